"""Shared test fixtures: the shared/ fixture folder and tiny models built on the spot (nothing downloaded).

Helpers (paths, configs, file writers, torchrun) live in tests/utils.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.utils import SHARED_FIXTURES, TINY_LLAMA

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES}")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def demo_tokenizer():
    from component.demo_assets import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, demo_tokenizer) -> Path:
    """A 2-layer random-init Llama folder with the demo tokenizer (BOS <s>, EOS </s>, ChatML template)."""
    from component.demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), config=TINY_LLAMA, tokenizer=demo_tokenizer)


@pytest.fixture(scope="session")
def baichuan_13b_folder(tmp_path_factory, shared_fixtures) -> Path:
    """A tiny Baichuan-13B-shaped hub folder (auto_map, quirks, .py files that must never run), real tokenizer."""
    from component.model.baichuan import BaichuanConfig, BaichuanForCausalLM

    folder = tmp_path_factory.mktemp("Baichuan-13B-Base")
    hub_config = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_type": "baichuan",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "model_max_length": 512,
        "vocab_size": 125696,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "gradient_checkpointing": [False],
    }
    config = BaichuanConfig(**{k: v for k, v in hub_config.items() if k not in ("architectures", "auto_map")})
    BaichuanForCausalLM(config).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(hub_config), encoding="utf-8")
    for name in ("modeling_baichuan.py", "configuration_baichuan.py", "tokenization_baichuan.py"):
        (folder / name).write_text("raise RuntimeError('hub code must never run')\n", encoding="utf-8")
    tokenizer_dir = shared_fixtures / "tokenizers" / "baichuan2"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
