"""kill -9 at seeded random moments (mid-save included), truncated files, a full disk: resume always ends exact."""

from __future__ import annotations

import errno
import logging
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from component.train.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_problem,
    find_resumable,
    is_disk_full,
)
from tests.faults.conftest import STEPS, KillAfterStep, KillAt, assert_same_adapter, run_forked, train

pytestmark = pytest.mark.slow

TRIALS: list[str] = []  # the kill trials that ran
LEFT_BROKEN: list[str] = []  # why resume skipped checkpoints the kills left behind, over all trials
WRITES_PER_SAVE = 7  # adapter, training_args.bin, optimizer, scheduler, rng, trainer_state, marker


def _kill_plans(seed: int, trials: int) -> list[list[tuple[str, int, str]]]:
    """Each trial: one or two kills, each ("write", k, before|partial) or ("step", n, "")."""
    rng = random.Random(seed)
    plans = []
    for trial in range(trials):
        kills = []
        for _ in range(1 + (trial % 3 == 2)):  # every third trial is killed twice before it finishes
            if rng.random() < 0.75:
                kills.append(("write", rng.randint(1, WRITES_PER_SAVE * STEPS), rng.choice(["before", "partial"])))
            else:
                kills.append(("step", rng.randint(1, STEPS), ""))
        plans.append(kills)
    return plans


@pytest.mark.parametrize("trial", range(8))
def test_kill9_at_random_points_then_resume_equals_an_uninterrupted_run(trial, tmp_path, fault_args, reference_adapter):
    plan = _kill_plans(seed=1606, trials=8)[trial]
    out = tmp_path / "out"
    args = {**fault_args, "output_dir": str(out)}
    for kind, where, mode in plan:

        def body(kind=kind, where=where, mode=mode):
            if kind == "write":
                KillAt(pytest.MonkeyPatch(), where, mode)
                train(tmp_path, args, "--resume_from_checkpoint", "true")
            else:
                train(tmp_path, args, "--resume_from_checkpoint", "true", callbacks=[KillAfterStep(where)])

        status = run_forked(body, tmp_path / "child.log")
        log = (tmp_path / "child.log").read_text(errors="replace")
        assert status in (-signal.SIGKILL, 0), f"{plan}: status {status}\n{log[-3000:]}"
        _, skipped = find_resumable(out)
        LEFT_BROKEN.extend(reason for _, reason in skipped)
    TRIALS.append(str(plan))
    train(tmp_path, args, "--resume_from_checkpoint", "true")
    assert_same_adapter(out, reference_adapter)


def test_the_seeded_kills_did_break_saves_midway():
    """The trials above are only worth something if some kills left a half-written newest checkpoint."""
    if not TRIALS:
        pytest.skip("selected without the kill trials above (they run in the same module)")
    assert any("no checkpoint_complete.json" in reason for reason in LEFT_BROKEN), LEFT_BROKEN


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory, fault_args) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    train(folder, {**fault_args, "output_dir": str(folder / "out")})
    return folder / "out"


@pytest.fixture()
def finished_run(finished_template, tmp_path) -> Path:
    """A copy of one finished run with a checkpoint after every step."""
    return Path(shutil.copytree(finished_template, tmp_path / "out"))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"])
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_naming_the_file(
    name, finished_run, tmp_path, fault_args, reference_adapter, capsys
):
    newest = finished_run / f"checkpoint-{STEPS}"
    path = newest / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    chosen, skipped = find_resumable(finished_run)
    assert chosen == finished_run / f"checkpoint-{STEPS - 1}"
    assert skipped[0][0] == newest and name in skipped[0][1]

    # without the marker's sizes (a checkpoint from an older version), the file's own structure gives it away
    legacy = shutil.copytree(newest, tmp_path / "legacy")
    (legacy / COMPLETE_MARKER).unlink()
    problem = checkpoint_problem(legacy, require_marker=False)
    assert problem and name in problem

    if name != "adapter_model.safetensors":
        return  # one resume through a damaged newest checkpoint is enough
    (finished_run / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    train(tmp_path, {**fault_args, "output_dir": str(finished_run)}, "--resume_from_checkpoint", "true")
    log = capsys.readouterr().out
    assert f"skipping checkpoint-{STEPS}: " in log and name in log.split(f"skipping checkpoint-{STEPS}: ")[1][:300]
    assert f"resume: from {finished_run / f'checkpoint-{STEPS - 1}'}" in log
    assert log.count('"model_type": "llama"') <= 1, "the model config is dumped at every save again"
    assert_same_adapter(finished_run, reference_adapter)


def test_no_complete_checkpoint_starts_over_and_says_why(finished_run):
    from component.train.recipe import resolve_resume

    for folder in finished_run.glob("checkpoint-*"):
        (folder / COMPLETE_MARKER).unlink()
    (finished_run / "checkpoint-1" / "scheduler.pt").write_bytes(b"")  # and one legacy-looking folder broken
    chosen, skipped = find_resumable(finished_run)  # no markers at all: judged by their files (older runs)
    assert chosen == finished_run / f"checkpoint-{STEPS}"
    for folder in finished_run.glob("checkpoint-*"):
        shutil.rmtree(folder / "optimizer.pt", ignore_errors=True)
        (folder / "trainer_state.json").unlink()
    args = type("A", (), {"resume_from_checkpoint": "true", "output_dir": str(finished_run)})()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("component.train.recipe").addHandler(handler)
    try:
        assert resolve_resume(args) is None
    finally:
        logging.getLogger("component.train.recipe").removeHandler(handler)
    assert any("trainer_state.json is missing" in line for line in seen), seen
    assert any("starting from scratch" in line for line in seen), seen


def test_disk_full_during_a_save_is_one_clear_error_and_the_previous_checkpoint_survives(
    tmp_path, fault_args, reference_adapter, monkeypatch
):
    out = tmp_path / "out"
    args = {**fault_args, "output_dir": str(out)}
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if "checkpoint-3" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as raised:
        train(tmp_path, args)
    message = str(raised.value)
    assert "disk full while saving" in message and "checkpoint-3" in message
    assert "free" in message and "needs about" in message and "checkpoint-2 is intact" in message
    assert raised.value.exit_code == 74
    assert not (out / "checkpoint-3").exists()  # the partial folder is gone, freeing its space
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / "adapter_model.safetensors").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    train(tmp_path, args, "--resume_from_checkpoint", "true")
    assert_same_adapter(out, reference_adapter)


def test_disk_full_is_recognised_in_every_form_it_reaches_us():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_at_the_final_save_keeps_the_last_checkpoint(tmp_path, fault_args, monkeypatch):
    import peft.peft_model

    out = tmp_path / "out"
    real = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *a, **kw):
        if Path(filename).parent == out:
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(CheckpointError, match=f"final model to {out}; the last checkpoint {out / 'checkpoint-2'}"):
        train(tmp_path, {**fault_args, "output_dir": str(out), "max_steps": 2})


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(finished_run):
    from component.train.checkpoints import UnusableCheckpoint
    from component.train.recipe import resolve_resume

    folder = finished_run / "checkpoint-4"
    (folder / "rng_state.pth").write_bytes(b"PK\x03\x04 cut")
    args = type("A", (), {"resume_from_checkpoint": str(folder), "output_dir": str(finished_run)})()
    with pytest.raises(UnusableCheckpoint, match="rng_state.pth is truncated or changed") as raised:
        resolve_resume(args)
    assert raised.value.exit_code == 1
