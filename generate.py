"""Generation front end: chat with a model, or compare base and fine-tuned answers side by side.

    python generate.py chat --model_name_or_path BASE [--adapter OUT] [--preset default] [--quantization 4bit]
    python generate.py compare --model_name_or_path BASE --adapter OUT [--questions data/eval/questions.txt]
        [--references FILE] [--preset greedy,top_p] [--reward_model RM] [--output_dir output/compare]
    python generate.py compare --config config/demo/compare.json [--key value ...]

Presets: default (the original project's sampling: temperature 0.6, top_p 0.8, repetition_penalty 2.0),
greedy, beam, top_k, top_p; --generation_config FILE.json and --key value override their fields. Every option
can live in the --config JSON file; the command line wins. `python generate.py compare --help` lists them all;
docs/generation.md explains them.

chat: one message a line on stdin (scriptable); /reset clears the history, /exit quits.
compare: ONE loaded base model, the adapter switched off (base) and on (SFT); writes report.html, report.md,
answers.jsonl and summary.json to output_dir; --reward_model adds scores and the SFT win rate.
"""

from __future__ import annotations

import logging
import sys

import component  # noqa: F401  (registers the native Baichuan classes)
from component.arguments import ConfigError
from component.generation import (
    ChatOptions,
    ChatSession,
    CompareOptions,
    chat_loop,
    load_for_generation,
    parse_options,
    run_compare,
)

USAGE = "usage: python generate.py {chat,compare} [--config FILE.json] [--key value ...]  (--help for options)"


def chat(argv: list[str]) -> None:
    options = parse_options(ChatOptions, argv, "generate.py chat")
    settings = options.settings()
    if len(settings) > 1:
        raise ConfigError("chat takes one preset; compare runs several")
    model, tokenizer, template = load_for_generation(options)
    session = ChatSession(model, tokenizer, template, settings[0], options.system, options.max_context)
    print(f"[{settings[0].describe()} | template {template.name}]")
    chat_loop(session, sys.stdin, sys.stdout, "User: " if sys.stdin.isatty() else "", options.show_prompt)


def compare(argv: list[str]) -> None:
    options = parse_options(CompareOptions, argv, "generate.py compare")
    result, paths = run_compare(options)
    for preset, entry in result.summary.items():
        for label, stats in entry["models"].items():
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
            print(f"{preset:>8} {label:>5}: {shown}")
        if "sft_vs_base" in entry:
            duel = entry["sft_vs_base"]
            print(
                f"{preset:>8}   SFT win rate over base by reward: {duel['win_rate']:.1%} "
                f"({duel['wins']} wins, {duel['ties']} ties, {duel['losses']} losses)"
            )
    print(f"Report: {paths['html']}  (also {paths['markdown']}, {paths['answers']})")


def main(argv: list[str]) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    commands = {"chat": chat, "compare": compare}
    if not argv or argv[0] not in commands:
        sys.exit(__doc__ if argv[:1] in (["-h"], ["--help"]) else USAGE)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"config error: {error}")
