"""Reading (gzip) text files line by line, with errors that name the file and the line."""
import gzip
import math
import os


def open_text(path):
    """Opens `path` for reading text; `.gz` files are decompressed on the fly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def read_lines(path, max_lines: int | None = None):
    """Yields (line_number starting at 1, line without its newline); skips blank lines."""
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if max_lines is not None and number > max_lines:
                return
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


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
