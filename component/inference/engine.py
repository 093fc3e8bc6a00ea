"""The generation engine: load a model to answer with, and generate answers in batches.

The prompt is always built by `data.template` (`Template.encode_prompt`), the code that rendered the training
data, so a fine-tuned model is asked in exactly the format it learned. Chat and compare build on this module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, TextIO

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, TextStreamer

from component.config.choices import TEMPLATES
from component.config.generation import GenerationSettings
from component.config.inference import ModelOptions
from component.data.template import Template, get_template
from component.inference.answers import (  # noqa: F401 (re-exported: chat, compare, RL, web import them from here)
    clean_answer,
    clean_text,
    context_length,
    room_to_answer,
    stop_strings,
)
from component.model.loader import load_for_inference, load_tokenizer, read_train_args, tokenizer_folder


def template_name_for(options: ModelOptions) -> str:
    """The template the weights were trained with (train_args.json next to them), unless one is named."""
    if options.template:
        return options.template
    for folder in (*options.adapters().values(), options.model_name_or_path):
        name = read_train_args(folder).get("template")
        if name in TEMPLATES:
            return name
    return "human_assistant"


def load_for_generation(options: ModelOptions) -> tuple[Any, Any, Template]:
    """Model (base with its adapters attached under their names, if any), left-padding tokenizer and template."""
    adapters = options.adapters()
    # The adapter folder's tokenizer is the one training used; a merged folder carries its own.
    path = tokenizer_folder(*adapters.values(), options.model_name_or_path)
    tokenizer = load_tokenizer(path, options.trust_remote_code, padding_side="left")
    template = get_template(template_name_for(options), tokenizer)
    model = load_for_inference(
        options.model_name_or_path,
        adapters=adapters,
        quantization=options.quantization,
        trust_remote_code=options.trust_remote_code,
    )
    return model, tokenizer, template


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def generate_kwargs(tokenizer, template: Template, settings: GenerationSettings) -> dict[str, Any]:
    """kwargs for model.generate shared by batch and chat: strategy, stop tokens/strings, padding."""
    kwargs = settings.generate_kwargs()
    kwargs.update(eos_token_id=template.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    if stop_strings(template):
        kwargs.update(stop_strings=stop_strings(template), tokenizer=tokenizer)
    return kwargs


@torch.inference_mode()
def generate_token_ids(
    model,
    tokenizer,
    template: Template,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 8,
    context: int | None = None,
) -> list[list[int]]:
    """The new tokens for each token-id prompt, `batch_size` at a time, left-padded so every answer starts at the
    same column; each ends with its first stop token, or runs to max_new_tokens (what other runtimes return)."""
    device = model_device(model)
    kwargs = generate_kwargs(tokenizer, template, settings)
    pad, stops = tokenizer.pad_token_id, set(template.stop_token_ids)
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        kwargs["max_new_tokens"] = room_to_answer(settings, width, context)
        for row in model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs):
            tokens = row[width:].tolist()
            end = next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))
            answers.append(tokens[:end])
    return answers


def generate_answers(
    model,
    tokenizer,
    template: Template,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 8,
    context: int | None = None,
) -> list[str]:
    """Answers to token-id prompts (generate_token_ids, decoded and cleaned)."""
    token_ids = generate_token_ids(model, tokenizer, template, prompts, settings, batch_size, context)
    return [clean_answer(tokens, tokenizer, template) for tokens in token_ids]


class StreamWriter(TextStreamer):
    """TextStreamer that writes each finished piece of text to a stream instead of printing it."""

    def __init__(self, tokenizer, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text)
        self.stream.flush()


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (the web page's stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_answer(
    model,
    tokenizer,
    template: Template,
    prompt: list[int],
    settings: GenerationSettings,
    context: int | None = None,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """The answer to one token-id prompt so far, yielded as tokens arrive; the last value is exactly what
    `generate_answers` / `ChatSession.ask` return for it (`clean_answer`), cut short if `stop` was set.

    model.generate runs in a thread feeding a TextIteratorStreamer; beam search cannot stream, so it yields
    only the final answer. Closing the generator early stops the generation and waits for it to end, so the
    caller's hold on the model (a lock, an active adapter) outlasts the generation.
    """
    stop = stop or threading.Event()
    kwargs = generate_kwargs(tokenizer, template, settings)
    kwargs["max_new_tokens"] = room_to_answer(settings, len(prompt), context)
    kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnEvent(stop)])
    streamer = None
    if settings.num_beams == 1:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["streamer"] = streamer
    input_ids = torch.tensor([prompt], device=model_device(model))
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.inference_mode():  # thread-local: the caller's mode does not reach this thread
                result["output"] = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
                )
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error
            if streamer is not None:
                streamer.end()  # unblock the reader below

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    finished = False
    try:
        text = ""
        for piece in streamer or ():
            text += piece
            yield clean_text(text, template)
        thread.join()
        finished = True
    finally:
        if not finished:  # the reader went away (closed generator, error): end the generation first
            stop.set()
            thread.join()
    if "error" in result:
        raise result["error"]
    yield clean_answer(result["output"][0, len(prompt) :].tolist(), tokenizer, template)
