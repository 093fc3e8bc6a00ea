"""vLLM's OpenAI-compatible server, run from vLLM's own environment (`make vllm-env`): started on a free loopback
port, waited for, and stopped with every process it started.

vLLM cannot be imported in the training environment (vLLM 0.32 pins transformers < 5.20, we train on 5.24), so it
runs as a process: `train_rlhf.py` with `vllm_launch: true` and the serving checks (tests/serving) start it here.
The server runs under a small watchdog in vLLM's Python that ends it when the process that started it is gone,
even after a SIGKILL, so no server outlives its trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from component.config.errors import UserFacingError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-vllm"
START_TIMEOUT_S = 900.0
STOP_GRACE_S = 30.0

# Runs in vLLM's Python: starts the server (argv[1:]) and ends it when its own parent (the trainer) is gone.
_WATCHDOG = """
import os, signal, subprocess, sys, time
parent = os.getppid()
server = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: server.terminate())
while server.poll() is None:
    if os.getppid() != parent:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)
    time.sleep(1)
sys.exit(server.returncode)
"""


class ServerStartError(UserFacingError):
    """vLLM's environment is missing, or its server exited or did not answer while starting."""

    label = "vLLM server"


def venv_python(venv: str | Path | None = None) -> Path:
    """The Python of vLLM's environment (default: the repository's .venv-vllm); one line if it is missing."""
    folder = Path(venv) if venv else DEFAULT_VENV
    python = folder / "bin" / "python"
    if not python.is_file():
        raise ServerStartError(
            f"no vLLM environment at {folder} ({python} is missing): build it with `make vllm-env` "
            "(VLLM_VENV=DIR for another folder) or point 'vllm_venv' at one"
        )
    return python


def server_environment(**extra: str) -> dict[str, str]:
    """The environment of a vLLM process: ours without PYTHONPATH (this project must not shadow vLLM's packages),
    no usage reports, a 1 GiB KV cache on the CPU unless VLLM_CPU_KVCACHE_SPACE says otherwise, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether the server at `url` (http://host:port) answers its /health route."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def log_tail(log: Path, lines: int = 1) -> str:
    """The last non-empty lines of a server log (vLLM's reason for exiting is usually the last one)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class RunningServer:
    """A vLLM server process started by `start_server`: `url` (http://127.0.0.1:PORT), its `log`, `stop()`."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        stop_process_group(self.process, grace)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model: str | Path,
    arguments: list[str],
    log: Path,
    python: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> RunningServer:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL ARGUMENTS` on 127.0.0.1 at a free port, its output
    in `log`; returns once it answers /health. Exits or silence until `timeout` raise ServerStartError naming the
    log (the server is stopped first)."""
    python = python or venv_python()
    port = free_port()
    command = [str(python), "-c", _WATCHDOG, str(python), "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model", str(model), *arguments]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else server_environment(),
            start_new_session=True,  # its own process group: stop() ends vLLM's engine processes too
        )
    server = RunningServer(process, f"http://127.0.0.1:{port}", log)
    logger.info("starting vLLM's server for %s on %s (log: %s)", model, server.url, log)
    try:
        wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_ready(server: RunningServer, timeout: float) -> None:
    started = time.monotonic()
    while not healthy(server.url):
        if not server.alive():
            raise ServerStartError(
                f"vLLM's server exited with code {server.process.returncode} while starting "
                f"({log_tail(server.log)}); its log: {server.log}"
            )
        if time.monotonic() - started > timeout:
            raise ServerStartError(f"vLLM's server did not answer within {timeout:.0f} s; its log: {server.log}")
        time.sleep(1)
    logger.info("vLLM's server answers at %s (started in %.0f s)", server.url, time.monotonic() - started)


def stop_process_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
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
