"""The one LM head + loss path: logits only where a label is, in chunks, never [positions x vocabulary].

A causal LM's own forward builds fp32 logits for every position over the whole vocabulary, and backward keeps
their gradient: with a 125,696-piece vocabulary these are the largest tensors of a step, and most sit at
prompt positions whose logits are thrown away. Here the decoder's final hidden states are gathered at the
positions that predict a label (position t predicts labels[t + 1]; -100 is no label, which also covers the
first label of each example in a packed row), and the head + loss run on chunks of those positions.

A chunk is at most `ChunkSize.rows` positions and at most `ChunkSize.mib` MiB of fp32 logits (rows x vocabulary
x 4 bytes), so the head's working memory is bounded by the budget, whatever the vocabulary. Each chunk's logits
are built once and turned into their own gradient in place (softmax - one-hot, by hand; autograd only through
the head): the loss does this during its forward (nothing recomputed), per-token log-probs keep each chunk's
log-sum-exp and recompute its logits in backward. Either way a chunk's peak is about one fp32 chunk of logits
(two where the head's own backward keeps its output, e.g. soft-capping's tanh or a full-tuned NormHead).

The head is the model's own output module, called as the model calls it: a plain or tied `nn.Linear`, a
4-bit `Linear4bit`, Baichuan2's NormHead (normalised rows), a LoRA-wrapped head; then the config's logit
scaling / soft-capping, then the upcast to fp32 per chunk, as transformers' causal-LM loss does. Results
equal the model's path to float tolerance (tests/train/test_lm_head.py).

Public API (SFT uses the first two; DPO / RL reuse `label_positions` + `token_logprobs`):

- `OutputHead.of(model)`: the head of a (PEFT-, DDP-wrapped) causal LM, with its logit transforms.
- `causal_lm_loss(hidden, labels, head, num_items_in_batch, chunk_size)`: the model's loss, same normalisation.
- `label_positions(hidden, labels)`: (hidden states [n, H], targets [n], mask [B, T]) at label positions.
- `token_logprobs(hidden, targets, head, chunk_size)`: log p(target) per position, [n] fp32, differentiable.
- `token_entropies(hidden, head, chunk_size)`: the entropy per position, [n] fp32, no gradient.
- `ChunkSize(rows, mib)`: the chunking (`chunk_size` above: a ChunkSize, or an int = rows within the default MiB).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from component.model.packed_attention import base_causal_lm

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_MIB = 256.0


@dataclass(frozen=True)
class ChunkSize:
    """Label positions per head chunk: at most `rows`, and at most as many as `mib` MiB of fp32 logits hold
    (rows x vocabulary x 4 bytes; at least one row). `mib` None: `rows`, whatever the vocabulary."""

    rows: int = DEFAULT_CHUNK_SIZE
    mib: float | None = DEFAULT_CHUNK_MIB

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"logits_chunk_size must be positive, got {self.rows}")
        if self.mib is not None and not self.mib > 0:
            raise ValueError(f"logits_chunk_mib must be positive or None, got {self.mib}")

    @classmethod
    def of(cls, chunk: int | ChunkSize) -> ChunkSize:
        return chunk if isinstance(chunk, ChunkSize) else cls(chunk)

    def rows_for(self, vocab_size: int) -> int:
        if self.mib is None:
            return self.rows
        return max(1, min(self.rows, int(self.mib * 2**20) // (4 * vocab_size)))


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

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (nn.Linear, Linear4bit, NormHead and PEFT's LoRA layers name it out_features)."""
        size = getattr(self.module, "out_features", None)
        return int(size if size is not None else self.module.weight.shape[0])

    def rows(self, chunk: int | ChunkSize) -> int:
        """Positions per chunk through this head."""
        return ChunkSize.of(chunk).rows_for(self.vocab_size)

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


def _writable_logits(head: OutputHead, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's fp32 logits of `hidden` (in autograd's graph where grad is enabled) and a tensor of their values
    that may be overwritten: the logits' own storage (no copy) unless the head's backward keeps them."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = head.logits(hidden)
    storage = logits.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in saved):
        return logits, logits.detach().clone()
    return logits, logits.detach()


@torch.no_grad()
def _exp_(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [r, V] -> exp(logits - row max), in place; returns those rows' sums [r, 1] and log-sum-exp [r]."""
    top = values.amax(-1, keepdim=True)
    sums = values.sub_(top).exp_().sum(-1, keepdim=True)
    return sums, (sums.log() + top).squeeze(-1)


def _starts(count: int, rows: int) -> range:
    # At least one (possibly empty) chunk: the head stays in the graph, as DDP expects every step.
    return range(0, max(count, 1), rows)


def _accumulate(totals: list, grads: tuple) -> None:
    for i, grad in enumerate(grads):
        if grad is not None:
            totals[i] = grad if totals[i] is None else totals[i].add_(grad)


# --- the loss: each chunk differentiated in its forward ---------------------------------------------------------
def _loss_chunks(
    head: OutputHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    scales: torch.Tensor,
    rows: int,
    hidden_grad: bool = False,
    params: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """The loss scales[0] * summed cross-entropy + scales[1] * summed z-loss, and its gradients for the gathered
    hidden states (with `hidden_grad`) and for `params`, the head's trainable weights (neither: the loss only).

    A chunk's fp32 logits become their gradient in place, scales[0] * (softmax - one-hot) (+ the z-loss's
    2 * weight * scales[1] * max at the argmax, where `max` sends it), and autograd takes that through the head.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.zeros_like(hidden) if hidden_grad else None
    grad_params: list[torch.Tensor | None] = [None] * len(params)
    for start in _starts(len(targets), rows):
        piece = hidden[start : start + rows].detach().requires_grad_(hidden_grad)
        chunk_targets = targets[start : start + rows, None]
        with torch.enable_grad():
            logits, values = _writable_logits(head, piece)
        with torch.no_grad():
            target = values.gather(-1, chunk_targets)
            top, top_at = values.max(-1, keepdim=True) if head.z_loss_weight else (None, None)
            sums, log_sum_exp = _exp_(values)
            total += (log_sum_exp - target.squeeze(-1)).sum() * scales[0]
            if top is not None:
                total += head.z_loss_weight * top.pow(2).sum() * scales[1]
            if not hidden_grad and not params:
                continue
            values.mul_(scales[0] / sums).scatter_add_(-1, chunk_targets, (-scales[0]).expand(len(target), 1))
            if top is not None:
                values.scatter_add_(-1, top_at, 2 * head.z_loss_weight * scales[1] * top)
        grads = torch.autograd.grad(logits, [piece] * hidden_grad + list(params), values, allow_unused=True)
        del logits, values
        if hidden_grad:
            grad_hidden[start : start + rows], grads = grads[0], grads[1:]
        _accumulate(grad_params, grads)
    return total, grad_hidden, grad_params


class _ChunkedLoss(torch.autograd.Function):
    """A scalar loss whose gradients are taken chunk by chunk during its forward, then scaled in backward.

    For a scalar loss this saves the recomputation checkpointing would do: each chunk's logits are built once and
    differentiated at once; what is kept is the gradient for the gathered hidden states [n, H] and for the head's
    trainable weights.
    """

    @staticmethod
    def forward(ctx, hidden, targets, scales, head, rows, *params):
        total, grad_hidden, grad_params = _loss_chunks(
            head, hidden, targets, scales, rows, ctx.needs_input_grad[0], params
        )
        ctx.grads = (grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = (None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads)
        return grad_hidden, None, None, None, None, *grad_params


# --- per-token log-probs: each chunk's log-sum-exp kept, its logits recomputed in backward ----------------------
def _logprob_chunks(
    head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [n], log-sum-exp [n]) without gradient."""
    logprobs, log_sum_exps = [], []
    with torch.no_grad():
        for start in _starts(len(targets), rows):
            _, values = _writable_logits(head, hidden[start : start + rows])
            target = values.gather(-1, targets[start : start + rows, None]).squeeze(-1)
            log_sum_exps.append(_exp_(values)[1])
            logprobs.append(target - log_sum_exps[-1])
    return torch.cat(logprobs), torch.cat(log_sum_exps)


def _forward_state(device: torch.device) -> dict:
    """What a recompute must see again: the random state (a dropout in the head) and autocast."""
    kind = device.type
    return {
        "device": device,
        "rng": (torch.get_rng_state(), torch.cuda.get_rng_state(device) if kind == "cuda" else None),
        "autocast": {
            "device_type": kind,
            "dtype": torch.get_autocast_dtype(kind),
            "enabled": torch.is_autocast_enabled(kind),
        },
    }


@contextmanager
def _replayed(state: dict) -> Iterator[None]:
    """The forward's random state (the head's dropout draws the same masks) and autocast again; the random
    state outside is restored after."""
    cpu, accelerator = state["rng"]
    with torch.random.fork_rng(devices=[state["device"]] if accelerator is not None else []):
        torch.set_rng_state(cpu)
        if accelerator is not None:
            torch.cuda.set_rng_state(accelerator, state["device"])
        with torch.autocast(**state["autocast"]):
            yield


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) per position; backward recomputes each chunk's logits and makes them its gradient in place,
    grad * (one-hot - softmax), from the log-sum-exp kept by the forward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, rows, *params):
        ctx.state = _forward_state(hidden.device)
        logprobs, log_sum_exp = _logprob_chunks(head, hidden, targets, rows)
        ctx.save_for_backward(hidden, targets, log_sum_exp)
        ctx.head, ctx.rows, ctx.params = head, rows, params
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        hidden, targets, log_sum_exp = ctx.saved_tensors
        hidden_grad = ctx.needs_input_grad[0]
        params = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[4:]) if needed]
        grad_hidden = torch.zeros_like(hidden) if hidden_grad else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        rows = ctx.rows
        with _replayed(ctx.state):
            for start in _starts(len(targets), rows):
                piece = hidden[start : start + rows].detach().requires_grad_(hidden_grad)
                with torch.enable_grad():
                    logits, values = _writable_logits(ctx.head, piece)
                with torch.no_grad():
                    weight = grad_output[start : start + rows, None].float()
                    values.sub_(log_sum_exp[start : start + rows, None]).exp_().mul_(-weight)
                    values.scatter_add_(-1, targets[start : start + rows, None], weight)
                grads = torch.autograd.grad(logits, [piece] * hidden_grad + params, values, allow_unused=True)
                del logits, values
                if hidden_grad:
                    grad_hidden[start : start + rows], grads = grads[0], grads[1:]
                _accumulate(grad_params, grads)
        grads = iter(grad_params)
        return grad_hidden, None, None, None, *(next(grads) if n else None for n in ctx.needs_input_grad[4:])


def _chunk_logprobs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead, chunk_size: int | ChunkSize = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for gathered positions (see `label_positions`): [n] fp32, differentiable.

    hidden [n, H] in the model's dtype, targets [n] long, none of them -100. Peak memory: one chunk x vocab.
    DPO / RL sum these per sequence (the positions' rows come from the mask `label_positions` returns).
    """
    rows = head.rows(chunk_size)
    params = [p for p in head.module.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        return _logprob_chunks(head, hidden, targets, rows)[0]
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 gathers the head's weight only inside a module call: gradients for it cannot leave a function of
        # ours, so there each chunk keeps its activations for autograd (more memory under ZeRO-3 only).
        starts = _starts(len(targets), rows)
        return torch.cat([_chunk_logprobs(head, hidden[s : s + rows], targets[s : s + rows]) for s in starts])
    return _ChunkedLogprobs.apply(hidden, targets, head, rows, *params)


@torch.no_grad()
def token_entropies(
    hidden: torch.Tensor, head: OutputHead, chunk_size: int | ChunkSize = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """The entropy of the head's distribution at each of `hidden`'s positions [n] (no gradient; logged by RL).
    Peak memory: two chunks x vocab."""
    rows = head.rows(chunk_size)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        _, values = _writable_logits(head, hidden[start : start + rows])
        values.sub_(values.amax(-1, keepdim=True))  # z - max; entropy = log sum e^z - sum p z, shift-free
        probs = values.exp()
        sums = probs.sum(-1)
        pieces.append(sums.log() - probs.mul_(values).sum(-1) / sums)
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_loss(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, summed z-loss] of one chunk through autograd (ZeRO-3's path)."""
    logits = head.logits(hidden)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    if not head.z_loss_weight:
        return torch.stack([loss, loss.new_zeros(())])
    return torch.stack([loss, head.z_loss_weight * logits.max(dim=-1).values.pow(2).sum()])


def causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: OutputHead,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | ChunkSize = DEFAULT_CHUNK_SIZE,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss the model's forward computes, without its [positions x vocabulary] logits.

    Summed token cross-entropy divided by `num_items_in_batch` (the label tokens of the whole optimizer step,
    all processes, as the Trainer counts them) or, without it, by this batch's label tokens; plus Baichuan2's
    z-loss normalised the same way when the config has `z_loss_weight`.
    """
    hidden, targets, _ = label_positions(hidden_states, labels, shift_labels)
    count = torch.tensor(float(len(targets)), device=hidden.device)
    if num_items_in_batch is None:
        # As the model: the mean over this batch's label tokens; its z-loss divides by at least 1.
        scales = torch.stack([1 / count, 1 / count.clamp_min(1)])
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
        scales = (1 / denominator).expand(2)
    params = [p for p in head.module.parameters() if p.requires_grad]
    rows = head.rows(chunk_size)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        return _loss_chunks(head, hidden, targets, scales, rows)[0]
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 gathers the head's weight only inside a module call: gradients for it cannot leave a function of
        # ours, so there each chunk keeps its logits for autograd until backward (more memory under ZeRO-3 only).
        starts = _starts(len(targets), rows)
        pieces = [_chunk_loss(head, hidden[s : s + rows], targets[s : s + rows]) for s in starts]
        return (torch.stack(pieces).sum(dim=0) * scales).sum()
    return _ChunkedLoss.apply(hidden, targets, scales, head, rows, *params)


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
