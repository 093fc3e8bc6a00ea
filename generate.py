"""Generation front end: chat with a model, compare base and fine-tuned answers side by side, score answers.

    python generate.py chat --model_name_or_path BASE [--adapter OUT] [--preset default] [--quantization 4bit]
    python generate.py compare --model_name_or_path BASE --adapter OUT [--questions data/eval/questions.txt]
        [--references FILE] [--preset greedy,top_p] [--reward_model RM] [--output_dir output/compare]
    python generate.py compare --config config/demo/compare.json [--key value ...]
    python generate.py score --reward_model RM --input rows.jsonl --output scores.jsonl
    python generate.py web --model_name_or_path BASE --adapter sft=OUT [--adapter dpo=OUT ...] [--reward_model RM]
        [--host 127.0.0.1] [--port 7860]        (pip install -r requirements-web.txt)

Presets: default (the original project's sampling: temperature 0.6, top_p 0.8, repetition_penalty 2.0),
greedy, beam, top_k, top_p; --generation_config FILE.json and --key value override their fields. Every option
can live in the --config JSON file; the command line wins. `python generate.py compare --help` lists them all;
docs/generation.md explains them.

chat: one message a line on stdin (scriptable); /reset clears the history, /exit quits.
compare: ONE loaded base model, the adapter switched off (base) and on (SFT); writes report.html, report.md,
answers.jsonl and summary.json to output_dir; --reward_model adds scores and the SFT win rate.
score: each JSONL row ({prompt, response, history?, system?}) written back with the reward model's `score`.
web: a browser page (Gradio) to chat with the base or an adapter, and to compare them all on one question with
the reward model's verdict; docs/generation.md#web.
"""

from __future__ import annotations

import logging
import sys

from component.config.inference import (
    CONFIG_FLAG,
    ChatOptions,
    CompareOptions,
    ScoreOptions,
    WebOptions,
    parse_options,
)
from component.config.parser import ConfigError, fields_of, run_cli, usage

USAGE = (
    "usage: python generate.py {chat,compare,score,web} [--config FILE.json] [--key value ...]  (--help for options)"
)


def chat(options: ChatOptions) -> None:
    from component.inference.backends import load_generator
    from component.inference.chat import ChatSession, OnnxChatSession, chat_loop

    settings = options.settings()
    if len(settings) > 1:
        raise ConfigError("chat takes one preset; compare runs several")
    if len(options.adapters()) > 1:
        raise ConfigError("chat takes one adapter; compare runs several")
    model, tokenizer, template = load_generator(options)
    session_class = OnnxChatSession if options.backend == "onnxruntime" else ChatSession
    session = session_class(model, tokenizer, template, settings[0], options.system, options.max_context)
    print(f"[{settings[0].describe()} | template {template.name}]")
    chat_loop(session, sys.stdin, sys.stdout, "User: " if sys.stdin.isatty() else "", options.show_prompt)


def compare(options: CompareOptions) -> None:
    from component.inference.compare import run_compare
    from component.inference.report import duels, title

    result, paths = run_compare(options)
    for preset, entry in result.summary.items():
        for label, stats in entry["models"].items():
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
            print(f"{preset:>8} {label:>5}: {shown}")
        for label, other, duel in duels(entry):
            print(
                f"{preset:>8}   {title(label)} win rate over {title(other)} by reward: {duel['win_rate']:.1%} "
                f"({duel['wins']} wins, {duel['ties']} ties, {duel['losses']} losses)"
            )
    print(f"Report: {paths['html']}  (also {paths['markdown']}, {paths['answers']})")


def score(options: ScoreOptions) -> None:
    from component.inference.scoring import score_file

    count = score_file(options)
    print(f"scored {count} rows -> {options.output}")


def web(options: WebOptions) -> None:
    if options.backend != "torch":
        raise ConfigError("generate.py web runs --backend torch; an exported ONNX model answers in chat and compare")
    try:
        from component.inference.web.page import serve
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise ConfigError("generate.py web needs Gradio: pip install -r requirements-web.txt") from None
    serve(options)


COMMANDS = {
    "chat": (ChatOptions, chat),
    "compare": (CompareOptions, compare),
    "score": (ScoreOptions, score),
    "web": (WebOptions, web),
}


def main(argv: list[str]) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__ if argv[:1] in (["-h"], ["--help"]) else USAGE)
    options_class, command = COMMANDS[argv[0]]
    command(parse_options(options_class, argv[1:], f"generate.py {argv[0]}"))


def help_text(argv: list[str]) -> str:
    options_class, _ = COMMANDS[argv[0]]
    return usage(f"generate.py {argv[0]}", options_class.__doc__ or "", CONFIG_FLAG, fields_of(options_class))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: help_text(sys.argv[1:]))
