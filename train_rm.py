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

from transformers import AutoModelForSequenceClassification, set_seed

import component  # noqa: F401  (registers the native Baichuan classes)
from component.arguments import ConfigError, RewardArguments, load_arguments, save_resolved
from component.dataset import write_data_report
from component.model import load_model, load_tokenizer
from component.reward import SCORE_HEAD, RewardTrainer, train_score_head_in_fp32
from component.reward_data import PairCollator, prepare_reward_data
from component.template import get_template
from component.training import finish_training, packing_row_tokens, resolve_resume, setup_logging, use_packing

logger = logging.getLogger("train_rm")

PLOT_KEYS = ("loss", "eval_loss", "eval_accuracy", "eval_margin")


def main(argv: list[str], callbacks: list | None = None) -> RewardTrainer | None:
    args, training_args = load_arguments(argv, RewardArguments)
    setup_logging(training_args)

    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    template = get_template(args.template, tokenizer)
    data = prepare_reward_data(args, template, training_args)
    if training_args.process_index == 0:
        save_resolved(args, training_args, training_args.output_dir)
        write_data_report(data, training_args.output_dir, ("chosen_input_ids", "rejected_input_ids"))
    if len(data.train) == 0:
        raise ValueError(f"no training pairs left: see the skip counts in {training_args.output_dir}/data_report.json")
    if training_args.process_index == 0:
        first = data.train[0]
        logger.info(
            "Example pair:\n--- chosen ---\n%s\n--- rejected ---\n%s",
            tokenizer.decode(first["chosen_input_ids"]),
            tokenizer.decode(first["rejected_input_ids"]),
        )
        logger.info(
            "Data: %d train / %d eval pairs; report in %s/data_report.json",
            data.report["examples"],
            data.report["eval_examples"],
            training_args.output_dir,
        )
    if args.dry_run:
        return None

    set_seed(training_args.seed)  # the new score head is random-init: the same on every run and rank
    model = load_model(
        args,
        training_args.gradient_checkpointing,
        model_class=AutoModelForSequenceClassification,
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
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    finish_training(trainer, result, PLOT_KEYS)
    return trainer


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"config error: {error}")
