"""export.py --format hf on the four Baichuan variants: the merged folder keeps the hub layout (architectures
spelling, W_pack, the NormHead weight as published) and loads back in our loader with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from component.export.merge import merge_adapter
from component.model.loader import load_pretrained
from tests.export.tiny_models import BAICHUAN_VARIANTS, build_baichuan

INPUT_IDS = torch.tensor([[1, 195, 92, 1000, 5000, 196, 31, 2]])


@pytest.mark.parametrize("variant", list(BAICHUAN_VARIANTS))
def test_merged_baichuan_keeps_hub_layout_and_logits(variant, tmp_path):
    base = build_baichuan(tmp_path / "base", variant, layers=2)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        expected = reference(input_ids=INPUT_IDS).logits

    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), str(base), dtype="float32")
    config = json.loads((merged / "config.json").read_text())
    hub_config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == hub_config["architectures"]  # BaiChuanForCausalLM for Baichuan-7B
    assert ("max_position_embeddings" in config) == ("max_position_embeddings" in hub_config)
    weights = load_file(merged / "model.safetensors")
    assert "model.layers.0.self_attn.W_pack.weight" in weights and not any("lora" in n for n in weights)
    # lm_head is no LoRA target: the merged NormHead weight is the published (unnormalised) one, bit for bit
    torch.testing.assert_close(weights["lm_head.weight"], load_file(base / "model.safetensors")["lm_head.weight"])
    assert not any(path.suffix == ".py" for path in merged.iterdir())  # our loader needs no remote code

    loaded = load_pretrained(str(merged), dtype=torch.float32)
    assert type(loaded).__name__ == "BaichuanForCausalLM" and loaded.config.use_alibi == BAICHUAN_VARIANTS[variant][1]
    assert loaded.config.use_norm_head == BAICHUAN_VARIANTS[variant][2]
    with torch.no_grad():
        logits = loaded(input_ids=INPUT_IDS).logits
        unmerged = reference.merge_and_unload()(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits, unmerged)  # the saved folder is the merged model exactly
