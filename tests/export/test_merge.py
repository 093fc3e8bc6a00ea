"""merge_lora.py: merged weights give the logits of base + adapter, load with plain transformers, keep RM heads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from component.config.parser import ConfigError
from component.export.merge import merge_adapter
from tests.utils import REPO, TINY_LLAMA

TINY = TINY_LLAMA  # the suite's tiny Llama (tests/conftest.py)
INPUT_IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45], [1, 50, 60, 70, 80, 90, 100]])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from component.demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("merge") / "base", config=TINY, seed=3)


def _adapter(base: Path, folder: Path, task_type: str | None = None) -> Path:
    """A LoRA adapter with random non-zero weights (so merging changes the logits)."""
    torch.manual_seed(4)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=3)
        config = LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            modules_to_save=["score"],
            task_type="SEQ_CLS",
            init_lora_weights=False,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if task_type == "SEQ_CLS":  # a "trained" head: different from the base's freshly initialized one
        with torch.no_grad():
            for parameter in peft_model.base_model.model.score.modules_to_save.parameters():
                parameter.normal_(0, 1)
    peft_model.save_pretrained(folder)
    (folder / "train_args.json").write_text(json.dumps({"template": "human_assistant"}), encoding="utf-8")
    return folder


def test_merged_logits_equal_base_plus_adapter(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        expected = reference(input_ids=INPUT_IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=INPUT_IDS).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter matters

    output = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="float32")
    files = {p.name for p in output.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "train_args.json"} <= files
    merged = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no peft
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=INPUT_IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_reward_model_merge_keeps_the_trained_head(base, tmp_path):
    adapter = _adapter(base, tmp_path / "rm", task_type="SEQ_CLS")
    with torch.no_grad():
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=3)
        reference = PeftModel.from_pretrained(model, adapter)
        expected = reference(input_ids=INPUT_IDS).logits

    output = merge_adapter(str(adapter), str(tmp_path / "rm_merged"), model_name_or_path=str(base), dtype="float32")
    merged = AutoModelForSequenceClassification.from_pretrained(output)
    assert merged.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=INPUT_IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_merging_into_a_quantized_base_is_refused(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="Load the base in 16-bit to merge"):
        merge_adapter(str(adapter), str(tmp_path / "merged"), quantization="4bit")
    assert not (tmp_path / "merged").exists()


def test_cli_merges_in_bf16_by_default(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter")
    command = [sys.executable, "merge_lora.py", "--adapter", str(adapter), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.dtype == torch.bfloat16
