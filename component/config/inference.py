"""Settings of the inference and export front ends (generate.py chat / compare / score / web, merge_lora.py).

Each front end takes `--config FILE.json` plus `--key value` overrides through `config.parser`, the same
parser and messages as the training recipes; every check here runs before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from component.config.choices import (
    EXPORT_FORMATS,
    GENERATION_BACKENDS,
    GGUF_TYPES,
    MERGE_DTYPES,
    ONNX_DTYPES,
    QUANTIZATIONS,
    TEMPLATES,
)
from component.config.generation import GENERATION_KEYS, PRESETS, SAMPLING_KEYS, GenerationSettings, resolve_settings
from component.config.parser import (
    ConfigError,
    check_settings,
    choices,
    fields_of,
    parse_settings,
    read_json_object,
)

CONFIG_FLAG = "config"
DEFAULT_QUESTIONS = "data/eval/questions.txt"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class WeightsOptions:
    """Which weights to load: one base, its adapters by name (generate.py, evaluate.py)."""

    model_name_or_path: str | None = field(default=None, metadata=_help("Base (or merged) model folder."))
    adapter: str | list[str] | None = field(
        default=None,
        metadata=_help(
            "LoRA adapter folder(s) (train_sft.py / train_dpo.py output_dir); several as NAME=PATH, e.g. "
            "--adapter sft=output/sft --adapter dpo=output/dpo"
        ),
    )
    quantization: str | None = field(
        default=None, metadata=choices(*QUANTIZATIONS, help="Load the base in 4bit or 8bit (bitsandbytes).")
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Run Python files shipped with the model."))

    def adapters(self) -> dict[str, str]:
        """Adapter name -> folder, in the order given; one unnamed adapter is "sft", several take folder names."""
        items = [self.adapter] if isinstance(self.adapter, str) else list(self.adapter or [])
        named: dict[str, str] = {}
        for item in items:
            name, equals, path = item.partition("=")
            if not equals:
                name, path = ("sft" if len(items) == 1 else Path(item).name), item
            if not name.isidentifier() or name == "base":
                raise ConfigError(f"'adapter' name {name!r} must be a word other than 'base' (NAME=PATH)")
            if name in named:
                raise ConfigError(f"'adapter' name {name!r} is given twice")
            named[name] = path
        return named

    def validate(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("missing 'model_name_or_path' (a local model folder), in --config or on the command line")
        require_folder("model_name_or_path", self.model_name_or_path, "a local model folder")
        for path in self.adapters().values():
            require_folder("adapter", path, "a LoRA output_dir")
            if not (Path(path) / "adapter_config.json").is_file():
                raise ConfigError(f"'adapter' {path!r} has no adapter_config.json (is it a LoRA output_dir?)")


@dataclass
class ModelOptions(WeightsOptions):
    """Which weights to load and how to prompt them."""

    template: str | None = field(
        default=None,
        metadata=choices(
            *TEMPLATES, None, help="Prompt template; default: the adapter's train_args.json, else human_assistant."
        ),
    )
    system: str | None = field(default=None, metadata=_help("System prompt for every conversation."))
    max_context: int | None = field(default=None, metadata=_help("Context length; default: the model config's."))

    def validate(self) -> None:
        super().validate()
        if self.max_context is not None and self.max_context < 2:
            raise ConfigError(f"'max_context' must be at least 2, got {self.max_context}")


@dataclass
class GenerationOptions(ModelOptions):
    """Decoding keys shared by chat and compare; None means "the preset's value"."""

    generation_config: str | None = field(default=None, metadata=_help("JSON file of generation keys."))
    do_sample: bool | None = field(default=None, metadata=_help("Sample (true) or search (false)."))
    temperature: float | None = field(default=None, metadata=_help("Softmax temperature when sampling."))
    top_k: int | None = field(default=None, metadata=_help("Sample from the k likeliest tokens; 0 = off."))
    top_p: float | None = field(default=None, metadata=_help("Nucleus sampling mass in (0, 1]; 1 = off."))
    num_beams: int | None = field(default=None, metadata=_help("Beam width; 1 = no beam search."))
    repetition_penalty: float | None = field(default=None, metadata=_help("> 1 discourages repeats; 1 = off."))
    no_repeat_ngram_size: int | None = field(default=None, metadata=_help("Forbid repeating n-grams; 0 = off."))
    max_new_tokens: int | None = field(default=None, metadata=_help("Most tokens generated per answer."))
    seed: int | None = field(default=None, metadata=_help("Random seed (default 42)."))
    preset: str | list[str] | None = field(
        default=None, metadata=_help("Preset name(s), comma-separated or a list: " + ", ".join(PRESETS))
    )
    backend: str = field(
        default="torch",
        metadata=choices(
            *GENERATION_BACKENDS, help="torch, or onnxruntime: model_name_or_path is an export.py --format onnx folder."
        ),
    )

    def generation_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GENERATION_KEYS if getattr(self, k) is not None}

    def settings(self) -> list[GenerationSettings]:
        """One GenerationSettings per requested preset: preset < generation_config file < options."""
        from_file = read_generation_config(self.generation_config)
        presets = self.preset if self.preset is not None else from_file.pop("preset", "default")
        from_file.pop("preset", None)
        names = [n.strip() for n in presets.split(",")] if isinstance(presets, str) else list(presets)
        if not names:
            raise ConfigError("'preset' is an empty list; name at least one of " + ", ".join(PRESETS))
        if len(set(names)) < len(names):
            raise ConfigError(f"'preset' names a preset twice: {names}")
        overrides = {**from_file, **self.generation_overrides()}
        sampled = [n for n in names if overrides.get("do_sample", PRESETS.get(n, {}).get("do_sample"))]
        searched_overrides = {k: v for k, v in overrides.items() if k not in SAMPLING_KEYS}
        # In a mixed list (e.g. greedy,top_p) a sampling knob tunes the sampling presets only.
        return [resolve_settings(n, overrides if n in sampled or not sampled else searched_overrides) for n in names]

    def validate(self) -> None:
        super().validate()
        self.settings()  # generation keys fail here, before any weights load


@dataclass
class ChatOptions(GenerationOptions):
    """Chat with a model: one message a line on stdin, answers streamed; /reset clears the history, /exit quits."""

    show_prompt: bool = field(default=False, metadata=_help("Echo each rendered prompt (debugging)."))


@dataclass
class CompareOptions(GenerationOptions):
    """Answer the same questions with the base model (adapter off) and the fine-tuned one (adapter on)."""

    questions: str | None = field(default=None, metadata=_help("Questions: .txt (one a line) or an SFT data file."))
    references: str | None = field(default=None, metadata=_help("Questions with expected answers: exact match."))
    max_questions: int | None = field(default=None, metadata=_help("Use only the first N questions."))
    batch_size: int = field(default=8, metadata=_help("Prompts generated (and scored) together."))
    output_dir: str = field(default="output/compare", metadata=_help("Where report.md/.html, answers.jsonl go."))
    reward_model: str | None = field(default=None, metadata=_help("Reward model folder (train_rm.py output)."))
    reward_base_model: str | None = field(default=None, metadata=_help("Base of a reward-model adapter."))

    def validate(self) -> None:
        if self.questions and self.references:
            raise ConfigError("give either 'questions' or 'references' (questions with expected answers), not both")
        require_file("questions", self.questions)
        require_file("references", self.references)
        require_folder("reward_model", self.reward_model, "train_rm.py output_dir")
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be at least 1, got {self.batch_size}")
        super().validate()


@dataclass
class WebOptions(GenerationOptions):
    """A browser page (Gradio): chat with the base or a fine-tuned adapter, compare them all on one question."""

    host: str = field(default="127.0.0.1", metadata=_help("Address to bind; 0.0.0.0 opens the page to the network."))
    port: int = field(default=7860, metadata=_help("Port to serve the page on."))
    reward_model: str | None = field(default=None, metadata=_help("Reward model folder: scores compare answers."))
    reward_base_model: str | None = field(default=None, metadata=_help("Base of a reward-model adapter."))

    def validate(self) -> None:
        if not self.host:
            raise ConfigError("'host' is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (the network)")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"'port' must be in 1..65535, got {self.port}")
        require_folder("reward_model", self.reward_model, "train_rm.py output_dir")
        super().validate()
        if len(self.settings()) > 1:
            raise ConfigError("web takes one preset to start with (the page switches presets); compare runs several")


@dataclass
class ScoreOptions:
    """Score (prompt, response) rows of a JSONL file with a train_rm.py reward model."""

    reward_model: str | None = field(default=None, metadata=_help("Reward model folder (train_rm.py output)."))
    input: str | None = field(default=None, metadata=_help("JSONL rows: prompt, response, optional history/system."))
    output: str | None = field(default=None, metadata=_help("JSONL: each input row plus 'score'."))
    reward_base_model: str | None = field(
        default=None, metadata=_help("Base of a reward-model adapter; default: its train_args.json.")
    )
    quantization: str | None = field(default=None, metadata=choices(*QUANTIZATIONS, help="Load in 4bit or 8bit."))
    batch_size: int = field(default=8, metadata=_help("Rows scored together."))
    max_seq_length: int | None = field(default=None, metadata=_help("Default: the reward model's training value."))

    def validate(self) -> None:
        for key in ("reward_model", "input", "output"):
            if not getattr(self, key):
                raise ConfigError(f"missing '{key}', in --config or on the command line")
        require_folder("reward_model", self.reward_model, "train_rm.py output_dir")
        require_file("input", self.input)
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be at least 1, got {self.batch_size}")


@dataclass
class MergeOptions:
    """Merge a LoRA adapter into its 16-bit base and save a standalone model folder."""

    adapter: str | None = field(default=None, metadata=_help("LoRA adapter folder (train_sft.py/train_rm.py output)."))
    output_dir: str | None = field(default=None, metadata=_help("Where the merged model folder goes."))
    model_name_or_path: str | None = field(
        default=None, metadata=_help("Base model folder; default: the adapter's base_model_name_or_path.")
    )
    dtype: str = field(default="bfloat16", metadata=choices(*MERGE_DTYPES, help="Dtype of the merged weights."))
    quantization: str | None = field(
        default=None, metadata=choices(*QUANTIZATIONS, help="Refused: merging needs a 16-bit base.")
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Run Python files shipped with the model."))

    def validate(self) -> None:
        for key in ("adapter", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"missing '{key}', in --config or on the command line")


@dataclass
class ExportOptions:
    """Export a model (a base + LoRA adapter, or a merged folder) as a transformers folder, GGUF or ONNX."""

    format: str = field(default="hf", metadata=choices(*EXPORT_FORMATS, help="hf (merged folder), gguf or onnx."))
    model_name_or_path: str | None = field(
        default=None, metadata=_help("Base or merged model folder; default: the adapter's base_model_name_or_path.")
    )
    adapter: str | None = field(default=None, metadata=_help("LoRA adapter folder to merge first (optional)."))
    output_dir: str | None = field(default=None, metadata=_help("Where the exported files go."))
    dtype: str = field(
        default="bfloat16",
        metadata=choices(*MERGE_DTYPES, help="hf: dtype of the merged weights; onnx: see onnx_dtype."),
    )
    gguf_type: str = field(default="f16", metadata=choices(*GGUF_TYPES, help="gguf: tensor type of the weights."))
    onnx_dtype: str = field(default="float32", metadata=choices(*ONNX_DTYPES, help="onnx: dtype of the graph."))
    opset: int | None = field(default=None, metadata=_help("onnx: opset version; default: the exporter's."))
    quantization: str | None = field(
        default=None, metadata=choices(*QUANTIZATIONS, help="Refused: exporting needs a 16-bit base.")
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Run Python files shipped with the model."))

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("missing 'output_dir', in --config or on the command line")
        if not self.adapter and not self.model_name_or_path:
            raise ConfigError("give 'model_name_or_path' (a merged or base folder) and/or 'adapter'")
        require_folder("model_name_or_path", self.model_name_or_path, "a local model folder")
        require_folder("adapter", self.adapter, "a LoRA output_dir")
        if self.opset is not None and self.opset < 7:
            raise ConfigError(f"'opset' must be at least 7, got {self.opset}")


def read_generation_config(path: str | None) -> dict[str, Any]:
    """A JSON file of generation keys (and optionally 'preset'); unknown keys fail with the closest match."""
    if not path:
        return {}
    fields = fields_of(GenerationOptions)
    wanted = {name: fields[name] for name in (*GENERATION_KEYS, "preset")}
    return check_settings(wanted, read_json_object(path, "generation_config"), {}, path)


def parse_options(cls: type, argv: list[str], prog: str = "generate.py") -> Any:
    """`[--config FILE] [--key value ...]` -> options; command line beats file, unknown keys name the closest."""
    values, _ = parse_settings(argv, fields_of(cls), CONFIG_FLAG, prog)
    options = cls(**values)
    options.validate()
    return options


def require_folder(key: str, path: str | None, what: str) -> None:
    if path and not Path(path).is_dir():
        raise ConfigError(f"'{key}' {path!r} is not a folder ({what})")


def require_file(key: str, path: str | None) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"'{key}' file {path!r} does not exist")
