"""Attention only within each sequence of a packed row, on any backend: SDPA per segment, causal, no mask.

A packed row holds several sequences back to back, `position_ids` restarting at 0 for each. transformers' SDPA and
eager paths turn the restarts into a dense block-diagonal row x row mask and compute the whole square, the
cross-sequence blocks included, and with a mask SDPA cannot skip the upper triangle either. Flash-attention's
varlen kernel is the only stock path that skips that work, and it needs a GPU and the flash-attn package.

`sdpa_segments` (registered in transformers' AttentionInterface under `SEGMENT_ATTENTION`) is SDPA, except for a
packed row: there it splits query, key and value at the restarts and runs one causal SDPA per sequence, so the
work is the sum of the sequences' own triangles, whatever the row's length, and the row needs no padding. Every
other input (a padding mask, a KV cache, a plain causal batch) goes to transformers' own SDPA unchanged. Its mask
function builds no mask where the attention derives the segments itself.

The split is exact: each sequence sees the same keys, positions and scaling as alone (tests/train/test_packing.py
compares logits, losses and gradients with the padded batch and with each sequence run alone). Models that add
their own bias (Baichuan's ALiBi) pass it as `segment_bias`, whose top-left L x L block is each segment's mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

SEGMENT_ATTENTION = "sdpa_segments"
# What a model may run with before it is switched: SDPA itself, eager (same math, SDPA per segment computes it), or
# transformers' default (None: SDPA).
SWITCHABLE_ATTENTION = (None, "sdpa", "eager")


def packed_lengths(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Lengths of the sequences of each row ([B, T] position_ids; a new one wherever a position is not the previous
    + 1, as transformers' `find_packed_sequence_indices` reads them), or None when no row restarts."""
    width = position_ids.shape[-1]
    breaks = (torch.diff(position_ids, dim=-1) != 1).nonzero().tolist()
    if not breaks:
        return None
    starts: list[list[int]] = [[0] for _ in range(position_ids.shape[0])]
    for row, column in breaks:
        starts[row].append(column + 1)
    return [[end - start for start, end in zip(row, [*row[1:], width])] for row in starts]


_last_row: tuple[torch.Tensor, int, int, list[list[int]] | None] | None = None


def _row_lengths(position_ids: torch.Tensor, batch_size: int) -> list[list[int]] | None:
    """packed_lengths of a forward's rows, read once per forward: every layer gets the same position_ids tensor, and
    each reading is a device-to-host copy (a GPU sync). Inference tensors (generation) are read every time: they
    keep no version counter to tell an in-place change."""
    global _last_row
    if position_ids.is_inference():
        return packed_lengths(position_ids.expand(batch_size, -1))
    last = _last_row
    if last is not None and last[0] is position_ids and last[1:3] == (position_ids._version, batch_size):
        return last[3]
    lengths = packed_lengths(position_ids.expand(batch_size, -1))
    _last_row = (position_ids, position_ids._version, batch_size, lengths)
    return lengths


def attend_per_segment(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[list[int]],
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`attend(q, k, v)` ([1, heads, L, head_dim] each, -> [1, L, heads, head_dim]) on each segment; [B, T, heads, D].

    `split` hands out views whose backward is one concatenation (slicing would add a full-size gradient per
    segment); the outputs are joined the same way.
    """
    rows = []
    for row, row_lengths in enumerate(lengths):
        pieces = zip(*(x[row : row + 1].split(row_lengths, dim=2) for x in (query, key, value)))
        rows.append(torch.cat([attend(q, k, v) for q, k, v in pieces], dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def sdpa_segments_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    segment_lengths: list[list[int]] | None = None,
    segment_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a packed row (no mask, no cache, restarting `position_ids`) run one causal
    SDPA per sequence. Models that know the segments already may pass their `segment_lengths`, and
    `segment_bias` [1 or B, heads, Lmax, Lmax]: an additive mask for every segment instead of plain causality
    (its top-left L x L block), from models with their own position bias."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = segment_lengths
    if lengths is None and attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1:
        lengths = _row_lengths(position_ids, query.shape[0])
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length = q.shape[2]
        mask = None if segment_bias is None else segment_bias[..., :length, :length]
        return sdpa_attention_forward(module, q, k, v, mask, dropout, scaling, **kwargs)[0]

    return attend_per_segment(query, key, value, lengths, attend), None


def _segment_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """No mask where `sdpa_segments_forward` finds the segments itself (no padding mask, no cache offset, causal or
    packed-causal only); transformers' SDPA mask everywhere else (padding, caches, sliding windows, overlays)."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None and local_size is None and not use_vmap
    if plain and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )


def register_segment_attention() -> None:
    """Make `SEGMENT_ATTENTION` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, sdpa_segments_forward)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, _segment_mask)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under DDP / DeepSpeed / compile and PEFT wrappers."""
    # DDP, DataParallel and DeepSpeed's engine keep the model as `.module`; torch.compile as `._orig_mod`
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def segment_attention_unsupported(model: nn.Module | None) -> str | None:
    """Why `model` cannot run `sdpa_segments` (a sentence), or None when it can."""
    if model is None:
        return None  # what load_model loads by default: an SDPA model
    core = base_causal_lm(model)
    config = getattr(core, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == SEGMENT_ATTENTION:
        return None
    if implementation not in SWITCHABLE_ATTENTION:
        return f"it runs attn_implementation {implementation!r}"
    if not getattr(core, "_supports_sdpa", False) or not hasattr(core, "set_attn_implementation"):
        return f"{type(core).__name__} has no SDPA attention"
    if not core._can_set_attn_implementation():
        return f"{type(core).__name__} does not use transformers' attention interface"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "is_causal", True):
        return "its attention is not causal"
    return None


def use_segment_attention(model: nn.Module) -> None:
    """Switch a (wrapped) transformers model to `sdpa_segments`; see `segment_attention_unsupported` first."""
    register_segment_attention()
    core = base_causal_lm(model)
    if core.config._attn_implementation != SEGMENT_ATTENTION:
        core.set_attn_implementation(SEGMENT_ATTENTION)
        logger.info("Attention: %s (packed rows attend per sequence)", SEGMENT_ATTENTION)
