"""Direct preference optimization: per-sequence log-probs at label positions only, the losses, the Trainer.

Batches come from `data.collators.PairCollator` with labels: the B chosen sequences first, then the B rejected,
padded or packed padding-free, with `sequence_ids` telling which sequence each position holds. The policy's
log-prob of a reply is the sum over its label tokens (the reply and the token that ends it); logits are computed
only at those positions, in chunks that are recomputed in backward, never [positions x vocabulary] at once.

Reference log-probs: none (simpo, orpo), the same model with the LoRA adapter switched off, log-probs computed
once before training (`ref_logps` in the batch), or a frozen copy. Losses: docs/dpo.md.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EvalPrediction, Trainer

from component.config.choices import REFERENCE_FREE_LOSSES
from component.train.guards import ReliableTrainerMixin
from component.train.lm_head import (
    DEFAULT_CHUNK_SIZE,
    ChunkSize,
    OutputHead,
    decoder_hidden_states,
    label_positions,
    token_logprobs,
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / DeepSpeed wrappers (peft's wrapper kept: it switches adapters)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def as_reference(model: nn.Module, reference: str | nn.Module) -> Iterator[nn.Module]:
    """The model that computes reference log-probs: `model` with its adapter off ("adapter_off") or with a frozen
    second adapter active (its name), or the frozen `reference` model itself."""
    if not isinstance(reference, str):
        yield reference
    elif reference == "adapter_off":
        with unwrap(model).disable_adapter():
            yield model
    else:
        peft_model = unwrap(model)
        active = peft_model.active_adapter
        peft_model.set_adapter(reference)
        try:
            yield model
        finally:
            peft_model.set_adapter(active)  # also makes the policy's adapter trainable again


def sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | ChunkSize = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label-token log-probs, label-token count) per sequence of a PairCollator batch.

    The model's own forward runs (DDP and peft stay in the path) without logits; the decoder's last hidden state
    goes through the output head only at the positions that predict a label (`train.lm_head`).
    """
    inputs = {key: batch.get(key) for key in ("input_ids", "attention_mask", "position_ids")}
    hidden = decoder_hidden_states(model, inputs)
    states, targets, mask = label_positions(hidden, batch["labels"])
    logps = token_logprobs(states, targets, OutputHead.of(model), chunk)
    owners = F.pad(batch["sequence_ids"], (0, 1), value=-1)[..., 1:][mask]  # the sequence of each target token
    sequences = int(batch["sequence_ids"].max()) + 1
    totals = logps.new_zeros(sequences).index_add(0, owners, logps)
    counts = logps.new_zeros(sequences).index_add(0, owners, torch.ones_like(logps))
    return totals, counts


def preference_loss(
    loss_type: str,
    logps: torch.Tensor,
    counts: torch.Tensor,
    ref_logps: torch.Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over pairs, chosen rewards, rejected rewards) for [chosen..., rejected...] log-prob sums."""
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.clamp_min(1).chunk(2)
    if loss_type in REFERENCE_FREE_LOSSES:
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":  # label_smoothing > 0: conservative DPO (cDPO)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # per-token log ratios, as the IPO authors' own runs (and TRL) normalise them
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * (chosen / n_chosen - rejected / n_rejected) - simpo_gamma)
    elif loss_type == "orpo":
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_chosen - torch.log1p(-torch.exp(mean_chosen))) - (
            mean_rejected - torch.log1p(-torch.exp(mean_rejected))
        )
        losses = -mean_chosen - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if sft_weight:
        losses = losses + sft_weight * (-chosen / n_chosen)
    if loss_type in ("simpo", "orpo"):  # their implicit reward: beta x mean token log-prob
        return losses.mean(), (beta * chosen / n_chosen).detach(), (beta * rejected / n_rejected).detach()
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def reward_metrics(chosen_rewards: np.ndarray, rejected_rewards: np.ndarray) -> dict[str, float]:
    chosen_rewards, rejected_rewards = np.asarray(chosen_rewards), np.asarray(rejected_rewards)
    return {
        "rewards/chosen": float(np.mean(chosen_rewards)),
        "rewards/rejected": float(np.mean(rejected_rewards)),
        "rewards/accuracies": float(np.mean(chosen_rewards > rejected_rewards)),
        "rewards/margins": float(np.mean(chosen_rewards - rejected_rewards)),
    }


class DPOTrainer(ReliableTrainerMixin, Trainer):
    """transformers.Trainer with a preference loss over PairCollator batches (loss: mean over the micro-batch's
    pairs, which the Trainer divides by the accumulation steps). `reference` is "none", "adapter_off",
    "precomputed" or a frozen model."""

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        sft_weight: float = 0.0,
        reference: str | nn.Module = "adapter_off",
        chunk: int | ChunkSize = DEFAULT_CHUNK_SIZE,
        **kwargs,
    ) -> None:
        kwargs.setdefault("compute_metrics", self._eval_metrics)
        super().__init__(*args, **kwargs)
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma, self.sft_weight, self.reference, self.chunk = simpo_gamma, sft_weight, reference, chunk
        self.model_accepts_loss_kwargs = False
        self.label_names = []  # prediction_step below makes the metric inputs
        self._logged: dict[str, list[float]] = defaultdict(list)

    def reference_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.loss_type in REFERENCE_FREE_LOSSES:
            return None
        if self.reference == "precomputed":
            return inputs["ref_logps"].float()
        with torch.no_grad(), as_reference(model, self.reference) as reference:
            return sequence_logps(reference, inputs, self.chunk)[0]

    def pair_loss(self, model, inputs):
        ref_logps = self.reference_logps(model, inputs)  # first: switching adapters must not touch the policy graph
        logps, counts = sequence_logps(model, inputs, self.chunk)
        loss, chosen_rewards, rejected_rewards = preference_loss(
            self.loss_type,
            logps,
            counts,
            ref_logps,
            self.beta,
            self.label_smoothing,
            self.simpo_gamma,
            self.sft_weight,
        )
        return loss, logps.detach(), chosen_rewards, rejected_rewards

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, logps, chosen_rewards, rejected_rewards = self.pair_loss(model, inputs)
        if model.training:
            chosen_logps, rejected_logps = logps.chunk(2)
            stats = reward_metrics(chosen_rewards.cpu().numpy(), rejected_rewards.cpu().numpy())
            stats.update({"logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item()})
            for key, value in stats.items():
                self._logged[key].append(value)
        return (loss, {"logps": logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._logged and "loss" in logs:  # training logs: the means since the last log
            logs = {**logs, **{key: float(np.mean(values)) for key, values in self._logged.items()}}
            self._logged.clear()
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, logps, chosen_rewards, rejected_rewards = self.pair_loss(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        chosen_logps, rejected_logps = logps.chunk(2)
        outputs = torch.stack([chosen_rewards, rejected_rewards, chosen_logps, rejected_logps], dim=1)
        return loss.detach(), outputs, torch.zeros(len(outputs), device=outputs.device)  # metrics need labels

    @staticmethod
    def _eval_metrics(prediction: EvalPrediction) -> dict[str, float]:
        values = prediction.predictions
        values = values[0] if isinstance(values, tuple) else values
        metrics = reward_metrics(values[:, 0], values[:, 1])
        metrics.update({"logps/chosen": float(np.mean(values[:, 2])), "logps/rejected": float(np.mean(values[:, 3]))})
        return metrics


@torch.no_grad()
def precompute_reference_logps(
    model: nn.Module, dataset, collator, batch_size: int, chunk: int | ChunkSize
) -> list[float]:
    """Reference log-prob sums of every pair, [chosen, rejected] per row, with the model as it is now."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values: list[list[float]] = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        chosen, rejected = sequence_logps(model, batch, chunk)[0].chunk(2)
        values += [[c, r] for c, r in zip(chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    if any(not math.isfinite(v) for pair in values for v in pair):
        raise ValueError("reference log-probs are not finite: check the model's weights and dtype")
    return values
