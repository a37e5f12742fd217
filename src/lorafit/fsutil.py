"""Writing outputs safely: check a target never destroys what the user has, then build it atomically.

:func:`check_new_output` refuses a target whose writing would delete or mix with the user's files;
:func:`check_writable_dir` and :func:`check_new_file` check a folder or file target without creating anything;
:func:`atomic_dir` builds under a temporary name next to the target and renames it into place. What lorafit
writes gets the permissions the umask gives (not the owner-only ones of temporary files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorafit.errors import LorafitError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def display(path: str | os.PathLike) -> str:
    """``path`` as the user will recognise it: relative to the working directory when it lies below it."""
    p = Path(os.path.normpath(Path(path).absolute()))  # "examples/../runs/demo" reads as "runs/demo"
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def listing(names: Iterable[str], shown: int = 3) -> str:
    """``"4 entries: a, b, c, ..."`` for a one-line message."""
    names = sorted(names)
    more = ", ..." if len(names) > shown else ""
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'}: {', '.join(names[:shown])}{more}"


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
    names = [c.name for c in path.iterdir()] if path.is_dir() else []
    if names and not overwrite:
        raise LorafitError(f"{target}: folder exists and is not empty ({listing(names)}); "
                           f"choose a new folder, or pass {flag} to replace it")
    return path


def check_writable_dir(target: str | os.PathLike, what: str) -> Path:
    """``target`` if it is, or can be made, a folder this process writes into; else a one-line error naming
    ``what`` (e.g. "output_dir"). Creates nothing (a refused command leaves no folder behind), and is called
    before any slow work, so a bad path fails in a second."""
    path = Path(target).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:  # the nearest folder that is there
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == path else f"{display(existing)} "
        raise LorafitError(f"{what} {display(path)}: {where}is a file, not a folder; give a folder name")
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed where the OS allows: nothing shows in the folder
            pass
    except OSError as e:
        raise LorafitError(f"{what} {display(path)}: cannot write there ({e.strerror or e}); give a folder you can "
                           "write to") from None
    return path


def check_new_file(target: str | os.PathLike, what: str, force: bool, flag: str = "--force") -> Path:
    """``target`` if a file may be written there: it does not exist (or ``force``), it is not a folder, and its
    folder can be written; else a one-line error naming ``what`` (e.g. "--json"). Creates nothing."""
    path = Path(target).expanduser()
    if path.is_dir():
        raise LorafitError(f"{what} {target}: is a folder; give a file name")
    if path.exists() and not force:
        raise LorafitError(f"{what} {target}: exists; choose another name, or pass {flag} to replace it")
    check_writable_dir(path.parent, what)
    return path


def umask() -> int:
    """The process's umask (read without changing it where the OS shows it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open``/``mkdir`` would: temporary
    files and folders (mkstemp, mkdtemp) are owner-only, whatever the user's umask says. Only for what this
    process just wrote."""
    path, mask = Path(path), umask()

    def fix(p: Path) -> None:
        if p.is_symlink():
            return
        base = 0o777 if p.is_dir() else 0o666 | (p.stat().st_mode & 0o111)  # executables stay executable
        os.chmod(p, base & ~mask)

    fix(path)
    if path.is_dir():
        for p in path.rglob("*"):
            fix(p)


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file renamed into place)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object at ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; if the block succeeds it replaces ``target``, else it is removed.

    Readers never see a half-written ``target``: it is either the old folder or the complete new one (the
    rename is atomic; between removing the old and renaming the new, ``target`` is briefly absent). The
    result has the umask's permissions, not the temporary folder's owner-only ones. ``replace=False``: a
    ``target`` that holds files (one another process completed meanwhile) is kept as it is, never absent for a
    moment, and the rename onto it raises ``OSError`` (the new folder is removed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    """lorafit's own cache folder: ``$LORAFIT_CACHE``, else ``~/.cache/lorafit`` (the demo model, eval columns)."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))
