"""Shared test fixtures: the bundled fixture folder (tests/fixtures) and tiny models built on the spot (nothing downloaded).

Helpers (paths, configs, file writers, torchrun) live in tests/utils.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.utils import FIXTURES, TINY_LLAMA

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail_unexpected_skip(report) -> None:
    """Under CI, a skip that no opt-in step explains (tests.utils.opt_in) becomes a failure."""
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not reason.removeprefix("Skipped: ").startswith("opt-in: "):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip under CI (only opt-in skips are allowed): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """CI fails a test that skips for any reason but an opt-in check, so a missing fixture cannot hide tests."""
    _fail_unexpected_skip((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_unexpected_skip((yield).get_result())


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


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
def baichuan_13b_folder(tmp_path_factory, fixtures_dir) -> Path:
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
    tokenizer_dir = fixtures_dir / "tokenizers" / "baichuan2"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
