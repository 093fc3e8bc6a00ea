"""TRL's side of `sft_throughput.py --whole-process`: the script a TRL user writes for the same run, timed end to end.

    python benchmarks/trl_sft.py MODEL TRAIN_JSONL OUTPUT_DIR [--max-length 1024 --batch-size 8 --seed 0]

Reads the Firefly-layout JSONL (`input`, `target`) as a prompt-completion dataset in our `human_assistant`
template's text (`Human: ...\\n\\nAssistant: ` + the reply; TRL adds BOS and EOS as the tokenizer says, and
trains on the completion only, its default for such data), trains one epoch with `SFTTrainer` defaults and the
benchmark's shared settings (learning rate 1e-3 constant, batch, max length, seed; fp32 and no gradient
checkpointing, as every mode of the benchmark), then saves the model and its train metrics, as transformers'
example scripts do. Imports are part of the measurement, so nothing here is imported before it is needed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("train_file")
    parser.add_argument("output_dir")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files=options.train_file, split="train")
    data = data.map(
        lambda r: {"prompt": f"Human: {r['input']}\n\nAssistant: ", "completion": r["target"]},
        remove_columns=data.column_names,
    )
    config = SFTConfig(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_length=options.max_length,
        seed=options.seed,
        gradient_checkpointing=False,
        bf16=False,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = SFTTrainer(model=options.model, args=config, train_dataset=data)
    result = trainer.train()
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
