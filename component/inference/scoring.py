"""Reward scoring: load a train_rm.py output folder and score (prompt, reply) conversations with it.

Each conversation is rendered by the reward model's own template and pooled at the reply's last token, exactly
as in training (`data.pairwise.encode_replies`, `model.reward_head.sequence_scores`). Front end:
`python generate.py score --reward_model RM --input rows.jsonl --output scores.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from component.config.errors import InputError
from component.config.inference import ScoreOptions
from component.data.collators import PaddingCollator
from component.data.conversation import Conversation, Turn
from component.data.pairwise import encode_replies
from component.data.template import Template, get_template
from component.model.loader import (
    adapter_base,
    check_local_model,
    folder_kind,
    load_for_inference,
    load_tokenizer,
    read_train_args,
    tokenizer_folder,
)
from component.model.reward_head import sequence_scores

logger = logging.getLogger(__name__)

FOLDER_KINDS = {
    "reward_adapter": "a reward-model adapter",
    "reward_model": "a full reward model",
    "sft_adapter": "an SFT (causal-LM) adapter, not a reward model",
    "causal_lm": "a causal-LM model folder (a base or merged model), not a reward model",
    "none": "not a model folder (no adapter_config.json or config.json)",
}

RewardScorer = Callable[[list[Conversation]], list[float]]


def load_reward_model(path: str, base_model: str | None = None, quantization: str | None = None):
    """(model, tokenizer, template name) from a train_rm.py output_dir: a LoRA adapter or a full model.

    The base model and template come from the train_args.json saved there unless `base_model` is given.
    """
    kind = folder_kind(path)
    if kind not in ("reward_adapter", "reward_model"):
        raise InputError(f"'reward_model' {path!r} is {FOLDER_KINDS[kind]}; expected a train_rm.py output_dir")
    saved = read_train_args(path)
    trust_remote_code = bool(saved.get("trust_remote_code", False))
    adapter = kind == "reward_adapter"
    if adapter and base_model is None:
        base_model = adapter_base(path)
    if adapter:
        check_local_model(base_model, f"the base model of reward adapter {path!r} (set --reward_base_model)")
    tokenizer = load_tokenizer(tokenizer_folder(path, base_model), trust_remote_code)
    model = load_for_inference(
        base_model if adapter else path,
        "seq_cls",
        adapter=path if adapter else None,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, tokenizer, saved.get("template", "human_assistant")


def load_reward_scorer(
    path: str,
    base_model: str | None = None,
    quantization: str | None = None,
    batch_size: int = 8,
    max_seq_length: int | None = None,
) -> RewardScorer:
    """conversations -> scores with the reward model of `path`; long prompts are cut as in its training."""
    model, tokenizer, template_name = load_reward_model(path, base_model=base_model, quantization=quantization)
    if quantization is None and isinstance(model, PeftModel):  # frozen: one merged weight per layer, not base + LoRA
        model = model.merge_and_unload()
    if max_seq_length is None:
        max_seq_length = read_train_args(path).get("max_seq_length")

    def score(conversations: list[Conversation]) -> list[float]:
        scores = score_conversations(model, tokenizer, template_name, conversations, batch_size, max_seq_length)
        return [float(s) for s in scores]

    return score


@torch.no_grad()
def score_conversations(
    model: nn.Module,
    tokenizer,
    template: Template | str,
    conversations: list[Conversation],
    batch_size: int = 8,
    max_seq_length: int | None = None,
) -> list[float]:
    """The reward of each conversation's last assistant reply, given everything before it.

    Rendered and pooled exactly as in training. With `max_seq_length`, long prompts are cut as in training;
    a reply that cannot fit at all scores NaN.
    """
    if isinstance(template, str):
        template = get_template(template, tokenizer)
    sequences: list[list[int] | None] = []
    for conversation in conversations:
        last = conversation.turns[-1]
        encoded = encode_replies(
            template, conversation.turns[:-1], last.user, [last.assistant], conversation.system, max_seq_length
        )
        sequences.append(encoded.sequences[0] if encoded else None)
    scores = [math.nan] * len(sequences)
    order = sorted((i for i, s in enumerate(sequences) if s is not None), key=lambda i: -len(sequences[i]))
    collate = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([{"input_ids": sequences[i]} for i in chunk])
        values = sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for i, value in zip(chunk, values.tolist()):
            scores[i] = value
    model.train(was_training)
    if len(order) < len(sequences):
        logger.warning(
            "%d conversations do not fit max_seq_length=%s: scored NaN", len(sequences) - len(order), max_seq_length
        )
    return scores


def _text(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ValueError(f"missing '{key}'")
    if type(value) is not str:
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def conversation_from_row(row: dict) -> Conversation:
    """{prompt, response, history?, system?}; history as [{user, assistant}] or [[user, assistant]].

    ValueError names the field that is missing or of the wrong type.
    """
    history = row.get("history") or []
    if type(history) is not list:
        raise ValueError(f"'history' must be a list of [user, assistant] pairs, got {type(history).__name__}")
    turns = []
    for i, h in enumerate(history):
        if type(h) is dict:
            pair = (h.get("user"), h.get("assistant"))
        elif type(h) in (list, tuple) and len(h) == 2:
            pair = tuple(h)
        else:
            pair = (None, None)
        if not all(type(x) is str for x in pair):
            raise ValueError(f"'history' item {i} must be [user, assistant] or {{user, assistant}} strings, got {h!r}")
        turns.append(Turn(*pair))
    system = _text(row, "system", required=False)
    return Conversation([*turns, Turn(_text(row, "prompt"), _text(row, "response"))], system=system or None)


def read_score_rows(path: str) -> tuple[list[dict], list[Conversation]]:
    """The rows of a JSONL file and their conversations; any bad line is an InputError naming file:line."""
    rows, conversations = [], []
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[: error.start].decode("utf-8", "replace")) + 1
                raise InputError(f"{path}:{n}:{column}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{n}:{error.colno}: not valid JSON: {error.msg}") from None
            if type(row) is not dict:
                raise InputError(
                    f"{path}:{n}: expected a JSON object {{prompt, response, ...}}, got {type(row).__name__}"
                )
            try:
                conversations.append(conversation_from_row(row))
            except ValueError as error:
                raise InputError(f"{path}:{n}: {error}") from None
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows to score")
    return rows, conversations


def score_file(options: ScoreOptions) -> int:
    """Score every row of a JSONL file; write each row with a `score` added. Returns the row count."""
    rows, conversations = read_score_rows(options.input)  # all of it checked before any weights load
    scorer = load_reward_scorer(
        options.reward_model,
        options.reward_base_model,
        options.quantization,
        options.batch_size,
        options.max_seq_length,
    )
    scores = scorer(conversations)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    with open(options.output, "w", encoding="utf-8") as handle:
        for row, value in zip(rows, scores):
            handle.write(json.dumps({**row, "score": value}, ensure_ascii=False) + "\n")
    return len(rows)
