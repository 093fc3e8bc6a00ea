"""How a recipe batches: packed padding-free rows or padded batches, how a packed row attends, and its row
budget (docs/throughput.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from component.config.parser import ConfigError
from component.config.training import FinetuneArguments
from component.data.collators import PackingCollator, PaddingCollator
from component.model.packed_attention import SEGMENT_ATTENTION, segment_attention_unsupported, use_segment_attention

logger = logging.getLogger(__name__)


# Attention implementations whose kernel runs a packed row as separate sequences (cu_seqlens from the position_ids
# restarts). `sdpa_segments` (model.packed_attention) does the same with one SDPA call per sequence; plain sdpa and
# eager build a dense block-diagonal row x row mask.
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


def attends_per_sequence(model) -> bool:
    """True when one flat packed row costs only its sequences' own attention: a varlen kernel, or `sdpa_segments`."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return varlen_attention_available(model) or implementation == SEGMENT_ATTENTION


def packed_attention(args: FinetuneArguments, model=None) -> str:
    """How packed rows attend: "varlen" (a flash kernel), "segments" (SDPA per sequence) or "mask" (row x row).

    `packed_attention: null` takes the fastest exact one the model has; "segments" where the model cannot run it
    is a configuration error naming why. Without a model: what `load_model` loads by default (SDPA: segments).
    """
    if varlen_attention_available(model):
        return "varlen"
    if args.packed_attention == "mask":
        return "mask"
    reason = segment_attention_unsupported(model)
    if reason is None:
        return "segments"
    if args.packed_attention == "segments":
        raise ConfigError(f"packed_attention: 'segments' cannot run here: {reason}; use 'mask' or null")
    return "mask"


def use_packed_attention(args: FinetuneArguments, model=None) -> str:
    """Resolve `packed_attention(args, model)` and switch the model to `sdpa_segments` where that is the answer."""
    attention = packed_attention(args, model)
    if attention == "segments" and model is not None:
        use_segment_attention(model)
    return attention


@dataclass
class Batching:
    """How batches are built: packed rows, or padded batches (length-grouped or random); `reason` is logged."""

    packing: bool
    group_by_length: bool
    reason: str


def resolve_batching(args: FinetuneArguments, training_args: TrainingArguments, model=None) -> Batching:
    """The batching rule of docs/throughput.md; explicit keys win.

    `packing: null` packs unless length grouping is asked for: packed batches hold the same examples as padded
    ones (the same loss and gradients, tested), only without the padding work. How the rows attend and their
    layout follow the model (packed_attention, packing_row_tokens).
    """
    grouped = args.group_by_length or training_args.train_sampling_strategy == "group_by_length"
    if args.packing is not None:
        reason = "packing set in the train args"
        return Batching(args.packing, grouped and not args.packing, reason)
    if grouped:
        return Batching(False, True, "group_by_length set in the train args")
    return Batching(True, False, "packing: null")


def use_packing(args: FinetuneArguments, training_args: TrainingArguments, model=None) -> bool:
    """Resolve the batching (see resolve_batching), set the Trainer's sampler and the model's attention to it; True =
    packed batches. Under packed_attention "segments" the model is switched to `sdpa_segments` (SDPA otherwise)."""
    batching = resolve_batching(args, training_args, model)
    if batching.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"  # the Trainer reads our `length` column
    shape = "padded, length-grouped" if batching.group_by_length else "padded"
    if batching.packing:
        attention = use_packed_attention(args, model)
        rows = packing_row_tokens(args, model)
        layout = "one flat row per batch" if rows is None else f"rows of at most {rows} tokens"
        if rows == "longest":
            layout = "rows of at most the batch's longest example"
        described = {"varlen": "a varlen kernel", "segments": "SDPA per sequence", "mask": "a row x row mask"}
        shape = f"packed, {layout}, attention by {described[attention]}"
    logger.info("Batching: %s (%s)", shape, batching.reason)
    return batching.packing


def packing_row_tokens(args: FinetuneArguments, model=None) -> int | str | None:
    """Row budget of packed batches: one flat row where attention runs per sequence, else `packing_row_tokens` or
    "longest".

    A varlen kernel and `sdpa_segments` do no cross-example work in a flat row, and a flat row has no padding.
    A row x row mask (packed_attention "mask") pays row^2 per row: rows no longer than the batch's longest example
    keep it within what the batch padded (with a mask) would cost, on fewer positions.
    """
    if packed_attention(args, model) != "mask":
        return None
    return args.packing_row_tokens or "longest"


def make_collator(args: FinetuneArguments, training_args: TrainingArguments, tokenizer, packing: bool, model=None):
    """The SFT collator for the resolved batching (pass the model so the row layout fits its attention)."""
    if packing:
        return PackingCollator(pad_token_id=tokenizer.pad_token_id, row_tokens=packing_row_tokens(args, model))
    # Right padding of a causal LM needs no mask (see PaddingCollator): SDPA's fast causal path instead.
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id, attention_mask=False)
