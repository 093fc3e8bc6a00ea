"""Reward pooling: one score per sequence from a sequence-classification model's `score` head.

The model is a stock `AutoModelForSequenceClassification` with `num_labels=1` (a `score` linear head over a
causal LM backbone), so TRL, vLLM and plain transformers load it. Its own forward pools at the rightmost
token that is not `pad_token_id`, which is wrong when pad equals EOS and meaningless for packed rows; we read
the per-token output of the `score` head during the model's forward and pick the last real token ourselves
(from the attention mask, or the collator's `score_index` for packed rows). Going through the top-level
forward keeps DDP's gradient sync and peft's trainable copy of the head in the path.
"""

from __future__ import annotations

import torch
from torch import nn

SCORE_HEAD = "score"  # Llama, Qwen2, Mistral and our Baichuan name their classification head so


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the rightmost position with attention_mask == 1 (right or left padding, any pad id)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def score_head(model: nn.Module) -> nn.Module:
    """The `score` module the model's forward calls (under peft: the wrapper that runs the trainable copy)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = getattr(model, SCORE_HEAD, None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no '{SCORE_HEAD}' head; the reward model expects one")
    return head


def sequence_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    score_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fp32 score per sequence, read at its last real token (see the module docstring)."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    token_scores = captured[-1].squeeze(-1)  # (rows, tokens)
    if score_index is not None:  # packed rows: the collator knows where each sequence ends
        return token_scores.reshape(-1)[score_index].float()
    if attention_mask is None:
        raise ValueError("padded batches need an attention_mask to find each sequence's last token")
    rows = torch.arange(token_scores.shape[0], device=token_scores.device)
    return token_scores[rows, last_token_index(attention_mask).to(token_scores.device)].float()


def train_score_head_in_fp32(model: nn.Module) -> None:
    """With 16-bit weights the head copy peft trains would be 16-bit too, and small updates would round away.

    Keep the trained head in fp32 and feed it the hidden states in fp32 (under QLoRA they already are).
    """
    head = score_head(model)
    trained = getattr(head, "modules_to_save", None)
    for module in trained.values() if trained is not None else [head]:
        if any(p.requires_grad for p in module.parameters()) and module.weight.dtype != torch.float32:
            module.float()
            module.register_forward_pre_hook(lambda _module, args: tuple(a.float() for a in args))
