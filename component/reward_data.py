"""Reward-model data: preference files -> tokenized (chosen, rejected) pairs -> batches.

Each side is the conversation rendered by the SFT template, ending with the reply's EOS, so the reward
model scores exactly the tokens a policy trained with the same template produces. A pair that is too long
loses prompt tokens from the left (oldest whole turns first, then the head of what remains, BOS kept);
both replies and their EOS always survive. A pair whose longer reply leaves no room for a prompt token is
dropped and counted as `pair_too_long`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from component.arguments import RewardArguments, data_file_specs
from component.collator import PackingCollator, PaddingCollator, pack_rows
from component.conversation import Conversation, PreferencePair, Turn
from component.dataset import CACHE_VERSION, PreparedData, build_splits, prepare_cached, tokenizer_fingerprint
from component.dataset import _file_fingerprint as file_fingerprint
from component.preference_readers import read_preference_file
from component.readers import SourceReport
from component.template import Template

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


def prepare_reward_data(args: RewardArguments, template: Template, training_args) -> PreparedData:
    """Read, tokenize and cache preference pairs; the report has the same shape as SFT's."""
    settings = {
        "kind": "rm",
        "version": CACHE_VERSION,
        "rm_version": RM_CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(template.tokenizer),
        "template": template.name,
        "train_files": [{**s, **file_fingerprint(s["path"])} for s in data_file_specs(args.train_file, "train_file")],
        "eval_files": [{**s, **file_fingerprint(s["path"])} for s in data_file_specs(args.eval_file, "eval_file")],
        "seed": training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        **{
            key: getattr(args, key)
            for key in ("max_seq_length", "skip_bad_records", "data_format", "max_samples", "test_size")
        },
    }
    tokenize = rm_tokenize_function(template, args.max_seq_length)
    return prepare_cached(
        settings,
        args,
        training_args,
        build=lambda: build_splits(args, settings["seed"], read_preference_rows, tokenize, TOO_LONG),
        label_columns=(),
    )


@dataclass
class PairCollator:
    """A batch of B pairs as 2B sequences: the B chosen first, then the B rejected.

    Padded: input_ids + attention_mask (kept: it locates each sequence's last token), right padding. Packed:
    PackingCollator's padding-free rows of at most `row_tokens` (None: one flat row; see
    training.packing_row_tokens), position_ids restarting per sequence, no attention_mask, plus
    `score_index`, the flat (row * width + column) index of each sequence's last token.
    """

    pad_token_id: int
    packing: bool = False
    row_tokens: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        rows = [{"input_ids": ids} for ids in sequences]
        if not self.packing:
            return PaddingCollator(pad_token_id=self.pad_token_id, attention_mask=True)(rows)
        batch = PackingCollator(pad_token_id=self.pad_token_id, row_tokens=self.row_tokens)(rows)
        batch["score_index"] = packed_last_tokens(
            [len(ids) for ids in sequences], self.row_tokens, batch["position_ids"]
        )
        return batch


def packed_last_tokens(lengths: list[int], row_tokens: int | None, position_ids: torch.Tensor) -> torch.Tensor:
    """Flat index of each sequence's last token in PackingCollator's rows (same pack_rows layout)."""
    width = position_ids.shape[1]
    index = torch.empty(len(lengths), dtype=torch.long)
    for r, row in enumerate(pack_rows(lengths, row_tokens)):
        start = 0
        for i in row:
            end = start + lengths[i] - 1
            index[i] = r * width + end
            start = end + 1
    # The packing layout lives in collator.py; fail loudly if it ever stops matching this one.
    flat = position_ids.reshape(-1)
    if not torch.equal(flat[index], torch.tensor(lengths) - 1):
        raise RuntimeError("PackingCollator's row layout no longer matches pack_rows; update packed_last_tokens")
    return index
