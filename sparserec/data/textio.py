"""Reading (gzip) text files line by line, with errors that name the file and the line.

Every failure while reading (a truncated or corrupt gzip, a plain file named `.gz`, bytes that are
not UTF-8) is a ValueError naming the file and the line being read; a UTF-8 byte-order mark at the
start of a file is dropped. `recording_files` collects the paths opened, so a run can fingerprint
the files its data came from.
"""
import contextlib
import gzip
import math
import os
import zlib

_recorders = []  # lists collecting the absolute path of every file opened (see recording_files)


@contextlib.contextmanager
def recording_files():
    """Within the block, every file `open_text` opens is appended (once, absolute) to the yielded list."""
    files = []
    _recorders.append(files)
    try:
        yield files
    finally:
        _recorders.remove(files)


def open_text(path):
    """Opens `path` for reading bytes; `.gz` files are decompressed on the fly (`read_lines` decodes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    absolute = os.path.abspath(path)
    for files in _recorders:
        if absolute not in files:
            files.append(absolute)
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_lines(path, max_lines: int | None = None):
    """Yields (line_number starting at 1, line without its newline); skips blank lines."""
    number = 0
    with open_text(path) as f:
        try:
            # Lines are decoded one by one (not by a text wrapper's chunks) so an error names its line.
            for number, raw in enumerate(f, start=1):
                if max_lines is not None and number > max_lines:
                    return
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise line_error(path, number, f"not UTF-8 text (byte {error.start + 1} of the line: "
                                                   f"{raw[error.start:error.start + 1]!r}); save the file as UTF-8"
                                     ) from None
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            what = ("not a gzip file (rename it without .gz if it is plain text)"
                    if isinstance(error, gzip.BadGzipFile) and number == 0
                    else f"truncated or corrupt gzip data ({error or type(error).__name__})")
            raise line_error(path, number + 1, what) from None


def line_error(path, line_number: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line_number}: {message}")


def split_fields(path, line_number: int, line: str, expected: int, sep: str = "\t") -> list:
    fields = line.split(sep)
    if len(fields) != expected:
        raise line_error(path, line_number, f"expected {expected} {'tab-separated ' if sep == chr(9) else ''}"
                                            f"fields, got {len(fields)}: {line[:80]!r}")
    return fields


def parse_number(path, line_number: int, text: str, what: str, kind=float):
    """`text` as an int or a finite float ("nan" / "inf" would silently break sorting and bands)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise line_error(path, line_number, f"{what} must be a{'n integer' if kind is int else ' finite number'}, "
                                            f"got {text!r}")
    return value


def require_events(path, count: int) -> None:
    """A file that yielded no events (empty, or a header only) is an error, not an empty dataset."""
    if count == 0:
        raise ValueError(f"{path}: no events (the file is empty or holds only a header)")
