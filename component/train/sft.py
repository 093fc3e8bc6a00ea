"""SFT's Trainer: transformers' Trainer with the loss (training and eval) through `train.lm_head`."""

from __future__ import annotations

import logging

from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from component.config.choices import LOGITS_PATHS
from component.train.guards import ReliableTrainerMixin
from component.train.lm_head import (
    DEFAULT_CHUNK_MIB,
    DEFAULT_CHUNK_SIZE,
    ChunkSize,
    OutputHead,
    causal_lm_loss,
    decoder_hidden_states,
)

logger = logging.getLogger(__name__)


class SFTTrainer(ReliableTrainerMixin, Trainer):
    """`logits_path: "chunked"`: logits only at label positions, in chunks; `"model"`: the model's own loss. With
    atomic checkpoints and the signal / non-finite guards (train.guards).

    Everything else (batches, `num_items_in_batch`, gradient accumulation, DDP, eval loop) is the Trainer's.
    """

    def __init__(
        self,
        *args,
        logits_path: str = "chunked",
        logits_chunk_size: int = DEFAULT_CHUNK_SIZE,
        logits_chunk_mib: float | None = DEFAULT_CHUNK_MIB,
        **kwargs,
    ) -> None:
        if logits_path not in LOGITS_PATHS:
            raise ValueError(f"logits_path {logits_path!r} is not one of {', '.join(LOGITS_PATHS)}")
        ChunkSize(logits_chunk_size, logits_chunk_mib)  # checks both
        super().__init__(*args, **kwargs)
        if logits_path == "chunked" and (self.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
            # Sharded engines gather the head's weight only inside the model's forward; the head called after it
            # would see a shard. Their SFT runs through the model's own loss (docs/scale_out.md).
            logger.warning('logits_path: "chunked" runs as "model" under FSDP / ZeRO-3 (the output head is sharded)')
            logits_path = "model"
        self.logits_path = logits_path
        self.logits_chunk_size, self.logits_chunk_mib = logits_chunk_size, logits_chunk_mib
        if logits_path == "chunked":
            OutputHead.of(self.model)  # an unsupported head fails now, not at the first step
            if self.label_smoother is not None or self.compute_loss_func is not None:
                raise ValueError(
                    'logits_path: "chunked" computes the plain causal-LM loss; label_smoothing_factor or a custom '
                    'loss needs logits_path: "model"'
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Metrics that read logits (compute_metrics) need the model's logits: its own path then.
        wants_logits = return_outputs and (self.compute_metrics is not None or self.preprocess_logits_for_metrics)
        if self.logits_path == "model" or wants_logits or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        hidden_states = decoder_hidden_states(model, inputs)
        # accelerate autocasts the model's forward only; the head then runs in the same precision as it did there.
        with self.accelerator.autocast():
            chunk = ChunkSize(self.logits_chunk_size, self.logits_chunk_mib)
            loss = causal_lm_loss(hidden_states, labels, OutputHead.of(model), num_items_in_batch, chunk, shift_labels)
        # The Trainer's own rescaling under DDP (`average_tokens_across_devices`), as in Trainer.compute_loss.
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu
        return (loss, {"loss": loss}) if return_outputs else loss
