"""The SFT data pipeline end to end through `train_sft.py --dry_run true`: report, preview, counts, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_sft
from component.data.template import IGNORE_INDEX


def write_args(tmp_path: Path, **values) -> str:
    path = tmp_path / f"args_{len(list(tmp_path.glob('args_*.json')))}.json"
    path.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture()
def mixed_args(tmp_path, tiny_llama_dir, fixtures_dir):
    datasets = fixtures_dir / "datasets"
    return {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": [
            {"path": str(datasets / "Belle_open_source_0.5M.sample.json"), "max_samples": 50},
            str(datasets / "edge_cases" / "firefly_empty_target.jsonl"),
            {
                "path": str(datasets / "safety_prompts.typical_safety_scenarios.handmade.json"),
                "safety_scenarios": ["Insult", "Ethics_And_Morality"],
            },
            str(datasets / "moss-003-sft-data.firefly.sample.jsonl"),
        ],
        "max_seq_length": 256,
        "output_dir": str(tmp_path / "out"),
        "data_cache_dir": str(tmp_path / "cache"),
        "dry_run": True,
    }


def test_dry_run_writes_report_and_preview(tmp_path, mixed_args):
    train_sft.main(["--train_args_file", write_args(tmp_path, **mixed_args)])
    out = Path(mixed_args["output_dir"])
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    belle, firefly, safety, moss = report["sources"]
    assert belle["format"] == "belle" and belle["read"] == 300
    assert belle["skipped"]["max_samples"] == 250
    assert firefly["format"] == "firefly" and firefly["read"] == 4 and firefly["kept"] == 2
    assert sum(firefly["skipped"].values()) == 2
    assert safety["format"] == "safety_prompts" and safety["kept"] == 6
    assert moss["format"] == "moss_firefly" and moss["read"] == 33
    # long MOSS conversations do not fit 256 tokens: counted, never silently cut
    assert moss["truncated"] > 0
    kept = sum(s["kept"] for s in report["sources"])
    assert report["examples"] == kept
    for source in report["sources"]:  # every record read is kept or skipped for a counted reason
        assert source["read"] == source["kept"] + sum(source["skipped"].values())
    assert set(report["tokens"]) == {"min", "p50", "p90", "p99", "max"}
    assert report["tokens"]["max"] <= 256
    assert 0 < report["label_token_fraction"] < 1
    preview = [json.loads(line) for line in (out / "data_preview.jsonl").read_text().splitlines()]
    assert len(preview) == 20
    for row in preview:
        assert len(row["input_ids"]) == len(row["labels"])
        assert any(label != IGNORE_INDEX for label in row["labels"][1:])
    assert (out / "train_args.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # dry run: no model loaded, nothing trained


def test_second_run_loads_the_cache_and_settings_change_the_key(tmp_path, mixed_args, tiny_llama_dir):
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    args, training_args = build_arguments(mixed_args)
    template = get_template("human_assistant", load_tokenizer(str(tiny_llama_dir)))
    first = prepare_sft_data(args, template, training_args)
    second = prepare_sft_data(args, template, training_args)
    assert not first.from_cache and second.from_cache
    assert first.report == second.report and second.train["input_ids"] == first.train["input_ids"]
    args.max_seq_length = 128
    third = prepare_sft_data(args, template, training_args)
    assert not third.from_cache and third.cache_path != first.cache_path


def test_test_size_holds_out_a_split(tmp_path, mixed_args):
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    args, training_args = build_arguments({**mixed_args, "test_size": 0.2})
    template = get_template("human_assistant", load_tokenizer(mixed_args["model_name_or_path"]))
    data = prepare_sft_data(args, template, training_args)
    total = sum(s["kept"] for s in data.report["sources"])
    read = sum(
        s["read"]
        - s["skipped"].get("scenario_excluded", 0)
        - s["skipped"].get("max_samples", 0)
        - s["skipped"].get("empty_reply", 0)
        for s in data.report["sources"]
    )
    assert len(data.train) + len(data.eval) == total
    assert abs(len(data.eval) - 0.2 * read) <= 1 + sum(
        s["skipped"].get("no_label_after_truncation", 0) for s in data.report["sources"]
    )


def test_malformed_line_is_an_error_naming_file_and_line(tmp_path, mixed_args, fixtures_dir):
    bad = str(fixtures_dir / "datasets" / "edge_cases" / "belle_malformed_line4.json")
    with pytest.raises(ValueError, match="belle_malformed_line4.json:4"):
        train_sft.main(["--train_args_file", write_args(tmp_path, **{**mixed_args, "train_file": bad})])
    train_sft.main(
        [
            "--train_args_file",
            write_args(tmp_path, **{**mixed_args, "train_file": bad, "skip_bad_records": True, "max_seq_length": 2048}),
        ]
    )
    report = json.loads((Path(mixed_args["output_dir"]) / "data_report.json").read_text())
    assert report["sources"][0]["skipped"] == {"malformed_json": 1} and report["examples"] == 4
