"""config/lora_config.json, as shipped, pointed at a tiny Baichuan-13B-shaped hub folder: dry run and QLoRA steps.

The folder looks like a hub download (model_type "baichuan", auto_map, model_max_length, the
gradient_checkpointing list quirk, .py files that must never run) with Baichuan2's real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_sft
from tests.utils import REPO

pytestmark = pytest.mark.slow


def shipped_config(tmp_path: Path, **overrides) -> str:
    values = json.loads((REPO / "config" / "lora_config.json").read_text(encoding="utf-8"))
    values.update(overrides)
    path = tmp_path / "lora_config.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


def test_lora_config_dry_run_and_two_qlora_steps_on_tiny_baichuan_13b(tmp_path, baichuan_13b_folder, fixtures_dir):
    data = fixtures_dir / "datasets" / "safety_prompts.typical_safety_scenarios.handmade.json"
    shipped = json.loads((REPO / "config" / "lora_config.json").read_text(encoding="utf-8"))
    assert "trust_remote_code" not in shipped and shipped["template"] == "human_assistant"
    args_file = shipped_config(
        tmp_path,
        model_name_or_path=str(baichuan_13b_folder),
        train_file=str(data),
        output_dir=str(tmp_path / "out"),
        data_cache_dir=str(tmp_path / "cache"),
    )
    train_sft.main(["--train_args_file", args_file, "--dry_run", "true"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    # three scenarios x 3 hand-made records; one held out by test_size
    assert report["sources"][0]["kept"] == 9 and report["examples"] + report["eval_examples"] == 9
    preview = json.loads((tmp_path / "out" / "data_preview.jsonl").read_text().splitlines()[0])
    assert preview["input_ids"][0] == 1 and preview["input_ids"][1] != 1  # one BOS
    assert preview["input_ids"][-1] == 2 and preview["labels"][-1] == 2

    trainer = train_sft.main(
        [
            "--train_args_file", args_file,
            # CPU stand-ins for the GPU-only settings of the shipped config
            "--bf16", "false", "--optim", "adamw_torch", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--dataloader_num_workers", "0", "--learning_rate", "0.01",
        ]
    )  # fmt: skip
    base = trainer.model.get_base_model()
    assert type(base).__name__ == "BaichuanForCausalLM"
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    targets = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
