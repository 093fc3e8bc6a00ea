"""`generate.py web` end to end in a real headless browser: Playwright drives Debian's Chromium (no browser
download) against a server this module starts on a free loopback port, over the tiny models of
tests/inference/conftest.py. Every request the page makes outside the server is refused and must not happen.

Screenshots of both tabs go to $WEB_SCREENSHOT_DIR when set (`make web-screenshots` refreshes docs/images).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from component.config.inference import ChatOptions, parse_options
from component.config.parser import ConfigError
from tests.utils import REPO, free_port, opt_in

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUESTION = "把 12 逐位写成汉字"
ANSWER_TOKENS = 12

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=opt_in("Debian's /usr/bin/chromium", "apt-get install chromium (make setup as root)"),
    ),
]


class Server:
    """`generate.py web` in a subprocess; `url()` waits until it answers."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        command = [sys.executable, "generate.py", "web", *argv, "--port", str(self.port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.ready = False

    def url(self, timeout: float = 180) -> str:
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.time() + timeout
        while not self.ready:
            if self.process.poll() is not None or time.time() > deadline:
                pytest.fail("generate.py web did not start:\n" + self.log.read_text(errors="replace")[-3000:])
            try:
                self.ready = urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                time.sleep(0.3)
        return url

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def models_argv(web_models) -> list[str]:
    adapters = ["--adapter", f"sft={web_models['sft']}", "--adapter", f"dpo={web_models['dpo']}"]
    return ["--model_name_or_path", web_models["base"], *adapters, "--reward_model", web_models["rm"]]


@pytest.fixture(scope="module")
def server(models_argv, tmp_path_factory):
    server = Server(
        [*models_argv, "--preset", "greedy", "--max_new_tokens", str(ANSWER_TOKENS)],
        tmp_path_factory.mktemp("web") / "server.log",
    )
    yield server
    server.stop()
    assert server.process.returncode is not None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A fresh Chromium profile; any request that leaves the loopback server is refused and recorded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 800},
        )
        context.outside = []

        def guard(route):
            if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
                route.continue_()
            else:
                context.outside.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        context.set_default_timeout(30_000)
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.goto(server.url())
    page.locator("#message textarea").wait_for()
    yield page
    page.close()
    assert browser.outside == []  # the page works offline: no CDN, fonts, analytics


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("WEB_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


def bot_messages(page) -> list[str]:
    return page.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def set_knob(page, name: str, value) -> None:
    page.locator(f"#knob-{name} input").fill(str(value))
    page.locator(f"#knob-{name} input").blur()


def wait_for_answer(page, count: int, length: int) -> str:
    """The `count`-th answer once it is `length` characters long (one character a token on the tiny models)."""
    page.wait_for_function(
        "([count, length]) => { const m = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
        " return m.length >= count && m[count - 1].innerText.trim().length >= length; }",
        arg=[count, length],
    )
    return bot_messages(page)[count - 1].strip()


@pytest.fixture(scope="module")
def cli_answers(server, web_models) -> list[str]:
    """`generate.py chat` greedy with the sft adapter on two lines of stdin, run in-process while the server
    starts."""
    import generate

    argv = ["chat", "--model_name_or_path", web_models["base"], "--adapter", web_models["sft"], "--preset", "greedy"]
    stdin, sys.stdin = sys.stdin, io.StringIO(f"{QUESTION}\n再见\n")
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            generate.main([*argv, "--max_new_tokens", str(ANSWER_TOKENS)])
    finally:
        sys.stdin = stdin
    lines = out.getvalue().splitlines()
    return [line.removeprefix("Assistant: ") for line in lines if line.startswith("Assistant: ")]


def test_chat_streams_the_same_answers_as_generate_py_chat(cli_answers, page, tmp_path):
    expected = cli_answers
    assert [len(answer) for answer in expected] == [ANSWER_TOKENS, ANSWER_TOKENS]

    send(page, QUESTION)
    assert wait_for_answer(page, 1, ANSWER_TOKENS) == expected[0]
    prompt = page.locator("#rendered-prompt textarea")
    assert prompt.input_value() == f"<s>Human: {QUESTION}\n\nAssistant: "  # special tokens visible
    send(page, "再见")  # the second turn sees the first, as in the CLI session
    assert wait_for_answer(page, 2, ANSWER_TOKENS) == expected[1]
    assert prompt.input_value().count("Human: ") == 2 and expected[0] in prompt.input_value()
    assert page.locator("#message textarea").input_value() == ""
    screenshot(page, "web_chat.png", tmp_path)

    page.locator("#reset").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")
    send(page, QUESTION)
    assert wait_for_answer(page, 1, ANSWER_TOKENS) == expected[0]  # a fresh conversation


def test_compare_shows_one_column_per_model_scored_like_generate_py_score(page, web_models, tmp_path):
    import generate

    page.get_by_role("tab", name="Compare").click()
    page.locator("#question textarea").fill(QUESTION)
    page.locator("#compare").click()
    page.wait_for_function("() => document.querySelector('#score-dpo').innerText.includes('reward')")
    columns = page.locator('[id^="answer-"]')
    assert columns.count() == 3
    titles = [page.locator(f"#answer-{label} label").first.inner_text().strip() for label in ("base", "sft", "dpo")]
    assert titles == ["Base", "Fine-tuned (SFT)", "DPO"]
    answers = {label: page.locator(f"#answer-{label} textarea").input_value() for label in ("base", "sft", "dpo")}
    assert all(len(answer) == ANSWER_TOKENS for answer in answers.values())
    shown = {label: page.locator(f"#score-{label}").inner_text() for label in answers}
    screenshot(page, "web_compare.png", tmp_path)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": QUESTION, "response": a}) + "\n" for a in answers.values()))
    generate.main(["score", "--reward_model", web_models["rm"], "--input", str(rows), "--output", str(tmp_path / "s")])
    scores = [json.loads(line)["score"] for line in (tmp_path / "s").read_text().splitlines()]
    best = max(scores)
    for text, score in zip(shown.values(), scores):
        assert text.startswith(f"reward: {score:.4f}")
        assert ("winner" in text) == (score == best)


def test_stop_ends_a_long_generation_and_keeps_the_partial_answer(page):
    set_knob(page, "max_new_tokens", 3000)
    send(page, QUESTION)
    seen = wait_for_answer(page, 1, 5)  # streamed: text shows while the model still generates
    page.locator("#chat-stop").click()
    stopped_at = time.time()
    answer, previous = bot_messages(page)[0], None
    while answer != previous:  # until it stops growing
        time.sleep(1.0)
        answer, previous = bot_messages(page)[0], answer
    assert seen and len(seen) <= len(answer.strip()) < 3000
    assert time.time() - stopped_at < 10

    set_knob(page, "max_new_tokens", ANSWER_TOKENS)
    send(page, "再见")  # usable again; the stopped answer is part of the history
    assert len(wait_for_answer(page, 2, ANSWER_TOKENS)) == ANSWER_TOKENS
    assert answer.strip() in page.locator("#rendered-prompt textarea").input_value()


def test_bad_settings_and_prompts_show_an_error_and_the_page_stays_usable(page, web_models):
    with pytest.raises(ConfigError) as cli:
        parse_options(
            ChatOptions, ["--model_name_or_path", web_models["base"], "--preset", "greedy", "--num_beams", "0"]
        )
    set_knob(page, "num_beams", 0)
    send(page, QUESTION)
    toast = page.locator(".toast-body").filter(has_text=str(cli.value))
    toast.first.wait_for()
    assert str(cli.value) == "generation settings (greedy): num_beams must be >= 1, got 0"
    assert bot_messages(page) == []

    set_knob(page, "num_beams", 1)
    send(page, "1" * 4100)  # one token a digit: no room left in the 4096-token context
    page.locator(".toast-body").filter(has_text="leaves no room to answer in a context of 4096 tokens").first.wait_for()
    assert bot_messages(page) == []

    send(page, QUESTION)
    assert len(wait_for_answer(page, 1, ANSWER_TOKENS)) == ANSWER_TOKENS
