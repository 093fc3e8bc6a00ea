"""vLLM's environment for the serving checks (make check-vllm): where it is, the offline worker, the server.

vLLM cannot be imported here (it needs an older transformers), so the checks drive the environment `make vllm-env`
built (VLLM_VENV, default .venv-vllm) through subprocesses: vllm_worker.py for offline generation, and vLLM's
OpenAI-compatible server on 127.0.0.1 (started and stopped by component/inference/vllm_server.py, as train_rlhf.py
starts it), always stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from component.inference.vllm_server import DEFAULT_VENV, ServerStartError, server_environment, start_server
from tests.utils import opt_in

VENV = Path(os.environ.get("VLLM_VENV") or DEFAULT_VENV)
PYTHON = VENV / "bin" / "python"
WORKER = Path(__file__).with_name("vllm_worker.py")
SERVER_START_SECONDS = 600


def vllm_environment() -> dict[str, str]:
    """The variables every vLLM process here gets: a 1 GiB KV cache, no hub, nothing of our PYTHONPATH."""
    return server_environment(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")


def require_vllm() -> None:
    if not PYTHON.is_file():
        pytest.skip(opt_in(f"vLLM's environment with our plugin ({VENV})", "make check-vllm"))


def run_worker(jobs: list[dict], workdir: Path, timeout: int = 1800) -> list[dict[str, list[list[int]]]]:
    """vllm_worker.py on `jobs` in one process; its results (see the worker's docstring)."""
    jobs_file, results_file = workdir / "jobs.json", workdir / "results.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    env = {**vllm_environment(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [str(PYTHON), str(WORKER), str(jobs_file), str(results_file)]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(results_file.read_text(encoding="utf-8"))


def lora_slots(adapters: int) -> int:
    """--max-loras for `adapters` served beside the base model. vLLM 0.32's CPU LoRA kernels
    (vllm/lora/ops/torch_ops) pick each token's adapter by slot index, -1 meaning none, and Python's -1 is the last
    slot: with every slot taken, requests without an adapter get the last slot's adapter. A spare slot stays
    empty (zeros), so the base answers as the base (docs/export.md#serving)."""
    return adapters + 1


@contextlib.contextmanager
def openai_server(model: str | Path, *arguments: str, log: Path) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on 127.0.0.1 (a free port) for `model` (component.inference.vllm_server);
    yields its base URL (`http://127.0.0.1:PORT/v1`) once it answers, and stops it (its whole process group)
    afterwards."""
    try:
        server = start_server(
            model, list(arguments), log, python=PYTHON, env=vllm_environment(), timeout=SERVER_START_SECONDS
        )
    except ServerStartError as error:
        raise AssertionError(f"{error}:\n{log.read_text()[-5000:]}") from None
    try:
        yield f"{server.url}/v1"
    finally:
        server.stop()
