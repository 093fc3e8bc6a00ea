"""Generation settings: the decoding presets, one resolved strategy, and its checks.

`default` is the original project's GenerationConfig; the strategy presets are greedy, beam, top_k and top_p.
A preset's fields are overridden by a generation-config file and then by the front end's own keys; every
value is checked here, before any weights load, with the messages transformers would otherwise raise deep
inside generate().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from component.config.parser import ConfigError, closest

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


def unsupported_by_vllm(settings: GenerationSettings) -> list[str]:
    """What vLLM's sampler cannot do as transformers' generate does (empty: every setting means the same)."""
    problems = []
    if settings.num_beams > 1:
        problems.append(f"num_beams {settings.num_beams} (beam search)")
    if settings.no_repeat_ngram_size:
        problems.append(f"no_repeat_ngram_size {settings.no_repeat_ngram_size}")
    return problems


def resolve_settings(preset: str = "default", overrides: dict[str, Any] | None = None) -> GenerationSettings:
    """The preset's fields, then `overrides` (generation-config file, command line), checked up front."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}.{closest(preset, list(PRESETS))}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in overrides:
        if key not in GENERATION_KEYS:
            raise ConfigError(f"unknown generation key '{key}'.{closest(key, list(GENERATION_KEYS))}")
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
