"""Prompt data for online RL: any SFT or preference file -> the conversation up to its last user turn, tokenized
as the generation prompt, with the record's reply kept as the reference (for rule rewards such as exact match)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from component.config.training import RLArguments
from component.data.conversation import Turn
from component.data.pipeline import PreparedData, build_splits, cache_settings, prepare_cached
from component.data.readers import DataFormatError, SourceReport, read_preference_file
from component.data.supervised import read_sft_conversations
from component.data.template import Template

PROMPT_CACHE_VERSION = "1"
NO_ROOM = "prompt_leaves_no_room"


def read_prompt_rows(spec: dict, args: RLArguments) -> tuple[list[dict], SourceReport]:
    """`build_splits` reader: {system, history, prompt, reference} rows from an SFT file, or a preference file
    (its chosen reply as the reference)."""
    try:
        conversations, report = read_sft_conversations(spec, args)
    except DataFormatError as error:
        if "preference data" not in str(error):
            raise
        pairs, report = read_preference_file(
            spec["path"], spec["format"] or args.data_format, skip_bad_records=args.skip_bad_records
        )
        rows = [
            {
                "system": p.system or "",
                "history": [vars(t) for t in p.history],
                "prompt": p.prompt,
                "reference": p.chosen,
            }
            for p in pairs
        ]
        return rows, report
    rows = []
    for conversation in conversations:
        *history, last = conversation["turns"]
        rows.append(
            {
                "system": conversation["system"],
                "history": history,
                "prompt": last["user"],
                "reference": last["assistant"],
            }
        )
    return rows, report


def prompt_tokenize_function(template: Template, max_prompt_tokens: int) -> Callable:
    """Batched `datasets.map` function: rows -> prompt_ids, length (0 = no room left to answer: dropped), and the
    conversation columns kept for the rewards (system, history, prompt, reference)."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        kept = ("system", "history", "prompt", "reference")
        out: dict[str, list] = {"prompt_ids": [], "length": [], "truncated": [], **{k: batch[k] for k in kept}}
        for system, history, prompt in zip(batch["system"], batch["history"], batch["prompt"]):
            turns = [Turn(t["user"], t["assistant"]) for t in history]
            ids = template.encode_prompt(turns, prompt, system or None)
            fits = len(ids) <= max_prompt_tokens
            out["prompt_ids"].append(ids if fits else [])
            out["length"].append(len(ids) if fits else 0)
            out["truncated"].append(False)
        return out

    return tokenize


PROMPT_CACHE_KEYS = ("max_seq_length", "max_new_tokens", "skip_bad_records", "data_format", "max_samples", "test_size")


def prepare_prompt_data(args: RLArguments, template: Template, training_args) -> PreparedData:
    """Prompts that leave room for `max_new_tokens` within `max_seq_length`; the others are counted, not trained."""
    settings = cache_settings(
        "rl", args, template, training_args, PROMPT_CACHE_KEYS, prompt_version=PROMPT_CACHE_VERSION
    )
    tokenize = prompt_tokenize_function(template, args.max_seq_length - args.max_new_tokens)
    return prepare_cached(
        settings,
        args,
        training_args,
        build=lambda: build_splits(args, settings["seed"], read_prompt_rows, tokenize, NO_ROOM),
        label_columns=(),
    )


def write_prompts_jsonl(dataset, tokenizer, path: str | Path) -> int:
    """The prompts as JSONL for other RL stacks (OpenRLHF `--input_key prompt`, verl after a parquet conversion):
    `prompt` is the rendered generation prompt (the template applied; special tokens left to the runtime's
    tokenizer), `question` the last user turn, `reference` the record's reply."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in dataset:
            text = tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
            record = {"prompt": text, "question": row["prompt"], "reference": row["reference"]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(dataset)
