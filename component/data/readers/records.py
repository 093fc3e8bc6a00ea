"""Reading data files: records out of a file, each one counted, and the errors that name file:line.

The shared file layer of every reader (SFT and preference): containers (JSON lines, JSON array, object of
lists, CSV/TSV, parquet, optionally gzipped), `SourceReport` counts (`read == kept + sum(skipped)`), `Skip`
for a record a converter rejects, `convert_all` that turns each rejection into a counted skip, and the
format-name check shared by both readers.
"""

from __future__ import annotations

import csv
import difflib
import gc
import gzip
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from component.config.errors import InputError

logger = logging.getLogger(__name__)

# Per-reason warnings logged per file before switching to counting only (1.1M-line files).
_LOG_FIRST = 5


class DataFormatError(InputError):
    """A file cannot be read as the requested/detected format. The message names the file."""


@dataclass
class SourceReport:
    """What happened to one input file: one entry of data_report.json."""

    path: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skipped"] = dict(self.skipped)
        return out


class Skip(Exception):
    """Raised by a record converter: drop this record and count it under `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# Keys whose values are lists in known record layouts. A top-level object with one of these is a
# record, not a Safety-Prompts style {scenario: [records]} object.
_RECORD_LIST_KEYS = frozenset(
    {
        "conversations",
        "conversation",
        "messages",
        "history",
        "chosen",
        "rejected",
        "output",
        "tools",
        "prompt",
    }
)


def _looks_like_object_of_lists(obj: dict) -> bool:
    return bool(obj) and all(type(v) is list for v in obj.values()) and not (obj.keys() & _RECORD_LIST_KEYS)


def _is_json_object(line: str) -> bool:
    try:
        return type(json.loads(line)) is dict
    except json.JSONDecodeError:
        return False


class RecordReader:
    """Reads one file as a stream of raw records and keeps that file's counts and warnings.

    Containers: "lines" (JSON lines, whatever the extension), "array" (one JSON array, or a
    single JSON object treated as one record), "object" (JSON object of lists), "csv", "parquet".
    """

    def __init__(
        self,
        path: str,
        report: SourceReport,
        skip_bad_records: bool,
        log: logging.Logger = logger,
    ) -> None:
        self.path = path
        self.report = report
        self.skip_bad_records = skip_bad_records
        self.log = log
        self.container = "lines"
        self.object_keys: list[str] | None = None  # scenario names of an object-of-lists file

    # -- accounting --------------------------------------------------------------------------------
    def where(self, n: int) -> str:
        if self.container in ("lines", "csv"):
            return f"{self.path}:{n}"
        if self.container == "parquet":
            return f"{self.path} row {n}"
        return f"{self.path} item {n}"

    def skip(self, n: int, reason: str, detail: str = "", *, log: bool = True) -> None:
        skipped = self.report.skipped
        count = skipped.get(reason, 0) + 1
        skipped[reason] = count
        if log and count <= _LOG_FIRST:
            suffix = f": {detail}" if detail else ""
            self.log.warning("%s: skipped record (%s)%s", self.where(n), reason, suffix)
            if count == _LOG_FIRST:
                self.log.warning("%s: further '%s' skips are counted, not logged", self.path, reason)

    def bad_record(self, n: int, reason: str, message: str) -> None:
        """Unparseable data: an error in strict mode, a counted skip with skip_bad_records."""
        if not self.skip_bad_records:
            raise DataFormatError(f"{self.where(n)}: {message}")
        self.skip(n, reason, message)

    def finish(self) -> None:
        r = self.report
        if r.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in r.skipped.items())
            self.log.warning("%s: kept %d of %d records; skipped: %s", self.path, r.kept, r.read, reasons)
        if r.read and not r.kept:
            self.log.warning("%s: no records kept (format %s)", self.path, r.format)

    # -- reading -----------------------------------------------------------------------------------
    def records(self) -> Iterator[tuple[int, str | None, dict]]:
        """Yields (line/item/row number, object-of-lists key or None, record dict)."""
        name = self.path.removesuffix(".gz")
        ext = os.path.splitext(name)[1].lower()
        try:
            if ext == ".parquet":
                raw: Iterable[tuple[int, str | None, Any]] = self._parquet()
            elif ext in (".csv", ".tsv"):
                raw = self._csv("\t" if ext == ".tsv" else ",")
            else:
                raw = self._json()
            for n, key, rec in raw:
                if type(rec) is not dict:
                    self.skip(n, "not_an_object", f"got {type(rec).__name__}")
                    continue
                yield n, key, rec
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{utf8_error_position(self.path)}: not valid UTF-8 ({e.reason})") from None
        except (gzip.BadGzipFile, EOFError) as e:
            raise DataFormatError(f"{self.path}: broken gzip stream ({e})") from None

    def _open_text(self, newline: str | None = None):
        # utf-8-sig drops a leading BOM; universal newlines turn CRLF into LF.
        if self.path.endswith(".gz"):
            return gzip.open(self.path, "rt", encoding="utf-8-sig", newline=newline)
        return open(self.path, encoding="utf-8-sig", newline=newline)

    def _json(self) -> Iterator[tuple[int, str | None, Any]]:
        with self._open_text() as f:
            head: list[str] = []
            first = _next_content_line(f, head)
            if first is None:
                return
            start = first.lstrip()[:1]
            if start == "[":
                yield from self._whole(head, f)
                return
            if start == "{":
                try:
                    obj = json.loads(first)
                except json.JSONDecodeError:
                    # A pretty-printed object's first line is not a whole object; a JSON-lines file
                    # with a broken first line still has whole objects on the next lines.
                    second = _next_content_line(f, head)
                    if second is None or not _is_json_object(second):
                        yield from self._whole(head, f)
                        return
                else:
                    if type(obj) is dict and _looks_like_object_of_lists(obj):
                        # A compact (single-line) {scenario: [records]} file, unless more follows.
                        rest = f.read()
                        if not rest.strip():
                            yield from self._object_items(obj)
                            return
                        yield from self._lines(itertools.chain(head, rest.splitlines(keepends=True)))
                        return
            yield from self._lines(itertools.chain(head, f))

    def _lines(self, lines: Iterable[str]) -> Iterator[tuple[int, None, Any]]:
        self.container = "lines"
        report = self.report
        loads = json.loads
        decode_error = json.JSONDecodeError
        for n, line in enumerate(lines, 1):
            # json.loads accepts surrounding whitespace (incl. \r), so only blank lines need a test.
            if not line or line.isspace():
                continue
            report.read += 1
            try:
                rec = loads(line)
            except decode_error as e:
                self.bad_record(n, "malformed_json", _line_error(line, n, e))
                continue
            yield n, None, rec

    def _whole(self, head: list[str], f) -> Iterator[tuple[int, str | None, Any]]:
        text = "".join(head) + f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # Never fall back to the records before the damage: nobody could tell what was lost.
            raise DataFormatError(
                f"{self.path}:{e.lineno}:{e.colno}: invalid JSON, file not read: {e.msg}: "
                f"line {e.lineno} column {e.colno} (char {e.pos})"
            ) from None
        if type(obj) is list:
            self.container = "array"
            for i, rec in enumerate(obj, 1):
                self.report.read += 1
                yield i, None, rec
        elif type(obj) is dict and _looks_like_object_of_lists(obj):
            yield from self._object_items(obj)
        elif type(obj) is dict:
            self.container = "array"  # one pretty-printed record (e.g. MOSS's GitHub files)
            self.report.read += 1
            yield 1, None, obj
        else:
            kind = type(obj).__name__
            raise DataFormatError(f"{self.path}: top-level JSON is a {kind}, not an array or object")

    def _object_items(self, obj: dict) -> Iterator[tuple[int, str, Any]]:
        self.container = "object"
        self.object_keys = list(obj)
        n = 0
        for key, items in obj.items():
            for rec in items:
                n += 1
                self.report.read += 1
                yield n, key, rec

    def _csv(self, delimiter: str) -> Iterator[tuple[int, None, Any]]:
        self.container = "csv"
        # Long quoted answers exceed csv's default 128 KiB field limit.
        if csv.field_size_limit() < 1 << 30:
            csv.field_size_limit(1 << 30)
        with self._open_text(newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header: list[str] | None = None
            end = 0
            try:
                for row in reader:
                    start, end = end + 1, reader.line_num  # a quoted field may span lines
                    if not row or all(not c.strip() for c in row):
                        continue
                    if header is None:
                        header = [h.strip() for h in row]
                        continue
                    self.report.read += 1
                    if len(row) != len(header):
                        message = f"{len(row)} fields where the header has {len(header)}"
                        self.bad_record(start, "malformed_row", message)
                        continue
                    yield start, None, dict(zip(header, row, strict=True))
            except csv.Error as e:
                raise DataFormatError(f"{self.path}:{reader.line_num}: malformed CSV ({e})") from None

    def _parquet(self) -> Iterator[tuple[int, None, Any]]:
        import pyarrow as pa  # lazy: only parquet inputs pay the import
        import pyarrow.parquet as pq

        self.container = "parquet"
        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(f"{self.path}: not a readable parquet file ({e})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=8192):
            for rec in batch.to_pylist():
                n += 1
                self.report.read += 1
                yield n, None, rec


def _line_error(line: str, n: int, e: json.JSONDecodeError) -> str:
    """Decoder message with the file's line number (the decoder only saw one line)."""
    try:  # without the line break, a cut string reads as "Unterminated string", not a control char
        json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e2:
        e = e2
    return f"malformed JSON: {e.msg}: line {n} column {e.colno}"


def utf8_error_position(path: str) -> str:
    """file:line:column of the first byte that is not UTF-8 (the decoder only knows its buffer offset)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for n, line in enumerate(handle, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{path}:{n}:{len(line[: e.start].decode('utf-8', 'replace')) + 1}"
    except (OSError, EOFError):
        pass
    return path


def _next_content_line(f: Iterable[str], head: list[str]) -> str | None:
    """Next non-blank line of `f`; every line consumed is appended to `head` for replay."""
    for line in f:
        head.append(line)
        if not line.isspace():
            return line
    return None


def iter_records(
    path: str | os.PathLike[str],
    *,
    skip_bad_records: bool = False,
    report: SourceReport | None = None,
) -> Iterator[tuple[int, dict]]:
    """Raw records of a .json/.jsonl (optionally .gz), .csv/.tsv or .parquet file.

    Yields (line number for JSON lines/CSV, else 1-based item/row index, record). An object-of-lists
    file (Safety-Prompts) yields each list item as published (its items carry the key as "type").
    Blank lines are ignored and not counted; `report.read` counts every other line/item, and
    malformed lines (skip_bad_records=True) and non-object items are counted in `report.skipped`.
    """
    path = os.fspath(path)
    reader = RecordReader(path, report or SourceReport(path, "raw"), skip_bad_records)
    for n, _key, rec in reader.records():
        yield n, rec


def check_format(
    fmt: str | None,
    choices: tuple[str, ...],
    kind: str,
    path: str,
    other: tuple[str, ...] = (),
) -> str:
    if fmt is None:  # an unset per-file option
        return "auto"
    if fmt == "auto" or fmt in choices:
        return fmt
    msg = f"{path}: unknown {kind} format {fmt!r}; valid formats: auto, {', '.join(choices)}"
    if fmt in other:
        msg += f" ({fmt!r} is a format of the other reader)"
    close = difflib.get_close_matches(str(fmt), choices, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    raise DataFormatError(msg)


def convert_all(
    reader: RecordReader,
    records: Iterable[tuple[int, dict]],
    convert: Callable[[dict], Any],
) -> list:
    """Run `convert` on each record; every failure becomes a counted, logged skip."""
    out = []
    append = out.append
    # Millions of small acyclic objects make the cyclic GC rescan an ever larger heap (~30% of
    # the read time for 1.1M records); nothing here creates cycles, so pause it for the loop.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for n, rec in records:
            try:
                append(convert(rec))
            except Skip as s:
                reader.skip(n, s.reason, s.detail)
            except KeyError as e:
                reader.skip(n, f"missing_field:{e.args[0]}")
            except (TypeError, AttributeError, ValueError) as e:
                reader.skip(n, "bad_structure", str(e))
    finally:
        if gc_was_enabled:
            gc.enable()
    return out
