"""SFT readers: each publisher's record layout -> canonical `Conversation` records.

BELLE, Firefly, MOSS-003 (original and Firefly-processed), Safety-Prompts, alpaca, ShareGPT and OpenAI
`messages`; the format is detected from the first record's keys unless named. File reading and counting
are `records`'; see docs/data.md for every format and skip reason.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator

from component.config.choices import MOSS_TOOL_MODES, PREFERENCE_FORMATS, SFT_FORMATS
from component.data.conversation import Conversation, Turn
from component.data.readers.fields import (
    alpaca_history,
    blank,
    check_turns,
    declares_tools,
    join_instruction,
    openai_messages,
    optional_system,
    sharegpt_messages,
    split_dialogue,
    text_field,
)
from component.data.readers.records import (
    DataFormatError,
    RecordReader,
    Skip,
    SourceReport,
    check_format,
    convert_all,
)

logger = logging.getLogger(__name__)

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


# -- SFT converters: raw record -> Conversation (or raise Skip / KeyError) ------------------------


def _conv_alpaca(rec: dict) -> Conversation:
    user = join_instruction(text_field(rec, "instruction"), rec.get("input"))
    turns = [*alpaca_history(rec), Turn(user, text_field(rec, "output"))]
    check_turns(turns)
    return Conversation(turns=turns, system=optional_system(rec))


def _conv_firefly(rec: dict) -> Conversation:
    turn = Turn(text_field(rec, "input"), text_field(rec, "target"))
    check_turns([turn])
    return Conversation(turns=[turn])


def _conv_safety(rec: dict) -> Conversation:
    # The response is kept raw: many start with "\n\n", and trimming is the template's choice.
    turn = Turn(text_field(rec, "prompt"), text_field(rec, "response"))
    check_turns([turn])
    return Conversation(turns=[turn])


def _conv_moss_firefly(rec: dict) -> Conversation:
    conversation = rec["conversation"]
    if type(conversation) is not list or not conversation:
        raise Skip("bad_field:conversation", "expected a non-empty list of {human, assistant}")
    turns = []
    for t in conversation:
        if type(t) is not dict:
            raise Skip("bad_field:conversation", "expected a non-empty list of {human, assistant}")
        turns.append(Turn(text_field(t, "human"), text_field(t, "assistant")))
    check_turns(turns)
    return Conversation(turns=turns, system=optional_system(rec))


def _conv_sharegpt(rec: dict) -> Conversation:
    if declares_tools(rec):
        # Replies in such conversations refer to a tool list the model would never see.
        raise Skip("uses_tools", "declares tools")
    messages = sharegpt_messages(rec["conversations"], "conversations")
    system, turns, _ = split_dialogue(messages, ends_with="assistant")
    check_turns(turns)
    return Conversation(turns=turns, system=system or optional_system(rec))


def _conv_openai(rec: dict) -> Conversation:
    if declares_tools(rec):
        raise Skip("uses_tools", "declares tools")
    system, turns, _ = split_dialogue(openai_messages(rec["messages"], "messages"), ends_with="assistant")
    check_turns(turns)
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
        raise Skip("bad_field:chat", f"unexpected turn key {key!r}") from None


def _make_moss(keep_system_prompt: bool, moss_tools: str) -> Callable[[dict], Conversation]:
    strip_tools = moss_tools == "strip"

    def convert(rec: dict) -> Conversation:
        chat = rec["chat"]
        if type(chat) is not dict or not chat:
            raise Skip("bad_field:chat", "expected a non-empty {turn_N: {...}} object")
        turns = []
        # Sorted by number: "turn_10" must follow "turn_9" whatever the key order.
        for _, t in sorted(chat.items(), key=lambda kv: _turn_number(kv[0])):
            if type(t) is not dict:
                raise Skip("bad_field:chat", "expected each turn to be an object")
            command = _moss_strip(t.get("Commands") or "", "<|Commands|>:", "<eoc>")
            if command and command != "None" and not strip_tools:
                raise Skip("uses_tools", command[:80])
            reply = _moss_strip(text_field(t, "MOSS"), "<|MOSS|>:", "<eom>")
            if "<|" in reply:
                reply = _MOSS_CITATION.sub("", reply).strip()
            turns.append(Turn(_moss_strip(text_field(t, "Human"), "<|Human|>:", "<eoh>"), reply))
        check_turns(turns)
        system = None
        if keep_system_prompt:
            meta = rec.get("meta_instruction")
            if type(meta) is str and not blank(meta):
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
    fmt = check_format(format, SFT_FORMATS, "SFT", path, PREFERENCE_FORMATS)
    if moss_tools not in MOSS_TOOL_MODES:
        raise ValueError(f"moss_tools must be one of {MOSS_TOOL_MODES}, got {moss_tools!r}")
    if isinstance(safety_scenarios, str):
        safety_scenarios = [safety_scenarios]
    wanted = None if safety_scenarios is None else set(safety_scenarios)
    report = SourceReport(path=path, format=fmt)
    reader = RecordReader(path, report, skip_bad_records, logger)
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
        convs = convert_all(reader, itertools.chain([first], records), convert)
    if fmt == "auto":
        if report.read == 0:
            raise DataFormatError(f"{path}: no records; cannot detect the format")
        report.format = "unknown"
    if wanted is not None and fmt == "safety_prompts":
        check_scenarios(reader.object_keys if reader.object_keys is not None else seen_scenarios)
    report.kept = len(convs)
    reader.finish()
    return convs, report
