"""Reading text files (data files, chat templates): UTF-8 by default, or a dataset's ``encoding:``.

UTF-8 is read with the ``utf-8-sig`` codec, so a file saved with a byte-order mark (as Windows tools do) reads
as the same text as one without: a BOM would otherwise break the first JSON line and rename the first CSV
column. A file that is binary, or is not text in the codec, raises :class:`NotText` saying where (line and
byte offset) and which encoding to suggest; the caller adds the file name and the fix for its config key.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

SNIFF_BYTES = 8000  # a NUL byte in the first 8000 bytes means binary (git's rule)
CHUNK = 1 << 20
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # UTF-32 LE first: it starts
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # like the UTF-16 LE mark
ICONV_NAMES = {"latin-1": "latin1"}


class NotText(Exception):
    """``str()`` is ``line 3 (byte 57): not UTF-8 text (0xe9)``.

    ``suggest`` is an encoding likely to read the file (None when there is no good guess) and ``binary``
    says the file holds NUL bytes, so it is probably no text file at all.
    """

    def __init__(self, line: int, offset: int, why: str, suggest: str | None = None, binary: bool = False):
        super().__init__(f"line {line} (byte {offset}): {why}")
        self.suggest = suggest
        self.binary = binary

    @property
    def iconv_name(self) -> str | None:
        """``suggest`` as iconv spells it."""
        return ICONV_NAMES.get(self.suggest, self.suggest) if self.suggest else None


def codec_for(encoding: str | None) -> str:
    """The codec to open a file with: any spelling of UTF-8 skips a leading byte-order mark."""
    if encoding is None or codecs.lookup(encoding).name == "utf-8":
        return "utf-8-sig"
    return encoding


def text_lines(path: Path, encoding: str | None = None, newline: str | None = "") -> Iterator[str]:
    """The decoded lines of ``path`` (line ends kept; ``newline`` as for :func:`open`).

    Raises :class:`NotText` (before any line when the start of the file looks binary) or :class:`OSError`.
    """
    codec = codec_for(encoding)
    with open(path, "rb") as fh:
        _sniff(fh.read(SNIFF_BYTES), codec)
    try:
        with open(path, encoding=codec, newline=newline) as fh:
            yield from fh
    except UnicodeDecodeError:
        # the text layer decodes in blocks and cannot say where: find the byte again
        raise _locate(path, codec) from None


def read_text(path: Path, encoding: str | None = None) -> str:
    """The whole file as text, newlines translated to ``\\n``; raises as :func:`text_lines`."""
    return "".join(text_lines(path, encoding, newline=None))


def _label(codec: str) -> str:
    return "UTF-8" if codec == "utf-8-sig" else codec


def _sniff(head: bytes, codec: str) -> None:
    """Catch UTF-16/32 files and binary files from their first bytes (both decode as UTF-8 when ASCII-only)."""
    if codecs.lookup(codec).name.startswith(("utf-16", "utf-32")):
        return  # NUL bytes are normal there
    for bom, enc in BOMS:
        if head.startswith(bom):
            raise NotText(1, 0, f"{enc.upper()} text (it starts with a {enc.upper()} byte-order mark), "
                                f"not {_label(codec)}", suggest=enc)
    nul = head.find(b"\0")
    if nul >= 0:
        raise NotText(head.count(b"\n", 0, nul) + 1, nul, "not a text file (it holds NUL bytes)", binary=True)


def _locate(path: Path, codec: str) -> NotText:
    """The first byte ``codec`` cannot decode: its line, file offset, value and an encoding to suggest."""
    decoder = codecs.getincrementaldecoder(codec)()
    pos = newlines = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object is what the decoder held (bytes left over + this chunk, minus a stripped BOM):
                # it ends where the chunk ends
                offset = max(0, pos + len(chunk) - len(e.object) + e.start)
                line = newlines + chunk[: max(0, offset - pos)].count(b"\n") + 1
                byte = e.object[e.start] if e.start < len(e.object) else None
                return _decode_problem(line, offset, byte, codec)
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            pos += len(chunk)
    return NotText(newlines + 1, pos, f"not {_label(codec)} text")  # pragma: no cover - decodes on a rescan


def _decode_problem(line: int, offset: int, byte: int | None, codec: str) -> NotText:
    shown = f" (0x{byte:02x})" if byte is not None else ""
    suggest = None
    if codec == "utf-8-sig" and byte is not None:
        # 0x80-0x9f are printable only in Windows-1252 (curly quotes, dashes, euro); elsewhere Latin-1 reads all
        suggest = "cp1252" if 0x80 <= byte <= 0x9F else "latin-1"
    return NotText(line, offset, f"not {_label(codec)} text{shown}", suggest=suggest)
