"""Shared test fixtures: the shared/ fixture folder and tiny models built on the spot (nothing downloaded)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def run_torchrun(script: Path | str, *script_args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N script ...` on the CPU (gloo), one thread each; fails the test on error."""
    with socket.socket() as sock:  # a free port, so parallel runs never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(port), str(script), *map(str, script_args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
