"""Merge a LoRA adapter into its base weights and save a standalone model folder (= export.py --format hf).

    python merge_lora.py --adapter output/sft --output_dir output/sft_merged [--model_name_or_path BASE]
        [--dtype bfloat16|float16|float32] [--trust_remote_code true] [--config FILE.json]

The folder (safetensors, tokenizer, generation config, train_args.json) loads with plain transformers and
serves `generate.py --model_name_or_path FOLDER`. The base defaults to the adapter's base_model_name_or_path.
Reward-model adapters merge too (score head kept). Merging into a 4-bit/8-bit base is refused: load the base
in 16-bit; a QLoRA adapter merges into the 16-bit base as it is.
"""

from __future__ import annotations

import sys

from component.config.inference import CONFIG_FLAG, MergeOptions, parse_options
from component.config.parser import fields_of, run_cli, usage


def main(argv: list[str]) -> None:
    from component.export.merge import export_hf

    options = parse_options(MergeOptions, argv, "merge_lora.py")
    print(f"Merged model saved to {export_hf(options)}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("merge_lora.py", __doc__, CONFIG_FLAG, fields_of(MergeOptions)))
