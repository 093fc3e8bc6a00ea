"""The Gradio page of `generate.py web`: a chat tab, a compare tab, the generation knobs, the rendered prompt.

Every model call goes through one Gradio queue slot (`concurrency_id="model"`, limit 1) and the backend's lock,
so two users never interleave adapter switches. Stop and reset skip the queue. A user error (a bad knob, a
prompt that leaves no room to answer) is an error toast; the page stays usable. Nothing is fetched from the
internet: analytics off, no share link, the theme's fonts are served locally.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import gradio as gr

from component.config.errors import UserFacingError
from component.config.generation import PRESETS
from component.config.inference import WebOptions
from component.config.parser import ConfigError
from component.inference.report import title
from component.inference.web.backend import PAGE_KNOBS, CompareView, WebBackend, load_backend

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
KNOB_LABELS = {
    "temperature": "temperature (sampling)",
    "top_p": "top_p (sampling)",
    "top_k": "top_k (sampling)",
    "num_beams": "num_beams",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_new_tokens",
}
INTEGER_KNOBS = ("top_k", "num_beams", "max_new_tokens")
MODEL_CALL = {"concurrency_limit": 1, "concurrency_id": "model"}


@contextlib.contextmanager
def shown_on_page() -> Iterator[None]:
    """A user's error (a bad knob, a prompt with no room) becomes the page's error box; a bug keeps its traceback."""
    try:
        yield
    except UserFacingError as error:
        raise gr.Error(str(error), print_exception=False) from None


def messages(history: list[dict[str, str]], query: str, answer: str) -> list[dict[str, str]]:
    return [*history, {"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def score_line(label: str, view: CompareView) -> str:
    if view.stopped:
        return "*stopped*"
    if view.scores is None:
        return ""
    score = view.scores[label]
    if score is None:
        return "reward: n/a (does not fit the reward model)"
    return f"reward: **{score:.4f}**" + (" · **winner**" if label in view.winners() else "")


def build_page(backend: WebBackend, heading: str = "") -> gr.Blocks:
    """The page over `backend`; `heading` (markdown) names the loaded models."""
    labels = backend.labels

    # The knobs are named parameters (in PAGE_KNOBS order): Gradio passes gr.Request only to a named parameter.
    def chat(
        query: str,
        turns: list,
        history: list,
        label: str,
        preset: str,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        num_beams: int | None,
        repetition_penalty: float | None,
        max_new_tokens: int | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        knobs = dict(zip(PAGE_KNOBS, (temperature, top_p, top_k, num_beams, repetition_penalty, max_new_tokens)))
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a message first.", print_exception=False)
        view = None
        with shown_on_page():
            generation = backend.settings(preset, knobs)
            for view in backend.chat(turns, query, label, generation, request.session_hash):
                yield "", view.history, messages(history, query, view.answer), view.prompt
        if view is not None and view.dropped_turns:
            gr.Info(f"{view.dropped_turns} oldest turn(s) dropped to fit the context")

    def compare(
        query: str,
        preset: str,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        num_beams: int | None,
        repetition_penalty: float | None,
        max_new_tokens: int | None,
        request: gr.Request,
    ) -> Iterator[list]:
        knobs = dict(zip(PAGE_KNOBS, (temperature, top_p, top_k, num_beams, repetition_penalty, max_new_tokens)))
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a question first.", print_exception=False)
        with shown_on_page():
            generation = backend.settings(preset, knobs)
            for view in backend.compare(query, generation, request.session_hash):
                answers = [view.answers[label] for label in labels]
                yield [*answers, *(score_line(label, view) for label in labels), view.prompt]

    def stop(request: gr.Request) -> None:
        backend.stop(request.session_hash)

    def preset_changed(preset: str) -> list:
        with shown_on_page():
            return list(backend.preset_knobs(preset).values())

    start = backend.start_knobs()
    with gr.Blocks(analytics_enabled=False, title="LLM_training web") as page:
        gr.Markdown("## LLM_training: chat with and compare the base and fine-tuned models\n" + heading)
        with gr.Accordion("Generation settings (checked as on the command line)", open=True), gr.Row():
            preset = gr.Dropdown(list(PRESETS), value=backend.start.preset, label="preset", elem_id="preset")
            knobs = [
                gr.Number(
                    value=start[name],
                    label=KNOB_LABELS[name],
                    precision=0 if name in INTEGER_KNOBS else None,
                    elem_id=f"knob-{name}",
                    min_width=100,
                )
                for name in PAGE_KNOBS
            ]
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                turns = gr.State([])
                model = gr.Dropdown(
                    [(title(label), label) for label in labels],
                    value=labels[min(1, len(labels) - 1)],  # the first adapter, if any
                    label="model",
                    elem_id="chat-model",
                )
                chatbot = gr.Chatbot(
                    [], label="conversation", render_markdown=False, height=320, elem_id="chatbot", buttons=["copy"]
                )
                message = gr.Textbox(placeholder="Type a message and press Enter", label="message", elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    chat_stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                    reset = gr.Button("Reset", elem_id="reset")
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                question = gr.Textbox(
                    placeholder="One question: every model answers it", label="question", elem_id="question"
                )
                with gr.Row():
                    run = gr.Button("Compare", variant="primary", elem_id="compare")
                    compare_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                answers, scores = [], []
                with gr.Row():
                    for label in labels:
                        with gr.Column(min_width=160):
                            answers.append(
                                gr.Textbox(label=title(label), lines=6, interactive=False, elem_id=f"answer-{label}")
                            )
                            scores.append(gr.Markdown("", elem_id=f"score-{label}"))
        prompt = gr.Textbox(
            label="Rendered prompt (special tokens visible): exactly what the model received",
            lines=6,
            interactive=False,
            elem_id="rendered-prompt",
        )

        preset.change(preset_changed, preset, knobs, queue=False)
        chat_inputs = [message, turns, chatbot, model, preset, *knobs]
        chat_outputs = [message, turns, chatbot, prompt]
        message.submit(chat, chat_inputs, chat_outputs, **MODEL_CALL)
        send.click(chat, chat_inputs, chat_outputs, **MODEL_CALL)
        chat_stop.click(stop, None, None, queue=False)
        reset.click(lambda: ([], [], "", ""), None, [turns, chatbot, message, prompt], queue=False)
        question.submit(compare, [question, preset, *knobs], [*answers, *scores, prompt], **MODEL_CALL)
        run.click(compare, [question, preset, *knobs], [*answers, *scores, prompt], **MODEL_CALL)
        compare_stop.click(stop, None, None, queue=False)
    return page


def describe(options: WebOptions, backend: WebBackend) -> str:
    lines = [f"- **base**: `{options.model_name_or_path}` (template `{backend.template.name}`)"]
    lines += [f"- **{name}**: `{path}`" for name, path in options.adapters().items()]
    if options.reward_model:
        lines.append(f"- **reward model**: `{options.reward_model}`")
    return "\n".join(lines)


def serve(options: WebOptions) -> None:
    """Load the models once and serve the page until interrupted."""
    backend = load_backend(options)
    page = build_page(backend, describe(options, backend))
    if options.host not in LOOPBACK:
        logger.warning("binding %s: anyone who can reach this machine can use the models", options.host)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(
            server_name=options.host,
            server_port=options.port,
            share=False,
            show_error=True,
            footer_links=[],
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            theme=gr.themes.Default(),
        )
    except OSError as error:
        raise ConfigError(f"cannot serve on {options.host}:{options.port} ({error}); choose another 'port'") from None
