"""Bad input, case by case (issue 16 and docs/data.md's skip reasons): one line, the right exit code, or a count.

Entry points run in-process through `run_cli`, exactly as their `__main__` does, so each case costs no interpreter
start; one subprocess case checks that --help and usage errors answer before torch loads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from component.config.parser import run_cli
from component.data.readers import read_preference_file, read_sft_file
from tests.faults.conftest import write_args
from tests.utils import REPO

GOOD = {"instruction": "把 12 逐位写成汉字", "output": "一二"}


def run_entry(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of an entry point run as its __main__ does."""
    capsys.readouterr()
    try:
        run_cli(main, argv, lambda: "help")
        code = 0
    except SystemExit as error:
        code = error.code
    return code, capsys.readouterr().err


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


# (case, file settings, command line, exit code, one-line message pattern)
TRAIN_CASES = [
    ("lora_alpha 0 trains nothing", {"lora_alpha": 0}, [], 1, r"'lora_alpha' must be > 0, got 0"),
    ("negative epochs", {"num_train_epochs": -1, "max_steps": -1}, [], 1, r"'num_train_epochs' must be > 0"),
    ("max_steps 0", {"max_steps": 0}, [], 1, r"'max_steps' must be > 0"),
    (
        "negative learning rate, CLI named",
        {},
        ["--learning_rate", "-1"],
        1,
        r"^config error: --learning_rate must be >= 0",
    ),
    ("lora_dropout above 1", {"lora_dropout": 1.5}, [], 1, r"'lora_dropout' must be >= 0 and < 1, got 1.5"),
    ("batch size 0", {"per_device_train_batch_size": 0}, [], 1, r"'per_device_train_batch_size' must be >= 1"),
    ("grad accumulation 0", {"gradient_accumulation_steps": 0}, [], 1, r"'gradient_accumulation_steps' must be >= 1"),
    ("data_format typo", {"data_format": "alpacca"}, [], 1, r"'data_format' must be one of .*Did you mean 'alpaca'"),
    ("per-file format typo", "format_typo", [], 1, r"'train_file' format 'belel' is unknown.*Did you mean 'belle'"),
    ("unknown key on the CLI", {}, ["--lora_rnak", "4"], 1, r"unknown option '--lora_rnak'. Did you mean 'lora_rank'"),
    ("a folder as train_file", "folder", [], 1, r"'train_file' .* is a folder"),
    ("missing train_file", "missing", [], 1, r"'train_file' file .* does not exist"),
    ("bad UTF-8", "utf8", [], 1, r"^data error: .*bad_utf8.jsonl:2:18: not valid UTF-8"),
    ("malformed JSON line", "malformed", [], 1, r"^data error: .*malformed.jsonl:2: malformed JSON"),
    (
        "every record dropped",
        "all_skipped",
        [],
        1,
        r"^data error: no training examples left after reading: kept 0 of 2",
    ),
    (
        "every example too long",
        {"max_seq_length": 8},
        [],
        1,
        r"^data error: no training examples left after tokenizing",
    ),
    ("unknown LoRA target", {"lora_target_modules": ["q_projj"]}, [], 1, r"\['q_projj'\] not found .*'q_proj'"),
]


@pytest.mark.parametrize("case, settings, cli, code, pattern", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_sft_bad_input(case, settings, cli, code, pattern, tmp_path, fault_args, fault_data, capsys):
    import train_sft

    args = {**fault_args, "output_dir": str(tmp_path / "out"), "max_steps": 1}
    files = {
        "format_typo": {"train_file": [{"path": str(fault_data), "format": "belel"}]},
        "folder": {"train_file": str(tmp_path)},
        "missing": {"train_file": str(tmp_path / "nope.jsonl")},
        "malformed": {"train_file": str(tmp_path / "malformed.jsonl")},
        "utf8": {"train_file": str(tmp_path / "bad_utf8.jsonl")},
        "all_skipped": {
            "train_file": _jsonl(tmp_path / "skipped.jsonl", [{**GOOD, "input": 5}, {**GOOD, "input": ["z"]}])
        },
    }
    (tmp_path / "malformed.jsonl").write_text(json.dumps(GOOD) + '\n{"instruction": "x",\n', encoding="utf-8")
    (tmp_path / "bad_utf8.jsonl").write_bytes(
        json.dumps(GOOD).encode() + b'\n{"instruction": "\xff\xfe", "output": "y"}\n'
    )
    args.update(files.get(settings, {}) if isinstance(settings, str) else settings)
    exit_code, err = run_entry(train_sft.main, ["--train_args_file", write_args(tmp_path, **args), *cli], capsys)
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]
    assert exit_code == code, err
    assert len(lines) == 1 and "Traceback" not in err, err  # progress bars aside, one line
    assert re.search(pattern, lines[0]), lines[0]
    if "no training examples left" in pattern:  # the report is written first, and the message points at it
        report = json.loads((tmp_path / "out" / "data_report.json").read_text())
        assert report["examples"] == 0 and report["sources"][0]["read"] > 0
        assert "data_report.json" in lines[0]


def test_debug_shows_the_traceback(tmp_path, fault_args):
    import train_sft
    from component.config.parser import ConfigError

    argv = ["--train_args_file", write_args(tmp_path, **{**fault_args, "output_dir": str(tmp_path), "lora_alpha": 0})]
    with pytest.raises(ConfigError):
        run_cli(train_sft.main, [*argv, "--debug"], lambda: "")


def test_null_on_the_command_line_means_none(tmp_path, fault_args, capsys):
    import train_sft

    argv = ["--train_args_file", write_args(tmp_path, **fault_args, output_dir=str(tmp_path / "o"))]
    code, err = run_entry(train_sft.main, [*argv, "--eval_file", "null", "--max_samples", "null", "--dry_run"], capsys)
    assert code == 0, err


def test_help_and_usage_errors_answer_before_torch_loads(tmp_path):
    for script in ("train_sft.py", "train_rm.py"):
        start = time.time()
        shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
        assert shown.returncode == 0 and "--lora_alpha" in shown.stdout and "docs/config.md" in shown.stdout
        usage = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True)
        assert usage.returncode == 1 and usage.stderr.strip() == (
            f"config error: missing --train_args_file (a JSON file under config/); see {script} --help"
        )
        typo = subprocess.run(
            [sys.executable, script, "--train_args_file", "config/demo/sft_lora.json", "--lora_rnak", "4"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert typo.returncode == 1 and "unknown option '--lora_rnak'. Did you mean 'lora_rank'?" in typo.stderr
        assert time.time() - start < 6, "torch was imported before the arguments were read"


# -- generate.py score: each line checked, file:line named ----------------------------------------------------
SCORE_CASES = [
    ("malformed line", '{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', r"rows.jsonl:2:\d+: not valid JSON"),
    ("missing response", '{"prompt": "a"}\n', r"rows.jsonl:1: missing 'response'"),
    ("numeric fields", '{"prompt": 1, "response": 2}\n', r"rows.jsonl:1: 'prompt' must be a string, got int"),
    ("history not a list", '{"prompt": "a", "response": "b", "history": "oops"}\n', r"rows.jsonl:1: 'history' must be"),
    ("history item", '{"prompt": "a", "response": "b", "history": [["x"]]}\n', r"rows.jsonl:1: 'history' item 0"),
    ("a JSON array line", '["a", "b"]\n', r"rows.jsonl:1: expected a JSON object"),
    ("bad UTF-8", b'{"prompt": "\xff", "response": "b"}\n', r"rows.jsonl:1:13: not valid UTF-8"),
    ("empty file", "\n", r"rows.jsonl: no rows to score"),
]


@pytest.mark.parametrize("case, text, pattern", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_generate_score_checks_every_line(case, text, pattern, tmp_path, capsys):
    import generate

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["score", "--reward_model", str(tmp_path), "--input", str(rows), "--output", str(tmp_path / "s.jsonl")]
    code, err = run_entry(generate.main, argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search("^data error: .*" + pattern, err.strip()), err


@pytest.mark.parametrize(
    "folder, pattern",
    [
        ("/nope/reward", r"'reward_model' '/nope/reward' is not a folder"),
        ("sft_adapter", r"is an SFT \(causal-LM\) adapter, not a reward model; expected a train_rm.py output_dir"),
        ("base", r"is a causal-LM model folder .*not a reward model"),
        ("empty", r"is not a model folder"),
    ],
)
def test_generate_score_says_what_folder_it_expected(folder, pattern, tmp_path, tiny_llama_dir, capsys):
    import generate

    folders = {"sft_adapter": tmp_path / "sft", "base": tiny_llama_dir, "empty": tmp_path / "empty"}
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    (tmp_path / "empty").mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n')
    path = str(folders.get(folder, folder))
    argv = ["score", "--reward_model", path, "--input", str(rows), "--output", str(tmp_path / "s.jsonl")]
    start = time.time()
    code, err = run_entry(generate.main, argv, capsys)
    assert code == 1 and re.search(pattern, err), err
    assert time.time() - start < 10  # no hub retries


@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_an_adapter_on_the_wrong_base_is_one_line_naming_its_base_and_the_shapes(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from component.config.parser import ConfigError
    from component.model.loader import load_adapter

    def tiny(hidden: int):
        config = LlamaConfig(
            hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
        return LlamaForCausalLM(config)

    adapter = get_peft_model(tiny(32), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.peft_config["default"].base_model_name_or_path = "/models/base-32"
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError) as raised:
        load_adapter(tiny(48), str(tmp_path / "adapter"))
    message = str(raised.value)
    assert "\n" not in message and "trained on base '/models/base-32'" in message
    assert re.search(r"adapter torch.Size\(\[\d+, 32\]\) vs model torch.Size\(\[\d+, 48\]\)", message), message


# -- docs/data.md: every skip reason is a count, never an error -------------------------------------------------
SFT = "sft"
PREF = "preference"
SKIP_CASES = [
    (SFT, "alpaca", {"instruction": "q", "output": "a", "input": 5}, "bad_field:input"),
    (SFT, "alpaca", {"instruction": "q"}, "missing_field:output"),
    (SFT, "alpaca", {"instruction": "q", "output": 7}, "bad_field:output"),
    (SFT, "alpaca", {"instruction": "q", "output": "a", "history": "oops"}, "bad_field:history"),
    (SFT, "alpaca", {"instruction": " ", "output": "a"}, "empty_prompt"),
    (SFT, "alpaca", {"instruction": "q", "output": "  "}, "empty_reply"),
    (SFT, "alpaca", ["not", "an", "object"], "not_an_object"),
    (SFT, "sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
    (SFT, "sharegpt", {"conversations": [{"from": ["x"], "value": "y"}]}, "bad_structure"),
    (SFT, "sharegpt", {"conversations": [{"from": "gpt", "value": "a"}]}, "bad_turn_order"),
    (
        SFT,
        "sharegpt",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{}]"},
        "uses_tools",
    ),
    (PREF, "hh_rlhf", {"chosen": "no transcript", "rejected": "no transcript"}, "bad_transcript"),
    (
        PREF,
        "hh_rlhf",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
        "prefix_mismatch",
    ),
    (PREF, "hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing_field:rejected"),
    (PREF, "prompt_chosen_rejected", {"prompt": "q", "chosen": " ", "rejected": "r"}, "empty_chosen"),
    (PREF, "prompt_chosen_rejected", {"prompt": "q", "chosen": "c", "rejected": ""}, "empty_rejected"),
    (PREF, "prompt_chosen_rejected", {"prompt": "q", "chosen": "same ", "rejected": " same"}, "chosen_equals_rejected"),
]


@pytest.mark.parametrize("kind, fmt, record, reason", SKIP_CASES, ids=[f"{c[1]}-{c[3]}" for c in SKIP_CASES])
def test_each_skip_reason_is_counted(kind, fmt, record, reason, tmp_path):
    good = {
        "alpaca": {"instruction": "q", "output": "a"},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    }.get(fmt)
    records = [record] if good is None else [good, record]  # a good first record: the format is detected from it
    path = _jsonl(tmp_path / "data.jsonl", records)
    reader = read_sft_file if kind == SFT else read_preference_file
    _, report = reader(path, fmt)
    assert report.skipped == {reason: 1}, report
    assert report.read == report.kept + sum(report.skipped.values())


def test_malformed_rows_and_excluded_scenarios_are_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n", encoding="utf-8")
    _, report = read_sft_file(str(path), skip_bad_records=True)
    assert report.skipped == {"malformed_json": 1}
    csv = tmp_path / "data.csv"
    csv.write_text("instruction,output\nq,a\nq,a,extra\n", encoding="utf-8")
    _, report = read_sft_file(str(csv), "alpaca", skip_bad_records=True)
    assert report.skipped == {"malformed_row": 1}
    safety = tmp_path / "safety.json"
    safety.write_text(
        json.dumps(
            {"A": [{"prompt": "q", "response": "r", "type": "A"}], "B": [{"prompt": "q", "response": "r", "type": "B"}]}
        )
    )
    _, report = read_sft_file(str(safety), safety_scenarios=["A"])
    assert report.skipped == {"scenario_excluded": 1} and report.kept == 1


def test_a_full_disk_anywhere_is_one_line_and_exit_74(capsys):
    import errno
    import os

    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/data_report.json")

    code, err = run_entry(main, [], capsys)
    assert code == 74 and err.strip().startswith("disk full: ") and "data_report.json" in err


def test_compare_questions_files_name_the_bad_line(tmp_path):
    from component.data.readers import DataFormatError
    from component.inference.compare import read_questions

    bad = tmp_path / "questions.txt"
    bad.write_bytes("第一个问题\n".encode() + b"ok \xff\n")
    with pytest.raises(DataFormatError, match=r"questions.txt:2:4: not valid UTF-8"):
        read_questions(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no questions"):
        read_questions(str(empty))


def test_our_defaults_cause_no_warnings(tmp_path, fault_args):
    import warnings

    from component.config.training import build_arguments

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        build_arguments({**fault_args, "output_dir": str(tmp_path)})


@pytest.mark.parametrize(
    "export_format, model",
    [("onnx", "baichuan"), ("onnx", "llama"), ("gguf", "llama"), ("hf", "llama adapter")],
)
def test_export_of_a_folder_without_tokenizer_is_one_line(export_format, model, tmp_path, tiny_llama_dir, capsys):
    """export.py names the missing tokenizer files (it used to end in SentencePiece's ValueError, after loading
    the weights)."""
    import runpy
    import shutil

    from tests.export.tiny_models import build_baichuan

    export_main = runpy.run_path(str(REPO / "export.py"))["main"]  # `import export` finds tests/export

    if model == "baichuan":
        folder = build_baichuan(tmp_path / "model", "baichuan_13b", layers=1)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink()
        missing = "tokenizer.model missing"
    else:
        folder = tmp_path / "model"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(tiny_llama_dir / name, folder / name)
        missing = "tokenizer.json / tokenizer.model / vocab.json / vocab.txt missing"
    argv = ["--format", export_format, "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(folder)]
    if model == "llama adapter":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        adapter = tmp_path / "adapter"
        get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2)).save_pretrained(adapter)
        argv += ["--adapter", str(adapter)]
    code, err = run_entry(export_main, argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"^config error: model folder '.*' has no tokenizer: {re.escape(missing)}", err), err
