"""Writing outputs safely: check a target never destroys what the user has, then build it atomically.

:func:`check_new_output` refuses a target whose writing would delete or mix with the user's files;
:func:`atomic_dir` builds under a temporary name next to the target and renames it into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorafit.errors import LorafitError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_new_output(target: str | os.PathLike, overwrite: bool,
                     protected: dict[str, str | os.PathLike] | None = None, flag: str = "--overwrite") -> Path:
    """``target`` resolved, if writing a new folder there destroys nothing the user has; else a one-line error.

    Never: the current folder or one above it, the home folder, the filesystem root, or a folder in
    ``protected`` (name → path: an input of the command, such as the adapter or the base model), nor a folder
    inside those inputs or containing them. A file, or a non-empty folder, is replaced only with ``flag``.
    """
    path = Path(target).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if path == Path(path.anchor) or path == home or _inside(cwd, path):
        where = "the current folder or one above it" if _inside(cwd, path) else "your home or the filesystem root"
        raise LorafitError(f"{target}: refusing to write there (it is {where}); give a new folder, "
                           f"e.g. {Path(target) / 'merged'}")
    for name, given in (protected or {}).items():
        p = Path(given).expanduser().resolve()
        if p.exists() and (_inside(path, p) or _inside(p, path)):
            raise LorafitError(f"{target}: that is {'inside ' if path != p else ''}the {name} folder {given}; "
                               f"write to a new folder, e.g. {p.parent / (p.name + '-merged')}")
    if path.is_file():
        raise LorafitError(f"{target}: is a file, not a folder; give a folder name (or remove the file)")
    names = sorted(c.name for c in path.iterdir()) if path.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise LorafitError(f"{target}: folder exists and is not empty ({len(names)} entries: {shown}); "
                           f"choose a new folder, or pass {flag} to replace it")
    return path


def ensure_writable_dir(target: str | os.PathLike, what: str) -> Path:
    """``target`` as a folder this process can write into (created if missing); else a one-line error naming
    ``what`` (e.g. "output_dir"). Called before any slow work, so a bad path fails in a second."""
    path = Path(target).expanduser()
    if path.exists() and not path.is_dir():
        raise LorafitError(f"{what} {target}: is a file, not a folder; give a folder name")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise LorafitError(f"{what} {target}: cannot write there ({e.strerror or e}); give a folder you can write to"
                           ) from None
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; if the block succeeds it replaces ``target``, else it is removed.

    Readers never see a half-written ``target``: it is either the old folder or the complete new one (the
    rename is atomic; between removing the old and renaming the new, ``target`` is briefly absent).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
