"""Chat: a multi-turn session over one loaded model, and the line-by-line loop of `generate.py chat`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TextIO

from component.config.generation import GenerationSettings
from component.data.conversation import Turn
from component.data.template import Template
from component.inference.answers import clean_answer, context_length, room_to_answer


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
        self.seed()

    def seed(self) -> None:
        import torch

        torch.manual_seed(self.settings.seed)  # once per session: reproducible, yet each turn samples afresh

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

    def ask(self, query: str, stream: TextIO | None = None) -> str:
        """Answer `query`; tokens are written to `stream` as they come (beam search writes the whole answer)."""
        prompt = self.build_prompt(query)
        self.last_prompt_ids = prompt
        answer = self.answer(prompt, room_to_answer(self.settings, len(prompt), self.context), stream)
        self.history.append(Turn(query, answer))
        return answer

    def answer(self, prompt: list[int], max_new_tokens: int, stream: TextIO | None) -> str:
        import torch

        from component.inference.engine import StreamWriter, generate_kwargs, model_device

        kwargs = generate_kwargs(self.tokenizer, self.template, self.settings)
        kwargs["max_new_tokens"] = max_new_tokens
        streaming = stream is not None and self.settings.num_beams == 1  # transformers cannot stream beams
        if streaming:
            kwargs["streamer"] = StreamWriter(self.tokenizer, stream)
        with torch.inference_mode():
            input_ids = torch.tensor([prompt], device=model_device(self.model))
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        answer = clean_answer(output[0, len(prompt) :].tolist(), self.tokenizer, self.template)
        if stream is not None and not streaming:
            stream.write(answer)
        return answer

    def stream(self, query: str, stop: threading.Event | None = None) -> Iterator[str]:
        """`ask` as a generator of the answer so far (the web page); setting `stop` ends it early, and the
        answer given so far joins the history."""
        from component.inference.engine import stream_answer

        prompt = self.build_prompt(query)
        self.last_prompt_ids = prompt
        answer = ""
        for answer in stream_answer(
            self.model, self.tokenizer, self.template, prompt, self.settings, self.context, stop
        ):
            yield answer
        self.history.append(Turn(query, answer))


class OnnxChatSession(ChatSession):
    """The same session over an onnxruntime generator (`onnx_engine.OnnxGenerator`); never imports torch."""

    def seed(self) -> None:
        import numpy as np

        self.rng = np.random.default_rng(self.settings.seed)

    def answer(self, prompt: list[int], max_new_tokens: int, stream: TextIO | None) -> str:
        tokens: list[int] = []
        written = ""

        def on_tokens(step) -> None:  # streams the cleaned answer so far, minus what is already written
            nonlocal written
            tokens.append(int(step[0]))
            text = clean_answer(tokens, self.tokenizer, self.template)
            if stream is not None and text.startswith(written) and text != written and not text.endswith("\ufffd"):
                stream.write(text[len(written) :])
                stream.flush()
                written = text

        self.model.generate([prompt], self.settings, max_new_tokens, self.rng, on_tokens)
        return clean_answer(tokens, self.tokenizer, self.template)


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
