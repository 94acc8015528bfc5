"""Load dataset rows from local files or the Hugging Face hub, and name bad rows precisely.

`load_rows` accepts

* a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (optionally ``.gz``/``.bz2``/
  ``.xz``/``.zst`` compressed);
* a local directory: the files of ``split`` are found the way `datasets` finds them
  (``train-*.jsonl``, ``data/test.parquet``, ... or ``data_files``), then loaded one by one
  so that every row still knows its file;
* anything else is taken as a hub dataset ID and passed to `datasets.load_dataset`.

A missing or unreadable file raises `DataError` naming it. Later stages report bad rows with
`DataError` too, located through `Rows.locate`: for JSON Lines and CSV files by the 1-based line of
the file where the row starts (blank lines and the CSV header counted, as an editor shows them), for
JSON arrays, parquet and hub data by the 1-based row: ``data/train.jsonl, line 4, field 'chosen':
expected a string, a list of messages or a list of token ids, got int``.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}

# CSV cells are read as written: an empty cell is "" (not a missing value), and text such as
# "NA" or "None" stays text.
CSV_OPTIONS = {"keep_default_na": False}


class DataError(ValueError):
    """A problem with the data, located by file, 1-based row (or line: `unit`) and field where known."""

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        unit: str = "row",
    ) -> None:
        self.reason = reason
        self.file = file
        self.row = row
        self.field = field
        self.unit = unit
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"{self.unit} {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def located(self, file: str | None, row: int | None, unit: str = "row") -> DataError:
        """The same error with its file and 1-based row (or line) filled in."""
        return DataError(self.reason, file=file, row=row, field=self.field, unit=unit)

    def __reduce__(self):
        init = functools.partial(type(self), file=self.file, row=self.row, field=self.field, unit=self.unit)
        return init, (self.reason,)


@dataclass(frozen=True)
class Location:
    """Where a row is, as a user finds it: `file`, and `number` in `unit` ("line" of the file for
    JSON Lines / CSV, 1-based "row" otherwise)."""

    file: str
    number: int
    unit: str

    def __iter__(self) -> Iterator[Any]:  # `file, number, unit = rows.locate(i)`
        return iter((self.file, self.number, self.unit))

    def __str__(self) -> str:
        return f"{self.file}, {self.unit} {self.number}"


@dataclass(frozen=True)
class Rows(Sequence[dict[str, Any]]):
    """Rows of a loaded dataset, each traceable to its file and row there.

    ``parts[k]`` holds the rows of ``files[k]``, kept apart so that each file has its own
    column types (one file's bad types cannot break the others).
    """

    parts: tuple[datasets.Dataset, ...]
    files: tuple[str, ...]
    paths: tuple[str | None, ...] = ()  # the local file behind each part (None: hub data)

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        """Index of the first row of each part."""
        return tuple(itertools.accumulate((len(part) for part in self.parts[:-1]), initial=0))

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        part, row = self._part_and_row(index % len(self))
        return self.parts[part][row]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.chain.from_iterable(self.parts)

    def locate(self, index: int) -> Location:
        """Where row ``index`` is: its file, and the line of the file where it starts (JSON Lines,
        CSV) or its 1-based row in that file (JSON arrays, parquet, hub data)."""
        part, row = self._part_and_row(index)
        lines = self._line_numbers(part)
        if lines is not None:
            return Location(self.files[part], lines[row], "line")
        return Location(self.files[part], row + 1, "row")

    @functools.cached_property
    def _line_maps(self) -> dict[int, list[int] | None]:
        return {}

    def _line_numbers(self, part: int) -> list[int] | None:
        if part not in self._line_maps:  # read each file once, and only when a row is located
            path = self.paths[part] if part < len(self.paths) else None
            lines = None if path is None else row_line_numbers(Path(path), len(self.parts[part]))
            self._line_maps[part] = lines
        return self._line_maps[part]

    def _part_and_row(self, index: int) -> tuple[int, int]:
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    @property
    def dataset(self) -> datasets.Dataset:
        """All rows as one `datasets.Dataset` (the files must have the same columns and types)."""
        if len(self.parts) == 1:
            return self.parts[0]
        try:
            return datasets.concatenate_datasets(list(self.parts))
        except Exception as err:
            raise DataError(f"files do not share column types: {err}", file=self.files[0]) from err


def load_rows(
    source: str | Path,
    *,
    split: str = "train",
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
) -> Rows:
    """Load the rows of ``split`` from a local file, a local directory or a hub dataset ID.

    For a single file ``split`` may slice (``"train[:100]"``); the whole file is the
    ``"train"`` split. For a directory, ``data_files`` (relative to it) overrides the automatic
    file discovery, and ``split`` must be a split name. For a hub ID both are passed on.
    """
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        return Rows((_load_file(path, name, split),), (name,), (str(path),))
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _load_saved(path, name, split)
    if path.is_dir():
        return _load_dir(path, name, split, data_files)
    if _looks_local(name):
        raise DataError("no such file or directory", file=name)
    try:
        dataset = datasets.load_dataset(name, split=split, data_files=data_files)
    except Exception as err:  # network, missing split, bad files: all name the source
        raise DataError(f"cannot load dataset: {err}", file=name) from err
    return Rows((dataset,), (name,))


def _load_saved(path: Path, name: str, split: str) -> Rows:
    """A directory written by `Dataset.save_to_disk` (its rows are the "train" split) or
    `DatasetDict.save_to_disk` (the rows of `split`); a split may slice: ``"train[:100]"``,
    ``"train[10%:]"``."""
    match = re.fullmatch(r"(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", split.strip())
    if match is None:
        raise DataError(f"cannot read the split {split!r} (e.g. 'train', 'train[:100]')", file=name)
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"cannot read the saved dataset: {err}", file=name) from err
    split_name, start, stop = match.groups()
    if isinstance(saved, datasets.DatasetDict):
        if split_name not in saved:
            raise DataError(f"no split {split_name!r} (splits: {', '.join(sorted(saved))})", file=name)
        saved = saved[split_name]
    elif split_name != "train":
        raise DataError(f"a saved Dataset has one split, 'train'; got {split_name!r}", file=name)
    if start is not None or stop is not None:
        n = len(saved)

        def index(bound: str | None, default: int) -> int:
            if bound is None:
                return default
            value = round(float(bound[:-1]) * n / 100) if bound.endswith("%") else int(bound)
            return min(max(value + n if value < 0 else value, 0), n)

        saved = saved.select(range(index(start, 0), max(index(stop, n), index(start, 0))))
    return Rows((saved,), (name,))


def _load_dir(path: Path, name: str, split: str, data_files: Any) -> Rows:
    try:
        builder = datasets.load_dataset_builder(str(path), data_files=data_files)
    except Exception as err:
        raise DataError(f"cannot find data files: {err}", file=name) from err
    split_files = {str(key): value for key, value in (builder.config.data_files or {}).items()}
    if split not in split_files:
        found = ", ".join(sorted(split_files)) or "none"
        raise DataError(f"no files for split {split!r} (splits found: {found})", file=name)
    files = [_shown_name(Path(file), path, name) for file in split_files[split]]
    parts = [
        _load_file(Path(file), shown, "train", builder.name)
        for file, shown in zip(split_files[split], files, strict=True)
    ]
    return Rows(tuple(parts), tuple(files), tuple(str(f) for f in split_files[split]))


def _load_file(path: Path, name: str, split: str, fmt: str | None = None) -> datasets.Dataset:
    fmt = fmt or _format_of(path, name)
    options = CSV_OPTIONS if fmt == "csv" else {}
    if fmt in ("json", "csv") and path.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv"):
        _check_text(path, name)
    try:
        with _quiet_datasets():  # its reader logs the failure itself; ours says where
            return datasets.load_dataset(fmt, data_files=str(path), split=split, **options)
    except Exception as err:
        cause = err.__cause__ or err
        if fmt == "json":
            _locate_json_error(path, name)
        raise DataError(f"cannot read {fmt} file: {cause}", file=name) from err


def _check_text(path: Path, name: str) -> None:
    """An empty file, or one that is not UTF-8 text (a binary file under a text suffix), named so
    before a reader says something vaguer."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataError("the file is empty: no rows", file=name)
    if b"\0" in head:
        at = head.index(bytes(1)) + 1
        raise DataError(f"not a text file (a NUL byte at byte {at}): is it binary?", file=name)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < 1 << 16 or e.start < len(head) - 4:  # not a character cut by the 64 KiB window
            raise DataError(f"not UTF-8 text (byte {e.start + 1}): is it binary?", file=name) from None


def _locate_json_error(path: Path, name: str) -> None:
    """Re-read a JSON / JSON Lines file that the reader refused with Python's json, and raise the
    first error with its line and column (the reader reports a byte offset or a block's row)."""
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document (an array of rows)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            where = {"file": name, "row": e.lineno, "unit": "line"}
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", **where) from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            where = {"file": name, "row": number, "unit": "line"}
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", **where) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object per line, got {type(value).__name__}", file=name,
                            row=number, unit="line")  # fmt: skip


class _quiet_datasets:
    """Raise the `datasets` logger's level while a file is read: its JSON reader logs a failure at
    ERROR level before raising it, which would print above our one-line message."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("datasets")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _open_text(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "rt", encoding="utf-8", newline="")
    if suffix == ".zst":
        import io

        import zstandard  # installed with datasets' zstd support; else ImportError -> rows numbered

        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def row_line_numbers(path: Path, num_rows: int) -> list[int] | None:
    """The 1-based line of `path` where each of its `num_rows` rows starts: the non-blank lines of a
    JSON Lines file, the records after the header of a CSV file (a quoted cell may span lines). None
    for other formats, or when the count does not match what `datasets` read (then rows are numbered)."""
    try:
        fmt = _format_of(path, str(path))
        starts: list[int] = []
        with _open_text(path) as f:
            if fmt == "json":
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        if not starts and line.lstrip().startswith("["):
                            return None  # a JSON array: rows, not lines
                        starts.append(number)
            elif fmt == "csv":
                import csv

                reader = csv.reader(f)
                line = 1
                for record in reader:
                    if record:  # pandas skips blank lines
                        starts.append(line)
                    line = reader.line_num + 1
                starts = starts[1:]  # the header
            else:
                return None
    except (OSError, ValueError, ImportError, UnicodeDecodeError, DataError):
        return None
    return starts if len(starts) == num_rows else None


def _shown_name(file: Path, root: Path, root_name: str) -> str:
    """``file`` as the user would write it: under the directory name they gave."""
    try:
        return str(Path(root_name) / file.relative_to(root.resolve()))
    except ValueError:
        return str(file)


def _format_of(path: Path, name: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    if not suffixes or suffixes[-1] not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise DataError(f"unknown file type (expected one of {known})", file=name)
    return FORMATS[suffixes[-1]]


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub ID like ``org/name``."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or "\\" in name
        or any(s in FORMATS or s in COMPRESSIONS for s in suffixes)
    )
