"""Steps every training recipe shares: logging, batching choice, resume, and what is written at the end."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from component.arguments import FinetuneArguments
from component.collator import PackingCollator, PaddingCollator

logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    """Progress on rank 0 only; warnings everywhere."""
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout, force=True
    )
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(logging.WARNING)


def varlen_attention_available() -> bool:
    """True where a padding-free kernel skips cross-example work (flash-attention varlen on a GPU)."""
    if not torch.cuda.is_available():
        return False
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def use_packing(args: FinetuneArguments, training_args: TrainingArguments) -> bool:
    """`packing: null` packs where a varlen kernel exists; elsewhere length-grouped padded batches win."""
    if args.packing is not None:
        return args.packing
    return varlen_attention_available() and not training_args.group_by_length


def make_collator(args: FinetuneArguments, training_args: TrainingArguments, tokenizer, packing: bool):
    if packing:
        row_tokens = args.packing_row_tokens or args.max_seq_length * training_args.per_device_train_batch_size
        return PackingCollator(pad_token_id=tokenizer.pad_token_id, row_tokens=row_tokens)
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id)


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`resume_from_checkpoint: true` means the latest checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value != "true":
        return value
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is None:
        logger.warning(
            "resume_from_checkpoint: no checkpoint in %s yet, starting from scratch", training_args.output_dir
        )
    return last


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


def finish_training(trainer, train_result, plot_keys: tuple[str, ...] = ("loss", "eval_loss")) -> None:
    """Save weights (adapter or full), tokenizer, metrics, trainer state and the loss plot; rank 0 writes."""
    trainer.save_model()
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


class StopAfterStepCallback(TrainerCallback):
    """Stops training after a given global step (used to test interrupted-then-resumed runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def log_json(title: str, payload: dict) -> None:
    logger.info("%s:\n%s", title, json.dumps(payload, indent=2, ensure_ascii=False))
