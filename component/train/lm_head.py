"""The one LM head + loss path: logits only where a label is, in chunks, never [positions x vocabulary].

A causal LM's own forward builds fp32 logits for every position over the whole vocabulary, and backward keeps
their gradient: with a 125,696-piece vocabulary these are the largest tensors of a step, and most sit at
prompt positions whose logits are thrown away. Here the decoder's final hidden states are gathered at the
positions that predict a label (position t predicts labels[t + 1]; -100 is no label, which also covers the
first label of each example in a packed row), and the head + loss run on chunks of those positions. The
loss takes each chunk's gradient during its forward and frees the chunk's logits before the next one (no
recompute); per-token log-probs checkpoint each chunk and recompute it in backward. Either way peak memory
holds one chunk x vocabulary.

The head is the model's own output module, called as the model calls it: a plain or tied `nn.Linear`, a
4-bit `Linear4bit`, Baichuan2's NormHead (normalised rows), a LoRA-wrapped head; then the config's logit
scaling / soft-capping, then the upcast to fp32 per chunk, as transformers' causal-LM loss does. Results
equal the model's path to float tolerance (tests/train/test_lm_head.py).

Public API (SFT uses the first two; DPO / RL reuse `label_positions` + `token_logprobs`):

- `OutputHead.of(model)`: the head of a (PEFT-, DDP-wrapped) causal LM, with its logit transforms.
- `causal_lm_loss(hidden, labels, head, num_items_in_batch, chunk_size)`: the model's loss, same normalisation.
- `label_positions(hidden, labels)`: (hidden states [n, H], targets [n], mask [B, T]) at label positions.
- `token_logprobs(hidden, targets, head, chunk_size)`: log p(target) per position, [n] fp32, differentiable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.integrations import is_deepspeed_zero3_enabled

from component.model.packed_attention import base_causal_lm

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class OutputHead:
    """The model's output module and what its forward does to the logits after it."""

    module: nn.Module
    scale: float = 1.0  # Cohere `logit_scale` (multiplies), Granite `logits_scaling` (divides)
    softcap: float | None = None  # Gemma-2 `final_logit_softcapping`: cap * tanh(logits / cap)
    z_loss_weight: float = 0.0  # Baichuan2's z-loss, weight * max_logit^2 per label token
    temperature: float = 1.0  # online RL: the log-probs of the distribution the completions were sampled from

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead:
        core = base_causal_lm(model)
        module = core.get_output_embeddings()
        if module is None:
            raise ValueError(f'{type(core).__name__} has no output embeddings (lm_head); use logits_path: "model"')
        config = core.config.get_text_config() if hasattr(core.config, "get_text_config") else core.config
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
            scale /= float(config.logits_scaling)
        return cls(
            module=module,
            scale=scale,
            softcap=getattr(config, "final_logit_softcapping", None) or None,
            z_loss_weight=float(getattr(config, "z_loss_weight", 0.0) or 0.0),
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V] of hidden states [n, H], computed in the head's dtype as the model's forward does."""
        logits = self.module(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits.float()


def label_positions(
    hidden_states: torch.Tensor, labels: torch.Tensor, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [n, H] and targets [n] at the positions that predict a label, and that mask [B, T].

    `labels` [B, T] as the collator gives them (position t predicts labels[t + 1]); `shift_labels`, when a
    collator provides it, is already shifted.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    mask = shift_labels != IGNORE_INDEX
    return hidden_states[mask], shift_labels[mask], mask


def _chunk_loss(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, summed z-loss] of one chunk; its logits live only inside this call."""
    logits = head.logits(hidden)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    if not head.z_loss_weight:
        return torch.stack([loss, loss.new_zeros(())])
    return torch.stack([loss, head.z_loss_weight * logits.max(dim=-1).values.pow(2).sum()])


def _chunk_logprobs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunks(head: OutputHead, function, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> list:
    if chunk_size < 1:
        raise ValueError(f"logits_chunk_size must be positive, got {chunk_size}")
    # At least one (possibly empty) chunk: the head stays in the graph, as DDP expects every step.
    starts = range(0, max(len(targets), 1), chunk_size)
    # ZeRO-3 re-gathers the head's weight in a recompute, which torch's checkpoint rejects as changed metadata:
    # there the chunks keep their activations (more memory under ZeRO-3 only).
    if not torch.is_grad_enabled() or is_deepspeed_zero3_enabled():
        return [function(head, hidden[s : s + chunk_size], targets[s : s + chunk_size]) for s in starts]
    return [
        checkpoint(function, head, hidden[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False)
        for s in starts
    ]


def token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for gathered positions (see `label_positions`): [n] fp32, differentiable.

    hidden [n, H] in the model's dtype, targets [n] long, none of them -100. Peak memory: one chunk x vocab.
    DPO / RL sum these per sequence (the positions' rows come from the mask `label_positions` returns).
    """
    pieces = _chunks(head, _chunk_logprobs, hidden, targets, chunk_size)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@torch.no_grad()
def token_entropies(hidden: torch.Tensor, head: OutputHead, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """The entropy of the head's distribution at each of `hidden`'s positions [n] (no gradient; logged by RL).
    Peak memory: one chunk x vocab."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        log_probs = torch.log_softmax(head.logits(hidden[start : start + chunk_size]), -1)
        pieces.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


class _ChunkedLoss(torch.autograd.Function):
    """A scalar loss whose gradients are taken chunk by chunk during the forward, then scaled in backward.

    For a scalar loss this saves the recomputation checkpointing would do: each chunk's logits are built once,
    differentiated at once (by autograd, through whatever the head does) and freed; what is kept is the
    gradient for the gathered hidden states [n, H] and for the head's trainable weights, if any.
    """

    @staticmethod
    def forward(ctx, hidden, targets, scales, head, chunk_size, *params):
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for start in range(0, max(len(targets), 1), chunk_size):
                piece = hidden[start : start + chunk_size].detach().requires_grad_()
                loss = (_chunk_loss(head, piece, targets[start : start + chunk_size]) * scales).sum()
                grads = torch.autograd.grad(loss, [piece, *params], allow_unused=True)
                grad_hidden[start : start + chunk_size] = grads[0]
                for buffer, grad in zip(grad_params, grads[1:]):
                    if grad is not None:
                        buffer += grad
                total += loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled = [g * grad_output.to(g.dtype) for g in grad_params]
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None, *scaled


def causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: OutputHead,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss the model's forward computes, without its [positions x vocabulary] logits.

    Summed token cross-entropy divided by `num_items_in_batch` (the label tokens of the whole optimizer step,
    all processes, as the Trainer counts them) or, without it, by this batch's label tokens; plus Baichuan2's
    z-loss normalised the same way when the config has `z_loss_weight`.
    """
    if chunk_size < 1:
        raise ValueError(f"logits_chunk_size must be positive, got {chunk_size}")
    hidden, targets, _ = label_positions(hidden_states, labels, shift_labels)
    count = torch.tensor(float(len(targets)), device=hidden.device)
    if num_items_in_batch is None:
        # As the model: the mean over this batch's label tokens; its z-loss divides by at least 1.
        scales = torch.stack([1 / count, 1 / count.clamp_min(1)])
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
        scales = (1 / denominator).expand(2)
    params = [p for p in head.module.parameters() if p.requires_grad]
    # ZeRO-3 partitions the head's weight outside its forward: gradients taken here would not fit it, so there
    # each chunk is differentiated by autograd in backward (its logits kept until then).
    if torch.is_grad_enabled() and (hidden.requires_grad or params) and not is_deepspeed_zero3_enabled():
        return _ChunkedLoss.apply(hidden, targets, scales, head, chunk_size, *params)
    pieces = _chunks(head, _chunk_loss, hidden, targets, chunk_size)
    return (torch.stack(pieces).sum(dim=0) * scales).sum()


def decoder_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder, from a forward through `model` (and so through DDP).

    The causal LM's forward runs with `logits_to_keep` = no position, so it computes no logits; a hook on its
    decoder catches the normalised last hidden state.
    """
    core = base_causal_lm(model)
    if "logits_to_keep" not in inspect.signature(core.forward).parameters:
        raise ValueError(
            f'{type(core).__name__}.forward takes no logits_to_keep, so logits_path: "chunked" cannot skip its '
            'logits; use logits_path: "model"'
        )
    decoder = core.get_decoder()
    if decoder is core:
        decoder = getattr(core, "model", None)
    if decoder is None or decoder is core:
        raise ValueError(f'cannot find the decoder of {type(core).__name__}; use logits_path: "model"')
    caught: list[torch.Tensor] = []

    def catch(_module, _args, output) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    device = inputs["input_ids"].device if "input_ids" in inputs else None
    handle = decoder.register_forward_hook(catch)
    try:
        model(**inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"expected one decoder output, caught {len(caught)}")
    return caught[0]
