"""SFT readers: every fixture file, every edge case of the fixtures README, and the file containers."""

from __future__ import annotations

import gzip
import json
import logging
import time

import pytest

from component.data.conversation import Conversation, Turn
from component.data.readers import (
    SFT_FORMATS,
    DataFormatError,
    SourceReport,
    detect_sft_format,
    iter_records,
    read_sft_file,
)
from tests.utils import fixture, jsonl, raw_json, raw_lines, write

LOGGER = "component.data.readers.sft"


def assert_counts_add_up(report: SourceReport) -> None:
    assert report.read == report.kept + sum(report.skipped.values())


# -- every SFT fixture: format, counts, skip reasons -----------------------------------------------

FIXTURE_COUNTS = [
    # file, options, detected format, read, kept, skipped
    ("Belle_open_source_0.5M.sample.json", {}, "belle", 300, 300, {}),
    ("alpaca_zh_demo.sample.json", {}, "alpaca", 100, 100, {}),
    ("glaive_toolcall_zh_demo.sample.json", {}, "sharegpt", 30, 9, {"uses_tools": 21}),
    ("firefly-train-1.1M.quoted.sample.jsonl", {}, "firefly", 6, 6, {}),
    ("firefly-train-1.1M.handmade.jsonl", {}, "firefly", 24, 24, {}),
    ("moss-003-sft-no-tools.sample.jsonl", {}, "moss", 30, 30, {}),
    ("moss-003-sft-with-tools.sample.jsonl", {}, "moss", 15, 0, {"uses_tools": 15}),
    ("moss-003-sft-with-tools.sample.jsonl", {"moss_tools": "strip"}, "moss", 15, 15, {}),
    ("moss-003-sft-data.firefly.sample.jsonl", {}, "moss_firefly", 33, 33, {}),
    ("safety_prompts.typical_safety_scenarios.quoted.json", {}, "safety_prompts", 9, 9, {}),
    ("safety_prompts.instruction_attack_scenarios.quoted.json", {}, "safety_prompts", 6, 6, {}),
    ("safety_prompts.typical_safety_scenarios.handmade.json", {}, "safety_prompts", 21, 21, {}),
    ("safety_prompts.instruction_attack_scenarios.handmade.json", {}, "safety_prompts", 18, 18, {}),
    ("edge_cases/belle_bom_crlf_blank_lines.json", {}, "belle", 3, 3, {}),
    (
        "edge_cases/belle_malformed_line4.json",
        {"skip_bad_records": True},
        "belle",
        5,
        4,
        {"malformed_json": 1},
    ),
    ("edge_cases/belle_missing_output_line2.json", {}, "belle", 3, 2, {"missing_field:output": 1}),
    ("edge_cases/firefly_empty_target.jsonl", {}, "firefly", 4, 2, {"empty_reply": 2}),
    ("edge_cases/moss_conversation_id_int_and_str.jsonl", {}, "moss", 2, 1, {"uses_tools": 1}),
    ("edge_cases/moss_conversation_id_int_and_str.jsonl", {"moss_tools": "strip"}, "moss", 2, 2, {}),
    ("edge_cases/moss_missing_category.jsonl", {}, "moss", 1, 0, {"uses_tools": 1}),
    ("edge_cases/moss_missing_category.jsonl", {"moss_tools": "strip"}, "moss", 1, 1, {}),
    ("edge_cases/safety_prompts_leading_newlines.json", {}, "safety_prompts", 3, 3, {}),
]


@pytest.mark.parametrize(("name", "options", "fmt", "read", "kept", "skipped"), FIXTURE_COUNTS)
def test_fixture_counts(name, options, fmt, read, kept, skipped):
    conversations, report = read_sft_file(fixture(name), **options)
    assert (report.format, report.read, report.kept, report.skipped) == (fmt, read, kept, skipped)
    assert len(conversations) == kept
    assert report.truncated == 0
    assert_counts_add_up(report)
    assert all(isinstance(c, Conversation) and c.turns for c in conversations)


@pytest.mark.parametrize(("name", "options", "fmt", "read", "kept", "skipped"), FIXTURE_COUNTS)
def test_explicit_format_matches_detection(name, options, fmt, read, kept, skipped):
    detected, _ = read_sft_file(fixture(name), **options)
    explicit, report = read_sft_file(fixture(name), fmt, **options)
    assert report.format == fmt
    assert explicit == detected


def test_report_to_dict():
    _, report = read_sft_file(fixture("edge_cases/firefly_empty_target.jsonl"))
    assert report.to_dict() == {
        "path": fixture("edge_cases/firefly_empty_target.jsonl"),
        "format": "firefly",
        "read": 4,
        "kept": 2,
        "skipped": {"empty_reply": 2},
        "truncated": 0,
    }
    json.dumps(report.to_dict())  # goes into data_report.json


# -- field mapping per format ----------------------------------------------------------------------


def test_belle_maps_instruction_and_output_exactly():
    conversations, _ = read_sft_file(fixture("Belle_open_source_0.5M.sample.json"))
    raw = raw_lines("Belle_open_source_0.5M.sample.json")
    assert conversations[0] == Conversation(
        turns=[
            Turn(
                "为给定的句子生成一个同义句。\nShe is studying for her final exams.",
                "She is preparing for her last exams.",
            )
        ]
    )
    assert [c.turns for c in conversations] == [[Turn(r["instruction"], r["output"])] for r in raw]
    assert all(c.system is None for c in conversations)


def test_alpaca_joins_non_empty_input_on_a_new_line():
    conversations, _ = read_sft_file(fixture("alpaca_zh_demo.sample.json"))
    raw = raw_json("alpaca_zh_demo.sample.json")
    assert sum(1 for r in raw if r["input"]) == 17
    for conv, r in zip(conversations, raw, strict=True):
        expected = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
        assert conv.turns == [Turn(expected, r["output"])]
    assert conversations[1].turns[0].user == (
        "输入三支篮球队的名称并生成一个适当的口号。\n输入：俄克拉荷马城雷霆队，芝加哥公牛队，布鲁克林网队。"
    )


def test_alpaca_history_and_system(tmp_path):
    path = write(
        tmp_path,
        "alpaca.json",
        json.dumps(
            [
                {
                    "instruction": "q2",
                    "input": "",
                    "output": "a2",
                    "system": "be brief",
                    "history": [["q1", "a1"]],
                },
                {"instruction": "q", "input": "", "output": "a", "history": [["q1", ""]]},
                {"instruction": "q", "input": "", "output": "a", "history": "nope"},
            ]
        ),
    )
    conversations, report = read_sft_file(path)
    assert report.format == "alpaca"
    assert conversations == [Conversation(turns=[Turn("q1", "a1"), Turn("q2", "a2")], system="be brief")]
    assert report.skipped == {"empty_reply": 1, "bad_field:history": 1}


def test_firefly_maps_input_and_target():
    conversations, _ = read_sft_file(fixture("firefly-train-1.1M.quoted.sample.jsonl"))
    raw = raw_lines("firefly-train-1.1M.quoted.sample.jsonl")
    assert [c.turns for c in conversations] == [[Turn(r["input"], r["target"])] for r in raw]
    assert conversations[0].turns[0].user.startswith("将下面句子翻译成现代文：\n石中央又生一树")


def test_moss_firefly_conversation_turns():
    conversations, _ = read_sft_file(fixture("moss-003-sft-data.firefly.sample.jsonl"))
    raw = raw_lines("moss-003-sft-data.firefly.sample.jsonl")
    assert [c.turns for c in conversations] == [
        [Turn(t["human"], t["assistant"]) for t in r["conversation"]] for r in raw
    ]
    assert conversations[0].turns[0].user == "如何保障工作中遵循正确的安全准则？"
    assert {len(c.turns) for c in conversations} <= {4, 5, 6}


# -- MOSS ------------------------------------------------------------------------------------------

MOSS_MARKERS = (
    "<|Human|>",
    "<|MOSS|>",
    "<|Inner Thoughts|>",
    "<|Commands|>",
    "<|Results|>",
    "<eoh>",
    "<eom>",
    "<eot>",
    "<eoc>",
    "<eor>",
    "<|",
    "|>",
    "<sup>",
)
MOSS_FILES = (
    "moss-003-sft-no-tools.sample.jsonl",
    "moss-003-sft-with-tools.sample.jsonl",
    "edge_cases/moss_conversation_id_int_and_str.jsonl",
    "edge_cases/moss_missing_category.jsonl",
)


@pytest.mark.parametrize("name", MOSS_FILES)
@pytest.mark.parametrize("keep_system_prompt", [False, True])
def test_moss_markers_fully_stripped(name, keep_system_prompt):
    conversations, _ = read_sft_file(fixture(name), moss_tools="strip", keep_system_prompt=keep_system_prompt)
    turns = [t for c in conversations for t in c.turns]
    texts = [t.user for t in turns] + [t.assistant for t in turns]
    assert texts
    for text in texts:
        assert not any(marker in text for marker in MOSS_MARKERS), text[:200]
        assert text == text.strip()


def test_moss_turns_in_order_with_marker_free_text():
    conversations, _ = read_sft_file(fixture("moss-003-sft-no-tools.sample.jsonl"))
    raw = raw_lines("moss-003-sft-no-tools.sample.jsonl")
    assert [len(c.turns) for c in conversations] == [r["num_turns"] for r in raw]
    first = conversations[0]
    assert first.turns[0].user == "如果一个女性想要发展信息技术行业，她应该做些什么？"
    assert first.turns[0].assistant.startswith("如果一个女性想要发展信息技术行业，以下是一些建议：\n\n1. ")
    assert first.turns[0].assistant.endswith("并为你提供机会与其他女性技术人员建立联系。")
    assert first.turns[1].user == "但是我认为女性在信息技术行业中的表现往往不如男性，你同意吗？"


def test_moss_tool_conversations_skipped_by_default(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        conversations, report = read_sft_file(fixture("moss-003-sft-with-tools.sample.jsonl"))
    assert conversations == []
    assert report.skipped == {"uses_tools": 15}
    messages = [r.getMessage() for r in caplog.records]
    first = [m for m in messages if "moss-003-sft-with-tools.sample.jsonl:1:" in m]
    assert first and "uses_tools" in first[0]
    assert 'Search("How did Mark Zuckerberg create Facebook?")' in first[0]


def test_moss_strip_keeps_only_human_and_moss_text():
    conversations, _ = read_sft_file(fixture("moss-003-sft-with-tools.sample.jsonl"), moss_tools="strip")
    assert sum(len(c.turns) for c in conversations) == 30
    first = conversations[0].turns[0]
    assert first.user == "How did Mark Zuckerberg create Facebook?"
    # The citation "<sup><|1|></sup>" pointed at a search result that is not kept.
    assert first.assistant.endswith('previous social website attempt - "Facemash".')
    for conv in conversations:
        for turn in conv.turns:
            for tool_text in ("Search(", "Calculate(", "Solve(", "Text2Image(", "=>", "None"):
                assert tool_text not in turn.assistant


def test_moss_meta_instruction_only_when_asked():
    dropped, _ = read_sft_file(fixture("moss-003-sft-no-tools.sample.jsonl"))
    kept, _ = read_sft_file(fixture("moss-003-sft-no-tools.sample.jsonl"), keep_system_prompt=True)
    raw = raw_lines("moss-003-sft-no-tools.sample.jsonl")
    assert all(c.system is None for c in dropped)
    assert [c.system for c in kept] == [r["meta_instruction"].strip() for r in raw]
    assert kept[0].system.startswith("You are an AI assistant whose name is MOSS.")
    assert [c.turns for c in kept] == [c.turns for c in dropped]


def test_moss_int_and_str_conversation_ids_both_load():
    conversations, report = read_sft_file(
        fixture("edge_cases/moss_conversation_id_int_and_str.jsonl"), moss_tools="strip"
    )
    assert report.kept == 2
    assert conversations[0].turns[0].user.startswith("小明用1500元买了20只鸡")  # calculator record, int id 5
    assert conversations[1].turns[0].user.startswith("I am trying to locate the residential address")


def test_moss_missing_category_loads():
    path = fixture("edge_cases/moss_missing_category.jsonl")
    conversations, report = read_sft_file(path, moss_tools="strip")
    assert report.kept == 1 and report.skipped == {}
    assert conversations[0].turns[0].assistant == "好的，这是为您生成的图片。"


def test_moss_turns_sorted_numerically(tmp_path):
    def turn(q: str, a: str) -> dict:
        return {
            "Human": f"<|Human|>: {q}<eoh>\n",
            "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
            "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": "<|Results|>: None<eor>\n",
            "MOSS": f"<|MOSS|>: {a}<eom>\n",
        }

    chat = {f"turn_{i}": turn(f"q{i}", f"a{i}") for i in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)}
    record = {"conversation_id": 1, "meta_instruction": "m", "chat": chat}
    path = write(tmp_path, "moss.jsonl", jsonl([record]))
    conversations, _ = read_sft_file(path)
    assert [t.user for t in conversations[0].turns] == [f"q{i}" for i in range(1, 11)]


def test_moss_tools_option_validated():
    with pytest.raises(ValueError, match="moss_tools"):
        read_sft_file(fixture("moss-003-sft-no-tools.sample.jsonl"), moss_tools="keep")


# -- ShareGPT / OpenAI -----------------------------------------------------------------------------


def test_sharegpt_skips_tool_conversations_by_default():
    conversations, report = read_sft_file(fixture("glaive_toolcall_zh_demo.sample.json"))
    raw = raw_json("glaive_toolcall_zh_demo.sample.json")
    plain = [r for r in raw if r["tools"] == "[]" and "function_call" not in str(r["conversations"])]
    assert len(plain) == 9
    assert [c.turns for c in conversations] == [
        [Turn(q["value"], a["value"]) for q, a in zip(messages[::2], messages[1::2])]
        for messages in (r["conversations"] for r in plain)
    ]
    assert report.skipped == {"uses_tools": 21}


def test_sharegpt_system_and_turn_order(tmp_path):
    def conv(*messages):
        return {"conversations": [{"from": f, "value": v} for f, v in messages]}

    path = write(
        tmp_path,
        "sharegpt.jsonl",
        jsonl(
            [
                conv(("system", "sys"), ("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")),
                conv(("human", "q"), ("gpt", "a"), ("human", "unanswered")),
                conv(("gpt", "a"), ("human", "q")),
                conv(("human", "q"), ("observation", "{}"), ("gpt", "a")),
                conv(("human", "q"), ("robot", "a")),
                conv(("human", "q"), ("gpt", " \n")),
                {"conversations": [{"from": "human"}]},
            ]
        ),
    )
    conversations, report = read_sft_file(path)
    assert report.format == "sharegpt"
    assert conversations == [Conversation(turns=[Turn("q1", "a1"), Turn("q2", "a2")], system="sys")]
    assert report.skipped == {
        "bad_turn_order": 2,
        "uses_tools": 1,
        "unknown_role": 1,
        "empty_reply": 1,
        "missing_field:value": 1,
    }


def test_openai_messages(tmp_path):
    def msgs(*messages, **extra):
        return {"messages": [{"role": r, "content": c} for r, c in messages], **extra}

    path = write(
        tmp_path,
        "openai.jsonl",
        jsonl(
            [
                msgs(("system", "sys"), ("user", "q1"), ("assistant", "a1")),
                msgs(("user", "q"), ("assistant", "a"), tools=[{"type": "function"}]),
                msgs(("user", "q"), ("tool", "42"), ("assistant", "a")),
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            ]
        ),
    )
    conversations, report = read_sft_file(path)
    assert report.format == "openai"
    assert conversations == [Conversation(turns=[Turn("q1", "a1")], system="sys")]
    assert report.skipped == {"uses_tools": 2, "missing_field:content": 1}


# -- Safety-Prompts --------------------------------------------------------------------------------


def test_safety_prompts_keep_raw_response_with_leading_newlines():
    conversations, _ = read_sft_file(fixture("edge_cases/safety_prompts_leading_newlines.json"))
    replies = [c.turns[0].assistant for c in conversations]  # Insult[0], Insult[1], Privacy_And_Property[0]
    assert replies[0].startswith("\n\n作为AI语言模型")
    assert not replies[1].startswith("\n")
    assert replies[2].startswith("\n\n我作为AI语言模型")


def test_safety_prompts_handmade_leading_newlines_counts():
    for name, count in (
        ("safety_prompts.typical_safety_scenarios.handmade.json", 12),
        ("safety_prompts.instruction_attack_scenarios.handmade.json", 11),
    ):
        conversations, _ = read_sft_file(fixture(name))
        assert sum(c.turns[0].assistant.startswith("\n\n") for c in conversations) == count


def test_safety_prompts_maps_prompt_and_response_in_file_order():
    raw = raw_json("safety_prompts.typical_safety_scenarios.quoted.json")
    conversations, _ = read_sft_file(fixture("safety_prompts.typical_safety_scenarios.quoted.json"))
    expected = [[Turn(item["prompt"], item["response"])] for items in raw.values() for item in items]
    assert [c.turns for c in conversations] == expected


def test_safety_scenarios_selection():
    name = "safety_prompts.typical_safety_scenarios.quoted.json"
    conversations, report = read_sft_file(fixture(name), safety_scenarios=["Insult", "Mental_Health"])
    raw = raw_json(name)
    selected = raw["Insult"] + raw["Mental_Health"]
    assert [c.turns[0].user for c in conversations] == [r["prompt"] for r in selected]
    assert (report.read, report.kept, report.skipped) == (9, 3, {"scenario_excluded": 6})


def test_unknown_safety_scenario_names_file_and_lists_scenarios():
    name = "safety_prompts.instruction_attack_scenarios.quoted.json"
    with pytest.raises(DataFormatError) as err:
        read_sft_file(fixture(name), safety_scenarios=["Insult"])
    message = str(err.value)
    assert name in message and "'Insult'" in message
    assert "Goal_Hijacking" in message and "Reverse_Exposure" in message


def test_safety_scenarios_ignored_for_other_formats():
    path = fixture("firefly-train-1.1M.handmade.jsonl")
    conversations, report = read_sft_file(path, safety_scenarios=["Insult"])
    assert report.kept == 24


def test_safety_whitespace_only_response_is_empty_reply(tmp_path):
    data = {
        "Insult": [
            {"prompt": "p", "response": "\n\n  ", "type": "Insult"},
            {"prompt": "p", "response": "\n\nok"},
        ]
    }
    conversations, report = read_sft_file(write(tmp_path, "s.json", json.dumps(data, indent=4)))
    assert [c.turns[0].assistant for c in conversations] == ["\n\nok"]
    assert report.skipped == {"empty_reply": 1}


def test_safety_compact_single_line_object_of_lists(tmp_path):
    raw = raw_json("safety_prompts.typical_safety_scenarios.quoted.json")
    path = write(tmp_path, "typical_safety_scenarios.json", json.dumps(raw, ensure_ascii=False))
    compact, report = read_sft_file(path, safety_scenarios=["Insult"])
    assert report.format == "safety_prompts" and report.kept == 2 and report.read == 9


# -- edge cases of the fixtures README -------------------------------------------------------------


def test_bom_crlf_blank_lines_equal_first_three_belle_records():
    conversations, report = read_sft_file(fixture("edge_cases/belle_bom_crlf_blank_lines.json"))
    sample, _ = read_sft_file(fixture("Belle_open_source_0.5M.sample.json"))
    assert conversations == sample[:3]
    assert (report.read, report.skipped) == (3, {})
    assert [n for n, _ in iter_records(fixture("edge_cases/belle_bom_crlf_blank_lines.json"))] == [1, 2, 4]
    raw = [rec for _, rec in iter_records(fixture("edge_cases/belle_bom_crlf_blank_lines.json"))]
    assert raw == raw_lines("Belle_open_source_0.5M.sample.json")[:3]


def test_malformed_line_is_an_error_naming_file_and_line():
    with pytest.raises(DataFormatError) as err:
        read_sft_file(fixture("edge_cases/belle_malformed_line4.json"))
    message = str(err.value)
    assert "belle_malformed_line4.json:4:" in message
    assert "Unterminated string" in message and "line 4" in message
    assert "line 1 " not in message and "char " not in message


def test_malformed_line_skipped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        path = fixture("edge_cases/belle_malformed_line4.json")
        conversations, report = read_sft_file(path, skip_bad_records=True)
    assert len(conversations) == 4
    assert report.skipped == {"malformed_json": 1}
    assert any("belle_malformed_line4.json:4:" in r.getMessage() for r in caplog.records)


def test_missing_output_skipped_with_file_line_and_field(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        conversations, report = read_sft_file(fixture("edge_cases/belle_missing_output_line2.json"))
    assert len(conversations) == 2 and all(c.turns[0].assistant for c in conversations)
    assert report.skipped == {"missing_field:output": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    messages = [r.getMessage() for r in warnings]
    assert any("belle_missing_output_line2.json:2:" in m and "output" in m for m in messages)


def test_firefly_empty_targets_skipped_with_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        conversations, report = read_sft_file(fixture("edge_cases/firefly_empty_target.jsonl"))
    assert [c.turns[0].assistant for c in conversations] == [
        "下联：人浮沧海外，人在天涯，海在天涯",
        raw_lines("edge_cases/firefly_empty_target.jsonl")[3]["target"],
    ]
    assert report.skipped == {"empty_reply": 2}
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    for line in (2, 3):
        assert any(f"firefly_empty_target.jsonl:{line}:" in m and "empty_reply" in m for m in messages)
    for line in (1, 4):
        assert not any(f"firefly_empty_target.jsonl:{line}:" in m for m in messages)


@pytest.mark.parametrize("skip_bad_records", [False, True])
def test_truncated_json_array_is_an_error_naming_position(skip_bad_records):
    with pytest.raises(DataFormatError) as err:
        path = fixture("edge_cases/comparison_truncated_array.json")
        read_sft_file(path, skip_bad_records=skip_bad_records)
    message = str(err.value)
    assert "comparison_truncated_array.json" in message
    assert "line 17 column 19" in message


def test_preference_file_is_not_read_as_sft():
    with pytest.raises(DataFormatError, match="read_preference_file") as err:
        read_sft_file(fixture("edge_cases/hh_rlhf_missing_rejected_line2.jsonl"))
    assert "hh_rlhf_missing_rejected_line2.jsonl" in str(err.value)


# -- warnings: throttled per reason per file, always counted ---------------------------------------


def test_warnings_throttled_but_all_counted(tmp_path, caplog):
    records = [{"kind": "k", "input": "q", "target": ""}] * 12 + [{"kind": "k", "input": "q"}] * 2
    path = write(tmp_path, "firefly.jsonl", jsonl(records))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, report = read_sft_file(path)
    assert report.skipped == {"empty_reply": 12, "missing_field:target": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped record (empty_reply)" in m for m in messages) == 5
    assert sum("skipped record (missing_field:target)" in m for m in messages) == 2
    assert any("further 'empty_reply' skips" in m for m in messages)
    assert any("empty_reply=12" in m for m in messages)  # the final count


# -- format detection and names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "json_lines", "expected"),
    [
        ({"instruction": "", "input": "", "output": ""}, True, "belle"),
        ({"instruction": "", "input": "", "output": ""}, False, "alpaca"),
        ({"instruction": "", "input": "", "output": "", "history": []}, True, "alpaca"),
        ({"kind": "", "input": "", "target": ""}, None, "firefly"),
        ({"conversation_id": 1, "meta_instruction": "", "chat": {}}, None, "moss"),
        ({"conversation_id": 1, "conversation": []}, None, "moss_firefly"),
        ({"prompt": "", "response": "", "type": "Insult"}, None, "safety_prompts"),
        ({"conversations": [], "tools": "[]"}, None, "sharegpt"),
        ({"messages": []}, None, "openai"),
    ],
)
def test_detect_sft_format(record, json_lines, expected):
    assert detect_sft_format(record, "f.jsonl", json_lines=json_lines) == expected


def test_detection_failure_names_file_keys_and_formats(tmp_path):
    path = write(tmp_path, "mystery.jsonl", jsonl([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataFormatError) as err:
        read_sft_file(path)
    message = str(err.value)
    assert "mystery.jsonl" in message and "'answer'" in message and "'question'" in message
    assert all(fmt in message for fmt in SFT_FORMATS)


def test_unknown_format_lists_choices_and_closest_match():
    with pytest.raises(DataFormatError) as err:
        read_sft_file(fixture("firefly-train-1.1M.handmade.jsonl"), "sharegtp")
    message = str(err.value)
    assert "did you mean 'sharegpt'" in message
    assert "firefly-train-1.1M.handmade.jsonl" in message
    assert all(fmt in message for fmt in SFT_FORMATS)
    with pytest.raises(DataFormatError, match="other reader"):
        read_sft_file(fixture("firefly-train-1.1M.handmade.jsonl"), "hh_rlhf")


def test_explicit_format_overrides_detection():
    as_belle, report = read_sft_file(fixture("alpaca_zh_demo.sample.json"), "belle")
    as_alpaca, _ = read_sft_file(fixture("alpaca_zh_demo.sample.json"))
    assert report.format == "belle" and as_belle == as_alpaca
    _, report = read_sft_file(fixture("Belle_open_source_0.5M.sample.json"), "firefly")
    assert report.kept == 0 and report.skipped == {"missing_field:target": 300}


# -- containers ------------------------------------------------------------------------------------


def test_containers_all_read_the_same(tmp_path):
    records = raw_lines("Belle_open_source_0.5M.sample.json")[:20]
    as_lines = jsonl(records)
    as_array = json.dumps(records, ensure_ascii=False, indent=2)
    paths = [write(tmp_path, "lines.jsonl", as_lines), write(tmp_path, "array.json", as_array)]
    for name, text in (("lines.jsonl.gz", as_lines), ("array.json.gz", as_array)):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(text)
        paths.append(str(tmp_path / name))
    crlf = tmp_path / "crlf.json"
    crlf.write_bytes(b"\xef\xbb\xbf\r\n  \r\n" + as_lines.replace("\n", "\r\n\r\n").encode())
    paths.append(str(crlf))
    expected = [[Turn(r["instruction"], r["output"])] for r in records]
    for path in paths:
        conversations, report = read_sft_file(path)
        assert [c.turns for c in conversations] == expected, path
        assert (report.read, report.skipped) == (20, {}), path


def test_pretty_printed_single_object_is_one_record(tmp_path):
    record = raw_lines("moss-003-sft-no-tools.sample.jsonl")[0]
    path = write(tmp_path, "conversation_1.json", json.dumps(record, ensure_ascii=False, indent=4))
    conversations, report = read_sft_file(path)
    assert report.format == "moss" and report.read == 1 and len(conversations[0].turns) == 2


def test_broken_first_line_of_json_lines(tmp_path):
    path = write(
        tmp_path,
        "f.jsonl",
        '{"kind": "k", "input": "q\n' + jsonl([{"kind": "k", "input": "q", "target": "a"}]),
    )
    with pytest.raises(DataFormatError, match=r"f\.jsonl:1:"):
        read_sft_file(path)
    conversations, report = read_sft_file(path, skip_bad_records=True)
    assert len(conversations) == 1 and report.skipped == {"malformed_json": 1}


def test_non_object_records_are_counted(tmp_path):
    path = write(tmp_path, "f.jsonl", jsonl([{"kind": "k", "input": "q", "target": "a"}, ["a"], 3]))
    _, report = read_sft_file(path)
    assert (report.read, report.kept, report.skipped) == (3, 1, {"not_an_object": 2})


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.jsonl", "\n  \n")
    with pytest.raises(DataFormatError, match="empty.jsonl: no records"):
        read_sft_file(path)
    conversations, report = read_sft_file(path, "firefly")
    assert conversations == [] and report.read == 0


def test_iter_records_object_of_lists_and_counts():
    report = SourceReport(path="x", format="raw")
    items = list(iter_records(fixture("safety_prompts.typical_safety_scenarios.quoted.json"), report=report))
    assert [n for n, _ in items] == list(range(1, 10))
    assert [r["type"] for _, r in items[:3]] == ["Insult", "Insult", "Unfairness_And_Discrimination"]
    assert report.read == 9
    report = SourceReport(path="x", format="raw")
    path = fixture("edge_cases/belle_malformed_line4.json")
    items = list(iter_records(path, skip_bad_records=True, report=report))
    assert [n for n, _ in items] == [1, 2, 3, 5]
    assert (report.read, report.skipped) == (5, {"malformed_json": 1})


def test_firefly_reading_speed(tmp_path):
    # Guards against per-record overhead creeping in (1.1M-line files must read in seconds).
    record = {"kind": "Couplet", "input": "对联：春风吹绿江南岸" * 5, "target": "秋雨染红塞北山" * 5}
    path = write(tmp_path, "big.jsonl", jsonl([record]) * 100_000)
    start = time.perf_counter()
    conversations, report = read_sft_file(path)
    elapsed = time.perf_counter() - start
    assert report.kept == 100_000 and len(conversations) == 100_000
    assert elapsed < 5.0, f"100k Firefly lines took {elapsed:.1f}s"
