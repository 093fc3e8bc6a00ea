"""Reward-model training: the pairwise loss, its metrics, and the Trainer subclass.

Scores come from `model.reward_head.sequence_scores` (pooled at each sequence's last real token); batches from
`data.collators.PairCollator` (the B chosen sequences first, then the B rejected).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EvalPrediction, Trainer

from component.model.reward_head import sequence_scores
from component.train.guards import ReliableTrainerMixin


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin), in fp32."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def pairwise_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Accuracy (ties count as wrong), mean scores and mean margin of a set of pairs."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return {
        "accuracy": float(np.mean(chosen > rejected)),
        "chosen_score": float(np.mean(chosen)),
        "rejected_score": float(np.mean(rejected)),
        "margin": float(np.mean(chosen - rejected)),
    }


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Trainer hook: predictions are (pairs, 2) = [chosen score, rejected score]."""
    scores = prediction.predictions
    scores = scores[0] if isinstance(scores, tuple) else scores
    return pairwise_metrics(scores[:, 0], scores[:, 1])


class RewardTrainer(ReliableTrainerMixin, Trainer):
    """transformers.Trainer with the pairwise loss; batches come from `reward_data.PairCollator`.

    The loss is a mean over the pairs of a micro-batch, so the Trainer divides it by the accumulation
    steps (`loss_is_scaled_for_ga = False`). Evaluation returns (pairs, 2) scores for `compute_metrics`.
    Atomic checkpoints, signal and non-finite guards: `train.guards.ReliableTrainerMixin`.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, margin: float = 0.0, **kwargs) -> None:
        kwargs.setdefault("compute_metrics", compute_metrics)
        super().__init__(*args, **kwargs)
        self.margin = margin
        self.model_accepts_loss_kwargs = False  # our compute_loss never passes num_items_in_batch on
        self.label_names = []  # no label tensors: prediction_step below makes the metric inputs

    def pair_scores(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sequence_scores(
            model,
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            score_index=inputs.get("score_index"),
        )
        chosen, rejected = scores.chunk(2)  # the collator puts the B chosen first, then the B rejected
        return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self.pair_scores(model, inputs)
        loss = pairwise_loss(chosen, rejected, self.margin)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            chosen, rejected = self.pair_scores(model, inputs)
            loss = pairwise_loss(chosen, rejected, self.margin).detach()
        if prediction_loss_only:
            return loss, None, None
        scores = torch.stack([chosen, rejected], dim=1).detach()
        return loss, scores, torch.zeros(len(chosen), device=scores.device)  # dummy labels: metrics need some
