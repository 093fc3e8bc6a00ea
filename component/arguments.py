"""Train-args files: one JSON file plus `--key value` overrides, checked before anything heavy loads.

Our own keys live in `FinetuneArguments` (SFT) and `RewardArguments` (reward model); every
`transformers.TrainingArguments` key is accepted next to them. Unknown keys, wrong types and impossible
combinations fail with a message naming the key and the valid choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments


class ConfigError(ValueError):
    """A train-args file or override that cannot work; the message names the key."""


TEMPLATES = ("human_assistant", "chat_template", "baichuan_chat")
FINETUNING_TYPES = ("lora", "qlora", "full")
QUANTIZATIONS = ("4bit", "8bit", None)
MOSS_TOOL_MODES = ("skip", "strip")


def choices(*values: Any) -> dict:
    return {"choices": values}


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


@dataclass
class RewardArguments(FinetuneArguments):
    """Reward-model keys on top of the shared ones."""

    margin: float = field(default=0.0, metadata={"help": "Subtracted from r_chosen - r_rejected in the loss."})


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_value(where: str, value: Any, annotation: Any, from_cli: bool) -> Any:
    """Check a JSON value (or convert a command-line string) against a dataclass field annotation.

    `where` names the setting in the error message, e.g. "train_args key 'lora_rank'" or "--top_p".
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if (value is None or (from_cli and value in ("null", "None"))) and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(where, value, option, from_cli)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where} must not be null")
    if annotation is Any:
        return json.loads(value) if from_cli and value[:1] in "[{" else value
    if origin in (list, tuple):
        if from_cli and isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        return [check_value(where, item, item_type, from_cli) for item in value]
    if origin is dict or annotation is dict:
        if from_cli and isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a JSON object, got {value!r}")
        return value
    if annotation is bool:
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if from_cli and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if from_cli and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return value  # an int stays an int: warmup_steps reads 20 as steps and 0.03 as a ratio
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, str):  # str-valued enums of TrainingArguments
        return annotation(value).value if hasattr(annotation, "_value2member_map_") else value
    return value  # other TrainingArguments types: TrainingArguments validates them itself


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    result = {}
    for f in dataclasses.fields(cls):
        if f.init:
            f.type = hints.get(f.name, f.type)
            result[f.name] = f
    return result


def parse_cli_overrides(argv: list[str]) -> tuple[str, dict[str, str]]:
    """`--train_args_file F [--key value ...]` -> (F, {key: raw string})."""
    train_args_file = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected --key value, got {token!r}")
        key, _, inline = token[2:].partition("=")
        if inline:
            value = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        if key == "train_args_file":
            train_args_file = value
        else:
            overrides[key] = value
    if train_args_file is None:
        raise ConfigError("missing --train_args_file (a JSON file under config/)")
    return train_args_file, overrides


def load_arguments(
    argv: list[str], ours: type[FinetuneArguments] = FinetuneArguments
) -> tuple[FinetuneArguments, TrainingArguments]:
    """Read the JSON train-args file, apply CLI overrides, validate, and build both argument objects."""
    train_args_file, overrides = parse_cli_overrides(argv)
    path = Path(train_args_file)
    if not path.is_file():
        raise ConfigError(f"train_args_file {train_args_file!r} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{train_args_file}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{train_args_file}: expected a JSON object of train args")
    return build_arguments(raw, overrides, ours, source=train_args_file)


def build_arguments(
    raw: dict[str, Any],
    overrides: dict[str, str] | None = None,
    ours: type[FinetuneArguments] = FinetuneArguments,
    source: str = "train_args",
) -> tuple[FinetuneArguments, TrainingArguments]:
    our_fields = _fields(ours)
    hf_fields = _fields(TrainingArguments)
    valid = sorted(set(our_fields) | set(hf_fields))
    values: dict[str, Any] = {}
    for key, value, from_cli in [(k, v, False) for k, v in raw.items()] + [
        (k, v, True) for k, v in (overrides or {}).items()
    ]:
        if key.startswith("_") or key == "comment":  # room for notes inside JSON files
            continue
        if key == "resume_from_checkpoint" and value in (True, False, "true", "false"):
            # true = the latest checkpoint in output_dir, resolved by the recipe
            value = "true" if value in (True, "true") else None
            from_cli = False
        spec = our_fields.get(key) or hf_fields.get(key)
        if spec is None:
            raise ConfigError(f"{source}: unknown key '{key}'.{_closest(key, valid)}")
        value = check_value(f"train_args key '{key}'", value, spec.type, from_cli)
        allowed = spec.metadata.get("choices") if spec.metadata else None
        if allowed is not None and value not in allowed:
            shown = ", ".join(json.dumps(c) for c in allowed)
            hint = _closest(str(value), [str(c) for c in allowed if c is not None])
            raise ConfigError(f"{source}: '{key}' must be one of {shown}, got {json.dumps(value)}.{hint}")
        values[key] = value
    for name, spec in our_fields.items():
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING and name not in values:
            raise ConfigError(f"{source}: required key '{name}' is missing")
    if "output_dir" not in values:
        raise ConfigError(f"{source}: required key 'output_dir' is missing")

    ours_values = {k: v for k, v in values.items() if k in our_fields}
    hf_values = {k: v for k, v in values.items() if k in hf_fields and k not in our_fields}
    args = ours(**ours_values)
    _apply_training_defaults(hf_values)
    try:
        training_args = TrainingArguments(**hf_values)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None
    training_args.device  # noqa: B018  (sets up torchrun's process group, so process_index is right from here on)
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
    for spec in data_file_specs(args.train_file, "train_file") + data_file_specs(args.eval_file, "eval_file"):
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
                    f"{_closest(name, list(FILE_SPEC_KEYS))}"
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
