"""One loader for every place training data lives, read through the `datasets` library.

    load_rows("data/train.jsonl")                      # JSON-lines, .json, .parquet or .arrow file
    load_rows("data/shards/")                          # a folder of such files (one kind)
    load_rows("saved/", split="test")                  # a Dataset/DatasetDict.save_to_disk folder
    load_rows("open-r1/OpenR1-Math-220k", subset="default")   # a Hugging Face Hub dataset id

`datasets` does the reading (Arrow-backed, memory-mapped, cached), so a multi-GB mixture does not have to
fit in memory. What it does not do is say where bad input is: its JSON error names neither file nor line.
So JSON-lines files are pre-scanned line by line first (UTF-8, JSON, one object per line; cheap next to
the Arrow conversion), and every failure becomes one `DataError` line naming the source, and the file and
line where known. `open_source` also keeps the row -> file:line map, so a recipe that finds a malformed
row can say where it is (`Source.where`; `Row`'s typed getters use it). `data_files` names the local files
behind a source without converting them, so the data can be fingerprinted by its bytes.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets

from dist_bench.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "arrow": "arrow"}
# File or folder names that mark a split in a downloaded Hub snapshot (data/train-00000-of-00003.parquet).
SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "dev", "eval"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """Loaded rows plus what is needed to say where row `index` came from."""

    name: str  # the source as given
    rows: datasets.Dataset
    kind: str | None = None  # jsonl | json | parquet | arrow; None for the Hub and save_to_disk folders
    files: list[Path] = field(default_factory=list)  # data files in row order
    lines: list[array] | None = None  # JSON-lines only: per file, the line number of each record
    _counts: list[int] | None = None

    def where(self, index: int) -> str:
        """`file:line: row i` for JSON-lines; `source: row i (file row k)` among several files; else
        `source: row i`. Row indices are 0-based, as in `rows[i]`."""
        if self.lines is not None:
            at, k = _locate(index, [len(numbers) for numbers in self.lines])
            return f"{self.files[at]}:{self.lines[at][k]}: row {index}"
        if len(self.files) > 1 and self.kind in ("parquet", "arrow"):
            if self._counts is None:
                self._counts = [_count_rows(path, self.kind) for path in self.files]
            at, k = _locate(index, self._counts)
            return f"{self.name}: row {index} ({self.files[at]} row {k})"
        return f"{self.name}: row {index}"


class Row:
    """One source row; its getters return a field's value or raise DataError on a wrong type."""

    def __init__(self, source: Source, index: int, values: dict[str, Any]) -> None:
        self.source, self.index, self.values = source, index, values

    def fail(self, field: str, expected: str, value: object) -> NoReturn:
        raise DataError(
            f"{self.source.where(self.index)}: field '{field}': expected {expected}, got {_type_of(value)}"
        )

    def text(self, field: str, *, nullable: bool = False) -> str | None:
        value = self.values.get(field)
        if isinstance(value, str) or (value is None and nullable):
            return value
        self.fail(field, "a string", value)

    def number(self, field: str) -> float | None:
        value = self.values.get(field)
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            return value
        self.fail(field, "a number", value)

    def items(self, field: str, item: type[str] | type[bool]) -> list[Any]:
        """A list whose elements are `item` or null; a null list is an empty one."""
        value = self.values.get(field)
        name = "string" if item is str else "boolean"
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(field, f"a list of {name}s", value)
        for at, element in enumerate(value):
            if element is not None and not isinstance(element, item):
                self.fail(f"{field}[{at}]", f"a {name}", element)
        return value

    def records(self, field: str, keys: tuple[str, ...]) -> list[dict[str, str | None]]:
        """A list of objects whose `keys` are strings or null (messages, examples); a null list is empty."""
        value = self.values.get(field)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(field, "a list of objects", value)
        for at, element in enumerate(value):
            if not isinstance(element, dict):
                self.fail(f"{field}[{at}]", "an object", element)
            for key in keys:
                if not isinstance(element.get(key), str | None):
                    self.fail(f"{field}[{at}].{key}", "a string", element[key])
        return value


def load_rows(source: str, *, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """The rows of `source` (see the module docstring for what it may be). Raises DataError."""
    return open_source(source, split=split, subset=subset).rows


def open_source(source: str, *, split: str = "train", subset: str | None = None) -> Source:
    """Like load_rows, keeping where each row came from.

    `split` picks a DatasetDict's split, a Hub split, or the files of one split in a folder laid out the
    Hub's way; a single file or a saved Dataset is one split already. `subset` is a Hub config name, for a
    Hub id or a downloaded snapshot folder (its README.md lists the configs).
    """
    place = _place(source, split, subset)
    if place.how in ("hub", "snapshot"):
        return _from_hub(source, split, subset, local=place.how == "snapshot")
    if place.how == "saved":
        return _saved(source, place.path, split)
    return _from_files(source, place.files, _file_kind(source, place.files))


def data_files(source: str, *, split: str = "train", subset: str | None = None) -> list[Path] | None:
    """The local files holding the rows that open_source(source, split=, subset=) reads, in row order: the
    data files themselves, or a save_to_disk folder's Arrow files. None where `datasets` picks the files
    from a dataset card (a Hub id, or a snapshot folder read with `subset`). For hashing what the data is
    without converting it: only a saved folder is opened (memory-mapped, nothing converted)."""
    place = _place(source, split, subset)
    if place.how in ("hub", "snapshot"):
        return None
    if place.how == "saved":
        return [Path(cached["filename"]) for cached in _saved(source, place.path, split).rows.cache_files]
    _file_kind(source, place.files)  # the same refusal of unknown or mixed kinds as open_source
    return place.files


@dataclass(frozen=True)
class _Place:
    """Where a source is read from, decided from the path alone: open_source and data_files agree on it."""

    how: str  # "hub" (an id), "snapshot" (a downloaded Hub folder, read with its card), "saved", "files"
    path: Path
    files: list[Path] = field(default_factory=list)


def _place(source: str, split: str, subset: str | None) -> _Place:
    path = Path(source).expanduser()
    if path.exists():
        if subset is not None:
            if (
                path.is_dir() and (path / "README.md").is_file()
            ):  # a downloaded Hub snapshot: its card's configs
                return _Place("snapshot", path)
            raise DataError(
                f"{source}: subset '{subset}' needs a Hub id or a Hub snapshot folder (with its README.md); "
                "or point at the subset's files"
            )
        if path.is_dir():
            if any(
                (path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json")
            ):
                return _Place("saved", path)
            return _Place("files", path, _folder_files(source, path, split))
        return _Place("files", path, [path])
    if _HUB_ID.match(source) and path.suffix.lower() not in SUFFIXES:
        return _Place("hub", path)
    # "not found" as in the other missing-input messages (split, model, task data)
    raise DataError(f"{source}: not found (no such file or folder)")


def _saved(source: str, path: Path, split: str) -> Source:
    with _quiet():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several kinds; all mean "not a readable saved dataset"
            raise DataError(f"{source}: not a readable save_to_disk folder ({_describe(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: split '{split}' not found (has: {', '.join(sorted(loaded))})")
        loaded = loaded[split]
    return Source(source, loaded)


def _folder_files(source: str, path: Path, split: str) -> list[Path]:
    """The folder's data files (recursively, hidden ones skipped), sorted. When every file belongs to a
    split by name (train-00000-of-00002.parquet, test.jsonl, data/train/part-0.arrow) only `split`'s are
    taken, so a downloaded Hub snapshot never mixes train and test."""
    files = sorted(
        found
        for found in path.rglob("*")
        if found.is_file()
        and found.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in found.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{source}: folder has no {', '.join(SUFFIXES)} files")
    splits = {found: _split_of(found.relative_to(path)) for found in files}
    if None in splits.values():  # some file belongs to no split: the folder is one dataset
        return files
    names = {name for name in splits.values() if name is not None}
    if split not in names:
        raise DataError(f"{source}: split '{split}' not found (has: {', '.join(sorted(names))})")
    return [found for found in files if splits[found] == split]


def _split_of(relative: Path) -> str | None:
    stem = re.split(r"[-_.]", relative.name, maxsplit=1)[0].lower()
    if stem in SPLIT_NAMES:
        return stem
    return next((part.lower() for part in relative.parts[:-1] if part.lower() in SPLIT_NAMES), None)


def _file_kind(source: str, files: list[Path]) -> str:
    unknown = [found for found in files if found.suffix.lower() not in SUFFIXES]
    if unknown:
        raise DataError(
            f"{source}: unknown file kind '{unknown[0].suffix or unknown[0].name}' (expected {', '.join(SUFFIXES)})"
        )
    kinds = sorted({SUFFIXES[found.suffix.lower()] for found in files})
    if len(kinds) > 1:
        raise DataError(f"{source}: folder mixes file kinds ({', '.join(kinds)}); keep one kind per folder")
    return kinds[0]


def _from_files(source: str, files: list[Path], kind: str) -> Source:
    lines = None
    if kind == "jsonl":
        lines = [_scan_jsonl(found) for found in files]
        if not any(lines):
            raise DataError(f"{source}: no records")
    with _quiet():
        try:
            rows = datasets.load_dataset(BUILDERS[kind], data_files=[str(f) for f in files], split="train")
        except Exception as err:  # Arrow, pandas and datasets errors alike: the file cannot be read as `kind`
            # Valid JSON-lines fail here when a field changes type between lines (one column, one type):
            # say which line and field rather than Arrow's or pandas' words, which name neither.
            changed = _type_change(files) if kind == "jsonl" else None
            raise DataError(changed or f"{source}: cannot be read as {kind} ({_describe(err)})") from None
    if lines is not None and len(rows) != sum(len(numbers) for numbers in lines):
        lines = None  # datasets split the lines differently: say `row i` only, never a wrong line
    return Source(source, rows, kind, files, lines)


def _from_hub(source: str, split: str, subset: str | None, *, local: bool = False) -> Source:
    """`datasets.load_dataset(id or snapshot folder, subset, split=split)`: the card's configs decide which
    files make the subset and split, exactly as on the Hub."""
    with _quiet():
        try:
            rows = datasets.load_dataset(source, subset, split=split)
        except Exception as err:  # offline, not cached, no such repo/config/split, auth: all one line
            what = (
                "cannot be loaded as a Hub snapshot"
                if local
                else "not a local path, nor loadable from the Hub"
            )
            raise DataError(f"{source}: {what} ({_describe(err)})") from None
    return Source(source, rows)


def _scan_jsonl(path: Path) -> array:
    """Line numbers of the records (blank lines skipped, as datasets skips them); the first bad line
    stops with `path:line: why`."""
    numbers = array("q")
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))  # so the error's column is on this line
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{line_no}: not a JSON object (a JSON {type(value).__name__})")
            numbers.append(line_no)
    return numbers


def _type_change(files: list[Path]) -> str | None:
    """`file:line: field 'f': a number here, a string on file:line` for the first top-level field whose
    JSON type differs from its first non-null value's (ints and floats are one kind: Arrow widens them);
    None when there is no such field. Only run after datasets failed: the files were scanned as valid."""
    first: dict[str, tuple[str, Path, int]] = {}
    for path in files:
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                if not text.strip():
                    continue
                for name, value in json.loads(text).items():
                    if value is None:
                        continue
                    kind = _type_of(value)  # ints and floats are both 'a number'
                    seen = first.setdefault(name, (kind, path, line_no))
                    if seen[0] != kind:
                        return (
                            f"{path}:{line_no}: field '{name}': {kind} here, {seen[0]} on {seen[1]}:{seen[2]} "
                            "(a field keeps one type on every line)"
                        )
    return None


def _locate(index: int, counts: list[int]) -> tuple[int, int]:
    for at, count in enumerate(counts):
        if index < count:
            return at, index
        index -= count
    raise IndexError(index)


def _count_rows(path: Path, kind: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as mapped:
        try:
            return pa.ipc.open_stream(mapped).read_all().num_rows
        except pa.ArrowInvalid:
            mapped.seek(0)
            return pa.ipc.open_file(mapped).read_all().num_rows


def _describe(err: BaseException) -> str:
    """The innermost cause, one line: datasets wraps the useful error in 'An error occurred while ...'."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets logs an error before raising it; we raise our own line, so its log would be a second one."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_KINDS = (
    (bool, "a boolean"),
    (int | float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "an object"),
)


def _type_of(value: object) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _KINDS if isinstance(value, kind)), type(value).__name__)
