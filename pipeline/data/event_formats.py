"""Input files of `ckv data prepare`: which format a file is, reading the wanted columns, list cells, and
short previews of bad values for error messages (docs/data_schema.md, "Input you bring").

Formats, by extension unless a separator is given:

    .csv .csv.gz                                   comma-separated text, header row
    .tsv .tsv.gz .inter .item .user                tab-separated text, header row, no quoting
                                                   (.inter / .item / .user: RecBole atomic files; their
                                                   ``name:type`` headers match the plain ``name``)
    .parquet .pq                                   Parquet (any column types; list columns for lists)
    anything else                                  refused, unless ``sep`` is given: then delimited text

``sep`` (``--sep``) is one character, or ``tab`` / ``\\t``, ``comma``, ``semicolon``, ``pipe``, ``space``.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from collectivekv.cachestore.store.data_error import DataError

CSV_SUFFIXES = (".csv", ".csv.gz")
TSV_SUFFIXES = (".tsv", ".tsv.gz", ".inter", ".item", ".user")
PARQUET_SUFFIXES = (".parquet", ".pq")
SEP_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
PREVIEW_CHARS = 40  # longest text of a value an error message shows
PREVIEW_ITEMS = 3  # list elements an error message shows


def parse_sep(sep: str | None) -> str | None:
    """``--sep`` as the one character it names (None stays None: the extension decides)."""
    if sep is None:
        return None
    char = SEP_NAMES.get(sep.lower(), sep)
    if len(char) != 1 or char in "\r\n\"":
        raise DataError(f"--sep {sep!r}: give one character (or one of {', '.join(SEP_NAMES)})")
    return char


@dataclass(frozen=True)
class FileFormat:
    """``kind`` "text" (with ``sep``) or "parquet"."""

    kind: str
    sep: str | None = None

    def describe(self) -> str:
        if self.kind == "parquet":
            return "Parquet"
        return {",": "CSV", "\t": "tab-separated text"}.get(str(self.sep), f"text separated by {self.sep!r}")


def file_format(path: Path, role: str, sep: str | None = None) -> FileFormat:
    """The format of ``path`` (module docstring); DataError naming the file when it has no known one."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return FileFormat("parquet")
    sep = parse_sep(sep)
    if sep is not None:
        return FileFormat("text", sep)
    if name.endswith(CSV_SUFFIXES):
        return FileFormat("text", ",")
    if name.endswith(TSV_SUFFIXES):
        return FileFormat("text", "\t")
    known = CSV_SUFFIXES + TSV_SUFFIXES + PARQUET_SUFFIXES
    raise DataError(f"{role} file {path}: unknown format; use one of {known}, or give the separator of a text "
                    "file with --sep (e.g. --sep tab)")


def _text_options(fmt: FileFormat) -> dict:
    # tab-separated files (MIND, RecBole) do not quote: a '"' inside a title is just a character
    quoting = csv.QUOTE_NONE if fmt.sep == "\t" else csv.QUOTE_MINIMAL
    return {"sep": fmt.sep, "quoting": quoting}


def match_columns(found: list[str], columns: Mapping[str, str]) -> dict[str, str]:
    """meaning -> the header name that holds it: the name itself, else a ``name:type`` header (RecBole).
    Meanings without a match are left out."""
    typed = {}
    for name in found:
        base = name.split(":", 1)[0]
        typed.setdefault(base, name)
    return {m: c if c in found else typed[c] for m, c in columns.items() if c in found or c in typed}


def read_header(path: str | Path, role: str, sep: str | None = None) -> list[str]:
    """The column names of a text or Parquet file; DataError naming the file when it is missing, empty or
    unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} file {path}: not found")
    fmt = file_format(path, role, sep)
    if path.stat().st_size == 0:
        raise DataError(f"{role} file {path}: empty file (0 bytes)")
    try:
        if fmt.kind == "text":
            return [str(c) for c in pd.read_csv(path, nrows=0, **_text_options(fmt)).columns]
        return list(pq.read_schema(path).names)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{role} file {path}: cannot read as {fmt.describe()}: {exc}") from exc


def read_frame(path: str | Path, columns: Mapping[str, str], role: str, *, sep: str | None = None,
               text: Collection[str] = ()) -> pd.DataFrame:
    """Read the named columns of a text or Parquet file; ``columns`` maps meaning -> column name.

    Returns a DataFrame whose columns are the meanings (e.g. "user"), in file row order. Meanings in
    ``text`` are read from text files as strings (ids keep their exact text: "0042" stays "0042").
    Dictionary / categorical columns come back as plain values.
    """
    path = Path(path)
    found = read_header(path, role, sep)
    fmt = file_format(path, role, sep)
    names = match_columns(found, columns)
    missing = [f"{meaning} column '{name}'" for meaning, name in columns.items() if meaning not in names]
    if missing:
        hint = ""
        if fmt.kind == "text" and len(found) == 1 and any(s in found[0] for s in ("\t", ";", "|", ",")):
            hint = f" (one column read with separator {fmt.sep!r}: give the file's separator with --sep)"
        raise DataError(f"{role} file {path}: missing {', '.join(missing)}; columns found: "
                        f"{[preview_text(c) for c in found][:50]}{hint}")
    wanted = list(dict.fromkeys(names.values()))
    try:
        if fmt.kind == "text":
            as_text = {names[m]: str for m in text if m in names}
            frame = pd.read_csv(path, usecols=wanted, dtype=as_text or None, low_memory=False,
                                **_text_options(fmt))
        else:
            frame = pq.read_table(path, columns=wanted).to_pandas()
    except (pd.errors.ParserError, pa.ArrowInvalid, ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{role} file {path}: cannot read as {fmt.describe()}: {exc}") from exc
    if len(frame) == 0:
        raise DataError(f"{role} file {path}: no rows (columns found: {found})")
    out = {}
    for meaning, name in names.items():
        col = frame[name].reset_index(drop=True)
        if isinstance(col.dtype, pd.CategoricalDtype | pd.StringDtype):
            col = col.astype(object).where(col.notna(), None)
        out[meaning] = col
    return pd.DataFrame(out)


def is_list_cell(value: object) -> bool:
    """A list-like cell (a Parquet list value arrives as a numpy array)."""
    return isinstance(value, list | tuple | np.ndarray)


def preview_text(value: object, limit: int = PREVIEW_CHARS) -> str:
    """``repr`` of a value cut to about ``limit`` characters; a list shows its first elements and its length."""
    if isinstance(value, np.generic):
        value = value.item()
    if is_list_cell(value):
        seq = list(value)  # type: ignore[arg-type]
        head = ", ".join(preview_text(v, 16) for v in seq[:PREVIEW_ITEMS])
        return f"[{head}, … ({len(seq)} values)]" if len(seq) > PREVIEW_ITEMS else f"[{head}]"
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def first_bad(mask: np.ndarray, values: pd.Series) -> str:
    """"first at row R (0-based, header excluded): <preview>" for the first True of ``mask``. R is the
    value's index label: its position in the file, or for list elements (an exploded column) its row."""
    pos = int(np.flatnonzero(mask)[0])
    row = values.index[pos]
    return f"first at row {row} (0-based, header excluded): {preview_text(values.iloc[pos])}"


def reject_lists(values: pd.Series, where: str, expected: str = "a single value") -> None:
    """DataError when a column that holds one value per row holds lists (a Parquet list column)."""
    if values.dtype != object:
        return
    lists = values.map(is_list_cell).to_numpy(bool)
    if lists.any():
        raise DataError(f"{where}: {int(lists.sum())} list value(s) where {expected} is expected, "
                        f"{first_bad(lists, values)}")
