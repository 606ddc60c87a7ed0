"""Opening user files safely: what every reader checks before it trusts a path.

- :func:`require_regular_file`: the path names a non-empty regular file. Checked with ``stat``
  before any ``open``, because opening a named pipe for reading blocks until a writer appears
  (a hang with no message) and a folder or device is never data.
- :func:`read_text`: the file as UTF-8 text; other encodings are refused with the line and byte
  offset of the first undecodable byte (a Latin-1 or UTF-16 export would otherwise become
  mojibake captions, or crash far from the file).
- :func:`inside_root`: a path read from a data file stays inside the data folder, unless the
  config allows outside paths (``..`` or absolute paths in a downloaded annotation file could
  otherwise make training read anything on the disk).
"""

from __future__ import annotations

import json

import os
import stat
from pathlib import Path

from mmgen.errors import DataError


def require_regular_file(path: str | Path, what: str = "file", error: type[Exception] = DataError,
                         allow_empty: bool = False) -> Path:
    """``path`` if it names a regular file (non-empty unless ``allow_empty``); otherwise
    ``error`` naming it and saying what it is instead."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:  # permission, a loop of links, a name too long
        raise error(f"{path}: cannot access {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        kind = "named pipe" if stat.S_ISFIFO(info.st_mode) else "socket" if stat.S_ISSOCK(info.st_mode) else "device"
        raise error(f"{path}: is a {kind}, not a regular file; refusing to read it as a {what}")
    if info.st_size == 0 and not allow_empty:
        raise error(f"{path}: empty file (0 bytes), not a {what}")
    return path


def read_text(path: str | Path, what: str = "file", error: type[Exception] = DataError,
              allow_empty: bool = False) -> str:
    """The UTF-8 text of a regular file (a leading BOM dropped); ``error`` naming the file, the
    line and the byte for any other encoding."""
    path = require_regular_file(path, what, error, allow_empty)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        hint = " (UTF-16?)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise error(f"{path}, line {line}: not UTF-8 text{hint}: byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start} cannot be decoded; re-save the {what} as UTF-8") from None


def jsonl_records(path: Path, what: str = "file", allow_empty: bool = False):
    """``(line number, where, record)`` for each non-blank line of a UTF-8 JSONL file, ``where``
    naming the file and line; a line that is not a JSON object raises DataError naming it. Lines end at
    "\n" only: a JSON string may hold a raw U+2028, which splitlines() would cut at."""
    text = read_text(path, what, allow_empty=allow_empty)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON: {error.msg} (column {error.colno})") from error
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield number, where, record


def inside_root(path: Path, root: Path, where: str, key: str = "image path", allow_outside: bool = False) -> Path:
    """``root / path``, refusing (DataError naming ``where`` and ``key``) a path that leaves
    ``root`` (absolute, or climbing out with ``..``) unless ``allow_outside``."""
    full = Path(root) / path
    if allow_outside:
        return full
    if Path(path).is_absolute() or os.path.isabs(str(path)):
        raise DataError(f"{where}: {key} {str(path)!r} is absolute; paths must be relative to the data "
                        f"folder {root} (set allow_outside_paths: true to read files elsewhere)")
    # Lexically (``..`` collapsed, links not followed): a data folder whose files are links to
    # a bigger disk is a normal layout; a written path that climbs out is not.
    base = os.path.normpath(os.path.abspath(root))
    resolved = os.path.normpath(os.path.join(base, str(path)))
    if os.path.commonpath([base, resolved]) != base:
        raise DataError(f"{where}: {key} {str(path)!r} leaves the data folder {root} "
                        "(set allow_outside_paths: true to read files elsewhere)")
    return full


def replace_atomically(path: Path, write) -> Path:
    """``write(temporary_path)`` then rename it onto ``path``: a reader (another process writing
    the same generated file, as DDP ranks do) sees the old file or the whole new one, never a
    partial one."""
    import os

    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)
    return path


def require_fields(record, keys: tuple[str, ...], where: str, what: str) -> dict:
    """``record`` if it is a JSON object holding ``keys``; else DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected {what}, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing {missing}")
    return record
