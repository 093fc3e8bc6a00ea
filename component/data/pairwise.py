"""Pairwise data (reward model, DPO): preference files -> tokenized (chosen, rejected) pairs.

Each side is the conversation rendered by the SFT template, ending with the reply's EOS, so the reward
model scores exactly the tokens a policy trained with the same template produces. A pair that is too long
loses prompt tokens from the left (oldest whole turns first, then the head of what remains, BOS kept);
both replies and their EOS always survive. A pair whose longer reply leaves no room for a prompt token is
dropped and counted as `pair_too_long`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from component.config.training import FinetuneArguments, RewardArguments
from component.data.conversation import Conversation, PreferencePair, Turn
from component.data.pipeline import PreparedData, build_splits, cache_settings, prepare_cached
from component.data.readers import SourceReport, read_preference_file
from component.data.supervised import show_trained_spans
from component.data.template import IGNORE_INDEX, Template

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
    """Token ids of one prompt followed by each reply (prompt cut alike for all), and whether it was cut.

    `reply_lengths[i]`: the last tokens of `sequences[i]` that are reply i and the token that ends it (its labels).
    """

    sequences: list[list[int]]
    truncated: bool
    reply_lengths: list[int]

    def labels(self, index: int) -> list[int]:
        """Labels of sequence `index`: -100 on the prompt, the token ids on the reply and its end token."""
        sequence = self.sequences[index]
        prompt = len(sequence) - self.reply_lengths[index]
        return [IGNORE_INDEX] * prompt + sequence[prompt:]


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
    reply_lengths = [len(r) for _, r in sides]
    if max_seq_length is None:
        return EncodedReplies([p + r for p, r in sides], False, reply_lengths)
    longest = max(len(p) + len(r) for p, r in sides)
    if longest <= max_seq_length:
        return EncodedReplies([p + r for p, r in sides], False, reply_lengths)

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
            return EncodedReplies([p + r for p, r in sides], True, reply_lengths)
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
    return EncodedReplies(sequences, True, reply_lengths)


def encode_pair(template: Template, pair: PreferencePair, max_seq_length: int | None) -> EncodedReplies | None:
    return encode_replies(
        template, pair.history, pair.prompt, [pair.chosen, pair.rejected], pair.system, max_seq_length
    )


def pair_tokenize_function(template: Template, max_seq_length: int, with_labels: bool = False) -> Callable:
    """Batched `datasets.map` function: pair rows -> chosen_input_ids, rejected_input_ids, length, truncated
    (+ chosen_labels, rejected_labels: -100 on the prompt, for DPO).

    `length` is chosen + rejected tokens: what a pair puts through the model, so group_by_length groups
    pairs of similar cost and the report's token totals are what training processes. 0 = dropped.
    """
    sides = ("chosen", "rejected")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        columns = [f"{side}_input_ids" for side in sides] + ["length", "truncated"]
        columns += [f"{side}_labels" for side in sides] if with_labels else []
        out: dict[str, list] = {column: [] for column in columns}
        for row in zip(*(batch[key] for key in ("system", "history", "prompt", "chosen", "rejected"))):
            pair = PreferencePair.from_dict(dict(zip(("system", "history", "prompt", "chosen", "rejected"), row)))
            encoded = encode_pair(template, pair, max_seq_length)
            for index, side in enumerate(sides):
                out[f"{side}_input_ids"].append(encoded.sequences[index] if encoded else [])
                if with_labels:
                    out[f"{side}_labels"].append(encoded.labels(index) if encoded else [])
            out["length"].append(sum(len(s) for s in encoded.sequences) if encoded else 0)
            out["truncated"].append(bool(encoded and encoded.truncated))
        return out

    return tokenize


PAIR_CACHE_KEYS = ("max_seq_length", "skip_bad_records", "data_format", "max_samples", "test_size")


def prepare_pair_data(args: FinetuneArguments, template: Template, training_args, with_labels: bool) -> PreparedData:
    """Read, tokenize and cache preference pairs (reward model: ids only; DPO: ids and labels)."""
    kind = "dpo" if with_labels else "rm"
    settings = cache_settings(kind, args, template, training_args, PAIR_CACHE_KEYS, rm_version=RM_CACHE_VERSION)
    tokenize = pair_tokenize_function(template, args.max_seq_length, with_labels)
    return prepare_cached(
        settings,
        args,
        training_args,
        build=lambda: build_splits(args, settings["seed"], read_preference_rows, tokenize, TOO_LONG),
        label_columns=("chosen_labels", "rejected_labels") if with_labels else (),
    )


def prepare_reward_data(args: RewardArguments, template: Template, training_args) -> PreparedData:
    """The reward model's pairs: token ids of both sides, no labels."""
    return prepare_pair_data(args, template, training_args, with_labels=False)


def show_pair(tokenizer, pair: dict) -> str:
    """A tokenized DPO pair decoded for a human, the trained spans of each side between [[ and ]]."""
    sides = [
        f"--- {side} ---\n" + show_trained_spans(tokenizer, pair[f"{side}_input_ids"], pair[f"{side}_labels"])
        for side in ("chosen", "rejected")
    ]
    return "Example pair (trained spans in [[ ]]):\n" + "\n".join(sides)
