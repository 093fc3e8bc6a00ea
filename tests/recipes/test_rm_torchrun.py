"""train_rm.py under a 2-process torchrun on the CPU (gloo): trains, evaluates and saves once."""

from __future__ import annotations

import json

import pytest

from tests.utils import REPO, run_torchrun

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_train_and_save_once(tmp_path, tiny_llama_dir):
    pairs = (REPO / "data/demo/preference_train.jsonl").read_text("utf-8").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(pairs[:32]) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(pairs[32:40]) + "\n", encoding="utf-8")
    out = tmp_path / "ddp"
    args = {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": str(tmp_path / "train.jsonl"),
        "eval_file": str(tmp_path / "eval.jsonl"),
        "max_seq_length": 64,
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "output_dir": str(out),
        "data_cache_dir": str(tmp_path / "cache"),
    }
    args_file = tmp_path / "ddp.json"
    args_file.write_text(json.dumps(args), encoding="utf-8")
    run_torchrun(REPO / "train_rm.py", "--train_args_file", args_file)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert state["epoch"] == pytest.approx(3 / 4)  # 32 pairs / (2 processes x 4) = 4 steps per epoch
    saved = sorted(str(p.relative_to(out)) for p in out.glob("**/adapter_model.safetensors"))
    assert saved == [
        "adapter_model.safetensors",
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-3/adapter_model.safetensors",
    ]  # written once, by rank 0
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_margin" in results
