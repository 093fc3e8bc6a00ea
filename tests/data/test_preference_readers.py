"""Preference readers: every preference fixture, transcript recovery, tabular inputs and skip reasons."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from component.data.conversation import PreferencePair, Turn
from component.data.readers import PREFERENCE_FORMATS, DataFormatError, detect_preference_format, read_preference_file
from tests.utils import fixture, jsonl, raw_json, raw_lines, write

LOGGER = "component.data.readers.preference"


FIXTURE_COUNTS = [
    # file, detected format, read, kept, skipped
    ("ultrafeedback.dpo.sample.jsonl", "openai_preference", 16, 16, {}),
    ("dpo_zh_demo.sample.json", "sharegpt_preference", 50, 50, {}),
    ("comparison_gpt4_data_zh.sample.json", "comparison", 150, 149, {"chosen_equals_rejected": 1}),
    ("comparison_gpt4_data_zh.output-list.derived.json", "comparison", 50, 50, {}),
    ("medical_reward.sample.jsonl", "medical", 100, 100, {}),
    ("hh-rlhf.quoted.sample.jsonl", "hh_rlhf", 2, 2, {}),
    ("hh-rlhf.handmade.jsonl.gz", "hh_rlhf", 6, 6, {}),
    ("rm-static.handmade.jsonl", "prompt_chosen_rejected", 5, 5, {}),
    ("rm-static.handmade.parquet", "prompt_chosen_rejected", 5, 5, {}),
    ("zhihu_rlhf_3k.handmade.tsv", "prompt_chosen_rejected", 4, 4, {}),
    ("rlhf-reward-single-round-trans_chinese.handmade.jsonl", "prompt_chosen_rejected", 4, 4, {}),
    ("rlhf-reward-single-round-trans_chinese.handmade.parquet", "prompt_chosen_rejected", 4, 4, {}),
    ("edge_cases/hh_rlhf_missing_rejected_line2.jsonl", "hh_rlhf", 2, 1, {"missing_field:rejected": 1}),
]


@pytest.mark.parametrize(("name", "fmt", "read", "kept", "skipped"), FIXTURE_COUNTS)
def test_fixture_counts(name, fmt, read, kept, skipped):
    pairs, report = read_preference_file(fixture(name))
    assert (report.format, report.read, report.kept, report.skipped) == (fmt, read, kept, skipped)
    assert len(pairs) == kept and all(isinstance(p, PreferencePair) for p in pairs)
    assert report.read == report.kept + sum(report.skipped.values())
    for pair in pairs:
        assert pair.prompt.strip() and pair.chosen.strip() and pair.rejected.strip()
        assert pair.chosen.strip() != pair.rejected.strip()


@pytest.mark.parametrize(("name", "fmt", "read", "kept", "skipped"), FIXTURE_COUNTS)
def test_explicit_format_matches_detection(name, fmt, read, kept, skipped):
    assert read_preference_file(fixture(name), fmt)[0] == read_preference_file(fixture(name))[0]


# -- hh-rlhf transcripts ---------------------------------------------------------------------------


def test_hh_rlhf_multi_turn_prompt_and_history():
    pairs, _ = read_preference_file(fixture("hh-rlhf.quoted.sample.jsonl"))
    dinosaurs = pairs[1]
    assert dinosaurs.history == [
        Turn(
            "What kind of noises did dinosaurs make?",
            "Humans and dinosaurs didn’t live at the same time, so it’s really hard to say. "
            "The best place to find out what noises dinosaurs made would be",
        ),
        Turn(
            "yes they did",
            "to guess, and that would probably require lots of reading and a certain amount of imagination, "
            "so we’re not really prepared to do that.",
        ),
    ]
    assert dinosaurs.prompt == "you cant read"
    assert dinosaurs.chosen == "You can read?"
    assert dinosaurs.rejected == "there’s a lot of stuff humans don’t know"
    assert dinosaurs.system is None
    horseshoes = pairs[0]
    assert horseshoes.prompt == "Okay. What else is needed to play, and what are the rules?"
    assert [t.user for t in horseshoes.history] == [
        "Hi, I want to learn to play horseshoes. Can you teach me?",
    ]
    assert horseshoes.rejected.startswith("Horseshoes are either metal or plastic discs.")


def test_hh_rlhf_gzip_round_trips_to_the_transcripts():
    pairs, _ = read_preference_file(fixture("hh-rlhf.handmade.jsonl.gz"))
    with gzip.open(fixture("hh-rlhf.handmade.jsonl.gz"), "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert [len(p.history) for p in pairs] == [0, 1, 0, 0, 0, 2]
    for pair, rec in zip(pairs, raw, strict=True):
        prefix = "".join(f"\n\nHuman: {t.user}\n\nAssistant: {t.assistant}" for t in pair.history)
        prefix += f"\n\nHuman: {pair.prompt}\n\nAssistant: "
        assert prefix + pair.chosen == rec["chosen"]
        assert prefix + pair.rejected == rec["rejected"]


def test_hh_rlhf_missing_rejected_skipped_with_file_and_line(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pairs, report = read_preference_file(fixture("edge_cases/hh_rlhf_missing_rejected_line2.jsonl"))
    assert len(pairs) == 1 and pairs[0].prompt.startswith("Okay. What else")
    assert report.skipped == {"missing_field:rejected": 1}
    assert any(
        "hh_rlhf_missing_rejected_line2.jsonl:2:" in r.getMessage() and "rejected" in r.getMessage()
        for r in caplog.records
        if r.name == LOGGER
    )


def test_hh_rlhf_skip_reasons(tmp_path):
    q = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: "
    records = [
        {"chosen": q + "fine", "rejected": q + "bad"},
        {"chosen": q + "fine", "rejected": q.replace("hello", "hey") + "bad"},
        {"chosen": q + "same", "rejected": q + "same "},
        {"chosen": q + "  ", "rejected": q + "bad"},
        {"chosen": q + "fine", "rejected": q},
        {"chosen": "no markers", "rejected": "at all"},
        {
            "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
            "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d",
        },
        {"chosen": q + "fine", "rejected": None},
    ]
    pairs, report = read_preference_file(write(tmp_path, "hh.jsonl", jsonl(records)))
    assert pairs == [PreferencePair("how are you?", "fine", "bad", history=[Turn("hi", "hello")])]
    assert report.skipped == {
        "prefix_mismatch": 1,
        "chosen_equals_rejected": 1,
        "empty_chosen": 1,
        "empty_rejected": 1,
        "bad_transcript": 1,
        "bad_turn_order": 1,
        "missing_field:rejected": 1,
    }


# -- prompt / chosen / rejected columns ------------------------------------------------------------


def test_rm_static_parquet_equals_jsonl_and_parses_the_prompt_transcript():
    from_jsonl, _ = read_preference_file(fixture("rm-static.handmade.jsonl"))
    from_parquet, _ = read_preference_file(fixture("rm-static.handmade.parquet"))
    assert from_parquet == from_jsonl
    coffee = from_jsonl[1]
    assert coffee.history == [
        Turn("How can I make my coffee less bitter?", "What brewing method do you use?"),
    ]
    assert coffee.prompt == "A French press."
    assert coffee.chosen.startswith("Try a coarser grind")  # leading space stripped
    assert coffee.rejected == "Add more sugar."
    raw = raw_lines("rm-static.handmade.jsonl")
    assert [p.chosen for p in from_jsonl] == [r["chosen"][1:] for r in raw]


def test_beyond_parquet_equals_jsonl_raw_values():
    from_jsonl, _ = read_preference_file(fixture("rlhf-reward-single-round-trans_chinese.handmade.jsonl"))
    from_parquet, _ = read_preference_file(fixture("rlhf-reward-single-round-trans_chinese.handmade.parquet"))
    assert from_parquet == from_jsonl
    raw = raw_lines("rlhf-reward-single-round-trans_chinese.handmade.jsonl")
    assert [(p.prompt, p.chosen, p.rejected, p.history) for p in from_jsonl] == [
        (r["prompt"], r["chosen"], r["rejected"], []) for r in raw
    ]


def test_zhihu_tsv_multi_line_quoted_fields():
    pairs, _ = read_preference_file(fixture("zhihu_rlhf_3k.handmade.tsv"))
    assert [p.prompt for p in pairs] == [
        "如何养成每天阅读的习惯？",
        "为什么有些人喝咖啡会心慌？",
        "刚工作的年轻人应该如何规划理财？",
        "学习编程应该先学哪门语言？",
    ]
    first = pairs[0]
    assert first.chosen.startswith("我的经验是从很小的目标开始。\n1. 每天只读十页，读完就可以停。\n2. ")
    assert first.chosen.endswith("\n坚持一个月之后，阅读就会变成自然而然的事情。")
    assert first.chosen.count("\n") == 4
    assert first.rejected == "多读书就行了。"


def test_tsv_rows_named_by_physical_line(tmp_path, caplog):
    text = 'prompt\tchosen\trejected\nq1\t"a\nb"\tc\nq2\tonly two\n\nq3\t\tc\nq4\t"x\n\ny"\t\n'
    path = write(tmp_path, "pairs.tsv", text)
    with pytest.raises(DataFormatError, match=r"pairs\.tsv:4: "):
        read_preference_file(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pairs, report = read_preference_file(path, skip_bad_records=True)
    assert pairs == [PreferencePair("q1", "a\nb", "c")]
    assert report.skipped == {"malformed_row": 1, "empty_chosen": 1, "empty_rejected": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("pairs.tsv:6:" in m and "empty_chosen" in m for m in messages)
    assert any("pairs.tsv:7:" in m and "empty_rejected" in m for m in messages)  # a row spanning lines 7-9


def test_csv_is_read_with_commas(tmp_path):
    path = write(tmp_path, "pairs.csv", 'prompt,chosen,rejected\n"q, with comma","good ""quoted""",bad\n')
    pairs, report = read_preference_file(path)
    assert report.format == "prompt_chosen_rejected"
    assert pairs == [PreferencePair("q, with comma", 'good "quoted"', "bad")]


# -- comparison / medical / ShareGPT / OpenAI ------------------------------------------------------


def test_comparison_both_layouts_give_the_same_pairs():
    with_columns, _ = read_preference_file(fixture("comparison_gpt4_data_zh.sample.json"))
    with_output_list, _ = read_preference_file(fixture("comparison_gpt4_data_zh.output-list.derived.json"))
    assert with_output_list == with_columns[:50]
    assert with_columns[0] == PreferencePair(
        prompt="什么是三原色？",
        chosen=(
            "三原色是红、蓝、黄。这些颜色被称为原色，因为它们不能通过混合其他颜色来创建，"
            "所有其他颜色都可以通过将它们按不同比例组合而成。"
            "在用于光的加色系统中，原色是红色、绿色和蓝色 (RGB)。"
        ),
        rejected="红色、黄色和绿色。",
    )


def test_comparison_equal_pair_is_skipped_with_its_item(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, report = read_preference_file(fixture("comparison_gpt4_data_zh.sample.json"))
    assert report.skipped == {"chosen_equals_rejected": 1}
    messages = [r.getMessage() for r in caplog.records]
    expected = "comparison_gpt4_data_zh.sample.json item 92: skipped record (chosen_equals_rejected)"
    assert any(expected in m for m in messages)


def test_comparison_input_and_bad_output(tmp_path):
    records = [
        {"instruction": "translate", "input": "猫", "output": ["cat", "dog"]},
        {"instruction": "translate", "input": "猫", "output": ["cat"]},
    ]
    pairs, report = read_preference_file(write(tmp_path, "cmp.json", json.dumps(records)))
    assert pairs == [PreferencePair("translate\n猫", "cat", "dog")]
    assert report.skipped == {"bad_field:output": 1}


def test_medical_fields():
    pairs, _ = read_preference_file(fixture("medical_reward.sample.jsonl"))
    raw = raw_lines("medical_reward.sample.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["question"], r["response_chosen"], r["response_rejected"]) for r in raw
    ]
    assert pairs[0] == PreferencePair(
        "肛门病变可能是什么疾病的症状?", "食管克罗恩病", "肛门病变可能与多种不同类型的病症有关。"
    )


def test_sharegpt_preference_system_and_prompt():
    pairs, _ = read_preference_file(fixture("dpo_zh_demo.sample.json"))
    raw = raw_json("dpo_zh_demo.sample.json")
    with_system = [p for p in pairs if p.system is not None]
    assert len(with_system) == 8
    assert with_system[0].system == "你是一个非常聪明的AI助手，非常擅长按照指示行事。尽你所能地帮助。"
    for pair, rec in zip(pairs, raw, strict=True):
        assert pair.prompt == rec["conversations"][-1]["value"]
        assert (pair.chosen, pair.rejected) == (rec["chosen"]["value"], rec["rejected"]["value"])
        assert pair.history == []


def test_sharegpt_preference_history(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
        ],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    tool = {**record, "chosen": {"from": "function_call", "value": "{}"}}
    pairs, report = read_preference_file(write(tmp_path, "dpo.json", json.dumps([record, tool])))
    assert pairs == [PreferencePair("q2", "good", "bad", history=[Turn("q1", "a1")], system="sys")]
    assert report.skipped == {"uses_tools": 1}


def test_ultrafeedback_messages():
    pairs, _ = read_preference_file(fixture("ultrafeedback.dpo.sample.jsonl"))
    raw = raw_lines("ultrafeedback.dpo.sample.jsonl")
    assert [(p.prompt, p.chosen, p.rejected, p.history) for p in pairs] == [
        (r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"], []) for r in raw
    ]
    assert pairs[0].prompt == "how can i develop a habit of drawing daily"


def test_openai_preference_layouts(tmp_path):
    def m(role, content):
        return {"role": role, "content": content}

    records = [
        # TRL implicit prompt: the context is the prompt column, the sides are only the reply.
        {
            "prompt": [m("system", "s"), m("user", "q")],
            "chosen": [m("assistant", "y")],
            "rejected": [m("assistant", "n")],
        },
        {
            "prompt": "q",
            "chosen": [m("user", "q"), m("assistant", "y")],
            "rejected": [m("user", "Q"), m("assistant", "n")],
        },
        {"prompt": "q", "chosen": [m("user", "q"), m("assistant", "y")], "rejected": []},
    ]
    pairs, report = read_preference_file(write(tmp_path, "dpo.jsonl", jsonl(records)))
    assert pairs == [PreferencePair("q", "y", "n", system="s")]
    assert report.skipped == {"prefix_mismatch": 1, "empty_rejected": 1}


# -- errors, detection, names ----------------------------------------------------------------------


@pytest.mark.parametrize("skip_bad_records", [False, True])
def test_truncated_array_error_names_file_line_and_column(skip_bad_records):
    with pytest.raises(DataFormatError) as err:
        path = fixture("edge_cases/comparison_truncated_array.json")
        read_preference_file(path, skip_bad_records=skip_bad_records)
    message = str(err.value)
    assert "comparison_truncated_array.json:17:19" in message and "line 17 column 19" in message


def test_malformed_line(tmp_path):
    text = jsonl([{"prompt": "q", "chosen": "y", "rejected": "n"}]) + '{"prompt": \n'
    path = write(tmp_path, "p.jsonl", text)
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: malformed JSON"):
        read_preference_file(path)
    pairs, report = read_preference_file(path, skip_bad_records=True)
    assert len(pairs) == 1 and report.skipped == {"malformed_json": 1}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"chosen": "\n\nHuman: q\n\nAssistant: y", "rejected": "\n\nHuman: q\n\nAssistant: n"}, "hh_rlhf"),
        ({"prompt": "q", "chosen": "y", "rejected": "n"}, "prompt_chosen_rejected"),
        ({"prompt": "q", "response": "y", "chosen": "y", "rejected": "n"}, "prompt_chosen_rejected"),
        ({"instruction": "q", "input": "", "output": ["y", "n"]}, "comparison"),
        ({"instruction": "q", "input": "", "chosen": "y", "rejected": "n"}, "comparison"),
        ({"question": "q", "response_chosen": "y", "response_rejected": "n"}, "medical"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt_preference"),
        ({"prompt": "q", "chosen": [], "rejected": [], "messages": []}, "openai_preference"),
    ],
)
def test_detect_preference_format(record, expected):
    assert detect_preference_format(record, "f.jsonl") == expected


def test_sft_file_is_not_read_as_preference():
    with pytest.raises(DataFormatError) as err:
        read_preference_file(fixture("Belle_open_source_0.5M.sample.json"))
    message = str(err.value)
    assert "Belle_open_source_0.5M.sample.json" in message and "'instruction'" in message
    assert all(fmt in message for fmt in PREFERENCE_FORMATS)


def test_unknown_format_lists_choices_and_closest_match():
    with pytest.raises(DataFormatError) as err:
        read_preference_file(fixture("medical_reward.sample.jsonl"), "hh-rlhf")
    message = str(err.value)
    assert "did you mean 'hh_rlhf'" in message and "medical_reward.sample.jsonl" in message
    assert all(fmt in message for fmt in PREFERENCE_FORMATS)
    with pytest.raises(DataFormatError, match="other reader"):
        read_preference_file(fixture("medical_reward.sample.jsonl"), "belle")
