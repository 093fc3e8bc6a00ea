"""Steps every training recipe shares: logging, resume, and what is written at the end (weights, metrics, plot)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainingArguments

from component.config.training import FinetuneArguments, load_arguments, save_resolved
from component.data.pipeline import NoDataError, PreparedData, write_data_report
from component.data.template import Template, get_template
from component.model.loader import load_tokenizer
from component.train.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    UnusableCheckpoint,
    checkpoint_problem,
    find_resumable,
    is_disk_full,
)
from component.train.guards import OutputDirLock, check_finite_weights

logger = logging.getLogger(__name__)


class StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of each record (not the stream of the moment it was made):
    a caller that redirects or closes stdout later (a notebook, a test's capture) never gets a dead stream."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(training_args: TrainingArguments) -> None:
    """Progress on rank 0 only; warnings everywhere."""
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, handlers=[StdoutHandler()], force=True
    )
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity(level)
    # peft reads the base config at every adapter save, and transformers logs it whole each time at INFO
    transformers.utils.logging.get_logger("transformers.configuration_utils").setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)


def lock_output_dir(training_args: TrainingArguments) -> OutputDirLock | None:
    """One run per output_dir (rank 0 holds the lock); a second run refuses before writing anything there."""
    if training_args.process_index != 0:
        return None
    return OutputDirLock(training_args.output_dir).acquire()


class RecipeStart(NamedTuple):
    """What every recipe has before it reads data: settings, the output_dir lock, tokenizer and template."""

    args: FinetuneArguments
    training_args: TrainingArguments
    lock: OutputDirLock | None
    tokenizer: Any
    template: Template


def release_process_group() -> None:
    """torch.distributed's process group torn down while the interpreter is still whole: gloo's worker threads
    left to interpreter finalization can abort a finished run's process (SIGABRT, "terminate called without an
    active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_recipe(argv: list[str], ours: type[FinetuneArguments], prog: str, padding_side: str = "right") -> RecipeStart:
    """Settings (validated), logging, the output_dir lock (before anything is written there), tokenizer, template;
    the process group (torchrun's, set up with the settings) released when the process exits."""
    args, training_args = load_arguments(argv, ours, prog=prog)
    atexit.unregister(release_process_group)  # once, however many recipes a process runs
    atexit.register(release_process_group)
    setup_logging(training_args)
    lock = lock_output_dir(training_args)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code, padding_side=padding_side)
    return RecipeStart(args, training_args, lock, tokenizer, get_template(args.template, tokenizer))


def record_data(
    args: FinetuneArguments,
    training_args: TrainingArguments,
    data: PreparedData,
    preview_columns: tuple[str, ...],
    show_example: Callable[[dict], str],
    unit: str = "examples",
) -> None:
    """Rank 0 writes train_args.json, data_report.json and data_preview.jsonl and logs one example and the counts.

    The report is written first, so a run with no data left still says why (its skip counts).
    """
    output_dir = training_args.output_dir
    if training_args.process_index == 0:
        save_resolved(args, training_args, output_dir)
        write_data_report(data, output_dir, preview_columns)
    if len(data.train) == 0:
        raise NoDataError(f"no training {unit} left: see the skip counts in {output_dir}/data_report.json")
    if training_args.process_index == 0:
        logger.info("%s", show_example(data.train[0]))
        logger.info(
            "Data: %d train / %d eval %s; report in %s/data_report.json",
            data.report["examples"],
            data.report["eval_examples"],
            unit,
            output_dir,
        )


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`resume_from_checkpoint: true` means the newest complete, loadable checkpoint in output_dir.

    Newer incomplete or damaged ones are skipped with the reason (naming the bad file); a path given explicitly
    must itself be complete.
    """
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if value != "true":
        chosen, skipped = find_resumable_path(value)
        if chosen is None:
            raise UnusableCheckpoint(f"cannot resume from {value}: {skipped}; use true for the newest usable one")
        return value
    output_dir = training_args.output_dir
    last, skipped = find_resumable(output_dir) if os.path.isdir(output_dir) else (None, [])
    for folder, reason in skipped:
        logger.warning("resume: skipping %s: %s", folder.name, reason)
    if last is None:
        if skipped:
            logger.warning("resume: no complete checkpoint in %s, starting from scratch", output_dir)
        else:
            logger.warning("resume_from_checkpoint: no checkpoint in %s yet, starting from scratch", output_dir)
        return None
    logger.info("resume: from %s%s", last, f" (skipped {len(skipped)} newer)" if skipped else "")
    return str(last)


def find_resumable_path(folder: str) -> tuple[str | None, str]:
    """An explicit checkpoint path: itself if complete, else (None, why)."""
    marked = (Path(folder) / COMPLETE_MARKER).is_file()
    problem = checkpoint_problem(folder, require_marker=marked)
    return (None, problem) if problem else (folder, "")


def plot_loss(log_history: list[dict], output_dir: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> Path | None:
    """training_loss.png: each logged metric in `keys` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(e["step"], e[k]) for e in log_history if k in e and "step" in e] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for axis, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None)
        axis.set_xlabel("step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(output_dir) / "training_loss.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def finish_training(
    trainer, train_result, plot_keys: tuple[str, ...] = ("loss", "eval_loss"), lock: OutputDirLock | None = None
) -> None:
    """Save weights (adapter or full), tokenizer, metrics, trainer state and the loss plot; rank 0 writes.

    A run stopped by a signal raises TrainingInterrupted instead (its checkpoint is saved), and NaN weights are
    never saved as the final output. The output_dir lock is released either way.
    """
    try:
        _finish(trainer, train_result, plot_keys)
    finally:
        if lock is not None:
            lock.release()


def _finish(trainer, train_result, plot_keys: tuple[str, ...]) -> None:
    guard = getattr(trainer, "signal_guard", None)
    if guard is not None:
        guard.raise_if_stopped(trainer.args.output_dir)
    check_finite_weights(trainer.model)
    try:
        trainer.save_model()
    except Exception as error:
        if not is_disk_full(error):
            raise
        last, _ = find_resumable(trainer.args.output_dir)
        kept = f"the last checkpoint {last} is intact" if last else "there is no checkpoint"
        raise CheckpointError(
            f"disk full while saving the final model to {trainer.args.output_dir}; {kept}. Free space, then rerun "
            "with --resume_from_checkpoint true"
        ) from error
    metrics = train_result.metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, trainer.args.output_dir, plot_keys)
    # Ranks leave together, every collective done: a rank that exits while another still writes can abort in
    # interpreter finalization (gloo's threads, SIGABRT "terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
