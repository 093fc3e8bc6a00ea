"""SFT dataset readers: a publisher's file layout -> canonical `Conversation` records.

Readers never tokenize. They parse, map fields to turns, and count every record: each record
seen is either kept or skipped with a reason (`SourceReport.skipped`), so
`read == kept + sum(skipped.values())` always holds. See docs/data.md for every format.

The file-level code here (`iter_records`, `_Reader`) is shared with `preference_readers`.
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
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from component.conversation import Conversation, Turn

__all__ = [
    "MOSS_TOOL_MODES",
    "SFT_FORMATS",
    "DataFormatError",
    "SourceReport",
    "detect_sft_format",
    "iter_records",
    "read_sft_file",
]

logger = logging.getLogger(__name__)

SFT_FORMATS: tuple[str, ...] = (
    "belle",
    "firefly",
    "moss",
    "moss_firefly",
    "safety_prompts",
    "alpaca",
    "sharegpt",
    "openai",
)
MOSS_TOOL_MODES: tuple[str, ...] = ("skip", "strip")

# Per-reason warnings logged per file before switching to counting only (1.1M-line files).
_LOG_FIRST = 5


class DataFormatError(ValueError):
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


class _Skip(Exception):
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


class _Reader:
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
            raise DataFormatError(f"{self.path}: not valid UTF-8 ({e})") from None
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
    reader = _Reader(path, report or SourceReport(path, "raw"), skip_bad_records)
    for n, _key, rec in reader.records():
        yield n, rec


# -- format names and detection --------------------------------------------------------------------


def _check_format(
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


_PREFERENCE_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")

SFT_DETECTION_KEYS: dict[str, str] = {
    "moss": "chat",
    "moss_firefly": "conversation",
    "sharegpt": "conversations",
    "openai": "messages",
    "firefly": "target (or kind)",
    "belle": "instruction, keys within {instruction, input, output}, JSON-lines file",
    "alpaca": "instruction (JSON array, or extra keys such as system/history)",
    "safety_prompts": "prompt + response",
}


def detect_sft_format(record: dict, path: str, *, json_lines: bool | None = None) -> str:
    """The SFT format of `record` (the file's first record), judged by its keys.

    BELLE and alpaca share instruction/input/output; `json_lines=True` (the file is one object per
    line, as BELLE publishes) with no other keys gives "belle", otherwise "alpaca". Both map the
    same way. Raises DataFormatError naming the file, the keys seen and the known formats.
    """
    keys = record.keys()
    if any(k in keys for k in _PREFERENCE_KEYS):
        raise DataFormatError(
            f"{path}: records look like preference data (keys {sorted(keys)}); read them with "
            "read_preference_file, or pass an SFT format explicitly"
        )
    if "chat" in keys:
        return "moss"
    if "conversation" in keys:
        return "moss_firefly"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "openai"
    if "target" in keys or "kind" in keys:
        return "firefly"
    if "instruction" in keys:
        if json_lines and keys <= {"instruction", "input", "output"}:
            return "belle"
        return "alpaca"
    if "prompt" in keys and "response" in keys:
        return "safety_prompts"
    known = "; ".join(f"{k}: {v}" for k, v in SFT_DETECTION_KEYS.items())
    raise DataFormatError(
        f"{path}: cannot detect the SFT format from the first record's keys {sorted(keys)}; "
        f"known formats (detection keys): {known}; pass format= explicitly"
    )


# -- shared field helpers (also used by preference_readers) ----------------------------------------


def _text(rec: dict, key: str) -> str:
    """rec[key] as a string; KeyError (-> missing_field:key) when absent."""
    v = rec[key]
    if type(v) is str:
        return v
    if v is None:
        raise _Skip(f"missing_field:{key}")
    raise _Skip(f"bad_field:{key}", f"expected a string, got {type(v).__name__}")


def _blank(s: str) -> bool:
    return not s or s.isspace()


def _join_instruction(instruction: str, inp: Any) -> str:
    """alpaca/BELLE/comparison prompt: instruction, then input on its own line when present."""
    if type(inp) is not str or _blank(inp):
        return instruction
    if _blank(instruction):
        return inp
    return f"{instruction}\n{inp}"


def _alpaca_history(rec: dict) -> list[Turn]:
    """alpaca-style history [[query, answer], ...] -> turns."""
    history = rec.get("history")
    if not history:
        return []
    if type(history) is not list:
        raise _Skip("bad_field:history", "expected a list of [query, answer] pairs")
    turns = []
    for pair in history:
        if type(pair) not in (list, tuple) or len(pair) != 2 or not all(type(x) is str for x in pair):
            raise _Skip("bad_field:history", "expected a list of [query, answer] pairs")
        turns.append(Turn(pair[0], pair[1]))
    return turns


def _optional_system(rec: dict) -> str | None:
    system = rec.get("system")
    if system is None or (type(system) is str and _blank(system)):
        return None
    if type(system) is not str:
        raise _Skip("bad_field:system", f"expected a string, got {type(system).__name__}")
    return system


def _check_turns(turns: list[Turn]) -> None:
    for t in turns:
        if _blank(t.user):
            raise _Skip("empty_prompt")
        if _blank(t.assistant):
            raise _Skip("empty_reply")


# Speaker names -> canonical roles. "tool" covers every tool-call/tool-result role.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "tool",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_OPENAI_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


def _declares_tools(rec: dict) -> bool:
    """A non-empty `tools` column (list, or a JSON string as in glaive data)."""
    tools = rec.get("tools")
    if not tools:
        return False
    if type(tools) is str:
        return tools.strip() not in ("", "[]", "null", "{}")
    return True


def _sharegpt_messages(messages: Any, field_name: str) -> list[tuple[str, str]]:
    if type(messages) is not list:
        raise _Skip(f"bad_field:{field_name}", "expected a list of messages")
    out = []
    for m in messages:
        if type(m) is not dict:
            raise _Skip(f"bad_field:{field_name}", "expected a list of messages")
        role = _SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise _Skip("unknown_role", f"from={m['from']!r}")
        out.append((role, m["value"] if role == "tool" else _text(m, "value")))
    return out


def _openai_messages(messages: Any, field_name: str) -> list[tuple[str, str]]:
    if type(messages) is not list:
        raise _Skip(f"bad_field:{field_name}", "expected a list of messages")
    out = []
    for m in messages:
        if type(m) is not dict:
            raise _Skip(f"bad_field:{field_name}", "expected a list of messages")
        role = _OPENAI_ROLES.get(m["role"])
        if role is None:
            raise _Skip("unknown_role", f"role={m['role']!r}")
        if role == "tool" or m.get("tool_calls") or m.get("function_call"):
            out.append(("tool", ""))
            continue
        out.append((role, _text(m, "content")))
    return out


def _split_dialogue(
    messages: list[tuple[str, str]],
    *,
    ends_with: str,
) -> tuple[str | None, list[Turn], str | None]:
    """(system, complete user/assistant turns, trailing user message or None).

    An optional leading system message, then strictly alternating user/assistant messages that
    end with `ends_with` ("assistant" for SFT, "user" for a preference prompt).
    """
    if any(role == "tool" for role, _ in messages):
        raise _Skip("uses_tools")
    system = None
    start = 0
    if messages and messages[0][0] == "system":
        system = None if _blank(messages[0][1]) else messages[0][1]
        start = 1
    body = messages[start:]
    if not body or body[-1][0] != ends_with:
        raise _Skip("bad_turn_order", f"the conversation must end with a {ends_with} message")
    turns = []
    for i in range(0, len(body) - 1 if ends_with == "user" else len(body), 2):
        pair = body[i : i + 2]
        if len(pair) != 2 or pair[0][0] != "user" or pair[1][0] != "assistant":
            raise _Skip("bad_turn_order", "messages must alternate user/assistant after an optional system")
        turns.append(Turn(pair[0][1], pair[1][1]))
    last_user = None
    if ends_with == "user":
        if len(body) % 2 != 1:
            raise _Skip("bad_turn_order", "messages must alternate user/assistant after an optional system")
        last_user = body[-1][1]
    return system, turns, last_user


# -- SFT converters: raw record -> Conversation (or raise _Skip / KeyError) ------------------------


def _conv_alpaca(rec: dict) -> Conversation:
    user = _join_instruction(_text(rec, "instruction"), rec.get("input"))
    turns = [*_alpaca_history(rec), Turn(user, _text(rec, "output"))]
    _check_turns(turns)
    return Conversation(turns=turns, system=_optional_system(rec))


def _conv_firefly(rec: dict) -> Conversation:
    turn = Turn(_text(rec, "input"), _text(rec, "target"))
    _check_turns([turn])
    return Conversation(turns=[turn])


def _conv_safety(rec: dict) -> Conversation:
    # The response is kept raw: many start with "\n\n", and trimming is the template's choice.
    turn = Turn(_text(rec, "prompt"), _text(rec, "response"))
    _check_turns([turn])
    return Conversation(turns=[turn])


def _conv_moss_firefly(rec: dict) -> Conversation:
    conversation = rec["conversation"]
    if type(conversation) is not list or not conversation:
        raise _Skip("bad_field:conversation", "expected a non-empty list of {human, assistant}")
    turns = []
    for t in conversation:
        if type(t) is not dict:
            raise _Skip("bad_field:conversation", "expected a non-empty list of {human, assistant}")
        turns.append(Turn(_text(t, "human"), _text(t, "assistant")))
    _check_turns(turns)
    return Conversation(turns=turns, system=_optional_system(rec))


def _conv_sharegpt(rec: dict) -> Conversation:
    if _declares_tools(rec):
        # Replies in such conversations refer to a tool list the model would never see.
        raise _Skip("uses_tools", "declares tools")
    messages = _sharegpt_messages(rec["conversations"], "conversations")
    system, turns, _ = _split_dialogue(messages, ends_with="assistant")
    _check_turns(turns)
    return Conversation(turns=turns, system=system or _optional_system(rec))


def _conv_openai(rec: dict) -> Conversation:
    if _declares_tools(rec):
        raise _Skip("uses_tools", "declares tools")
    system, turns, _ = _split_dialogue(_openai_messages(rec["messages"], "messages"), ends_with="assistant")
    _check_turns(turns)
    return Conversation(turns=turns, system=system)


def _moss_strip(text: str, prefix: str, end: str) -> str:
    """'<|Human|>: hi<eoh>\\n' -> 'hi'."""
    return text.strip().removeprefix(prefix).removesuffix(end).strip()


# Citations of search results ("<sup><|1|></sup>") point at tool output that is not kept.
_MOSS_CITATION = re.compile(r"(?:<sup>)?<\|\d+\|>(?:</sup>)?")


def _turn_number(key: str) -> int:
    try:
        return int(key.rpartition("_")[2])
    except ValueError:
        raise _Skip("bad_field:chat", f"unexpected turn key {key!r}") from None


def _make_moss(keep_system_prompt: bool, moss_tools: str) -> Callable[[dict], Conversation]:
    strip_tools = moss_tools == "strip"

    def convert(rec: dict) -> Conversation:
        chat = rec["chat"]
        if type(chat) is not dict or not chat:
            raise _Skip("bad_field:chat", "expected a non-empty {turn_N: {...}} object")
        turns = []
        # Sorted by number: "turn_10" must follow "turn_9" whatever the key order.
        for _, t in sorted(chat.items(), key=lambda kv: _turn_number(kv[0])):
            if type(t) is not dict:
                raise _Skip("bad_field:chat", "expected each turn to be an object")
            command = _moss_strip(t.get("Commands") or "", "<|Commands|>:", "<eoc>")
            if command and command != "None" and not strip_tools:
                raise _Skip("uses_tools", command[:80])
            reply = _moss_strip(_text(t, "MOSS"), "<|MOSS|>:", "<eom>")
            if "<|" in reply:
                reply = _MOSS_CITATION.sub("", reply).strip()
            turns.append(Turn(_moss_strip(_text(t, "Human"), "<|Human|>:", "<eoh>"), reply))
        _check_turns(turns)
        system = None
        if keep_system_prompt:
            meta = rec.get("meta_instruction")
            if type(meta) is str and not _blank(meta):
                system = meta.strip()
        return Conversation(turns=turns, system=system)

    return convert


def _sft_converter(fmt: str, keep_system_prompt: bool, moss_tools: str) -> Callable[[dict], Conversation]:
    if fmt == "moss":
        return _make_moss(keep_system_prompt, moss_tools)
    return {
        "belle": _conv_alpaca,
        "alpaca": _conv_alpaca,
        "firefly": _conv_firefly,
        "safety_prompts": _conv_safety,
        "moss_firefly": _conv_moss_firefly,
        "sharegpt": _conv_sharegpt,
        "openai": _conv_openai,
    }[fmt]


def _convert_all(
    reader: _Reader,
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
            except _Skip as s:
                reader.skip(n, s.reason, s.detail)
            except KeyError as e:
                reader.skip(n, f"missing_field:{e.args[0]}")
            except (TypeError, AttributeError, ValueError) as e:
                reader.skip(n, "bad_structure", str(e))
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def read_sft_file(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    skip_bad_records: bool = False,
    keep_system_prompt: bool = False,
    safety_scenarios: list[str] | None = None,
    moss_tools: str = "skip",
) -> tuple[list[Conversation], SourceReport]:
    """Read one SFT file into Conversations and its SourceReport.

    format: one of SFT_FORMATS or "auto" (detected from the first record's keys).
    skip_bad_records: count malformed JSON lines / CSV rows as skips instead of raising.
    keep_system_prompt: MOSS only: use meta_instruction as the system prompt (other formats'
        system prompts are per-record data and always kept).
    safety_scenarios: safety_prompts only (ignored for other formats): scenario names to keep
        (None = all); the others are counted as `scenario_excluded`. An unknown name is a
        DataFormatError naming the file and listing its scenarios.
    moss_tools: MOSS only: "skip" drops conversations that call a tool (`uses_tools`); "strip"
        keeps them with only the Human/MOSS text (citation markers removed).
    """
    path = os.fspath(path)
    fmt = _check_format(format, SFT_FORMATS, "SFT", path, _preference_format_names())
    if moss_tools not in MOSS_TOOL_MODES:
        raise ValueError(f"moss_tools must be one of {MOSS_TOOL_MODES}, got {moss_tools!r}")
    if isinstance(safety_scenarios, str):
        safety_scenarios = [safety_scenarios]
    wanted = None if safety_scenarios is None else set(safety_scenarios)
    report = SourceReport(path=path, format=fmt)
    reader = _Reader(path, report, skip_bad_records)
    seen_scenarios: list[str] = []
    checked = False

    def check_scenarios(available: list[str]) -> None:
        unknown = sorted(wanted - set(available)) if wanted is not None else []
        if unknown:
            raise DataFormatError(
                f"{path}: unknown Safety-Prompts scenario(s) {unknown}; this file has: {', '.join(available)}"
            )

    def selected() -> Iterator[tuple[int, dict]]:
        nonlocal fmt, checked, wanted
        for n, key, rec in reader.records():
            if not checked:
                if fmt == "auto":
                    fmt = report.format = detect_sft_format(rec, path, json_lines=reader.container == "lines")
                if wanted is not None and fmt != "safety_prompts":
                    # The option may be set once for a whole mix of files; it only selects Safety-Prompts.
                    logger.info("%s: safety_scenarios ignored for format %s", path, fmt)
                    wanted = None
                if reader.object_keys is not None and wanted is not None:
                    check_scenarios(reader.object_keys)
                checked = True
            if wanted is not None:
                scenario = key if key is not None else rec.get("type")
                if reader.object_keys is None and scenario not in seen_scenarios:
                    seen_scenarios.append(scenario)
                if scenario not in wanted:
                    reader.skip(n, "scenario_excluded", log=False)
                    continue
            yield n, rec

    convs: list[Conversation] = []
    # The converter depends on the detected format, known only after the first record.
    records = selected()
    first = next(records, None)
    if first is not None:
        convert = _sft_converter(fmt, keep_system_prompt, moss_tools)
        convs = _convert_all(reader, itertools.chain([first], records), convert)
    if fmt == "auto":
        if report.read == 0:
            raise DataFormatError(f"{path}: no records; cannot detect the format")
        report.format = "unknown"
    if wanted is not None and fmt == "safety_prompts":
        check_scenarios(reader.object_keys if reader.object_keys is not None else seen_scenarios)
    report.kept = len(convs)
    reader.finish()
    return convs, report


def _preference_format_names() -> tuple[str, ...]:
    try:
        from component.preference_readers import PREFERENCE_FORMATS
    except ImportError:  # pragma: no cover - module missing
        return ()
    return PREFERENCE_FORMATS
