"""What keeps a run from dying badly or training silently wrong; each piece composes with any Trainer.

- `SignalGuard` (callback): SIGTERM / SIGINT finish the current step, save a checkpoint and stop; the recipe
  then raises `TrainingInterrupted` (exit code 75) so a scheduler requeues and the run resumes exactly.
- `NonFiniteGuard` (callback): a NaN/inf gradient either stops the run before the optimizer applies it
  (`NonFiniteError`, naming the step and the last good checkpoint) or, with `on_nonfinite: skip`, drops that
  optimizer step, counted and logged as `nonfinite_skipped`.
- `OutputDirLock`: one run per output_dir; a lock file with pid, host and a heartbeat; stale locks are taken over.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from component.config.errors import EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_NONFINITE, UserFacingError
from component.train.checkpoints import AtomicCheckpointMixin, find_resumable
from component.train.host import training_host

logger = logging.getLogger(__name__)


class TrainingInterrupted(UserFacingError):
    label = "interrupted"
    exit_code = EXIT_INTERRUPTED


class NonFiniteError(UserFacingError):
    label = "training error"
    exit_code = EXIT_NONFINITE


class OutputDirLocked(UserFacingError):
    label = "output_dir in use"
    exit_code = EXIT_LOCKED


# -- signals ------------------------------------------------------------------------------------------------------
class SignalGuard(TrainerCallback):
    """SIGTERM/SIGINT -> save at the end of the current step and stop (a second SIGINT stops at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user wants out now
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then saving a checkpoint and stopping", self.received)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _any_rank_signalled(self, args) -> bool:
        # torchrun forwards the signal to every rank, not always within the same step: agree, or ranks deadlock
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            tensor = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
            if flag and self.received is None:
                self.received = "a signal (on another rank)"
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_signalled(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def raise_if_stopped(self, output_dir: str) -> None:
        """After `trainer.train()`: a run stopped by a signal ends with TrainingInterrupted, never as finished."""
        if self.stopped_at is None:
            return
        raise TrainingInterrupted(
            f"{self.received} at step {self.stopped_at}: saved {output_dir}/checkpoint-{self.stopped_at}; "
            "run the same command with --resume_from_checkpoint true to continue exactly"
        )


# -- non-finite loss or gradients ---------------------------------------------------------------------------------
def _grads_finite(model) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def likely_causes(args) -> str:
    causes = [f"learning_rate {args.learning_rate:g} too high"]
    if args.fp16:
        causes.append("fp16 overflow (try bf16 or a lower learning rate)")
    if not args.max_grad_norm:
        causes.append("no gradient clipping (max_grad_norm 0)")
    causes.append("bad data (an example with no label tokens, extreme lengths)")
    return "; ".join(causes)


class NonFiniteGuard(TrainerCallback):
    """Checks the gradients before each optimizer step (after DDP's all-reduce, so every rank agrees).

    mode "stop": raise NonFiniteError before the bad step is applied: weights and checkpoints stay finite.
    mode "skip": drop the step's gradients (the optimizer skips parameters without a gradient), count it.
    Under fp16 the loss scaler already skips overflowing steps; the guard then stops only when it keeps failing.
    """

    FP16_PATIENCE = 25  # consecutive overflows: the scaler has halved its scale 25 times

    def __init__(self, mode: str = "stop") -> None:
        self.mode = mode
        self.skipped = 0
        self._logged_skips = 0
        self._fp16_run = 0

    def _stop(self, args, state, what: str) -> None:
        step = state.global_step + 1
        last, _ = find_resumable(args.output_dir)
        good = f"last good checkpoint: {last}" if last else "no checkpoint saved yet"
        raise NonFiniteError(
            f"{what} at step {step}; stopped before applying it, nothing saved as final output; {good}. "
            f"Likely causes: {likely_causes(args)}. Or set on_nonfinite: skip to drop such steps"
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or _grads_finite(model):
            self._fp16_run = 0
            return
        if args.fp16:
            self._fp16_run += 1
            if self._fp16_run >= self.FP16_PATIENCE:
                self._stop(args, state, f"non-finite gradients on {self._fp16_run} steps in a row under fp16")
            return
        if self.mode == "stop":
            self._stop(args, state, "non-finite loss or gradient norm (NaN/inf)")
        for p in model.parameters():
            p.grad = None
        self.skipped += 1
        logger.warning("step %d: non-finite gradients, step skipped (%d so far)", state.global_step + 1, self.skipped)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        loss = logs.get("loss")
        if self.mode == "stop" and isinstance(loss, float) and not math.isfinite(loss) and not args.fp16:
            self._stop(args, state, f"logged loss {loss}")
        if self.skipped:
            logs["nonfinite_skipped"] = self.skipped  # for the loggers (TensorBoard) called after us
            if state.log_history and "loss" in state.log_history[-1]:  # Trainer recorded it before on_log
                state.log_history[-1]["nonfinite_skipped"] = self.skipped


class ReliableTrainerMixin(AtomicCheckpointMixin):
    """Trainer mixin for every recipe: atomic checkpoints, the signal guard and the non-finite guard; `train()`
    first calls train.host's `training_host()` (glibc reuses freed blocks).

    `class MyTrainer(ReliableTrainerMixin, Trainer)`; takes `on_nonfinite="stop"|"skip"` next to Trainer's
    arguments. `finish_training` (train.recipe) turns a signal-stopped run into TrainingInterrupted.
    """

    def __init__(self, *args, on_nonfinite: str = "stop", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.signal_guard = SignalGuard()
        self.nonfinite_guard = NonFiniteGuard(on_nonfinite)
        self.add_callback(self.signal_guard)
        self.add_callback(self.nonfinite_guard)

    def train(self, *args, **kwargs):
        training_host()
        return super().train(*args, **kwargs)


def check_finite_weights(model) -> None:
    """Never save NaN weights as a run's final output."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"{len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]}); the final model was not saved")


# -- one run per output_dir ---------------------------------------------------------------------------------------
LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0  # a lock from another host not touched for this long belongs to a dead run


class OutputDirLock:
    """`output_dir/.run.lock` with pid, host and start time, touched every HEARTBEAT_S by a daemon thread.

    A lock is stale when its process is gone (same host) or its heartbeat stopped (another host: a node lost to
    preemption); a stale lock is taken over with a warning. The same process may take its own lock again.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if pid == os.getpid():
                return True
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, TypeError, ValueError):
                return False
            return False
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            return True

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise OutputDirLocked(
                        f"{self.path.parent} is used by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('started')}); wait for it, pick another "
                        f"output_dir, or delete {self.path} if that run is gone"
                    ) from None
                if holder is not None and holder.get("pid") != os.getpid():
                    logger.warning("taking over a stale lock %s (%s)", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="output-dir-lock")
            self._thread.start()
            atexit.register(self.release)  # every exit but SIGKILL frees it (a requeued job may start elsewhere)
            return self
        raise OutputDirLocked(f"could not take {self.path}: another run is starting in {self.path.parent}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        atexit.unregister(self.release)
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
