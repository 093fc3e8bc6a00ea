"""Train-args of the training recipes: one JSON file (`--train_args_file`) plus `--key value` overrides.

Our own keys live in `FinetuneArguments` (SFT) and `RewardArguments` (reward model); every
`transformers.TrainingArguments` key is accepted next to them. Parsing is `config.parser`'s; unknown keys,
wrong types and impossible combinations fail with a message naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from component.config.choices import FINETUNING_TYPES, MOSS_TOOL_MODES, QUANTIZATIONS, TEMPLATES
from component.config.parser import (
    ConfigError,
    check_settings,
    choices,
    closest,
    fields_of,
    read_json_object,
    split_argv,
)


@dataclass
class FinetuneArguments:
    """Keys shared by every training recipe. Names follow the original project where it had them."""

    model_name_or_path: str = field(metadata={"help": "Local folder of a Hugging Face causal LM."})
    train_file: Any = field(
        metadata={"help": "A path, a list of paths, or a list of {path, format, max_samples, safety_scenarios}."}
    )
    eval_file: Any = field(default=None, metadata={"help": "Held-out file(s), same forms as train_file."})
    test_size: float = field(default=0.0, metadata={"help": "Held-out fraction of train_file when no eval_file."})
    max_samples: int | None = field(default=None, metadata={"help": "Cap on training examples after mixing."})
    data_format: str = field(default="auto", metadata={"help": "Format of every file unless a file names its own."})
    max_seq_length: int = field(default=1024, metadata={"help": "Longest tokenized example."})
    template: str = field(default="human_assistant", metadata=choices(*TEMPLATES))
    train_on_prompt: bool = field(default=False, metadata={"help": "Put loss on prompt tokens too."})
    keep_system_prompt: bool = field(default=False, metadata={"help": "Keep MOSS meta_instruction as system."})
    safety_scenarios: list[str] | None = field(default=None, metadata={"help": "Safety-Prompts scenarios to read."})
    moss_tools: str = field(default="skip", metadata=choices(*MOSS_TOOL_MODES))
    skip_bad_records: bool = field(default=False, metadata={"help": "Count malformed lines instead of failing."})
    num_proc: int | None = field(default=None, metadata={"help": "Tokenization worker processes."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Tokenized-dataset cache folder."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even when a cache exists."})
    packing: bool | None = field(
        default=None,
        metadata={"help": "Padding-free packed batches; null = pack unless group_by_length (docs/throughput.md)."},
    )
    packing_row_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one packed row where attention has no varlen kernel; null = the batch's "
            "longest example (a varlen kernel gets one flat row per batch)."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Padded batches of similar lengths (Trainer's length-grouped sampler) instead of packing."},
    )
    finetuning_type: str = field(default="lora", metadata=choices(*FINETUNING_TYPES))
    quantization: str | None = field(default=None, metadata=choices(*QUANTIZATIONS))
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata=choices(
            "bfloat16",
            "float16",
            "float32",
            None,
            help="dtype the packed 4-bit weights are stored in; QLoRA under FSDP / ZeRO-3 needs the compute dtype "
            "(bfloat16) so they shard with the rest (docs/scale_out.md); null = uint8.",
        ),
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names for LoRA; null = every linear layer but the output head."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run Python files shipped with the model."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel: null (transformers' default, SDPA), sdpa, eager, or flash_attention_2 "
            "(needs the flash-attn package; makes `packing: null` pack)."
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "Read data and tokenizer only, write the data report."})

    def __post_init__(self) -> None:
        if self.finetuning_type == "qlora" and self.quantization is None:
            self.quantization = "4bit"

    @property
    def train_files(self) -> list[dict[str, Any]]:
        """train_file as a list of {path, format, max_samples, safety_scenarios, key}."""
        return data_file_specs(self.train_file, "train_file")

    @property
    def eval_files(self) -> list[dict[str, Any]]:
        return data_file_specs(self.eval_file, "eval_file")


@dataclass
class RewardArguments(FinetuneArguments):
    """Reward-model keys on top of the shared ones."""

    margin: float = field(default=0.0, metadata={"help": "Subtracted from r_chosen - r_rejected in the loss."})


TRAIN_ARGS_FLAG = "train_args_file"


def recipe_fields(ours: type[FinetuneArguments] = FinetuneArguments) -> dict[str, dataclasses.Field]:
    """Every key a recipe accepts: ours first, then transformers.TrainingArguments'."""
    return fields_of(ours, TrainingArguments)


def load_arguments(
    argv: list[str], ours: type[FinetuneArguments] = FinetuneArguments, prog: str = "train_sft.py"
) -> tuple[FinetuneArguments, TrainingArguments]:
    """Read the JSON train-args file, apply CLI overrides, validate, and build both argument objects."""
    train_args_file, overrides = split_argv(argv, TRAIN_ARGS_FLAG)
    if train_args_file is None:
        raise ConfigError(f"missing --{TRAIN_ARGS_FLAG} (a JSON file under config/); see {prog} --help")
    raw = read_json_object(train_args_file, TRAIN_ARGS_FLAG)
    return build_arguments(raw, overrides, ours, source=train_args_file, prog=prog)


def build_arguments(
    raw: dict[str, Any],
    overrides: dict[str, str] | None = None,
    ours: type[FinetuneArguments] = FinetuneArguments,
    source: str = "train_args",
    prog: str = "",
) -> tuple[FinetuneArguments, TrainingArguments]:
    """The same as load_arguments for a dict already read (tests, other front ends)."""
    if isinstance(raw.get("resume_from_checkpoint"), bool):  # true = the latest checkpoint, resolved later
        raw = {**raw, "resume_from_checkpoint": "true" if raw["resume_from_checkpoint"] else None}
    if isinstance(raw.get("fsdp"), bool):  # TrainingArguments types it str for the legacy form; true is the new one
        raw = {**raw, "fsdp": "true" if raw["fsdp"] else None}
    values = check_settings(recipe_fields(ours), raw, overrides or {}, source, prog)
    return _build(values, ours, source)


def _build(
    values: dict[str, Any], ours: type[FinetuneArguments], source: str
) -> tuple[FinetuneArguments, TrainingArguments]:
    our_fields = fields_of(ours)
    if values.get("resume_from_checkpoint") == "false":
        values["resume_from_checkpoint"] = None
    for name, spec in our_fields.items():
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING and name not in values:
            raise ConfigError(f"{source}: required key '{name}' is missing")
    if "output_dir" not in values:
        raise ConfigError(f"{source}: required key 'output_dir' is missing")

    ours_values = {k: v for k, v in values.items() if k in our_fields}
    hf_values = {k: v for k, v in values.items() if k not in our_fields}
    args = ours(**ours_values)
    _apply_training_defaults(hf_values)
    check_scale_out(args, hf_values, source)
    try:
        training_args = TrainingArguments(**hf_values)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None
    training_args.device  # noqa: B018  (sets up torchrun's process group, so process_index is right from here on)
    if training_args.deepspeed:
        join_deepspeed_comm()
    validate(args, training_args, source)
    return args, training_args


def _apply_training_defaults(values: dict[str, Any]) -> None:
    """Our defaults where TrainingArguments' own do not suit fine-tuning; a config can still set each."""
    values.setdefault("report_to", ["tensorboard"])
    values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    values.setdefault("ddp_find_unused_parameters", False)
    values.setdefault("remove_unused_columns", False)
    # Without a GPU, accelerate only sets up torchrun's processes (gloo) when told it runs on the CPU.
    values.setdefault("use_cpu", not (torch.cuda.is_available() or torch.backends.mps.is_available()))


def check_scale_out(args: FinetuneArguments, hf_values: dict[str, Any], source: str) -> None:
    """The `deepspeed` / `fsdp` keys: the package is there, and the weights can be sharded (docs/scale_out.md)."""
    if hf_values.get("fsdp") in ("true", "True"):
        hf_values["fsdp"] = True
    elif hf_values.get("fsdp") in ("false", "False", ""):
        hf_values["fsdp"] = None
    engine = "fsdp" if hf_values.get("fsdp") else None  # the engines that shard the weights themselves
    if engine and hf_values.get("use_cpu"):
        logging.getLogger(__name__).warning(
            "%s: accelerate keeps 'fsdp' only on GPUs (and other accelerators); on the CPU the run is DDP "
            "(docs/scale_out.md, 'On the CPU')",
            source,
        )
    if hf_values.get("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"{source}: 'deepspeed' is set but the deepspeed package is not installed "
                "(DS_BUILD_OPS=0 pip install deepspeed; see docs/scale_out.md)"
            )
        engine = "deepspeed" if zero_stage(hf_values["deepspeed"], source) == 3 else None
    if args.bnb_4bit_quant_storage is not None and args.quantization != "4bit":
        raise ConfigError(f"{source}: 'bnb_4bit_quant_storage' only applies to 'quantization': \"4bit\"")
    if engine and args.quantization == "4bit" and args.bnb_4bit_quant_storage is None:
        raise ConfigError(
            f"{source}: 4-bit QLoRA under '{engine}' needs 'bnb_4bit_quant_storage': \"bfloat16\" (the compute "
            "dtype), so the packed weights can be sharded like the other parameters; see docs/scale_out.md"
        )
    if engine and args.quantization == "8bit":
        raise ConfigError(
            f"{source}: 'quantization': \"8bit\" cannot be combined with '{engine}' (8-bit weights cannot be "
            'sharded); use "finetuning_type": "qlora" (4-bit) or LoRA in 16-bit, see docs/scale_out.md'
        )


def zero_stage(deepspeed: dict | str, source: str = "train_args") -> int | None:
    """The ZeRO stage of a `deepspeed` value (a config dict or a JSON file path)."""
    if isinstance(deepspeed, str):
        if not os.path.isfile(deepspeed):
            raise ConfigError(f"{source}: 'deepspeed' file {deepspeed!r} does not exist (see config/deepspeed/)")
        deepspeed = read_json_object(deepspeed, "deepspeed")
    return deepspeed.get("zero_optimization", {}).get("stage")


def join_deepspeed_comm() -> None:
    """Attach deepspeed.comm to the process group accelerate created (on the CPU a plain gloo one).

    ZeRO-3 builds the model inside `deepspeed.zero.Init` (from_pretrained), which reads the world size from
    deepspeed.comm: without this it sees 1 and rejects the batch sizes. On GPUs accelerate already did it.
    """
    import deepspeed.comm

    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def validate(args: FinetuneArguments, training_args: TrainingArguments, source: str) -> None:
    """Impossible combinations and missing paths, found before any weights load."""
    if args.finetuning_type == "full" and args.quantization is not None:
        raise ConfigError(
            f"{source}: 'quantization': {json.dumps(args.quantization)} cannot be combined with "
            '\'finetuning_type\': "full" (quantized weights cannot be trained); use "lora"/"qlora" or set '
            "'quantization' to null"
        )
    if args.finetuning_type == "qlora" and args.quantization != "4bit":
        raise ConfigError(f"{source}: 'finetuning_type': \"qlora\" needs 'quantization': \"4bit\"")
    if not 0.0 <= args.test_size < 1.0:
        raise ConfigError(f"{source}: 'test_size' must be in [0, 1), got {args.test_size}")
    if args.test_size > 0 and args.eval_file:
        raise ConfigError(f"{source}: set either 'test_size' or 'eval_file', not both")
    if args.max_seq_length < 8:
        raise ConfigError(f"{source}: 'max_seq_length' must be at least 8, got {args.max_seq_length}")
    if args.lora_rank < 1:
        raise ConfigError(f"{source}: 'lora_rank' must be positive, got {args.lora_rank}")
    model_dir = Path(args.model_name_or_path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{source}: 'model_name_or_path' {args.model_name_or_path!r} is not a local model folder "
            "(no config.json there); download the model to disk first"
        )
    for spec in args.train_files + args.eval_files:
        if not os.path.isfile(spec["path"]):
            raise ConfigError(f"{source}: '{spec['key']}' file {spec['path']!r} does not exist")
    if args.packing and (args.group_by_length or training_args.train_sampling_strategy == "group_by_length"):
        raise ConfigError(f"{source}: 'packing' and 'group_by_length' exclude each other; pick one")
    if training_args.resume_from_checkpoint not in (None, "true") and not os.path.isdir(
        training_args.resume_from_checkpoint
    ):
        raise ConfigError(
            f"{source}: 'resume_from_checkpoint' {training_args.resume_from_checkpoint!r} is not a folder "
            "(use true for the latest checkpoint in output_dir)"
        )


FILE_SPEC_KEYS = ("path", "format", "max_samples", "safety_scenarios")


def data_file_specs(value: Any, key: str) -> list[dict[str, Any]]:
    """Normalise train_file / eval_file into a list of {path, format, max_samples, safety_scenarios, key}."""
    if value is None or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    specs = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise ConfigError(f"'{key}' entries must be paths or objects with a 'path', got {item!r}")
        for name in item:
            if name not in FILE_SPEC_KEYS:
                raise ConfigError(
                    f"'{key}' entry key '{name}' is unknown; valid: {', '.join(FILE_SPEC_KEYS)}."
                    f"{closest(name, list(FILE_SPEC_KEYS))}"
                )
        specs.append({"format": None, "max_samples": None, "safety_scenarios": None, **item, "key": key})
    return specs


def save_resolved(args: FinetuneArguments, training_args: TrainingArguments, output_dir: str) -> Path:
    """Write every key as the run saw it, so a run can be repeated from its output folder."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = Path(output_dir) / "train_args.json"
    resolved = {**dataclasses.asdict(args), **training_args.to_dict()}
    path.write_text(json.dumps(resolved, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path
