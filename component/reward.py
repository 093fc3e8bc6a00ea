"""Reward model: pooling, pairwise loss and metrics, the Trainer subclass, loading and scoring.

The model is a stock `AutoModelForSequenceClassification` with `num_labels=1` (a `score` linear head over a
causal LM backbone), so TRL, vLLM and plain transformers load it. Its own forward pools at the rightmost
token that is not `pad_token_id`, which is wrong when pad equals EOS and meaningless for packed rows; we read
the per-token output of the `score` head during the model's forward and pick the last real token ourselves
(from the attention mask, or the collator's `score_index` for packed rows). Going through the top-level
forward keeps DDP's gradient sync and peft's trainable copy of the head in the path.

    python -m component.reward score --model OUTPUT_DIR --input pairs.jsonl --output scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, EvalPrediction, Trainer

from component.collator import PaddingCollator
from component.conversation import Conversation, Turn
from component.model import compute_dtype, device_map_for_this_process, load_tokenizer, quantization_config
from component.reward_data import encode_replies
from component.template import Template, get_template

logger = logging.getLogger(__name__)

SCORE_HEAD = "score"  # Llama, Qwen2, Mistral and our Baichuan name their classification head so


# --- pooling, loss, metrics ------------------------------------------------------------------------
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the rightmost position with attention_mask == 1 (right or left padding, any pad id)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin), in fp32."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def pairwise_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Accuracy (ties count as wrong), mean scores and mean margin of a set of pairs."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return {
        "accuracy": float(np.mean(chosen > rejected)),
        "chosen_score": float(np.mean(chosen)),
        "rejected_score": float(np.mean(rejected)),
        "margin": float(np.mean(chosen - rejected)),
    }


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Trainer hook: predictions are (pairs, 2) = [chosen score, rejected score]."""
    scores = prediction.predictions
    scores = scores[0] if isinstance(scores, tuple) else scores
    return pairwise_metrics(scores[:, 0], scores[:, 1])


def score_head(model: nn.Module) -> nn.Module:
    """The `score` module the model's forward calls (under peft: the wrapper that runs the trainable copy)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = getattr(model, SCORE_HEAD, None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no '{SCORE_HEAD}' head; the reward model expects one")
    return head


def sequence_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    score_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fp32 score per sequence, read at its last real token (see the module docstring)."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    token_scores = captured[-1].squeeze(-1)  # (rows, tokens)
    if score_index is not None:  # packed rows: the collator knows where each sequence ends
        return token_scores.reshape(-1)[score_index].float()
    if attention_mask is None:
        raise ValueError("padded batches need an attention_mask to find each sequence's last token")
    rows = torch.arange(token_scores.shape[0], device=token_scores.device)
    return token_scores[rows, last_token_index(attention_mask).to(token_scores.device)].float()


# --- training ----------------------------------------------------------------------------------------
class RewardTrainer(Trainer):
    """transformers.Trainer with the pairwise loss; batches come from `reward_data.PairCollator`.

    The loss is a mean over the pairs of a micro-batch, so the Trainer divides it by the accumulation
    steps (`loss_is_scaled_for_ga = False`). Evaluation returns (pairs, 2) scores for `compute_metrics`.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, margin: float = 0.0, **kwargs) -> None:
        kwargs.setdefault("compute_metrics", compute_metrics)
        super().__init__(*args, **kwargs)
        self.margin = margin
        self.model_accepts_loss_kwargs = False  # our compute_loss never passes num_items_in_batch on
        self.label_names = []  # no label tensors: prediction_step below makes the metric inputs

    def pair_scores(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sequence_scores(
            model,
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            score_index=inputs.get("score_index"),
        )
        chosen, rejected = scores.chunk(2)  # the collator puts the B chosen first, then the B rejected
        return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self.pair_scores(model, inputs)
        loss = pairwise_loss(chosen, rejected, self.margin)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            chosen, rejected = self.pair_scores(model, inputs)
            loss = pairwise_loss(chosen, rejected, self.margin).detach()
        if prediction_loss_only:
            return loss, None, None
        scores = torch.stack([chosen, rejected], dim=1).detach()
        return loss, scores, torch.zeros(len(chosen), device=scores.device)  # dummy labels: metrics need some


def train_score_head_in_fp32(model: nn.Module) -> None:
    """With 16-bit weights the head copy peft trains would be 16-bit too, and small updates would round away.

    Keep the trained head in fp32 and feed it the hidden states in fp32 (under QLoRA they already are).
    """
    head = score_head(model)
    trained = getattr(head, "modules_to_save", None)
    for module in trained.values() if trained is not None else [head]:
        if any(p.requires_grad for p in module.parameters()) and module.weight.dtype != torch.float32:
            module.float()
            module.register_forward_pre_hook(lambda _module, args: tuple(a.float() for a in args))


# --- loading and scoring ------------------------------------------------------------------------------
def read_train_args(path: str | Path) -> dict:
    file = Path(path) / "train_args.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def load_reward_model(path: str, base_model: str | None = None, quantization: str | None = None):
    """(model, tokenizer, template name) from a train_rm.py output_dir: a LoRA adapter or a full model.

    The base model and template come from the train_args.json saved there unless `base_model` is given.
    """
    folder = Path(path)
    saved = read_train_args(folder)
    trust_remote_code = bool(saved.get("trust_remote_code", False))
    adapter = (folder / "adapter_config.json").is_file()
    if adapter and base_model is None:
        base_model = saved.get("model_name_or_path") or json.loads(
            (folder / "adapter_config.json").read_text(encoding="utf-8")
        ).get("base_model_name_or_path")
    has_tokenizer = any(folder.glob("tokenizer*"))
    tokenizer = load_tokenizer(str(folder if has_tokenizer else base_model), trust_remote_code)
    quantized = quantization_config(quantization)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model if adapter else str(folder),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        quantization_config=quantized,
        dtype=compute_dtype(),
        device_map=device_map_for_this_process(quantized is not None)
        or ({"": 0} if torch.cuda.is_available() else None),
        trust_remote_code=trust_remote_code,
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    return model, tokenizer, saved.get("template", "human_assistant")


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


def score_file(
    model_path: str,
    input_path: str,
    output_path: str,
    base_model: str | None = None,
    quantization: str | None = None,
    batch_size: int = 8,
    max_seq_length: int | None = None,
) -> int:
    """Score every row of a JSONL file; write each row with a `score` added. Returns the row count."""
    rows = [json.loads(line) for line in Path(input_path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    model, tokenizer, template_name = load_reward_model(model_path, base_model, quantization)
    if max_seq_length is None:
        max_seq_length = read_train_args(model_path).get("max_seq_length")
    scores = score_conversations(
        model, tokenizer, template_name, [conversation_from_row(r) for r in rows], batch_size, max_seq_length
    )
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as handle:
        for row, value in zip(rows, scores):
            handle.write(json.dumps({**row, "score": value}, ensure_ascii=False) + "\n")
    return len(rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m component.reward", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score (prompt, response) rows of a JSONL file")
    score.add_argument("--model", required=True, help="train_rm.py output_dir (adapter or full model)")
    score.add_argument("--base_model", help="base model folder; default: model_name_or_path in train_args.json")
    score.add_argument("--input", required=True, help="JSONL rows: prompt, response, optional history / system")
    score.add_argument("--output", required=True, help="JSONL: each input row plus 'score'")
    score.add_argument("--quantization", choices=["4bit", "8bit"], default=None)
    score.add_argument("--batch_size", type=int, default=8)
    score.add_argument("--max_seq_length", type=int, default=None, help="default: the training max_seq_length")
    options = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    count = score_file(
        options.model,
        options.input,
        options.output,
        options.base_model,
        options.quantization,
        options.batch_size,
        options.max_seq_length,
    )
    print(f"scored {count} rows -> {options.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
