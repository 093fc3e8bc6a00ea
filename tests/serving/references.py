"""What generate.py answers (its engine, greedy): the oracle the vLLM checks compare with, token for token."""

from __future__ import annotations

from pathlib import Path

from component.config.generation import resolve_settings
from component.config.inference import ModelOptions
from component.data.conversation import Turn
from component.inference.compare import model_variants
from component.inference.engine import generate_token_ids, load_for_generation


def generate_py(
    model: Path, conversations: list, max_new_tokens: int, adapters: dict[str, Path] | None = None
) -> tuple[list[list[int]], dict[str, list[list[int]]], object]:
    """(prompts as our template renders them, {"base" or adapter name: new tokens per prompt}, template) for
    `model` with `adapters` attached by name, all prompts in one left-padded batch."""
    options = ModelOptions(model_name_or_path=str(model), adapter=[f"{n}={p}" for n, p in (adapters or {}).items()])
    loaded, tokenizer, template = load_for_generation(options)
    prompts = [
        template.encode_prompt([Turn(*turn) for turn in history], question, system)
        for history, question, system in conversations
    ]
    settings = resolve_settings("greedy", {"max_new_tokens": max_new_tokens})
    answers = {}
    for label, switch in model_variants(loaded):
        with switch():
            answers[label] = generate_token_ids(loaded, tokenizer, template, prompts, settings, batch_size=8)
    return prompts, answers, template
