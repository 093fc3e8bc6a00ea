"""Generation: strategy presets, their validation, model loading, batched generation, chat, compare, merge.

The prompt is always built by `component.template` (`Template.encode_prompt`), the code that rendered the
training data, so a fine-tuned model is asked in exactly the format it learned. Front ends: generate.py
(`chat`, `compare`) and merge_lora.py; docs/generation.md describes every option.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from component.arguments import ConfigError, _closest, check_value
from component.conversation import Conversation, Turn
from component.model import compute_dtype, load_tokenizer, quantization_config
from component.report import CompareResult, write_reports
from component.template import TEMPLATE_CLASSES, Template, get_template

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Presets and settings
# ---------------------------------------------------------------------------------------------------------------

# "default" is the original project's GenerationConfig (top_k 50 was transformers' implicit default there).
# The strategy presets leave repetition_penalty off: a penalty of 2.0 forbids answers that repeat a token.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.8, "repetition_penalty": 2.0},
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "top_k": {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    "top_p": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.92},
}
GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_new_tokens",
    "seed",
)
SAMPLING_KEYS = ("temperature", "top_k", "top_p")


@dataclass(frozen=True)
class GenerationSettings:
    """One resolved decoding strategy; `generate_kwargs()` is what model.generate receives."""

    preset: str = "default"
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 512
    seed: int = 42

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.do_sample:  # sampling knobs only when sampling: transformers flags them otherwise
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs

    def describe(self) -> str:
        shown = {**self.generate_kwargs(), "seed": self.seed}
        return f"{self.preset}: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def resolve_settings(preset: str = "default", overrides: dict[str, Any] | None = None) -> GenerationSettings:
    """The preset's fields, then `overrides` (generation-config file, command line), checked up front."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}.{_closest(preset, list(PRESETS))}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in overrides:
        if key not in GENERATION_KEYS:
            raise ConfigError(f"unknown generation key '{key}'.{_closest(key, list(GENERATION_KEYS))}")
    values = {**PRESETS[preset], **overrides}
    if not values["do_sample"]:
        explicit = [k for k in SAMPLING_KEYS if k in overrides]
        if explicit:
            raise ConfigError(
                f"preset '{preset}' with do_sample false decodes deterministically, so {', '.join(explicit)} would "
                "be ignored; choose a sampling preset (default, top_k, top_p), set do_sample true, or drop "
                f"{', '.join(explicit)}"
            )
        values = {k: v for k, v in values.items() if k not in SAMPLING_KEYS}
    settings = GenerationSettings(preset=preset, **values)
    _check_ranges(settings)
    return settings


def _check_ranges(s: GenerationSettings) -> None:
    """The checks transformers would otherwise make deep inside generate(), with a stack trace."""
    problems = []
    if s.do_sample:
        if not 0.0 < s.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {s.top_p} (1.0 switches top-p filtering off)")
        if s.temperature <= 0:
            problems.append(f"temperature must be > 0 when sampling, got {s.temperature} (use preset greedy instead)")
        if s.top_k < 0:
            problems.append(f"top_k must be >= 0, got {s.top_k} (0 switches top-k filtering off)")
    if s.num_beams < 1:
        problems.append(f"num_beams must be >= 1, got {s.num_beams}")
    if s.repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be > 0, got {s.repetition_penalty} (1.0 = no penalty)")
    if s.no_repeat_ngram_size < 0:
        problems.append(f"no_repeat_ngram_size must be >= 0, got {s.no_repeat_ngram_size} (0 = off)")
    if s.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if problems:
        raise ConfigError(f"generation settings ({s.preset}): " + "; ".join(problems))


def read_generation_config(path: str | None) -> dict[str, Any]:
    """A JSON file of generation keys (and optionally 'preset'); unknown keys fail with the closest match."""
    if not path:
        return {}
    raw = _read_json_object(path, "generation_config")
    valid = [*GENERATION_KEYS, "preset"]
    values = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in valid:
            raise ConfigError(f"{path}: unknown generation key '{key}'.{_closest(key, valid)}")
        values[key] = _check_type(f"{path}: '{key}'", value, _hints(GenerationOptions)[key], from_cli=False)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Options of the front ends: one JSON file (--config) plus --key value overrides
# ---------------------------------------------------------------------------------------------------------------

QUANTIZATIONS = ("4bit", "8bit")


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelOptions:
    """Which weights to load and how to prompt them."""

    model_name_or_path: str | None = field(default=None, metadata=_help("Base (or merged) model folder."))
    adapter: str | None = field(default=None, metadata=_help("LoRA adapter folder (train_sft.py output_dir)."))
    template: str | None = field(
        default=None,
        metadata=_help("Prompt template; default: the adapter's train_args.json, else human_assistant."),
    )
    quantization: str | None = field(default=None, metadata=_help("Load the base in 4bit or 8bit (bitsandbytes)."))
    trust_remote_code: bool = field(default=False, metadata=_help("Run Python files shipped with the model."))
    system: str | None = field(default=None, metadata=_help("System prompt for every conversation."))
    max_context: int | None = field(default=None, metadata=_help("Context length; default: the model config's."))


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
    preset: Any = field(default=None, metadata=_help("Preset name(s): " + ", ".join(PRESETS)))

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


DEFAULT_QUESTIONS = "data/eval/questions.txt"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(where: str, value: Any, annotation: Any, from_cli: bool) -> Any:
    """Check a JSON value (or convert a command-line string) against a field annotation."""
    if annotation is Any:  # preset: a name or a list of names
        if from_cli and isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
            return value[0] if len(value) == 1 else value
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError(f"{where} must be a preset name or a list of names, got {value!r}")
    return check_value(where, value, annotation, from_cli)


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"{what} file {path!r} does not exist")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def parse_options(cls: type[ModelOptions], argv: list[str], prog: str = "generate.py") -> ModelOptions:
    """`[--config FILE] [--key value ...]` -> options; command line beats file, unknown keys name the closest."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(
        prog=prog, description=cls.__doc__, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    parser.add_argument("--config", help="JSON file holding any of the options below.")
    for name, spec in fields.items():
        default = spec.default if spec.default is not dataclasses.MISSING else None
        shown = "preset's" if name in GENERATION_KEYS else ("default" if name == "preset" else json.dumps(default))
        parser.add_argument(f"--{name}", metavar="VALUE", help=f"{spec.metadata.get('help', '')} [{shown}]")
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        raise ConfigError(f"unknown option '{flag}'.{_closest(name, [*fields, 'config'])} (see {prog} --help)")
    cli = vars(known)
    values: dict[str, Any] = {}
    config_path = cli.pop("config", None)
    if config_path:
        for key, value in _read_json_object(config_path, "config").items():
            if key.startswith("_"):  # room for notes inside JSON files
                continue
            if key not in fields:
                raise ConfigError(f"{config_path}: unknown key '{key}'.{_closest(key, list(fields))}")
            values[key] = _check_type(f"{config_path}: '{key}'", value, hints[key], from_cli=False)
    for key, value in cli.items():
        values[key] = _check_type(f"--{key}", value, hints[key], from_cli=True)
    options = cls(**values)
    _validate_options(options)
    return options


def _validate_options(options: ModelOptions) -> None:
    if not options.model_name_or_path:
        raise ConfigError("missing 'model_name_or_path' (a local model folder), in --config or on the command line")
    for key in ("model_name_or_path", "adapter"):
        path = getattr(options, key)
        if path and not Path(path).is_dir():
            raise ConfigError(f"'{key}' {path!r} is not a folder")
    if options.adapter and not (Path(options.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"'adapter' {options.adapter!r} has no adapter_config.json (is it a LoRA output_dir?)")
    if options.quantization not in (None, *QUANTIZATIONS):
        raise ConfigError(
            f"'quantization' must be one of 4bit, 8bit, null; got {options.quantization!r}."
            f"{_closest(str(options.quantization), list(QUANTIZATIONS))}"
        )
    if options.template is not None and options.template not in TEMPLATE_CLASSES:
        raise ConfigError(
            f"'template' must be one of {', '.join(TEMPLATE_CLASSES)}; got {options.template!r}."
            f"{_closest(options.template, list(TEMPLATE_CLASSES))}"
        )
    if options.max_context is not None and options.max_context < 2:
        raise ConfigError(f"'max_context' must be at least 2, got {options.max_context}")
    if isinstance(options, CompareOptions):
        if options.questions and options.references:
            raise ConfigError("give either 'questions' or 'references' (questions with expected answers), not both")
        for key in ("questions", "references"):
            path = getattr(options, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"'{key}' file {path!r} does not exist")
        if options.reward_model and not Path(options.reward_model).is_dir():
            raise ConfigError(f"'reward_model' {options.reward_model!r} is not a folder (train_rm.py output_dir)")
        if options.batch_size < 1:
            raise ConfigError(f"'batch_size' must be at least 1, got {options.batch_size}")
    options.settings()  # generation keys fail here, before any weights load


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _has_tokenizer(folder: str | None) -> bool:
    return bool(folder) and (Path(folder) / "tokenizer_config.json").is_file()


def template_name_for(options: ModelOptions) -> str:
    """The template the weights were trained with (train_args.json next to them), unless one is named."""
    if options.template:
        return options.template
    for folder in (options.adapter, options.model_name_or_path):
        train_args = Path(folder or "") / "train_args.json"
        if folder and train_args.is_file():
            name = json.loads(train_args.read_text(encoding="utf-8")).get("template")
            if name in TEMPLATE_CLASSES:
                return name
    return "human_assistant"


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_generation(options: ModelOptions) -> tuple[Any, Any, Template]:
    """Model (base with the adapter attached, if any), left-padding tokenizer and template."""
    from transformers import AutoModelForCausalLM

    # The adapter folder's tokenizer is the one training used; a merged folder carries its own.
    tokenizer_path = options.adapter if _has_tokenizer(options.adapter) else options.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_path, options.trust_remote_code, padding_side="left")
    template = get_template(template_name_for(options), tokenizer)
    quantization = quantization_config(options.quantization)
    device = inference_device()
    model = AutoModelForCausalLM.from_pretrained(
        options.model_name_or_path,
        dtype=compute_dtype(),
        quantization_config=quantization,
        device_map={"": device.index or 0} if quantization is not None and device.type == "cuda" else None,
        trust_remote_code=options.trust_remote_code,
    )
    if quantization is None:
        model.to(device)
    if options.adapter:
        model = attach_adapter(model, options.adapter)
    model.eval()
    return model, tokenizer, template


def attach_adapter(model, adapter: str):
    from peft import PeftModel

    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("task_type") == "SEQ_CLS":
        raise ConfigError(
            f"'adapter' {adapter!r} is a reward-model adapter (task_type SEQ_CLS); pass it as --reward_model"
        )
    return PeftModel.from_pretrained(model, adapter)


def context_length(model, tokenizer, override: int | None = None) -> int | None:
    """Longest sequence the model takes: --max_context, else the config's, else the tokenizer's; None = unknown."""
    if override:
        return override
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "model_max_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and value < 1_000_000 else None  # HF uses ~1e30 for "unset"


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def stop_strings(template: Template) -> list[str]:
    return list(getattr(template, "stop_strings", None) or [])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _generate_kwargs(tokenizer, template: Template, settings: GenerationSettings) -> dict[str, Any]:
    """kwargs for model.generate shared by batch and chat: strategy, stop tokens/strings, padding."""
    kwargs = settings.generate_kwargs()
    kwargs.update(eos_token_id=template.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    if stop_strings(template):
        kwargs.update(stop_strings=stop_strings(template), tokenizer=tokenizer)
    return kwargs


def _room(settings: GenerationSettings, prompt_length: int, context: int | None) -> int:
    """max_new_tokens, shortened where the context would overflow (the tiny demo model has 256 positions)."""
    if context is None:
        return settings.max_new_tokens
    room = context - prompt_length
    if room < 1:
        raise ConfigError(
            f"a prompt of {prompt_length} tokens leaves no room to answer in a context of {context} tokens; "
            "shorten the question or raise --max_context if the model allows"
        )
    if room < settings.max_new_tokens:
        logger.info("max_new_tokens %d -> %d to fit the %d-token context", settings.max_new_tokens, room, context)
    return min(room, settings.max_new_tokens)


def clean_answer(token_ids: list[int], tokenizer, template: Template) -> str:
    """The generated tokens up to the first stop token, decoded, cut at a stop string, stripped."""
    stops = set(template.stop_token_ids)
    end = next((i for i, token in enumerate(token_ids) if token in stops), len(token_ids))
    text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
    for stop in stop_strings(template):
        text = text.split(stop, 1)[0]
    return text.strip()


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    template: Template,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 8,
    context: int | None = None,
) -> list[str]:
    """Answers to token-id prompts, `batch_size` at a time, left-padded so every answer starts at the same column."""
    device = _model_device(model)
    kwargs = _generate_kwargs(tokenizer, template, settings)
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        kwargs["max_new_tokens"] = _room(settings, width, context)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        answers += [clean_answer(row[width:].tolist(), tokenizer, template) for row in output]
    return answers


class StreamWriter(TextStreamer):
    """TextStreamer that writes each finished piece of text to a stream instead of printing it."""

    def __init__(self, tokenizer, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text)
        self.stream.flush()


class ChatSession:
    """A multi-turn chat: history kept as Turns, the oldest dropped when prompt + answer would not fit."""

    def __init__(
        self,
        model,
        tokenizer,
        template: Template,
        settings: GenerationSettings,
        system: str | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.template, self.settings = model, tokenizer, template, settings
        self.system = system
        self.context = context_length(model, tokenizer, max_context)
        self.history: list[Turn] = []
        self.last_prompt_ids: list[int] = []
        self.dropped_turns = 0
        torch.manual_seed(settings.seed)  # once per session: reproducible, yet each turn samples afresh

    def reset(self) -> None:
        self.history = []
        self.dropped_turns = 0

    def build_prompt(self, query: str) -> list[int]:
        """The prompt for `query` with as much recent history as fits; drops older turns for good.

        Room for max_new_tokens is kept, but at most half the context: with max_new_tokens near the context
        size no history would ever survive, and the answer gets shortened to fit anyway.
        """
        reserve = (
            self.settings.max_new_tokens
            if self.context is None
            else min(self.settings.max_new_tokens, self.context // 2)
        )
        while True:
            prompt = self.template.encode_prompt(self.history, query, self.system)
            fits = self.context is None or len(prompt) + reserve <= self.context
            if fits or not self.history:
                return prompt
            self.history.pop(0)
            self.dropped_turns += 1

    @torch.inference_mode()
    def ask(self, query: str, stream: TextIO | None = None) -> str:
        """Answer `query`; tokens are written to `stream` as they come (beam search writes the whole answer)."""
        prompt = self.build_prompt(query)
        self.last_prompt_ids = prompt
        kwargs = _generate_kwargs(self.tokenizer, self.template, self.settings)
        kwargs["max_new_tokens"] = _room(self.settings, len(prompt), self.context)
        streaming = stream is not None and self.settings.num_beams == 1  # transformers cannot stream beams
        if streaming:
            kwargs["streamer"] = StreamWriter(self.tokenizer, stream)
        input_ids = torch.tensor([prompt], device=_model_device(self.model))
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        answer = clean_answer(output[0, len(prompt) :].tolist(), self.tokenizer, self.template)
        if stream is not None and not streaming:
            stream.write(answer)
        self.history.append(Turn(query, answer))
        return answer


CHAT_HELP = "Type a message; /reset clears the history, /exit (or end of input) quits."


def chat_loop(
    session: ChatSession, input_stream: TextIO, output_stream: TextIO, prompt: str = "", show_prompt: bool = False
) -> None:
    """Read one message per line from `input_stream` until /exit or end of input; write answers as they stream."""
    output_stream.write(CHAT_HELP + "\n")
    while True:
        if prompt:
            output_stream.write(prompt)
            output_stream.flush()
        line = input_stream.readline()
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query == "/exit":
            break
        if query == "/reset":
            session.reset()
            output_stream.write("[history cleared]\n")
            continue
        dropped = session.dropped_turns
        if show_prompt:
            rendered = session.tokenizer.decode(session.build_prompt(query), skip_special_tokens=False)
            output_stream.write(f"[prompt]\n{rendered}\n[/prompt]\n")
        output_stream.write("Assistant: ")
        session.ask(query, output_stream)
        output_stream.write("\n")
        if session.dropped_turns > dropped:
            output_stream.write(f"[{session.dropped_turns - dropped} oldest turn(s) dropped to fit the context]\n")
        output_stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# Compare: base vs fine-tuned on the same questions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Question:
    query: str
    history: list[Turn] = field(default_factory=list)
    system: str | None = None
    reference: str | None = None

    def conversation(self, answer: str) -> Conversation:
        return Conversation([*self.history, Turn(self.query, answer)], system=self.system)


def read_questions(path: str, with_references: bool = False, system: str | None = None) -> list[Question]:
    """A .txt file holds one question a line; other files are read as SFT data (format auto-detected)."""
    if Path(path).suffix == ".txt":
        if with_references:
            raise ConfigError(f"'references' {path!r}: a .txt file has no answers; use JSONL (e.g. Firefly layout)")
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        return [Question(line.strip(), system=system) for line in lines if line.strip()]
    from component.readers import DataFormatError, read_sft_file

    try:
        conversations, _ = read_sft_file(path)
    except DataFormatError as error:
        raise ConfigError(str(error)) from None
    questions = []
    for conversation in conversations:
        *history, last = conversation.turns
        reference = last.assistant if with_references else None
        questions.append(Question(last.user, history, conversation.system or system, reference))
    return questions


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def compare_models(
    model,
    tokenizer,
    template: Template,
    questions: list[Question],
    settings_list: list[GenerationSettings],
    batch_size: int = 8,
    context: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (preset, model, question). With a PeftModel, "base" is the same weights, adapter off."""
    from peft import PeftModel

    variants: list[tuple[str, Callable[[], Any]]] = [("base", contextlib.nullcontext)]
    if isinstance(model, PeftModel):
        variants = [("base", model.disable_adapter), ("sft", contextlib.nullcontext)]
    prompts = [template.encode_prompt(q.history, q.query, q.system) for q in questions]
    rows = []
    for settings in settings_list:
        for label, switch in variants:
            torch.manual_seed(settings.seed)  # each model draws the same random numbers
            with switch():
                answers = generate_answers(model, tokenizer, template, prompts, settings, batch_size, context)
            for index, (question, answer) in enumerate(zip(questions, answers)):
                row = {"preset": settings.preset, "model": label, "index": index, "question": question.query}
                row["answer"] = answer
                if question.reference is not None:
                    row["reference"] = question.reference
                    row["exact_match"] = exact_match(answer, question.reference)
                rows.append(row)
    return rows


RewardScorer = Callable[[list[Conversation]], list[float]]


def load_reward_scorer(
    path: str, base_model: str | None = None, quantization: str | None = None, batch_size: int = 8
) -> RewardScorer:
    """Scores conversations with the reward model from train_rm.py (component.reward)."""
    try:
        from component.reward import load_reward_model, score_conversations
    except ImportError as error:
        raise ConfigError(f"--reward_model needs component/reward.py (the reward-model code): {error}") from None
    model, tokenizer, template_name = load_reward_model(path, base_model=base_model, quantization=quantization)
    # Long answers are cut the way the reward model's training data was.
    train_args = Path(path) / "train_args.json"
    max_seq_length = (
        json.loads(train_args.read_text(encoding="utf-8")).get("max_seq_length") if train_args.is_file() else None
    )

    def score(conversations: list[Conversation]) -> list[float]:
        scores = score_conversations(model, tokenizer, template_name, conversations, batch_size, max_seq_length)
        return [float(s) for s in scores]

    return score


def add_reward_scores(rows: list[dict[str, Any]], questions: list[Question], scorer: RewardScorer) -> None:
    conversations = [questions[row["index"]].conversation(row["answer"]) for row in rows]
    for row, score in zip(rows, scorer(conversations)):
        row["reward"] = None if math.isnan(score) else score  # NaN: the reward model could not fit the answer


def summarize(rows: list[dict[str, Any]], settings_list: list[GenerationSettings]) -> dict[str, Any]:
    """Per preset and model: answers, exact match, mean reward; per preset: SFT's win rate over base by reward."""
    summary: dict[str, Any] = {}
    for settings in settings_list:
        by_model: dict[str, list[dict]] = {}
        for row in rows:
            if row["preset"] == settings.preset:
                by_model.setdefault(row["model"], []).append(row)
        entry: dict[str, Any] = {"models": {}}
        for label, model_rows in by_model.items():
            stats: dict[str, Any] = {"answers": len(model_rows)}
            if "exact_match" in model_rows[0]:
                stats["exact_match"] = sum(r["exact_match"] for r in model_rows) / len(model_rows)
            scored = [r["reward"] for r in model_rows if r.get("reward") is not None]
            if "reward" in model_rows[0]:
                stats["mean_reward"] = sum(scored) / len(scored) if scored else None
            entry["models"][label] = stats
        if "sft" in by_model and "reward" in by_model["sft"][0]:
            pairs = [
                (base["reward"], sft["reward"])
                for base, sft in zip(by_model["base"], by_model["sft"])
                if base["reward"] is not None and sft["reward"] is not None
            ]
            wins = sum(sft > base for base, sft in pairs)
            ties = sum(sft == base for base, sft in pairs)
            entry["sft_vs_base"] = {
                "wins": wins,
                "ties": ties,
                "losses": len(pairs) - wins - ties,
                "unscored": len(by_model["sft"]) - len(pairs),
                "win_rate": (wins + 0.5 * ties) / len(pairs) if pairs else None,  # a tie counts half
            }
        summary[settings.preset] = entry
    return summary


def _free(model) -> None:
    """Drop the generator before the reward model loads: two 13B models rarely fit one GPU."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_compare(options: CompareOptions) -> tuple[CompareResult, dict[str, Path]]:
    """The compare recipe: read questions, load once, generate per preset and model, score, write reports."""
    settings_list = options.settings()
    path = options.references or options.questions or DEFAULT_QUESTIONS
    questions = read_questions(path, with_references=bool(options.references), system=options.system)
    questions = questions[: options.max_questions] if options.max_questions else questions
    if not questions:
        raise ConfigError(f"{path}: no questions")
    started = time.time()
    model, tokenizer, template = load_for_generation(options)
    context = context_length(model, tokenizer, options.max_context)
    rows = compare_models(model, tokenizer, template, questions, settings_list, options.batch_size, context)
    _free(model)
    if options.reward_model:
        scorer = load_reward_scorer(
            options.reward_model, options.reward_base_model, options.quantization, options.batch_size
        )
        add_reward_scores(rows, questions, scorer)
    result = CompareResult(
        rows=rows,
        summary=summarize(rows, settings_list),
        settings={s.preset: s.describe() for s in settings_list},
        models={"base": options.model_name_or_path, **({"sft": options.adapter} if options.adapter else {})},
        meta={
            "questions_file": path,
            "questions": len(questions),
            "template": template.name,
            "quantization": options.quantization or "none",
            "reward_model": options.reward_model or "none",
            "seconds": round(time.time() - started, 1),
        },
    )
    return result, write_reports(result, options.output_dir)


# ---------------------------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------------------------

MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(
    adapter: str,
    output_dir: str,
    model_name_or_path: str | None = None,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Fold a LoRA adapter into 16-bit base weights and save a folder plain transformers loads.

    A reward-model adapter (task_type SEQ_CLS) merges into a sequence-classification model; its trained score
    head (peft modules_to_save) replaces the base's.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if quantization:
        raise ConfigError(
            f"merging into a {quantization}-loaded base is refused: the merged weights would have to be "
            "re-quantized (losing the adapter's precision) and cannot be saved as a plain model. Load the base in "
            "16-bit to merge (leave out --quantization); a QLoRA adapter merges into the 16-bit base as it is"
        )
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"'adapter' {adapter!r} has no adapter_config.json (is it a LoRA output_dir?)")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    base = model_name_or_path or adapter_config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"base model {base!r} is not a local model folder; pass --model_name_or_path")
    base_config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in base_config:
        raise ConfigError(f"base model {base!r} is saved quantized; merge into its 16-bit original instead")
    if dtype not in MERGE_DTYPES:
        raise ConfigError(
            f"'dtype' must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}.{_closest(dtype, list(MERGE_DTYPES))}"
        )

    tokenizer = load_tokenizer(adapter if _has_tokenizer(adapter) else base, trust_remote_code)
    reward = adapter_config.get("task_type") == "SEQ_CLS"
    model_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    extra = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id} if reward else {}
    model = model_class.from_pretrained(base, dtype=MERGE_DTYPES[dtype], trust_remote_code=trust_remote_code, **extra)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    output = Path(output_dir)
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    for name in ("train_args.json",):  # keeps the template choice with the weights
        if (Path(adapter) / name).is_file():
            (output / name).write_bytes((Path(adapter) / name).read_bytes())
    return output
