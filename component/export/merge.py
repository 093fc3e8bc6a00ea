"""Merge: fold a LoRA adapter into 16-bit base weights and save a folder plain transformers loads.

A Baichuan folder also gets our standalone model files and an `auto_map` naming them (write_standalone_code), so
transformers 5 with trust_remote_code=True loads it without this project.

Front end: merge_lora.py. A reward-model adapter (task_type SEQ_CLS) merges into a sequence-classification
model; its trained score head (peft modules_to_save) replaces the base's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from component.config.choices import MERGE_DTYPES
from component.config.parser import ConfigError, closest
from component.data.template import get_template
from component.model.baichuan import is_baichuan_config, write_standalone_code
from component.model.loader import (
    adapter_base,
    load_adapter,
    load_pretrained,
    load_tokenizer,
    read_adapter_config,
    tokenizer_folder,
    trained_template,
)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(
    adapter: str,
    output_dir: str,
    model_name_or_path: str | None = None,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge `adapter` into its base (default: the adapter's own base) and save to `output_dir`."""
    merged, tokenizer = merged_model(adapter, model_name_or_path, dtype, quantization, trust_remote_code)
    output = Path(output_dir)
    if type(merged).__name__.endswith("ForCausalLM"):  # not for reward models
        serve_with_trained_template(merged, tokenizer, trained_template(adapter))
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if (Path(adapter) / "train_args.json").is_file():  # keeps the template choice with the weights
        (output / "train_args.json").write_bytes((Path(adapter) / "train_args.json").read_bytes())
    if is_baichuan_config(output):  # loads without this project too (transformers + trust_remote_code)
        write_standalone_code(output)
    return output


def serve_with_trained_template(model, tokenizer, template_name: str) -> None:
    """Runtimes that render chat prompts themselves (vLLM's server, transformers' apply_chat_template) render the
    template the weights learned, and stop where generate.py stops: the tokenizer's chat_template becomes that
    template's Jinja form and generation_config's eos_token_id its stop tokens."""
    template = get_template(template_name, tokenizer)
    tokenizer.chat_template = template.jinja_chat_template()
    stops = template.stop_token_ids
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


def merged_model(
    adapter: str,
    model_name_or_path: str | None = None,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    trust_remote_code: bool = False,
):
    """(base with `adapter` merged in, in memory; the tokenizer training used): what merge_adapter saves."""

    if quantization:
        raise ConfigError(
            f"merging into a {quantization}-loaded base is refused: the merged weights would have to be "
            "re-quantized (losing the adapter's precision) and cannot be saved as a plain model. Load the base in "
            "16-bit to merge (leave out --quantization); a QLoRA adapter merges into the 16-bit base as it is"
        )
    adapter_config = read_adapter_config(adapter)
    if adapter_config is None:
        raise ConfigError(f"'adapter' {adapter!r} has no adapter_config.json (is it a LoRA output_dir?)")
    base = model_name_or_path or adapter_base(adapter)
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"base model {base!r} is not a local model folder; pass --model_name_or_path")
    base_config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in base_config:
        raise ConfigError(f"base model {base!r} is saved quantized; merge into its 16-bit original instead")
    if dtype not in MERGE_DTYPES:
        raise ConfigError(
            f"'dtype' must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}.{closest(dtype, list(MERGE_DTYPES))}"
        )

    tokenizer = load_tokenizer(tokenizer_folder(adapter, base), trust_remote_code)
    reward = adapter_config.get("task_type") == "SEQ_CLS"
    extra = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id} if reward else {}
    model = load_pretrained(
        base,
        "seq_cls" if reward else "causal_lm",
        dtype=TORCH_DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        **extra,
    )
    merged = load_adapter(model, adapter, "seq_cls" if reward else "causal_lm").merge_and_unload()  # wrong base: 1 line
    return merged, tokenizer


def export_hf(options) -> Path:
    """export.py --format hf and merge_lora.py (ExportOptions / MergeOptions): merge `options.adapter` into its base."""
    if not options.adapter:
        raise ConfigError("--format hf merges an adapter: give 'adapter' (a merged folder is already exported)")
    return merge_adapter(
        options.adapter,
        options.output_dir,
        options.model_name_or_path,
        options.dtype,
        options.quantization,
        options.trust_remote_code,
    )
