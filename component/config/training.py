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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from component.config.choices import (
    DATA_FORMATS,
    DPO_LOSSES,
    FINETUNING_TYPES,
    LOGITS_PATHS,
    MOSS_TOOL_MODES,
    NONFINITE_MODES,
    PACKED_ATTENTIONS,
    QUANTIZATIONS,
    RL_ALGORITHMS,
    ROLLOUT_ENGINES,
    TEMPLATES,
    VLLM_DTYPES,
)
from component.config.generation import PRESETS, resolve_settings, unsupported_by_vllm
from component.config.parser import (
    ConfigError,
    HelpRequested,
    check_settings,
    choices,
    closest,
    fields_of,
    read_json_object,
    split_argv,
    usage,
)

if TYPE_CHECKING:  # torch and transformers load only when arguments are built, so --help answers at once
    from transformers import TrainingArguments


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
    data_format: str = field(
        default="auto",
        metadata=choices(*DATA_FORMATS, help="Format of every file unless a file names its own (docs/data.md)."),
    )
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
    packed_attention: str | None = field(
        default=None,
        metadata=choices(
            *PACKED_ATTENTIONS,
            help="How a packed row attends: segments (SDPA per sequence, one flat row per batch) or mask (a "
            "block-diagonal row x row mask, rows of packing_row_tokens); null = the fastest exact path the model "
            "has (flash-attention's varlen kernel, else segments, else mask). docs/throughput.md.",
        ),
    )
    packing_row_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one packed row under packed_attention mask; null = the batch's longest "
            "example (segments and varlen kernels get one flat row per batch)."
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
    on_nonfinite: str = field(
        default="stop",
        metadata=choices(
            *NONFINITE_MODES,
            help="A NaN/inf loss or gradient: stop (name the step and the last good checkpoint) or skip that "
            "optimizer step (counted and logged as nonfinite_skipped). docs/reliability.md.",
        ),
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A trained LoRA adapter (e.g. an SFT output_dir) to continue training instead of a new one."},
    )
    dry_run: bool = field(default=False, metadata={"help": "Read data and tokenizer only, write the data report."})
    logits_path: str = field(
        default="chunked",
        metadata=choices(
            *LOGITS_PATHS, help='LM head + loss: "chunked" (logits at label positions, in chunks) or "model" (its own).'
        ),
    )
    logits_chunk_size: int = field(
        default=1024, metadata={"help": "At most this many label positions per LM-head chunk (logits_path: chunked)."}
    )
    logits_chunk_mib: float | None = field(
        default=256,
        metadata={
            "help": "At most this many MiB of fp32 logits per LM-head chunk (rows x vocabulary x 4 bytes), so the "
            "head's memory does not grow with the vocabulary; null: logits_chunk_size rows whatever the vocabulary."
        },
    )

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


@dataclass
class DPOArguments(FinetuneArguments):
    """Preference-optimization keys on top of the shared ones (docs/dpo.md)."""

    loss_type: str = field(default="sigmoid", metadata=choices(*DPO_LOSSES))
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the KL regularisation (ORPO: weight of the odds term)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed fraction of flipped labels (cDPO with sigmoid; robust); in [0, 0.5)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of an SFT (NLL) term on the chosen reply (RPO)."})
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={
            "help": "Reference log-probs in one pass before training, cached with the data; null = when the reference "
            "is not simply the base with the adapter off (full fine-tuning, or a continued adapter)."
        },
    )


@dataclass
class RLArguments(FinetuneArguments):
    """Online RL keys on top of the shared ones (docs/rlhf.md). train_file: prompts (any SFT or preference file)."""

    algorithm: str = field(default="grpo", metadata=choices(*RL_ALGORITHMS))
    reward_model: str | None = field(default=None, metadata={"help": "A train_rm.py output folder (adapter or full)."})
    reward_base_model: str | None = field(
        default=None, metadata={"help": "Base of a reward-model adapter; default: its train_args.json."}
    )
    reward_quantization: str | None = field(
        default=None, metadata=choices(*QUANTIZATIONS, help="Load the reward model in 4bit or 8bit.")
    )
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score."})
    exact_match_weight: float = field(
        default=0.0, metadata={"help": "Weight of a rule reward: 1 when the completion equals the record's reply."}
    )
    reward_function: str | None = field(
        default=None,
        metadata={"help": "A user reward 'module:function'(prompts, completions, references) -> list of floats."},
    )
    reward_function_weight: float = field(default=1.0, metadata={"help": "Weight of reward_function."})
    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt (the group)."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes over each batch of completions."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the reference (0: no KL term)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO-clip epsilon of the probability ratio."})
    scale_rewards: bool = field(default=True, metadata={"help": "GRPO: divide by the group's std."})
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount over completion tokens."})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda."})
    value_clip_range: float = field(default=0.2, metadata={"help": "PPO: clip of the value change per pass."})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO: whiten the per-token rewards before GAE."})
    generation_preset: str = field(
        default="top_k", metadata=choices(*PRESETS, help="generate.py preset to sample with.")
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature; default: the preset's."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "No loss on completions cut by max_new_tokens (they never ended)."}
    )
    truncated_completion_penalty: float = field(
        default=0.0, metadata={"help": "Subtracted from the reward of completions cut by max_new_tokens."}
    )
    sample_log_steps: int = field(default=10, metadata={"help": "Every N steps a few rows go to samples.jsonl."})
    rollout_engine: str = field(
        default="transformers",
        metadata=choices(
            *ROLLOUT_ENGINES, help="Who samples: the policy's generate, or a vLLM server with the adapter loaded."
        ),
    )
    vllm_url: str | None = field(
        default=None, metadata={"help": "vllm: a running vLLM server (http://127.0.0.1:PORT) serving this base model."}
    )
    vllm_launch: bool = field(
        default=False,
        metadata={"help": "vllm: start the server from vllm_venv on a free loopback port, stop it after."},
    )
    vllm_venv: str | None = field(
        default=None,
        metadata={"help": "vllm_launch: vLLM's environment (make vllm-env); default: the repo's .venv-vllm."},
    )
    vllm_dtype: str = field(
        default="auto",
        metadata=choices(*VLLM_DTYPES, help="vllm_launch: the served base's dtype (auto: vLLM's choice)."),
    )
    vllm_gpu_memory_utilization: float | None = field(
        default=None,
        metadata={"help": "vllm_launch: vLLM's share of its GPU; default 0.3 beside the trainer, 0.9 on vllm_devices."},
    )
    vllm_devices: str | None = field(
        default=None,
        metadata={"help": 'vllm_launch: CUDA_VISIBLE_DEVICES of the server (e.g. "6,7"); default: the trainer\'s.'},
    )
    vllm_args: list[str] | None = field(
        default=None, metadata={"help": 'vllm_launch: more server arguments, e.g. ["--tensor-parallel-size", "2"].'}
    )
    vllm_timeout: float = field(
        default=600.0, metadata={"help": "vllm: seconds to wait for each answer of the server."}
    )
    vllm_start_timeout: float = field(
        default=900.0, metadata={"help": "vllm_launch: seconds to wait for the server to start."}
    )


TRAIN_ARGS_FLAG = "train_args_file"


def recipe_fields(ours: type[FinetuneArguments] = FinetuneArguments) -> dict[str, dataclasses.Field]:
    """Every key a recipe accepts: ours first, then transformers.TrainingArguments'."""
    from transformers import TrainingArguments

    return fields_of(ours, TrainingArguments)


def _training_argument_names() -> set[str]:
    """TrainingArguments' field names read from its source (importing it costs seconds of torch); {} if unsure."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
        source = Path(spec.submodule_search_locations[0]) / "training_args.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (AttributeError, ImportError, OSError, SyntaxError, TypeError, IndexError):
        return set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return {
                n.target.id
                for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")
            }
    return set()


def check_usage_early(argv: list[str], prog: str, doc: str, ours: type[FinetuneArguments] = FinetuneArguments) -> None:
    """`--help`, a missing or unreadable train-args file, unknown keys and our keys' types and choices, answered
    before torch loads (seconds earlier). Called by the recipes' `__main__` ahead of their heavy imports; prints
    and exits like `run_cli`. The full checks still run in `load_arguments`.
    """
    try:
        train_args_file, overrides = split_argv([a for a in argv if a != "--debug"], TRAIN_ARGS_FLAG)
        if train_args_file is None:
            raise ConfigError(f"missing --{TRAIN_ARGS_FLAG} (a JSON file under config/); see {prog} --help")
        raw = read_json_object(train_args_file, TRAIN_ARGS_FLAG)
        theirs = _training_argument_names()
        if theirs:  # unknown keys and our keys' types/choices, still without torch
            ours_only = fields_of(ours)
            known = {**ours_only, **{name: None for name in theirs if name not in ours_only}}
            check_settings(
                {k: v for k, v in known.items() if v is not None},
                {k: v for k, v in raw.items() if k in ours_only},
                {k: v for k, v in overrides.items() if k in ours_only},
                train_args_file,
                prog,
            )
            check_settings(known, {k: v for k, v in raw.items() if k not in known}, {}, train_args_file, prog)
            unknown_cli = {k: v for k, v in overrides.items() if k not in known}
            check_settings(known, {}, unknown_cli, train_args_file, prog)
    except HelpRequested:
        more = (
            "Every transformers.TrainingArguments key is accepted too (output_dir, learning_rate, max_steps, "
            "save_steps, ...): see docs/config.md; docs/reliability.md for resume, signals and exit codes."
        )
        print(usage(prog, doc, TRAIN_ARGS_FLAG, fields_of(ours), more))
        sys.exit(0)
    except ConfigError as error:
        print(f"{error.label}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


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
    return _build(values, ours, source, set(overrides or {}))


def _build(
    values: dict[str, Any], ours: type[FinetuneArguments], source: str, cli_keys: set[str] = frozenset()
) -> tuple[FinetuneArguments, TrainingArguments]:
    from transformers import TrainingArguments

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
    where = Where(source, cli_keys)
    check_ranges(args, training_args, where)  # before .device: a bad value must not start a process group
    training_args.device  # noqa: B018  (sets up torchrun's process group, so process_index is right from here on)
    if training_args.deepspeed:
        join_deepspeed_comm()
    validate(args, training_args, where)
    return args, training_args


def _apply_training_defaults(values: dict[str, Any]) -> None:
    """Our defaults where TrainingArguments' own do not suit fine-tuning; a config can still set each."""
    import torch

    values.setdefault("report_to", ["tensorboard"])
    from transformers import TrainingArguments

    # transformers 5 renamed the key; setting the old name ourselves would warn on every run
    renamed = "activation_checkpointing_kwargs" in {f.name for f in dataclasses.fields(TrainingArguments)}
    if not values.keys() & {"activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"}:
        values["activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs"] = {
            "use_reentrant": False
        }
    # A NaN loss must show as nan, not as the running average (0.0 on the first steps); train.guards acts on it.
    values.setdefault("logging_nan_inf_filter", False)
    values.setdefault("ddp_find_unused_parameters", False)
    values.setdefault("remove_unused_columns", False)
    # Without a GPU, accelerate only sets up torchrun's processes (gloo) when told it runs on the CPU.
    values.setdefault("use_cpu", not (torch.cuda.is_available() or torch.backends.mps.is_available()))


class Where:
    """Names a key where it was set: `--key` when it came from the command line, else `file: 'key'`."""

    def __init__(self, source: str, cli_keys: set[str] | frozenset = frozenset()) -> None:
        self.source = source
        self.cli_keys = cli_keys

    def __call__(self, key: str) -> str:
        return f"--{key}" if key in self.cli_keys else f"{self.source}: '{key}'"


# key -> (lowest allowed, whether the lowest is allowed, highest or None, whether None is allowed): every numeric
# key whose bad values would otherwise train nothing or fail later inside a library.
_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "lora_rank": (1, True, None, False),
    "lora_alpha": (0, False, None, False),
    "lora_dropout": (0, True, 1, False),
    "test_size": (0, True, 1, False),
    "max_seq_length": (8, True, None, False),
    "max_samples": (1, True, None, True),
    "num_proc": (1, True, None, True),
    "packing_row_tokens": (8, True, None, True),
    "margin": (-math.inf, True, None, False),
    "learning_rate": (0, True, None, False),
    "weight_decay": (0, True, None, False),
    "max_grad_norm": (0, True, None, False),
    "warmup_steps": (0, True, None, False),
    "per_device_train_batch_size": (1, True, None, False),
    "per_device_eval_batch_size": (1, True, None, False),
    "gradient_accumulation_steps": (1, True, None, False),
    "logging_steps": (0, False, None, False),
    "save_steps": (0, False, None, False),
    "eval_steps": (0, False, None, True),
    "save_total_limit": (1, True, None, True),
    "adam_epsilon": (0, False, None, False),
    "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False),
}


def _in_range(value: float, low: float, low_ok: bool, high: float | None) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = value >= low if low_ok else value > low
    return above and (high is None or value < high)


def check_ranges(args: FinetuneArguments, training_args: TrainingArguments, where: Where) -> None:
    """Every numeric key in its range, before anything heavy loads: a config that trains nothing is an error."""
    for key, (low, low_ok, high, none_ok) in _RANGES.items():
        holder = args if hasattr(args, key) else training_args
        if not hasattr(holder, key):
            continue
        value = getattr(holder, key)
        if value is None and none_ok:
            continue
        if value is None or not _in_range(value, low, low_ok, high):
            low_text = "" if low == -math.inf else f"{'>=' if low_ok else '>'} {low:g}"
            high_text = f"< {high:g}" if high is not None else ""
            bound = " and ".join(t for t in (low_text, high_text) if t) or "finite"
            raise ConfigError(f"{where(key)} must be {bound}, got {value!r}")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ConfigError(
            f"{where('max_steps')} must be > 0 (or -1: use num_train_epochs), got {training_args.max_steps}"
        )
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise ConfigError(
            f"{where('num_train_epochs')} must be > 0 (or set max_steps), got {training_args.num_train_epochs}"
        )
    warmup = getattr(training_args, "warmup_ratio", None)
    if warmup is not None and not 0 <= warmup <= 1:
        raise ConfigError(f"{where('warmup_ratio')} must be in [0, 1], got {warmup}")


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
    import torch

    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def validate(args: FinetuneArguments, training_args: TrainingArguments, source: str | Where) -> None:
    """Impossible combinations and missing paths, found before any weights load."""
    where = source if isinstance(source, Where) else Where(source)
    source = where.source
    if args.finetuning_type == "full" and args.quantization is not None:
        raise ConfigError(
            f"{where('quantization')}: {json.dumps(args.quantization)} cannot be combined with "
            '\'finetuning_type\': "full" (quantized weights cannot be trained); use "lora"/"qlora" or set '
            "'quantization' to null"
        )
    if args.finetuning_type == "qlora" and args.quantization != "4bit":
        raise ConfigError(f'{where("finetuning_type")}: "qlora" needs \'quantization\': "4bit"')
    if args.test_size > 0 and args.eval_file:
        raise ConfigError(f"{source}: set either 'test_size' or 'eval_file', not both")
    if args.lora_target_modules is not None and not args.lora_target_modules:
        raise ConfigError(f"{where('lora_target_modules')} is an empty list; use null for every linear layer")
    check_logits_path(args, training_args, source)
    model_dir = Path(args.model_name_or_path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{where('model_name_or_path')} {args.model_name_or_path!r} is not a local model folder "
            "(no config.json there); download the model to disk first"
        )
    for spec in args.train_files + args.eval_files:
        if os.path.isdir(spec["path"]):
            raise ConfigError(f"{where(spec['key'])} {spec['path']!r} is a folder; name the data file(s) in it")
        if not os.path.isfile(spec["path"]):
            raise ConfigError(f"{where(spec['key'])} file {spec['path']!r} does not exist")
        if spec["format"] is not None and spec["format"] not in DATA_FORMATS:
            hint = closest(str(spec["format"]), list(DATA_FORMATS))
            raise ConfigError(
                f"{where(spec['key'])} format {spec['format']!r} is unknown; valid: {', '.join(DATA_FORMATS)}.{hint}"
            )
    if args.adapter_name_or_path is not None:
        if args.finetuning_type == "full":
            raise ConfigError(
                f"{source}: 'adapter_name_or_path' continues a LoRA adapter; it needs 'finetuning_type' lora/qlora"
            )
        if not (Path(args.adapter_name_or_path) / "adapter_config.json").is_file():
            raise ConfigError(
                f"{source}: 'adapter_name_or_path' {args.adapter_name_or_path!r} has no adapter_config.json "
                "(is it a LoRA output_dir?)"
            )
    if isinstance(args, DPOArguments):
        if args.beta <= 0:
            raise ConfigError(f"{source}: 'beta' must be > 0, got {args.beta}")
        if not 0.0 <= args.label_smoothing < 0.5:
            raise ConfigError(f"{source}: 'label_smoothing' must be in [0, 0.5), got {args.label_smoothing}")
        if args.sft_weight < 0:
            raise ConfigError(f"{source}: 'sft_weight' must be >= 0, got {args.sft_weight}")
    if isinstance(args, RLArguments):
        validate_rl(args, source)
    if args.packing and (args.group_by_length or training_args.train_sampling_strategy == "group_by_length"):
        raise ConfigError(f"{source}: 'packing' and 'group_by_length' exclude each other; pick one")
    if training_args.resume_from_checkpoint not in (None, "true") and not os.path.isdir(
        training_args.resume_from_checkpoint
    ):
        raise ConfigError(
            f"{where('resume_from_checkpoint')} {training_args.resume_from_checkpoint!r} is not a folder "
            "(use true for the latest checkpoint in output_dir)"
        )


def check_logits_path(args: FinetuneArguments, training_args: TrainingArguments, source: str) -> None:
    """The chunked LM head computes the plain causal-LM loss; what replaces that loss needs the model's path."""
    if args.logits_chunk_size < 1:
        raise ConfigError(f"{source}: 'logits_chunk_size' must be positive, got {args.logits_chunk_size}")
    if args.logits_chunk_mib is not None and not args.logits_chunk_mib > 0:
        raise ConfigError(f"{source}: 'logits_chunk_mib' must be positive or null, got {args.logits_chunk_mib}")
    if args.logits_path != "chunked":
        return
    for key, value in (
        ("use_liger_kernel", training_args.use_liger_kernel),
        ("label_smoothing_factor", training_args.label_smoothing_factor),
    ):
        if value:
            raise ConfigError(
                f"{source}: '{key}' replaces the model's loss, which 'logits_path': \"chunked\" never calls; "
                f"set 'logits_path' to \"model\" (choices: {', '.join(LOGITS_PATHS)}) or drop '{key}'"
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


def validate_rl(args: RLArguments, source: str) -> None:
    if args.finetuning_type == "full":
        raise ConfigError(f"{source}: train_rlhf.py trains LoRA/QLoRA adapters; set 'finetuning_type' to lora or qlora")
    if not (args.reward_model or args.exact_match_weight or args.reward_function):
        raise ConfigError(f"{source}: no reward: set 'reward_model', 'exact_match_weight' or 'reward_function'")
    if args.reward_model and not Path(args.reward_model).is_dir():
        raise ConfigError(f"{source}: 'reward_model' {args.reward_model!r} is not a folder (a train_rm.py output_dir)")
    if args.reward_function and ":" not in args.reward_function:
        raise ConfigError(f"{source}: 'reward_function' must be 'module:function', got {args.reward_function!r}")
    minimum = 2 if args.algorithm == "rloo" else 1
    if args.num_generations < minimum:
        raise ConfigError(f"{source}: 'num_generations' must be >= {minimum} for {args.algorithm}")
    for key in ("num_iterations", "max_new_tokens", "sample_log_steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be >= 1, got {getattr(args, key)}")
    if args.truncated_completion_penalty < 0:
        raise ConfigError(f"{source}: 'truncated_completion_penalty' must be >= 0 (it is subtracted)")
    if args.beta < 0 or not 0 < args.clip_range < 1:
        raise ConfigError(f"{source}: 'beta' must be >= 0 and 'clip_range' in (0, 1)")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1 and args.value_clip_range > 0 and args.vf_coef >= 0):
        raise ConfigError(
            f"{source}: PPO keys out of range: 'gamma' and 'lam' in [0, 1], 'value_clip_range' > 0, 'vf_coef' >= 0"
        )
    if args.max_new_tokens >= args.max_seq_length:
        raise ConfigError(
            f"{source}: 'max_new_tokens' ({args.max_new_tokens}) leaves no room for a prompt in 'max_seq_length' "
            f"({args.max_seq_length})"
        )
    validate_rollout_engine(args, source)


def validate_rollout_engine(args: RLArguments, source: str) -> None:
    """The vLLM keys: a server to use or to start, sampling vLLM does as transformers does, sane limits."""
    vllm_keys = [key for key in ("vllm_url", "vllm_launch", "vllm_args", "vllm_devices") if getattr(args, key)]
    if args.rollout_engine != "vllm":
        if vllm_keys:
            raise ConfigError(f"{source}: '{vllm_keys[0]}' needs 'rollout_engine': \"vllm\"")
        return
    if bool(args.vllm_url) == bool(args.vllm_launch):
        raise ConfigError(
            f"{source}: 'rollout_engine' vllm needs either 'vllm_url' (a running server) or 'vllm_launch': true"
        )
    if args.vllm_url and not args.vllm_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{source}: 'vllm_url' must start with http:// (e.g. http://127.0.0.1:8000), got {args.vllm_url!r}"
        )
    if not args.vllm_launch:
        unused = [key for key in ("vllm_args", "vllm_devices", "vllm_gpu_memory_utilization") if getattr(args, key)]
        if unused:
            raise ConfigError(f"{source}: '{unused[0]}' only applies with 'vllm_launch': true")
    if args.vllm_timeout <= 0 or args.vllm_start_timeout <= 0:
        raise ConfigError(f"{source}: 'vllm_timeout' and 'vllm_start_timeout' must be > 0 seconds")
    utilization = args.vllm_gpu_memory_utilization
    if utilization is not None and not 0 < utilization <= 1:
        raise ConfigError(f"{source}: 'vllm_gpu_memory_utilization' must be in (0, 1], got {utilization}")
    overrides = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    problems = unsupported_by_vllm(resolve_settings(args.generation_preset, overrides))
    if problems:
        raise ConfigError(
            f"{source}: 'rollout_engine' vllm cannot sample with {', '.join(problems)} ('generation_preset' "
            f"{args.generation_preset!r}); choose greedy, top_k, top_p or default"
        )
