"""vLLM's environment for the serving checks (make check-vllm): where it is, the offline worker, the server.

vLLM cannot be imported here (it needs an older transformers), so the checks drive the environment `make vllm-env`
built (VLLM_VENV, default .venv-vllm) through subprocesses: vllm_worker.py for offline generation, and vLLM's
OpenAI-compatible server on 127.0.0.1, always stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils import REPO, opt_in

VENV = Path(os.environ.get("VLLM_VENV") or REPO / ".venv-vllm")
PYTHON = VENV / "bin" / "python"
WORKER = Path(__file__).with_name("vllm_worker.py")
SERVER_START_SECONDS = 600


def vllm_environment() -> dict[str, str]:
    """The variables every vLLM process here gets: a small KV cache, no hub, nothing of our PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
    return env


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def openai_server(model: str | Path, *arguments: str, log: Path) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on 127.0.0.1 (a free port) for `model`; yields its base URL
    (`http://127.0.0.1:PORT/v1`) once it answers, and stops it (its whole process group) afterwards."""
    port = free_port()
    command = [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model", str(model), *arguments]
    with open(log, "w", encoding="utf-8") as output:
        server = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=vllm_environment(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vLLM's server exited with {server.returncode}:\n{log.read_text()[-5000:]}")
            if healthy(f"http://127.0.0.1:{port}/health"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"vLLM's server did not answer in {SERVER_START_SECONDS} s:\n{log.read_text()[-5000:]}"
                )
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process_group(server)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process_group(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process and its children (vLLM's engine core), SIGKILL after `grace` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
