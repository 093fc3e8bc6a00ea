"""The web page's model side without a browser: streaming, stop, the lock, settings from the page's knobs.

component.inference.engine.stream_answer, ChatSession.stream and component.inference.web.backend on the tiny
models of tests/inference/conftest.py (web_models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading

import pytest

from component.config.generation import resolve_settings
from component.config.inference import ChatOptions, WebOptions, parse_options
from component.config.parser import ConfigError, fields_of
from component.data.conversation import Conversation, Turn
from component.inference.chat import ChatSession
from component.inference.compare import Question, compare_models
from component.inference.engine import generate_answers, stream_answer
from component.inference.scoring import load_reward_scorer
from component.inference.web.backend import WebBackend, load_backend
from tests.utils import REPO, skip_without_demo

QUESTION = "把 12 逐位写成汉字"


def argv(models, *extra: str) -> list[str]:
    adapters = ["--adapter", f"sft={models['sft']}", "--adapter", f"dpo={models['dpo']}"]
    return ["--model_name_or_path", models["base"], *adapters, "--reward_model", models["rm"], *extra]


@pytest.fixture(scope="module")
def backend(web_models) -> WebBackend:
    return load_backend(parse_options(WebOptions, argv(web_models, "--preset", "greedy", "--max_new_tokens", "8")))


def test_streamed_answer_grows_and_ends_as_the_batch_answer(backend):
    prompt = backend.template.encode_prompt([], QUESTION)
    settings = resolve_settings("greedy", {"max_new_tokens": 10})
    pieces = list(stream_answer(backend.model, backend.tokenizer, backend.template, prompt, settings))
    final = generate_answers(backend.model, backend.tokenizer, backend.template, [prompt], settings)[0]
    assert pieces[-1] == final and len(final) == 10  # one character a token: the base never stops early
    assert len(pieces) > 5 and all(final.startswith(p) for p in pieces)  # token by token, each a prefix


def test_stop_event_ends_the_generation_early(backend):
    prompt = backend.template.encode_prompt([], QUESTION)
    settings = resolve_settings("greedy", {"max_new_tokens": 2000})
    stop = threading.Event()
    pieces = []
    for piece in stream_answer(backend.model, backend.tokenizer, backend.template, prompt, settings, stop=stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert 3 <= len(pieces[-1]) < 10  # stopped at the next token, not 2000 tokens later
    shorter = dataclasses.replace(settings, max_new_tokens=len(pieces[-1]))
    full = generate_answers(backend.model, backend.tokenizer, backend.template, [prompt], shorter)[0]
    assert pieces[-1] == full  # the stopped answer is the start of the full one


def test_closing_the_stream_waits_for_the_generation(backend):
    prompt = backend.template.encode_prompt([], QUESTION)
    stream = stream_answer(
        backend.model, backend.tokenizer, backend.template, prompt, resolve_settings("greedy", {"max_new_tokens": 2000})
    )
    next(stream)
    stream.close()  # a page closed mid-answer: the generation thread is stopped and joined
    assert not [t for t in threading.enumerate() if t.name == "generate"]


def test_chat_stream_equals_ask_and_keeps_history(backend):
    settings = resolve_settings("greedy", {"max_new_tokens": 6})
    asked = ChatSession(backend.model, backend.tokenizer, backend.template, settings)
    streamed = ChatSession(backend.model, backend.tokenizer, backend.template, settings)
    with backend.variants["sft"]():
        for query in ("你好", QUESTION):
            answer = asked.ask(query)
            assert list(streamed.stream(query))[-1] == answer
            assert streamed.last_prompt_ids == asked.last_prompt_ids
    assert streamed.history == asked.history and len(streamed.history) == 2


def test_backend_chat_renders_the_prompt_and_returns_the_history(backend):
    settings = backend.settings("greedy", backend.start_knobs())
    views = list(backend.chat([Turn("你好", "一二")], QUESTION, "sft", settings))
    prompt = backend.template.encode_prompt([Turn("你好", "一二")], QUESTION)
    assert views[-1].prompt == backend.tokenizer.decode(prompt, skip_special_tokens=False)
    assert views[-1].prompt.startswith("<s>") and views[-1].prompt.count("Human: ") == 2  # special tokens shown
    assert views[-1].history == [Turn("你好", "一二"), Turn(QUESTION, views[-1].answer)]
    assert len(views[-1].answer) == 8


def test_page_knobs_are_checked_as_on_the_command_line(backend, web_models):
    knobs = backend.start_knobs()
    assert knobs == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 50,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "max_new_tokens": 8,
    }
    assert backend.settings("greedy", knobs) == resolve_settings("greedy", {"max_new_tokens": 8})
    # a knob left at its preset's value is no override: switching to a sampling preset keeps it sampling
    sampled = backend.settings("default", {**backend.preset_knobs("default"), "temperature": 0.9})
    assert sampled == resolve_settings("default", {"temperature": 0.9})
    for key, value in (("temperature", 0.0), ("num_beams", 0), ("top_p", 1.5), ("max_new_tokens", 0)):
        preset = "default" if key in ("temperature", "top_p") else "greedy"
        with pytest.raises(ConfigError) as on_page:
            backend.settings(preset, {**backend.preset_knobs(preset), key: value})
        cli = ["--model_name_or_path", web_models["base"], "--preset", preset, f"--{key}", str(value)]
        with pytest.raises(ConfigError) as on_cli:
            parse_options(ChatOptions, cli)
        assert str(on_page.value) == str(on_cli.value)
    with pytest.raises(ConfigError, match="decodes deterministically, so temperature would be ignored"):
        backend.settings("greedy", {**knobs, "temperature": 0.5})


def test_a_prompt_with_no_room_is_a_config_error(web_models):
    small = load_backend(parse_options(WebOptions, argv(web_models, "--preset", "greedy", "--max_context", "16")))
    with pytest.raises(ConfigError, match="leaves no room to answer in a context of 16 tokens"):
        list(small.chat([], QUESTION * 4, "base", small.start))
    assert not small.lock.locked()  # the page stays usable


def test_compare_streams_each_model_then_scores_like_generate_py_score(backend, web_models):
    settings = backend.settings("greedy", backend.start_knobs())
    views = list(backend.compare(QUESTION, settings))
    final = views[-1]
    rows = compare_models(backend.model, backend.tokenizer, backend.template, [Question(QUESTION)], [settings])
    assert final.answers == {row["model"]: row["answer"] for row in rows}  # the compare command's answers
    assert list(final.answers) == ["base", "sft", "dpo"]
    assert all(view.scores is None for view in views[:-1]) and len(views) > 3 * 2
    scorer = load_reward_scorer(web_models["rm"])
    expected = scorer([Conversation([Turn(QUESTION, answer)]) for answer in final.answers.values()])
    assert list(final.scores.values()) == expected
    assert final.winners() == [max(final.scores, key=final.scores.get)]


def test_requests_hold_the_model_one_at_a_time(backend, monkeypatch):
    events = []
    variants = dict(backend.variants)

    def recording(label, switch):
        @contextlib.contextmanager
        def wrapped():
            events.append(("in", label))
            with switch():
                yield
            events.append(("out", label))

        return wrapped

    monkeypatch.setattr(backend, "variants", {label: recording(label, s) for label, s in variants.items()})
    settings = resolve_settings("greedy", {"max_new_tokens": 30})
    threads = [
        threading.Thread(target=lambda label=label: list(backend.chat([], QUESTION, label, settings, label)))
        for label in ("sft", "dpo", "base")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events) == 6
    assert all(events[i][0] == "in" and events[i + 1] == ("out", events[i][1]) for i in range(0, 6, 2))


def test_stop_reaches_a_request_waiting_for_the_model(backend):
    settings = resolve_settings("greedy", {"max_new_tokens": 8})
    with backend.lock:  # another user's generation holds the model
        views = []
        waiting = threading.Thread(target=lambda: views.extend(backend.chat([], QUESTION, "sft", settings, "me")))
        waiting.start()
        while "me" not in backend._stops:
            threading.Event().wait(0.01)
        backend.stop("me")
    waiting.join()
    assert views == []  # stopped before it started: nothing generated


def test_web_options_are_checked(web_models):
    base = ["--model_name_or_path", web_models["base"]]
    with pytest.raises(ConfigError, match=r"'port' must be in 1..65535, got 70000"):
        parse_options(WebOptions, [*base, "--port", "70000"])
    with pytest.raises(ConfigError, match="web takes one preset"):
        parse_options(WebOptions, [*base, "--preset", "greedy,top_p"])
    with pytest.raises(ConfigError, match="'reward_model' 'missing' is not a folder"):
        parse_options(WebOptions, [*base, "--reward_model", "missing"])
    options = parse_options(WebOptions, base)
    assert (options.host, options.port) == ("127.0.0.1", 7860)  # loopback unless told otherwise


def test_demo_web_config_parses():
    path = REPO / "config/demo/web.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    assert {k for k in config if not k.startswith("_")} <= set(fields_of(WebOptions))
    folders = [config["model_name_or_path"], config["reward_model"], *(a.partition("=")[2] for a in config["adapter"])]
    skip_without_demo(*folders)
    options = parse_options(WebOptions, ["--config", str(path)])
    assert list(options.adapters()) == ["sft", "dpo"] and options.settings()[0].preset == "greedy"


def test_web_without_gradio_names_the_requirements_file(web_models, monkeypatch):
    import generate

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "component.inference.web.page", raising=False)
    with pytest.raises(ConfigError, match=r"generate.py web needs Gradio: pip install -r requirements-web.txt"):
        generate.main(["web", "--model_name_or_path", web_models["base"]])
