"""export.py --format hf on the four Baichuan variants: the merged folder keeps the hub layout (architectures
spelling, W_pack, the NormHead weight as published), loads back in our loader with identical logits, and loads in
plain transformers without this project (our standalone files, trust_remote_code=True) with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from component.export.merge import merge_adapter
from component.model.baichuan import AUTO_MAP, STANDALONE_FILES
from component.model.loader import load_pretrained, load_tokenizer
from tests.export.tiny_models import BAICHUAN_VARIANTS, build_baichuan

INPUT_IDS = torch.tensor([[1, 195, 92, 1000, 5000, 196, 31, 2]])


@pytest.mark.parametrize("variant", list(BAICHUAN_VARIANTS))
def test_merged_baichuan_keeps_hub_layout_and_logits_and_loads_without_the_project(variant, tmp_path):
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
    # our standalone files, for transformers without this project (our loader ignores them: see below)
    assert sorted(path.name for path in merged.glob("*.py")) == sorted(STANDALONE_FILES)
    assert config["auto_map"] == AUTO_MAP

    loaded = load_pretrained(str(merged), dtype=torch.float32)
    assert type(loaded).__module__ == "component.model.baichuan.modeling_baichuan"  # ours, not the folder's copy
    assert loaded.config.use_alibi == BAICHUAN_VARIANTS[variant][1]
    assert loaded.config.use_norm_head == BAICHUAN_VARIANTS[variant][2]
    with torch.no_grad():
        logits = loaded(input_ids=INPUT_IDS).logits
        unmerged = reference.merge_and_unload()(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits, unmerged)  # the saved folder is the merged model exactly

    # The same folder where this project is not installed: transformers 5 runs our standalone files.
    plain_logits, tokenizer_class, ids = plain_transformers(merged, tmp_path)
    assert torch.equal(plain_logits, logits)
    assert tokenizer_class == "BaichuanTokenizer"
    assert ids == load_tokenizer(str(merged))("<reserved_106>你好 world")["input_ids"]


# Runs with `python -I` (no PYTHONPATH, no working directory on sys.path): this project cannot be imported.
PLAIN_TRANSFORMERS = """
import importlib.util, sys
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

assert importlib.util.find_spec("component") is None, "the project is importable"
folder, ids, out = sys.argv[1], [int(i) for i in sys.argv[2].split(",")], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__.startswith("transformers_modules")
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    save_file({"logits": model(input_ids=torch.tensor([ids])).logits.contiguous()}, out)
print(type(tokenizer).__name__, tokenizer("<reserved_106>你好 world")["input_ids"])
"""


def plain_transformers(folder, tmp_path) -> tuple[torch.Tensor, str, list[int]]:
    """(logits of INPUT_IDS, tokenizer class, ids of a text) from transformers alone, trust_remote_code=True."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    ids = ",".join(map(str, INPUT_IDS[0].tolist()))
    command = [sys.executable, "-I", "-c", PLAIN_TRANSFORMERS, str(folder), ids, str(tmp_path / "logits.safetensors")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name, ids_text = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return load_file(tmp_path / "logits.safetensors")["logits"], name, json.loads(ids_text)
