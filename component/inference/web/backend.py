"""The web page's model side: one loaded base (adapters switched per request) and an optional reward model,
behind one lock; chat and compare as generators of what the page shows. Gradio is not imported here.

The page's knobs are checked by `config.generation.resolve_settings`, the CLI's code, so a bad value gets the
CLI's message. A knob left at its preset's value is not an override, as if it were absent from the command line.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from component.config.generation import GenerationSettings, resolve_settings
from component.config.inference import WebOptions, read_generation_config
from component.config.parser import ConfigError
from component.data.conversation import Conversation, Turn
from component.data.template import Template
from component.inference.chat import ChatSession
from component.inference.compare import model_variants
from component.inference.engine import context_length, load_for_generation, stream_answer
from component.inference.scoring import RewardScorer, load_reward_scorer

# The decoding knobs the page shows; the other generation keys keep their command-line / preset values.
PAGE_KNOBS = ("temperature", "top_p", "top_k", "num_beams", "repetition_penalty", "max_new_tokens")


@dataclass
class ChatView:
    """What the chat tab shows after each streamed piece."""

    answer: str
    prompt: str
    history: list[Turn]
    dropped_turns: int = 0


@dataclass
class CompareView:
    """What the compare tab shows: each model's answer so far, and the reward scores once all are in."""

    answers: dict[str, str]
    prompt: str
    scores: dict[str, float | None] | None = None
    stopped: bool = False

    def winners(self) -> list[str]:
        """The models with the highest reward (several on a tie); none without scores."""
        scored = {label: s for label, s in (self.scores or {}).items() if s is not None}
        best = max(scored.values(), default=None)
        return [label for label, s in scored.items() if s == best]


class WebBackend:
    """One base model with its adapters ("base" = adapters off), its tokenizer and template, a reward scorer."""

    def __init__(
        self, model, tokenizer, template: Template, options: WebOptions, scorer: RewardScorer | None = None
    ) -> None:
        self.model, self.tokenizer, self.template, self.scorer = model, tokenizer, template, scorer
        self.variants = dict(model_variants(model))
        self.system = options.system
        self.max_context = options.max_context
        self.context = context_length(model, tokenizer, options.max_context)
        self.start = options.settings()[0]
        # Generation keys from --generation_config / the command line that the page has no knob for.
        given = {**read_generation_config(options.generation_config), **options.generation_overrides()}
        self.fixed = {k: v for k, v in given.items() if k not in (*PAGE_KNOBS, "preset")}
        self.lock = threading.Lock()  # one generation at a time: adapter switches never interleave
        self._stops: dict[str, threading.Event] = {}

    @property
    def labels(self) -> list[str]:
        return list(self.variants)

    def start_knobs(self) -> dict[str, Any]:
        """The knob values the page opens with: the command line's settings."""
        return {k: getattr(self.start, k) for k in PAGE_KNOBS}

    def preset_knobs(self, preset: str) -> dict[str, Any]:
        """The knob values of `preset` (with the command line's other keys)."""
        settings = resolve_settings(preset, self.fixed)
        return {k: getattr(settings, k) for k in PAGE_KNOBS}

    def settings(self, preset: str, knobs: dict[str, Any]) -> GenerationSettings:
        """The page's preset and knobs -> settings, checked as on the command line (ConfigError otherwise)."""
        defaults = self.preset_knobs(preset)
        changed = {k: v for k, v in knobs.items() if v is not None and v != defaults[k]}
        return resolve_settings(preset, {**self.fixed, **changed})

    def render(self, prompt: list[int]) -> str:
        """The prompt as the model receives it, special tokens included."""
        return self.tokenizer.decode(prompt, skip_special_tokens=False)

    def stop(self, session: str) -> None:
        """Stop `session`'s generation (running, or waiting for the model) at its next token."""
        event = self._stops.get(session)
        if event is not None:
            event.set()

    @contextlib.contextmanager
    def _turn(self, session: str) -> Iterator[threading.Event]:
        """Wait for the model, then hold it; the stop event is registered first, so a wait can be stopped too."""
        stop = self._stops[session] = threading.Event()
        try:
            with self.lock:
                yield stop
        finally:
            if self._stops.get(session) is stop:
                del self._stops[session]

    def _check_model(self, label: str) -> None:
        if label not in self.variants:
            raise ConfigError(f"unknown model {label!r}; valid: {', '.join(self.variants)}")

    def chat(
        self, history: list[Turn], query: str, label: str, settings: GenerationSettings, session: str = ""
    ) -> Iterator[ChatView]:
        """Answer `query` after `history` with model `label`, streamed; the last view carries the new history."""
        self._check_model(label)
        with self._turn(session) as stop:
            if stop.is_set():
                return
            chat = ChatSession(self.model, self.tokenizer, self.template, settings, self.system, self.max_context)
            chat.history = list(history)
            answer = ""
            with self.variants[label]():
                for answer in chat.stream(query, stop):
                    yield ChatView(answer, self.render(chat.last_prompt_ids), history, chat.dropped_turns)
            yield ChatView(answer, self.render(chat.last_prompt_ids), chat.history, chat.dropped_turns)

    def compare(self, query: str, settings: GenerationSettings, session: str = "") -> Iterator[CompareView]:
        """Every model's answer to `query` in turn, streamed, then the reward scores (when not stopped)."""
        prompt = self.template.encode_prompt([], query, self.system)
        rendered = self.render(prompt)
        answers = {label: "" for label in self.variants}
        with self._turn(session) as stop:
            for label, switch in self.variants.items():
                if stop.is_set():
                    break
                torch.manual_seed(settings.seed)  # each model draws the same random numbers, as in compare
                with switch():
                    for answers[label] in stream_answer(
                        self.model, self.tokenizer, self.template, prompt, settings, self.context, stop
                    ):
                        yield CompareView(dict(answers), rendered)
            stopped = stop.is_set()
            scores = self.score(query, answers) if self.scorer is not None and not stopped else None
        yield CompareView(answers, rendered, scores, stopped)

    def score(self, query: str, answers: dict[str, str]) -> dict[str, float | None]:
        """Reward of each answer to `query` (None where the reward model cannot fit it), as `generate.py score`."""
        conversations = [Conversation([Turn(query, answer)], system=self.system) for answer in answers.values()]
        scores = self.scorer(conversations)
        return {label: None if math.isnan(s) else s for label, s in zip(answers, scores)}


def load_backend(options: WebOptions) -> WebBackend:
    """Load the base with its adapters once, and the reward model if one is given."""
    model, tokenizer, template = load_for_generation(options)
    scorer = None
    if options.reward_model:
        scorer = load_reward_scorer(options.reward_model, options.reward_base_model, options.quantization)
    return WebBackend(model, tokenizer, template, options, scorer)
