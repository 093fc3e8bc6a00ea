"""Direct preference optimization recipe: DPO, IPO, cDPO, robust, hinge, SimPO, ORPO on QLoRA / LoRA / full.

    python train_dpo.py --train_args_file config/dpo/lora_config.json [--key value ...]
    sh run.sh train_dpo.py config/dpo/lora_config.json          # torchrun, one process per GPU

Steps: read the train args (SFT's keys + loss_type, beta, ...) -> load the tokenizer and template -> read,
tokenize and cache the preference pairs with labels on each reply (write data_report.json / data_preview.jsonl)
-> [stop here with --dry_run true] -> load the policy (quantized, a new LoRA or `adapter_name_or_path`
continued) -> the reference: none (simpo, orpo), the adapter switched off, log-probs precomputed once, or a
frozen copy -> train with DPOTrainer (chosen and rejected packed padding-free, logits at label positions only)
-> save adapter or weights, tokenizer, metrics, eval_results.json and training_loss.png. See docs/dpo.md.
"""

from __future__ import annotations

import logging
import sys

from component.config.training import DPOArguments, check_usage_early

if __name__ == "__main__":  # --help and a missing train-args file answer before torch loads
    check_usage_early(sys.argv[1:], "train_dpo.py", __doc__, DPOArguments)

from transformers import set_seed

from component.config.parser import run_cli, usage
from component.config.training import TRAIN_ARGS_FLAG, recipe_fields
from component.data.collators import PairCollator
from component.data.pairwise import prepare_pair_data, show_pair
from component.model.loader import load_model
from component.train.batching import packing_row_tokens, use_packing
from component.train.dpo import DPOTrainer
from component.train.lm_head import ChunkSize
from component.train.recipe import finish_training, record_data, resolve_resume, start_recipe
from component.train.reference import choose_reference

logger = logging.getLogger("train_dpo")

PLOT_KEYS = ("loss", "eval_loss", "rewards/margins", "eval_rewards/accuracies")


def main(argv: list[str], callbacks: list | None = None) -> DPOTrainer | None:
    args, training_args, lock, tokenizer, template = start_recipe(argv, DPOArguments, "train_dpo.py")

    data = prepare_pair_data(args, template, training_args, with_labels=True)
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    record_data(args, training_args, data, columns, lambda first: show_pair(tokenizer, first), unit="pairs")
    if args.dry_run:
        return None

    set_seed(training_args.seed)  # a new LoRA is initialised at load: same seed, same run
    model = load_model(args, training_args.gradient_checkpointing)
    packing = use_packing(args, training_args, model)  # chosen and rejected: segments of packed rows
    collator = PairCollator(tokenizer.pad_token_id, packing, packing_row_tokens(args, model), attention_mask=False)
    reference = choose_reference(args, training_args, model, data, collator)
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        on_nonfinite=args.on_nonfinite,
        loss_type=args.loss_type,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
        sft_weight=args.sft_weight,
        reference=reference,
        chunk=ChunkSize(args.logits_chunk_size, args.logits_chunk_mib),
    )
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    finish_training(trainer, result, PLOT_KEYS, lock=lock)
    return trainer


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("train_dpo.py", __doc__, TRAIN_ARGS_FLAG, recipe_fields(DPOArguments)))
