"""Helpers shared by the tests: paths, the tiny model config, fixture files, torchrun, a stop-after-step callback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DATASET_FIXTURES = FIXTURES / "datasets"

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


def opt_in(what: str, command: str) -> str:
    """The reason of a skip that only an opt-in step lifts. Under CI any other skip fails (tests/conftest.py)."""
    return f"opt-in: needs {what}; run `{command}`"


def skip_without_demo(*folders: str | Path) -> None:
    """Skips (opt-in) unless `make demo` has written these folders (relative to the repository)."""
    missing = [str(folder) for folder in folders if not (REPO / folder).is_dir()]
    if missing:
        pytest.skip(opt_in(f"make demo's outputs ({', '.join(missing)})", "make demo"))


def fixture(name: str) -> str:
    path = DATASET_FIXTURES / name
    assert path.exists(), f"dataset fixture {name} missing under {DATASET_FIXTURES}"
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


def free_port() -> int:
    """A free loopback port, so parallel runs never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    script: Path | str, *script_args: str, processes: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N script ...` on the CPU (gloo), one thread each; fails the test on error."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(port), str(script), *map(str, script_args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class StopAfterStepCallback(TrainerCallback):
    """Stops training after a given global step (interrupted-then-resumed runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def shipped_config(folder: str, name: str, tmp_path: Path, model: Path, data: Path, **overrides) -> str:
    """config/<folder>/<name> as shipped, with the model, every data path and the outputs pointed into the test."""
    values = json.loads((REPO / "config" / folder / name).read_text(encoding="utf-8"))

    def local(spec):
        if isinstance(spec, list):
            return [local(s) for s in spec]
        return {**spec, "path": str(data)} if isinstance(spec, dict) else str(data)

    values.update(
        model_name_or_path=str(model),
        train_file=local(values["train_file"]),
        eval_file=local(values["eval_file"]),
        output_dir=str(tmp_path / "out"),
        data_cache_dir=str(tmp_path / "cache"),
        **overrides,
    )
    path = tmp_path / name
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)
