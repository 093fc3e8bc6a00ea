"""Reward-model recipe: QLoRA (4-bit NF4), LoRA or full, on preference pairs read as published.

    python train_rm.py --train_args_file config/rm/lora_config.json [--key value ...]
    sh run.sh train_rm.py config/rm/lora_config.json          # torchrun, one process per GPU

Steps: read the train args (SFT's keys + margin) -> load the tokenizer and template -> read, tokenize and
cache the pairs (write data_report.json / data_preview.jsonl) -> [stop here with --dry_run true] -> load a
sequence-classification model with one output (quantized, LoRA; the score head trained and saved with the
adapter) -> train with RewardTrainer (pairwise loss; eval accuracy, scores, margin) -> save adapter or
weights, tokenizer, metrics, eval_results.json and training_loss.png in output_dir. See docs/reward_model.md.
"""

from __future__ import annotations

import logging
import sys

from component.config.training import RewardArguments, check_usage_early

if __name__ == "__main__":  # --help and a missing train-args file answer before torch loads
    check_usage_early(sys.argv[1:], "train_rm.py", __doc__, RewardArguments)

from transformers import set_seed

from component.config.parser import run_cli, usage
from component.config.training import TRAIN_ARGS_FLAG, recipe_fields
from component.data.collators import PairCollator
from component.data.pairwise import prepare_reward_data
from component.model.loader import load_model
from component.model.reward_head import SCORE_HEAD, train_score_head_in_fp32
from component.train.batching import packing_row_tokens, use_packing
from component.train.recipe import finish_training, record_data, resolve_resume, start_recipe
from component.train.reward import RewardTrainer

logger = logging.getLogger("train_rm")

PLOT_KEYS = ("loss", "eval_loss", "eval_accuracy", "eval_margin")


def main(argv: list[str], callbacks: list | None = None) -> RewardTrainer | None:
    args, training_args, lock, tokenizer, template = start_recipe(argv, RewardArguments, "train_rm.py")

    data = prepare_reward_data(args, template, training_args)
    record_data(
        args,
        training_args,
        data,
        ("chosen_input_ids", "rejected_input_ids"),
        lambda first: (
            f"Example pair:\n--- chosen ---\n{tokenizer.decode(first['chosen_input_ids'])}\n"
            f"--- rejected ---\n{tokenizer.decode(first['rejected_input_ids'])}"
        ),
        unit="pairs",
    )
    if args.dry_run:
        return None

    set_seed(training_args.seed)  # the new score head is random-init: the same on every run and rank
    model = load_model(
        args,
        training_args.gradient_checkpointing,
        task="seq_cls",
        modules_to_save=[SCORE_HEAD],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    train_score_head_in_fp32(model)
    packing = use_packing(args, training_args, model)  # chosen and rejected: two segments of a packed row
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=PairCollator(tokenizer.pad_token_id, packing, packing_row_tokens(args, model)),
        processing_class=tokenizer,
        margin=args.margin,
        on_nonfinite=args.on_nonfinite,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    finish_training(trainer, result, PLOT_KEYS, lock=lock)
    return trainer


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("train_rm.py", __doc__, TRAIN_ARGS_FLAG, recipe_fields(RewardArguments)))
