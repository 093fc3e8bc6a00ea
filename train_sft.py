"""Supervised fine-tuning recipe: QLoRA (4-bit NF4), LoRA or full, on instruction data read as published.

    python train_sft.py --train_args_file config/lora_config.json [--key value ...]
    sh run.sh train_sft.py config/lora_config.json          # torchrun, one process per GPU

Steps: read the train args -> load the tokenizer and template -> read, tokenize and cache the data (write
data_report.json / data_preview.jsonl) -> [stop here with --dry_run true] -> load the model (quantized,
LoRA) -> train with transformers.Trainer (resume, DDP, TensorBoard; the LM head + loss at label positions only,
in chunks: component/train/lm_head.py) -> save adapter or weights, tokenizer,
metrics and training_loss.png in output_dir. Keys: README.md and docs/config.md.
"""

from __future__ import annotations

import logging
import sys

from component.config.training import FinetuneArguments, check_usage_early

if __name__ == "__main__":  # --help and a missing train-args file answer before torch loads
    check_usage_early(sys.argv[1:], "train_sft.py", __doc__)

from transformers import Trainer, set_seed

from component.config.parser import run_cli, usage
from component.config.training import TRAIN_ARGS_FLAG, recipe_fields
from component.data.supervised import prepare_sft_data, show_trained_spans
from component.model.loader import load_model
from component.train.batching import make_collator, use_packing
from component.train.recipe import finish_training, record_data, resolve_resume, start_recipe
from component.train.sft import SFTTrainer

logger = logging.getLogger("train_sft")


def main(argv: list[str], callbacks: list | None = None) -> Trainer | None:
    args, training_args, lock, tokenizer, template = start_recipe(argv, FinetuneArguments, "train_sft.py")

    data = prepare_sft_data(args, template, training_args)
    record_data(
        args,
        training_args,
        data,
        ("input_ids", "labels"),
        lambda first: (
            "Example (trained spans in [[ ]]):\n" + show_trained_spans(tokenizer, first["input_ids"], first["labels"])
        ),
    )
    if args.dry_run:
        return None

    set_seed(training_args.seed)  # LoRA weights are initialised at load: same seed, same run
    model = load_model(args, training_args.gradient_checkpointing)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(args, training_args, tokenizer, use_packing(args, training_args, model), model),
        processing_class=tokenizer,
        on_nonfinite=args.on_nonfinite,
        callbacks=callbacks,
        logits_path=args.logits_path,
        logits_chunk_size=args.logits_chunk_size,
        logits_chunk_mib=args.logits_chunk_mib,
    )
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    finish_training(trainer, result, lock=lock)
    return trainer


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("train_sft.py", __doc__, TRAIN_ARGS_FLAG, recipe_fields()))
