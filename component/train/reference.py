"""The DPO reference model: which one a run uses, and reference log-probs computed once before training.

- reference-free losses (simpo, orpo): none
- a new LoRA adapter: the same model with the adapter switched off (no second copy of the weights)
- `precompute_ref_log_probs` (default for full fine-tuning and for a continued adapter): one pass before
  training with the policy as it starts; the values are saved next to the cached dataset and reused
- otherwise a continued adapter: a frozen second copy of that adapter on the same base ("reference")
- otherwise full fine-tuning: a frozen copy of the model
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import TrainingArguments

from component.config.choices import REFERENCE_FREE_LOSSES
from component.config.training import DPOArguments
from component.data.pipeline import PreparedData
from component.model.loader import load_pretrained
from component.model.packed_attention import SEGMENT_ATTENTION, use_segment_attention
from component.train.dpo import precompute_reference_logps
from component.train.lm_head import ChunkSize

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"


def wants_precompute(args: DPOArguments) -> bool:
    if args.precompute_ref_log_probs is not None:
        return args.precompute_ref_log_probs
    return args.finetuning_type == "full" or args.adapter_name_or_path is not None


def choose_reference(
    args: DPOArguments, training_args: TrainingArguments, model: nn.Module, data: PreparedData, collator
) -> str | nn.Module:
    """The reference of this run; precomputing adds `ref_chosen_logps` / `ref_rejected_logps` to the datasets."""
    if args.loss_type in REFERENCE_FREE_LOSSES:
        logger.info("Reference: none (%s is reference-free)", args.loss_type)
        return "none"
    if wants_precompute(args):
        add_reference_columns(args, training_args, model, data, collator)
        return "precomputed"
    if args.adapter_name_or_path:
        model.load_adapter(args.adapter_name_or_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        logger.info("Reference: a frozen copy of the adapter %s", args.adapter_name_or_path)
        return REFERENCE_ADAPTER
    if args.finetuning_type == "full":
        reference = load_pretrained(
            args.model_name_or_path, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
        reference.requires_grad_(False).eval().to(training_args.device)
        if model.config._attn_implementation == SEGMENT_ATTENTION:  # packed pairs attend per sequence in both
            use_segment_attention(reference)
        logger.info("Reference: a frozen copy of %s", args.model_name_or_path)
        return reference
    logger.info("Reference: the base model (the LoRA adapter switched off)")
    return "adapter_off"


def add_reference_columns(
    args: DPOArguments, training_args: TrainingArguments, model: nn.Module, data: PreparedData, collator
) -> None:
    """Reference log-probs of every pair, computed by the main process once and saved with the data cache."""
    key = hashlib.sha256(
        json.dumps(
            [args.model_name_or_path, args.adapter_name_or_path, args.quantization, args.finetuning_type],
            default=str,
        ).encode()
    ).hexdigest()[:16]
    model.to(training_args.device)
    batch_size = training_args.per_device_eval_batch_size
    for split in ("train", "eval"):
        dataset = getattr(data, split)
        if dataset is None:
            continue
        path = Path(data.cache_path or training_args.output_dir) / f"reference_logps-{key}-{split}.json"
        with training_args.main_process_first(desc="reference log-probs"):
            if path.is_file():
                values = json.loads(path.read_text(encoding="utf-8"))
            else:
                logger.info("Reference log-probs of %d %s pairs (once; saved to %s)", len(dataset), split, path)
                values = precompute_reference_logps(
                    model, dataset, collator, batch_size, ChunkSize(args.logits_chunk_size, args.logits_chunk_mib)
                )
                if training_args.process_index == 0:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(values), encoding="utf-8")
        dataset = dataset.add_column("ref_chosen_logps", [v[0] for v in values])
        setattr(data, split, dataset.add_column("ref_rejected_logps", [v[1] for v in values]))
