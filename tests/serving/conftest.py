"""Tiny models for the serving checks: each kind's base folder, two LoRA adapters on it and the first one merged.

vLLM's CPU attention takes head sizes of 32 and up, so these models have 2 heads of 32 (Qwen2: 2 query heads
sharing 1 KV head). Kinds: the demo-shaped Llama (human_assistant, BPE tokenizer), a Qwen2 (its ChatML
chat_template) and the four Baichuan variants (baichuan_chat, the real Baichuan2 tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.export.tiny_models import BAICHUAN_VARIANTS, build_baichuan, build_qwen2
from tests.serving.vllm_env import require_vllm
from tests.utils import TINY_LLAMA

KINDS = ["llama", "qwen2", *BAICHUAN_VARIANTS]
TEMPLATES = {"llama": "human_assistant", "qwen2": "chat_template", **dict.fromkeys(BAICHUAN_VARIANTS, "baichuan_chat")}
# (history, question, system): lengths differ, so a batch pads; one has a history turn, one a system prompt
CONVERSATIONS = [
    ([], "你好", None),
    ([], "把 4071 逐位写成汉字", None),
    ([("hello world, it's a test!", "Yes, it's fine.")], "Don't worry, is it?", None),
    ([], "Tell me, in one long sentence, why the sky is blue at noon and red at dusk?", "Answer briefly."),
]
MAX_NEW_TOKENS = 16


@dataclass
class ServedModel:
    kind: str
    base: Path
    adapters: dict[str, Path]  # two LoRA adapters of the base: "a", "b"
    merged: Path  # base + adapter "a", by export.py --format hf's code

    @property
    def template(self) -> str:
        return TEMPLATES[self.kind]


def build_base(folder: Path, kind: str, demo_tokenizer) -> Path:
    if kind == "llama":
        from component.demo_assets import build_tiny_model

        config = {**TINY_LLAMA, "num_attention_heads": 2, "num_key_value_heads": 2}
        build_tiny_model(folder, config=config, tokenizer=demo_tokenizer)
    elif kind == "qwen2":
        build_qwen2(folder, num_attention_heads=2, num_key_value_heads=1)
    else:
        build_baichuan(folder, kind, layers=2, hidden=64)
    (folder / "train_args.json").write_text(json.dumps({"template": TEMPLATES[kind]}), encoding="utf-8")
    return folder


def build_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A LoRA (rank 8, every linear layer but the head) with random B, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import component.model  # noqa: F401  (registers Baichuan)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    (folder / "train_args.json").write_text((base / "train_args.json").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def served_models(tmp_path_factory, demo_tokenizer) -> dict[str, ServedModel]:
    require_vllm()
    from component.export.merge import merge_adapter

    root = tmp_path_factory.mktemp("served")
    models = {}
    for kind in KINDS:
        base = build_base(root / kind / "base", kind, demo_tokenizer)
        adapters = {name: build_adapter(base, root / kind / name, seed) for name, seed in (("a", 1), ("b", 2))}
        merged = merge_adapter(str(adapters["a"]), str(root / kind / "merged"), str(base), dtype="float32")
        models[kind] = ServedModel(kind, base, adapters, merged)
    return models
