"""Pairwise data (reward model; DPO next): preference files -> tokenized (chosen, rejected) pairs.

Each side is the conversation rendered by the SFT template, ending with the reply's EOS, so the reward
model scores exactly the tokens a policy trained with the same template produces. A pair that is too long
loses prompt tokens from the left (oldest whole turns first, then the head of what remains, BOS kept);
both replies and their EOS always survive. A pair whose longer reply leaves no room for a prompt token is
dropped and counted as `pair_too_long`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from component.config.training import RewardArguments
from component.data.conversation import Conversation, PreferencePair, Turn
from component.data.pipeline import PreparedData, build_splits, cache_settings, prepare_cached
from component.data.readers import SourceReport, read_preference_file
from component.data.template import Template

# Bump when the pair encoding below changes the cached tokens.
RM_CACHE_VERSION = "1"
TOO_LONG = "pair_too_long"


def read_preference_rows(spec: dict, args: RewardArguments) -> tuple[list[dict], SourceReport]:
    """`build_splits` reader: one file spec -> canonical pair rows (PreferencePair.to_dict()) and its report."""
    pairs, report = read_preference_file(
        spec["path"], spec["format"] or args.data_format, skip_bad_records=args.skip_bad_records
    )
    return [pair.to_dict() for pair in pairs], report


@dataclass
class EncodedReplies:
    """Token ids of one prompt followed by each reply (prompt cut alike for all), and whether it was cut."""

    sequences: list[list[int]]
    truncated: bool


def _prompt_and_reply(turns: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    prompt = [token for p, r in turns[:-1] for token in p + r] + turns[-1][0]
    return prompt, turns[-1][1]


def encode_replies(
    template: Template,
    history: list[Turn],
    prompt: str,
    replies: list[str],
    system: str | None,
    max_seq_length: int | None,
) -> EncodedReplies | None:
    """Render (history, prompt, reply) for each reply, each at most max_seq_length tokens; None if impossible."""

    def render(kept_history: list[Turn]) -> list[tuple[list[int], list[int]]]:
        sides = [template.encode_turns(Conversation([*kept_history, Turn(prompt, r)], system)) for r in replies]
        return [_prompt_and_reply(turns) for turns in sides]

    sides = render(history)
    if max_seq_length is None:
        return EncodedReplies([p + r for p, r in sides], False)
    longest = max(len(p) + len(r) for p, r in sides)
    if longest <= max_seq_length:
        return EncodedReplies([p + r for p, r in sides], False)

    # Whole turns first: estimate how many oldest turns to drop from the full rendering, then re-render
    # (the first kept turn gains BOS / system), dropping one more while it still does not fit.
    turn_lengths = [len(p) + len(r) for p, r in template.encode_turns(Conversation(history, system))] if history else []
    drop, excess = 0, longest - max_seq_length
    while drop < len(history) and excess > 0:
        excess -= turn_lengths[drop]
        drop += 1
    while True:
        sides = render(history[drop:])
        if max(len(p) + len(r) for p, r in sides) <= max_seq_length:
            return EncodedReplies([p + r for p, r in sides], True)
        if drop >= len(history):
            break
        drop += 1

    # No history left and the current prompt alone is too long: keep its tail (and BOS), cut alike on both
    # sides so that the replies are judged against the same prompt.
    bos = [template.tokenizer.bos_token_id]
    keep_bos = all(prompt_ids[:1] == bos for prompt_ids, _ in sides)
    room = max_seq_length - max(len(reply_ids) for _, reply_ids in sides) - int(keep_bos)
    if room < 1:  # not even one prompt token fits next to the longer reply
        return None
    sequences = []
    for prompt_ids, reply_ids in sides:
        body = prompt_ids[int(keep_bos) :]
        sequences.append(bos * keep_bos + body[max(len(body) - room, 0) :] + reply_ids)
    return EncodedReplies(sequences, True)


def encode_pair(template: Template, pair: PreferencePair, max_seq_length: int | None) -> EncodedReplies | None:
    return encode_replies(
        template, pair.history, pair.prompt, [pair.chosen, pair.rejected], pair.system, max_seq_length
    )


def rm_tokenize_function(template: Template, max_seq_length: int) -> Callable:
    """Batched `datasets.map` function: pair rows -> chosen_input_ids, rejected_input_ids, length, truncated.

    `length` is chosen + rejected tokens: what a pair puts through the model, so group_by_length groups
    pairs of similar cost and the report's token totals are what training processes. 0 = dropped.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "length": [], "truncated": []}
        for row in zip(*(batch[key] for key in ("system", "history", "prompt", "chosen", "rejected"))):
            pair = PreferencePair.from_dict(dict(zip(("system", "history", "prompt", "chosen", "rejected"), row)))
            encoded = encode_pair(template, pair, max_seq_length)
            chosen, rejected = encoded.sequences if encoded else ([], [])
            out["chosen_input_ids"].append(chosen)
            out["rejected_input_ids"].append(rejected)
            out["length"].append(len(chosen) + len(rejected))
            out["truncated"].append(bool(encoded and encoded.truncated))
        return out

    return tokenize


RM_CACHE_KEYS = ("max_seq_length", "skip_bad_records", "data_format", "max_samples", "test_size")


def prepare_reward_data(args: RewardArguments, template: Template, training_args) -> PreparedData:
    """Read, tokenize and cache preference pairs; the report has the same shape as SFT's."""
    settings = cache_settings("rm", args, template, training_args, RM_CACHE_KEYS, rm_version=RM_CACHE_VERSION)
    tokenize = rm_tokenize_function(template, args.max_seq_length)
    return prepare_cached(
        settings,
        args,
        training_args,
        build=lambda: build_splits(args, settings["seed"], read_preference_rows, tokenize, TOO_LONG),
        label_columns=(),
    )
