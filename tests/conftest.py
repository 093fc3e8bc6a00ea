"""Shared test fixtures: the shared/ fixture folder and tiny models built on the spot (nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}


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


# Helpers for the reader tests: fixture data files, raw records, small files written on the spot.
DATASET_FIXTURES = SHARED_FIXTURES / "datasets"


def fixture(name: str) -> str:
    path = DATASET_FIXTURES / name
    if not path.exists():
        pytest.skip(f"dataset fixture {name} not found under {DATASET_FIXTURES}")
    return str(path)


def raw_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in Path(fixture(name)).read_text("utf-8").splitlines() if line.strip()]


def raw_json(name: str):
    return json.loads(Path(fixture(name)).read_text("utf-8"))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(records: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
