"""Preference (reward-model / DPO) dataset readers: file -> canonical `PreferencePair` records.

File reading, counting and warnings are `records`' (shared with the SFT readers); this module only
maps each publisher's record layout to (system, history, prompt, chosen, rejected).
See docs/data.md for every format.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable

from component.config.choices import PREFERENCE_FORMATS, SFT_FORMATS
from component.data.conversation import PreferencePair, Turn
from component.data.readers import fields, records

logger = logging.getLogger(__name__)

PREFERENCE_DETECTION_KEYS: dict[str, str] = {
    "sharegpt_preference": "conversations (+ chosen/rejected messages)",
    "medical": "question / response_chosen / response_rejected",
    "comparison": "instruction (+ output list or chosen/rejected)",
    "openai_preference": "chosen as a list of {role, content} messages",
    "prompt_chosen_rejected": "prompt + chosen (strings)",
    "hh_rlhf": "chosen (string transcript) without prompt",
}


def detect_preference_format(record: dict, path: str) -> str:
    """The preference format of `record` (the file's first record), judged by its keys."""
    keys = record.keys()
    if "conversations" in keys and ("chosen" in keys or "rejected" in keys):
        return "sharegpt_preference"
    if "response_chosen" in keys or "question" in keys:
        return "medical"
    if "instruction" in keys and ("chosen" in keys or type(record.get("output")) is list):
        return "comparison"
    if type(record.get("chosen")) is list:
        return "openai_preference"
    if "prompt" in keys and "chosen" in keys:
        return "prompt_chosen_rejected"
    if "chosen" in keys:
        return "hh_rlhf"
    known = "; ".join(f"{k}: {v}" for k, v in PREFERENCE_DETECTION_KEYS.items())
    raise records.DataFormatError(
        f"{path}: cannot detect the preference format from the first record's keys {sorted(keys)}; "
        f"known formats (detection keys): {known}; pass format= explicitly "
        "(SFT data is read with read_sft_file)"
    )


# -- Anthropic-style transcripts ("\n\nHuman: ...\n\nAssistant: ...") ------------------------------

_ASSISTANT = "\n\nAssistant:"
_TRANSCRIPT_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def _parse_transcript(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [("user", "a"), ("assistant", "b")]."""
    parts = _TRANSCRIPT_MARKER.split(text)
    if parts[0].strip():
        raise records.Skip("bad_transcript", "text before the first 'Human:'")
    return [("user" if parts[i] == "Human" else "assistant", parts[i + 1]) for i in range(1, len(parts), 2)]


def _after_marker(reply: str) -> str:
    """Drop the single space the transcript format puts after 'Assistant:'."""
    return reply[1:] if reply.startswith(" ") else reply


def _pair(
    prompt: str | None,
    chosen: str,
    rejected: str,
    history: list[Turn],
    system: str | None,
) -> PreferencePair:
    if prompt is None or fields.blank(prompt):
        raise records.Skip("empty_prompt")
    if fields.blank(chosen):
        raise records.Skip("empty_chosen")
    if fields.blank(rejected):
        raise records.Skip("empty_rejected")
    if chosen.strip() == rejected.strip():
        raise records.Skip("chosen_equals_rejected")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, history=history, system=system)


# -- converters: raw record -> PreferencePair (or raise records.Skip / KeyError) --------------------------


def _pair_hh_rlhf(rec: dict) -> PreferencePair:
    chosen = fields.text_field(rec, "chosen")
    rejected = fields.text_field(rec, "rejected")
    ic = chosen.rfind(_ASSISTANT)
    ir = rejected.rfind(_ASSISTANT)
    if ic < 0 or ir < 0:
        raise records.Skip("bad_transcript", "no '\\n\\nAssistant:' turn")
    # The shared context is everything before the last Assistant turn, and must be identical.
    if chosen[:ic] != rejected[:ir]:
        raise records.Skip("prefix_mismatch")
    system, history, prompt = fields.split_dialogue(_parse_transcript(chosen[:ic]), ends_with="user")
    return _pair(
        prompt,
        _after_marker(chosen[ic + len(_ASSISTANT) :]),
        _after_marker(rejected[ir + len(_ASSISTANT) :]),
        history,
        system,
    )


def _pair_prompt_chosen_rejected(rec: dict) -> PreferencePair:
    prompt = fields.text_field(rec, "prompt")
    chosen = fields.text_field(rec, "chosen")
    rejected = fields.text_field(rec, "rejected")
    if prompt.startswith(("\n\nHuman:", "Human:")):
        # Dahoas rm-static: the prompt is a transcript ending in "Assistant:", replies start with " ".
        messages = _parse_transcript(prompt)
        if messages and messages[-1][0] == "assistant" and fields.blank(messages[-1][1]):
            messages.pop()
        system, history, last = fields.split_dialogue(messages, ends_with="user")
        return _pair(last, _after_marker(chosen), _after_marker(rejected), history, system)
    return _pair(prompt, chosen, rejected, fields.alpaca_history(rec), fields.optional_system(rec))


def _pair_comparison(rec: dict) -> PreferencePair:
    prompt = fields.join_instruction(fields.text_field(rec, "instruction"), rec.get("input"))
    if "chosen" in rec or "rejected" in rec:
        chosen = fields.text_field(rec, "chosen")
        rejected = fields.text_field(rec, "rejected")
    else:
        output = rec["output"]
        if type(output) is not list or len(output) != 2 or not all(type(x) is str for x in output):
            raise records.Skip("bad_field:output", "expected [better, worse]")
        chosen, rejected = output
    return _pair(prompt, chosen, rejected, fields.alpaca_history(rec), fields.optional_system(rec))


def _pair_medical(rec: dict) -> PreferencePair:
    return _pair(
        fields.text_field(rec, "question"),
        fields.text_field(rec, "response_chosen"),
        fields.text_field(rec, "response_rejected"),
        fields.alpaca_history(rec),
        fields.optional_system(rec),
    )


def _sharegpt_reply(rec: dict, key: str) -> str:
    value = rec[key]
    if type(value) is str:
        return value
    if type(value) is not dict:
        raise records.Skip(f"bad_field:{key}", "expected a {from, value} message")
    role = fields.SHAREGPT_ROLES.get(value.get("from", "gpt"))
    if role == "tool":
        raise records.Skip("uses_tools", f"{key} is a {value['from']} message")
    if role != "assistant":
        raise records.Skip(f"bad_field:{key}", f"expected an assistant message, got from={value.get('from')!r}")
    return fields.text_field(value, "value")


def _pair_sharegpt(rec: dict) -> PreferencePair:
    if fields.declares_tools(rec):
        raise records.Skip("uses_tools", "declares tools")
    messages = fields.sharegpt_messages(rec["conversations"], "conversations")
    system, history, prompt = fields.split_dialogue(messages, ends_with="user")
    chosen = _sharegpt_reply(rec, "chosen")
    rejected = _sharegpt_reply(rec, "rejected")
    return _pair(prompt, chosen, rejected, history, system or fields.optional_system(rec))


def _openai_side(rec: dict, key: str) -> list[tuple[str, str]]:
    value = rec[key]
    if type(value) is str:
        return [("assistant", value)]
    return fields.openai_messages(value, key)


def _pair_openai(rec: dict) -> PreferencePair:
    if fields.declares_tools(rec):
        raise records.Skip("uses_tools", "declares tools")
    chosen = _openai_side(rec, "chosen")
    rejected = _openai_side(rec, "rejected")
    if not chosen:
        raise records.Skip("empty_chosen")
    if not rejected:
        raise records.Skip("empty_rejected")
    if any(role == "tool" for role, _ in itertools.chain(chosen, rejected)):
        raise records.Skip("uses_tools")
    if chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise records.Skip("bad_turn_order", "chosen/rejected must end with an assistant message")
    # UltraFeedback: each side is the whole conversation; TRL's implicit-prompt layout: only the reply.
    context_c, context_r = chosen[:-1], rejected[:-1]
    if context_c and context_r and context_c != context_r:
        raise records.Skip("prefix_mismatch")
    context = context_c or context_r
    if not context:
        prompt = rec["prompt"]
        context = [("user", prompt)] if type(prompt) is str else fields.openai_messages(prompt, "prompt")
    system, history, last = fields.split_dialogue(context, ends_with="user")
    return _pair(last, chosen[-1][1], rejected[-1][1], history, system)


_CONVERTERS: dict[str, Callable[[dict], PreferencePair]] = {
    "hh_rlhf": _pair_hh_rlhf,
    "prompt_chosen_rejected": _pair_prompt_chosen_rejected,
    "comparison": _pair_comparison,
    "medical": _pair_medical,
    "sharegpt_preference": _pair_sharegpt,
    "openai_preference": _pair_openai,
}


def read_preference_file(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    skip_bad_records: bool = False,
) -> tuple[list[PreferencePair], records.SourceReport]:
    """Read one preference file (.json/.jsonl[.gz], .parquet, .csv, .tsv) into PreferencePairs.

    format: one of PREFERENCE_FORMATS or "auto" (detected from the first record's keys).
    Malformed JSON lines / CSV rows raise records.DataFormatError naming file:line unless
    skip_bad_records=True (then counted as malformed_json / malformed_row). Records with missing
    fields, empty sides, chosen == rejected or mismatched transcripts are always skipped and counted.
    """
    path = os.fspath(path)
    fmt = records.check_format(format, PREFERENCE_FORMATS, "preference", path, SFT_FORMATS)
    report = records.SourceReport(path=path, format=fmt)
    reader = records.RecordReader(path, report, skip_bad_records, logger)
    rows = ((n, rec) for n, _key, rec in reader.records())
    first = next(rows, None)
    pairs: list[PreferencePair] = []
    if first is not None:
        if fmt == "auto":
            fmt = report.format = detect_preference_format(first[1], path)
        pairs = records.convert_all(reader, itertools.chain([first], rows), _CONVERTERS[fmt])
    elif fmt == "auto":
        if report.read == 0:
            raise records.DataFormatError(f"{path}: no records; cannot detect the format")
        report.format = "unknown"
    report.kept = len(pairs)
    reader.finish()
    return pairs, report
