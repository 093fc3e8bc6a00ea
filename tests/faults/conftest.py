"""Fault injection around train_sft.py on the tiny model: runs killed (SIGKILL), signalled, out of disk, NaN.

A "killed run" is a forked child of the test process (torch already imported, so each costs ~2 s instead of a
fresh interpreter's ~15 s on 2 cores) that SIGKILLs itself at a chosen moment: before or in the middle of the
k-th file a save writes, or between steps. Resumes run in the test process and must match one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.utils import REPO

STEPS = 6


def write_args(folder: Path, **values) -> str:
    path = folder / f"args_{len(list(folder.glob('args_*.json')))}.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/demo/digits_train.jsonl").read_text("utf-8").splitlines()]
    path = tmp_path_factory.mktemp("fault_data") / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:48]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def fault_args(tiny_llama_dir, fault_data, tmp_path_factory) -> dict:
    """6 steps of 8 examples, a checkpoint after every step, dropout on (so RNG state matters on resume)."""
    return {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": str(fault_data),
        "max_seq_length": 64,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "data_cache_dir": str(tmp_path_factory.mktemp("fault_cache")),
        "seed": 11,
        "dataloader_num_workers": 0,
    }


def train(folder: Path, args: dict, *extra: str, callbacks=None):
    import train_sft

    return train_sft.main(["--train_args_file", write_args(folder, **args), *extra], callbacks=callbacks)


@pytest.fixture(scope="session")
def reference_adapter(fault_args, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of one uninterrupted run: every interrupted-and-resumed run must end with exactly this."""
    folder = tmp_path_factory.mktemp("reference")
    train(folder, {**fault_args, "output_dir": str(folder / "out")})
    return load_file(folder / "out" / "adapter_model.safetensors")


def assert_same_adapter(output_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    final = load_file(Path(output_dir) / "adapter_model.safetensors")
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), f"{name}: max diff {(final[name] - tensor).abs().max()}"


def run_forked(body, log_path: Path) -> int:
    """Run `body()` in a forked child; returns its exit status as -signal or the exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115  (pytest replaced both)
            torch.set_num_threads(1)
            body()
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class KillAt:
    """Patches every writer a checkpoint save uses; SIGKILLs this process at the k-th write.

    mode "before": before the file is written; "partial": after writing only half of it (a torn write).
    """

    def __init__(self, monkeypatch, k: int, mode: str) -> None:
        import peft.peft_model
        import safetensors.torch
        import transformers.trainer_callback

        import component.train.checkpoints as checkpoints

        self.count = 0
        self.k = k
        self.mode = mode
        torch_save = torch.save
        safe_save = safetensors.torch.save_file
        state_save = transformers.trainer_callback.TrainerState.save_to_json
        marker = checkpoints.write_marker

        def hook(path, write):
            self.count += 1
            if self.count == self.k:
                if self.mode == "partial":
                    write()
                    size = os.path.getsize(path)
                    with open(path, "r+b") as handle:
                        handle.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return write()

        def save(obj, f, *a, **kw):
            return hook(f, lambda: torch_save(obj, f, *a, **kw)) if isinstance(f, (str, Path)) else torch_save(obj, f)

        def safe(tensors, filename, *a, **kw):
            return hook(filename, lambda: safe_save(tensors, filename, *a, **kw))

        def state(self_, json_path):
            return hook(json_path, lambda: state_save(self_, json_path))

        def mark(folder, step):
            return hook(Path(folder) / checkpoints.COMPLETE_MARKER, lambda: marker(folder, step))

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(safetensors.torch, "save_file", safe)
        monkeypatch.setattr(peft.peft_model, "safe_save_file", safe, raising=False)
        monkeypatch.setattr(transformers.trainer_callback.TrainerState, "save_to_json", state)
        monkeypatch.setattr(checkpoints, "write_marker", mark)


class KillAfterStep(TrainerCallback):
    """SIGKILL between steps (after step `step` ends, before its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(TrainerCallback):
    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)  # arrives mid-step, as a scheduler's would


class PoisonGradients(TrainerCallback):
    """NaN in one gradient before the optimizer step of the given steps (runs before the guard)."""

    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            grad = next(p for p in model.parameters() if p.requires_grad and p.grad is not None).grad
            grad.view(-1)[0] = float("nan")
