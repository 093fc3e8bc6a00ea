"""Supervised (SFT) data: conversations -> input_ids and labels (loss on the replies), through the pipeline.

Readers give canonical conversations; `template.encode_batch` renders them and masks everything but the
assistant replies and the token that ends each; `pipeline` reads, splits, caches and reports.
"""

from __future__ import annotations

from collections.abc import Callable

from component.config.training import FinetuneArguments
from component.data.conversation import Conversation
from component.data.pipeline import PreparedData, build_splits, cache_settings, prepare_cached
from component.data.readers import SourceReport, read_sft_file
from component.data.template import IGNORE_INDEX, Template


def read_sft_conversations(spec: dict, args: FinetuneArguments) -> tuple[list[dict], SourceReport]:
    conversations, report = read_sft_file(
        spec["path"],
        spec["format"] or args.data_format,
        skip_bad_records=args.skip_bad_records,
        keep_system_prompt=args.keep_system_prompt,
        safety_scenarios=spec["safety_scenarios"] or args.safety_scenarios,
        moss_tools=args.moss_tools,
    )
    return [c.to_dict() for c in conversations], report


def sft_tokenize_function(template: Template, max_seq_length: int, train_on_prompt: bool) -> Callable:
    """The batched `datasets.map` function: canonical rows -> input_ids, labels, length, truncated."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        conversations = [
            Conversation.from_dict({"system": system, "turns": turns})
            for system, turns in zip(batch["system"], batch["turns"])
        ]
        encoded = template.encode_batch(conversations, max_seq_length, train_on_prompt)
        return {
            "input_ids": [e.input_ids if e else [] for e in encoded],
            "labels": [e.labels if e else [] for e in encoded],
            "length": [len(e.input_ids) if e else 0 for e in encoded],
            "truncated": [bool(e and e.truncated) for e in encoded],
        }

    return tokenize


SFT_CACHE_KEYS = (
    "max_seq_length",
    "train_on_prompt",
    "keep_system_prompt",
    "safety_scenarios",
    "moss_tools",
    "skip_bad_records",
    "data_format",
    "max_samples",
    "test_size",
)


def prepare_sft_data(args: FinetuneArguments, template: Template, training_args) -> PreparedData:
    """Everything between the train-args file and the Trainer's datasets, cached."""
    settings = cache_settings("sft", args, template, training_args, SFT_CACHE_KEYS)
    return prepare_cached(
        settings,
        args,
        training_args,
        build=lambda: _build_sft(args, template, settings["seed"]),
    )


def _build_sft(args: FinetuneArguments, template: Template, seed: int):
    tokenize = sft_tokenize_function(template, args.max_seq_length, args.train_on_prompt)
    return build_splits(args, seed, read_sft_conversations, tokenize, "no_label_after_truncation")


def show_trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode an example with the trained spans between [[ and ]], for a human to check the mask."""
    pieces, current, trained = [], [], False
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained and current:
            text = tokenizer.decode(current, skip_special_tokens=False)
            pieces.append(f"[[{text}]]" if trained else text)
            current = []
        trained = is_trained
        current.append(token)
    if current:
        text = tokenizer.decode(current, skip_special_tokens=False)
        pieces.append(f"[[{text}]]" if trained else text)
    return "".join(pieces)
