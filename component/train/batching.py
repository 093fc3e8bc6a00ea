"""How a recipe batches: packed padding-free rows or padded batches, and the row budget (docs/throughput.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from component.config.training import FinetuneArguments
from component.data.collators import PackingCollator, PaddingCollator

logger = logging.getLogger(__name__)


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
