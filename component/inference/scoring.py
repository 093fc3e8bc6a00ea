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
from torch import nn

from component.config.inference import ScoreOptions
from component.data.collators import PaddingCollator
from component.data.conversation import Conversation, Turn
from component.data.pairwise import encode_replies
from component.data.template import Template, get_template
from component.model.loader import (
    adapter_base,
    load_for_inference,
    load_tokenizer,
    read_adapter_config,
    read_train_args,
    tokenizer_folder,
)
from component.model.reward_head import sequence_scores

logger = logging.getLogger(__name__)

RewardScorer = Callable[[list[Conversation]], list[float]]


def load_reward_model(path: str, base_model: str | None = None, quantization: str | None = None):
    """(model, tokenizer, template name) from a train_rm.py output_dir: a LoRA adapter or a full model.

    The base model and template come from the train_args.json saved there unless `base_model` is given.
    """
    saved = read_train_args(path)
    trust_remote_code = bool(saved.get("trust_remote_code", False))
    adapter = read_adapter_config(path) is not None
    if adapter and base_model is None:
        base_model = adapter_base(path)
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


def conversation_from_row(row: dict) -> Conversation:
    """{prompt, response, history?, system?}; history as [{user, assistant}] or [[user, assistant]]."""
    history = [
        Turn(h["user"], h["assistant"]) if isinstance(h, dict) else Turn(str(h[0]), str(h[1]))
        for h in row.get("history") or []
    ]
    return Conversation([*history, Turn(row["prompt"], row["response"])], system=row.get("system") or None)


def score_file(options: ScoreOptions) -> int:
    """Score every row of a JSONL file; write each row with a `score` added. Returns the row count."""
    rows = [
        json.loads(line) for line in Path(options.input).read_text(encoding="utf-8-sig").splitlines() if line.strip()
    ]
    scorer = load_reward_scorer(
        options.reward_model,
        options.reward_base_model,
        options.quantization,
        options.batch_size,
        options.max_seq_length,
    )
    scores = scorer([conversation_from_row(r) for r in rows])
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    with open(options.output, "w", encoding="utf-8") as handle:
        for row, value in zip(rows, scores):
            handle.write(json.dumps({**row, "score": value}, ensure_ascii=False) + "\n")
    return len(rows)
