"""Steps every training recipe shares: logging, batching choice, resume, and what is written at the end."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
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


# Attention implementations that run a packed row as separate sequences (cu_seqlens from the position_ids
# restarts). Everything else (sdpa, eager, our Baichuan) builds a dense block-diagonal row x row mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def varlen_attention_available(model=None) -> bool:
    """True where a packed row's attention skips cross-example work: a flash-attention model on a GPU.

    Without a model the answer is for what `load_model` loads by default, SDPA: no varlen kernel.
    """
    if model is None or not torch.cuda.is_available():
        return False
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    # Hub kernels ("kernels-community/flash-attn2") are varlen too.
    return implementation in VARLEN_ATTENTION or "flash" in implementation


@dataclass
class Batching:
    """How batches are built: packed rows, or padded batches (length-grouped or random); `reason` is logged."""

    packing: bool
    group_by_length: bool
    reason: str


def resolve_batching(args: FinetuneArguments, training_args: TrainingArguments, model=None) -> Batching:
    """The batching rule of docs/throughput.md; explicit keys win.

    `packing: null` packs unless length grouping is asked for: packed batches hold the same examples as padded
    ones (the same loss and gradients, tested), only without the padding work. The row layout follows the
    attention (packing_row_tokens): one flat row for a varlen kernel, else rows of the batch's longest example.
    """
    grouped = args.group_by_length or training_args.train_sampling_strategy == "group_by_length"
    if args.packing is not None:
        reason = "packing set in the train args"
        return Batching(args.packing, grouped and not args.packing, reason)
    if grouped:
        return Batching(False, True, "group_by_length set in the train args")
    kernel = "a varlen attention kernel" if varlen_attention_available(model) else "no varlen attention kernel"
    return Batching(True, False, f"packing: null, {kernel}")


def use_packing(args: FinetuneArguments, training_args: TrainingArguments, model=None) -> bool:
    """Resolve the batching (see resolve_batching), set the Trainer's sampler to it; True = packed batches."""
    batching = resolve_batching(args, training_args, model)
    if batching.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"  # the Trainer reads our `length` column
    shape = "padded, length-grouped" if batching.group_by_length else "padded"
    if batching.packing:
        rows = packing_row_tokens(args, model)
        shape = f"packed, {'one flat row per batch' if rows is None else f'rows of at most {rows} tokens'}"
        if rows == "longest":
            shape = "packed, rows of at most the batch's longest example"
    logger.info("Batching: %s (%s)", shape, batching.reason)
    return batching.packing


def packing_row_tokens(args: FinetuneArguments, model=None) -> int | str | None:
    """Row budget of packed batches: one flat row for a varlen kernel, else `packing_row_tokens` or "longest".

    A varlen kernel needs the single flat row and does no cross-example work in it. Dense-mask attention (SDPA,
    eager, our Baichuan) pays row x row per row: rows no longer than the batch's longest example keep it
    within what the batch padded (with a mask) would cost, on fewer positions.
    """
    if varlen_attention_available(model):
        return None
    return args.packing_row_tokens or "longest"


def make_collator(args: FinetuneArguments, training_args: TrainingArguments, tokenizer, packing: bool, model=None):
    """The SFT collator for the resolved batching (pass the model so the row layout fits its attention)."""
    if packing:
        return PackingCollator(pad_token_id=tokenizer.pad_token_id, row_tokens=packing_row_tokens(args, model))
    # Right padding of a causal LM needs no mask (see PaddingCollator): SDPA's fast causal path instead.
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id, attention_mask=False)


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
