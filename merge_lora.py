"""Merge a LoRA adapter into its base weights and save a standalone model folder.

    python merge_lora.py --adapter output/sft --output_dir output/sft_merged [--model_name_or_path BASE]
        [--dtype bfloat16|float16|float32] [--trust_remote_code]

The folder (safetensors, tokenizer, generation config, train_args.json) loads with plain transformers and
serves `generate.py --model_name_or_path FOLDER`. The base defaults to the adapter's base_model_name_or_path.
Reward-model adapters merge too (score head kept). Merging into a 4-bit/8-bit base is refused: load the base
in 16-bit; a QLoRA adapter merges into the 16-bit base as it is.
"""

from __future__ import annotations

import argparse
import sys

import component  # noqa: F401  (registers the native Baichuan classes)
from component.arguments import ConfigError
from component.generation import MERGE_DTYPES, merge_adapter


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (a train_sft.py / train_rm.py output)")
    parser.add_argument("--output_dir", required=True, help="where the merged model folder goes")
    parser.add_argument("--model_name_or_path", help="base model folder (default: from adapter_config.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(MERGE_DTYPES), help="weights dtype")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], help="refused: merging needs a 16-bit base")
    parser.add_argument("--trust_remote_code", action="store_true", help="run Python files shipped with the model")
    args = parser.parse_args(argv)
    output = merge_adapter(
        args.adapter, args.output_dir, args.model_name_or_path, args.dtype, args.quantization, args.trust_remote_code
    )
    print(f"Merged model saved to {output}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"config error: {error}")
