"""SIGTERM/SIGINT save and stop with exit code 75 and resume exactly; NaN stops (or is skipped); one run per dir."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from component.config.errors import EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_NONFINITE
from component.train.checkpoints import checkpoint_problem
from component.train.guards import LOCK_NAME, NonFiniteError, OutputDirLock, OutputDirLocked
from tests.faults.conftest import (
    STEPS,
    PoisonGradients,
    SignalAtStep,
    assert_same_adapter,
    run_forked,
    train,
    write_args,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_exits_75_and_the_resume_is_exact(signum, tmp_path, fault_args, reference_adapter):
    import train_sft
    from component.config.parser import run_cli

    out = tmp_path / "out"
    args = {**fault_args, "output_dir": str(out), "save_steps": 100}  # no scheduled save before the signal
    argv = ["--train_args_file", write_args(tmp_path, **args)]

    def body():
        run_cli(lambda a: train_sft.main(a, callbacks=[SignalAtStep(3, signum)]), argv, lambda: "")

    status = run_forked(body, tmp_path / "child.log")
    log = (tmp_path / "child.log").read_text(errors="replace")
    assert status == EXIT_INTERRUPTED, log[-3000:]
    last_line = log.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last_line.startswith(f"interrupted: {name} at step 3: saved "), last_line
    assert "--resume_from_checkpoint true" in last_line and "Traceback" not in log
    assert checkpoint_problem(out / "checkpoint-3") is None
    assert not (out / "adapter_model.safetensors").exists()  # an unfinished run is no final output
    assert not (out / LOCK_NAME).exists()  # released on the way out: a requeued job may start anywhere

    train(tmp_path, {**args, "save_steps": 1}, "--resume_from_checkpoint", "true")
    assert_same_adapter(out, reference_adapter)


def test_nonfinite_gradients_stop_before_they_are_applied_naming_step_and_last_checkpoint(tmp_path, fault_args):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as raised:
        train(tmp_path, {**fault_args, "output_dir": str(out)}, callbacks=[PoisonGradients(3)])
    message = str(raised.value)
    assert "at step 3" in message and f"last good checkpoint: {out / 'checkpoint-2'}" in message
    assert "learning_rate" in message and "on_nonfinite: skip" in message
    assert raised.value.exit_code == EXIT_NONFINITE
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "checkpoint-3").exists()
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_mode_drops_nonfinite_steps_counts_them_and_saves_finite_weights(tmp_path, fault_args):
    out = tmp_path / "out"
    trainer = train(
        tmp_path,
        {**fault_args, "output_dir": str(out), "on_nonfinite": "skip", "save_steps": 100},
        callbacks=[PoisonGradients(2, 4)],
    )
    history = trainer.state.log_history
    assert max(e.get("nonfinite_skipped", 0) for e in history) == 2
    weights = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert trainer.state.global_step == STEPS


def test_a_nan_loss_is_logged_as_nan_never_as_zero_and_nan_weights_are_never_the_final_output(tmp_path, fault_args):
    """A weight turned NaN before step 1 (skip mode, so the run goes on): every loss is NaN, logged as nan
    (transformers' default filter would log 0.0), and the final save refuses the NaN weights."""
    out = tmp_path / "out"
    logged = []

    class PoisonWeightsAndRecord(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
                weight.data.fill_(float("nan"))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    run = {**fault_args, "output_dir": str(out), "on_nonfinite": "skip", "max_steps": 3, "save_steps": 100}
    with pytest.raises(NonFiniteError, match="hold NaN/inf .*the final model was not saved"):
        train(tmp_path, run, callbacks=[PoisonWeightsAndRecord()])
    losses = [e["loss"] for e in logged if "loss" in e]
    assert losses and all(math.isnan(loss) for loss in losses), losses
    assert not (out / "adapter_model.safetensors").exists()


def test_nan_inf_filter_default_is_off_so_logs_show_nan(fault_args, tmp_path):
    from component.config.training import build_arguments

    _, training_args = build_arguments({**fault_args, "output_dir": str(tmp_path)})
    assert training_args.logging_nan_inf_filter is False
    assert math.isnan(float("nan"))


# -- one run per output_dir -------------------------------------------------------------------------------------
def _lock_file(out, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder), encoding="utf-8")


def test_a_second_run_on_the_same_output_dir_refuses_before_writing_anything(tmp_path, fault_args):
    import train_sft
    from component.config.parser import run_cli

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the "first run", alive
    try:
        _lock_file(out, first.pid)
        argv = ["--train_args_file", write_args(tmp_path, **fault_args, output_dir=str(out))]
        with pytest.raises(OutputDirLocked, match=f"used by another run \\(pid {first.pid} on "):
            train_sft.main(argv)
        assert not (out / "train_args.json").exists() and not (out / "data_report.json").exists()

        status = run_forked(lambda: run_cli(train_sft.main, argv, lambda: ""), tmp_path / "child.log")
        assert status == EXIT_LOCKED
        assert "output_dir in use:" in (tmp_path / "child.log").read_text()
    finally:
        first.kill()
        first.wait()


def test_stale_locks_are_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock_file(tmp_path, gone.pid)  # that process has exited (kill -9, OOM)
    lock = OutputDirLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()

    _lock_file(tmp_path, 1, host="node-that-was-preempted")
    with pytest.raises(OutputDirLocked):  # another host, heartbeat fresh: maybe alive
        OutputDirLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))  # heartbeat stopped an hour ago
    OutputDirLock(str(tmp_path)).acquire().release()


def test_sigterm_from_outside_to_the_real_cli(tmp_path, fault_args, reference_adapter):
    """What a scheduler does: SIGTERM to `python train_sft.py` mid-run -> one line, exit 75, exact resume."""
    from tests.utils import REPO

    out = tmp_path / "out"
    args = {**fault_args, "output_dir": str(out)}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "train_sft.py", "--train_args_file", write_args(tmp_path, **args)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-1" / "checkpoint_complete.json").exists() and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode != 0, "the run finished before the signal arrived"
    assert process.returncode == EXIT_INTERRUPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: SIGTERM at step ") and "Traceback" not in err, err[-3000:]
    step = int(last.split("at step ")[1].split(":")[0])
    assert checkpoint_problem(out / f"checkpoint-{step}") is None
    train(tmp_path, args, "--resume_from_checkpoint", "true")
    assert_same_adapter(out, reference_adapter)
