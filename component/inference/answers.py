"""Answer helpers that need no torch: context length, room to answer, stop strings, cleaning an answer.

Both generation engines use them: the PyTorch one (`engine`) and the onnxruntime one (`onnx_engine`), which
must run where torch is not installed.
"""

from __future__ import annotations

import logging

from component.config.generation import GenerationSettings
from component.config.parser import ConfigError
from component.data.template import Template

logger = logging.getLogger(__name__)


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


def stop_strings(template: Template) -> list[str]:
    return list(getattr(template, "stop_strings", None) or [])


def room_to_answer(settings: GenerationSettings, prompt_length: int, context: int | None) -> int:
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
    return clean_text(tokenizer.decode(token_ids[:end], skip_special_tokens=True), template)


def clean_text(text: str, template: Template) -> str:
    """Decoded answer text cut at the template's first stop string, stripped."""
    for stop in stop_strings(template):
        text = text.split(stop, 1)[0]
    return text.strip()
