"""Supervised fine-tuning recipe: QLoRA (4-bit NF4), LoRA or full, on instruction data read as published.

    python train_sft.py --train_args_file config/lora_config.json [--key value ...]
    sh run.sh train_sft.py config/lora_config.json          # torchrun, one process per GPU

Steps: read the train args -> load the tokenizer and template -> read, tokenize and cache the data (write
data_report.json / data_preview.jsonl) -> [stop here with --dry_run true] -> load the model (quantized,
LoRA) -> train with transformers.Trainer (resume, DDP, TensorBoard) -> save adapter or weights, tokenizer,
metrics and training_loss.png in output_dir. Keys: README.md and docs/config.md.
"""

from __future__ import annotations

import logging
import sys

from transformers import Trainer, set_seed

import component  # noqa: F401  (registers the native Baichuan classes)
from component.arguments import ConfigError, load_arguments, save_resolved
from component.dataset import prepare_sft_data, show_trained_spans, write_data_report
from component.model import load_model, load_tokenizer
from component.template import get_template
from component.training import finish_training, make_collator, resolve_resume, setup_logging, use_packing

logger = logging.getLogger("train_sft")


def main(argv: list[str], callbacks: list | None = None) -> Trainer | None:
    args, training_args = load_arguments(argv)
    setup_logging(training_args)

    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    template = get_template(args.template, tokenizer)
    data = prepare_sft_data(args, template, training_args)
    if training_args.process_index == 0:
        save_resolved(args, training_args, training_args.output_dir)
        write_data_report(data, training_args.output_dir, ("input_ids", "labels"))
        first = data.train[0]
        logger.info(
            "Example (trained spans in [[ ]]):\n%s", show_trained_spans(tokenizer, first["input_ids"], first["labels"])
        )
        logger.info(
            "Data: %d train / %d eval examples; report in %s/data_report.json",
            data.report["examples"],
            data.report["eval_examples"],
            training_args.output_dir,
        )
    if args.dry_run:
        return None

    set_seed(training_args.seed)  # LoRA weights are initialised at load: same seed, same run
    model = load_model(args, training_args.gradient_checkpointing)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(args, training_args, tokenizer, use_packing(args, training_args, model), model),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    finish_training(trainer, result)
    return trainer


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"config error: {error}")
