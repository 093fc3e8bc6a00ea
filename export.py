"""Export front end: a fine-tuned model as a transformers folder, a GGUF file (llama.cpp) or an ONNX graph.

    python export.py --format hf --adapter output/sft --output_dir output/sft_merged [--dtype bfloat16]
    python export.py --format gguf --adapter output/sft --output_dir output/sft_gguf [--gguf_type f16]
    python export.py --format onnx --model_name_or_path output/sft_merged --output_dir output/sft_onnx
    python export.py --config FILE.json [--key value ...]

Input: a base + LoRA adapter (merged first) or a merged folder. docs/export.md explains each format and what
runs it. merge_lora.py is `--format hf`.
"""

from __future__ import annotations

import sys

from component.config.inference import CONFIG_FLAG, ExportOptions, parse_options
from component.config.parser import fields_of, run_cli, usage


def main(argv: list[str]) -> None:
    options = parse_options(ExportOptions, argv, "export.py")
    if options.format == "gguf":
        from component.export.gguf import export_gguf as export
    elif options.format == "onnx":
        from component.export.onnx import export_onnx as export
    else:
        from component.export.merge import export_hf as export
    print(f"Exported ({options.format}) to {export(options)}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("export.py", __doc__, CONFIG_FLAG, fields_of(ExportOptions)))
