"""Scoring with a shared prompt prefix computed once: the few-shot block's KV cache, reused by every question.

Each question of a subject starts with the same description and few-shot examples, most of its prompt. The
prefix runs through the model once (per subject and per model: an adapter changes it); each batch of questions
then runs only its own tokens on top of it, the prefix's keys and values broadcast over the batch and never
copied into a stored cache. Rows are right-padded: a real token attends only to the prefix and to the tokens
before it, so padding changes nothing, and positions continue after the prefix (RoPE and Baichuan's ALiBi both
see the same absolute positions as in one full forward). The LM head runs only at the positions that are scored.

`CachedHFLM` is lm-eval's `HFLM` with its log-likelihoods computed this way wherever the tokens allow it: a
request whose context tokens do not start with its task's prefix tokens (a tokenizer that merges across the
boundary), or that lm-eval would truncate, goes through HFLM's own code and is counted (`full_forward`).
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class _SharedPrefixLayer(DynamicLayer):
    """One layer's prefix keys and values [1, heads, prefix, dim]: a forward sees them followed by its own, for every
    row of its batch; nothing is stored, so the next batch starts from the prefix again."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows = key_states.shape[0]
        keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
        return keys, values


Prefix = list[tuple[torch.Tensor, torch.Tensor]]


def prefix_cache_problem(model) -> str | None:
    """Why a model cannot reuse a prefix this way, or None: sliding-window layers keep only part of it."""
    layers = DynamicCache(config=model.config).layers
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        return "the model has sliding-window attention layers"
    return None


def _base_forward(model):
    get_base = getattr(model, "get_base_model", None)  # a PeftModel passes keyword arguments through
    return (get_base() if get_base else model).forward


class PrefixScorer:
    """Log-softmax rows of a model at chosen positions of token rows that follow a shared prefix."""

    def __init__(self, model, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.keeps_logits = "logits_to_keep" in inspect.signature(_base_forward(model)).parameters

    @torch.inference_mode()
    def encode_prefix(self, ids: list[int]) -> Prefix:
        """The prefix's keys and values, layer by layer."""
        cache = DynamicCache(config=self.model.config)
        extra = {"logits_to_keep": 1} if self.keeps_logits else {}
        self.model(input_ids=torch.tensor([ids], device=self.device), cache=cache, use_cache=True, **extra)
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.inference_mode()
    def log_softmax(
        self, prefix: Prefix | None, rows: list[list[int]], scored: list[int]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, log-softmax [scored[i], vocab]) at the last scored[i] positions of each row (tokens after the prefix),
        batch by batch, longest rows first; each batch's tensors are consumed before the next one runs."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]])
            first = min(len(rows[i]) - scored[i] for i in batch)  # earliest scored position in the batch
            input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
            for b, i in enumerate(batch):
                input_ids[b, : len(rows[i])] = torch.tensor(rows[i], device=self.device)
            kwargs: dict[str, Any] = {"logits_to_keep": width - first} if self.keeps_logits else {}
            if prefix is not None:
                kwargs.update(cache=Cache(layers=[_SharedPrefixLayer(k, v) for k, v in prefix]), use_cache=True)
            else:
                kwargs["use_cache"] = False
            logits = self.model(input_ids=input_ids, **kwargs).logits[:, -(width - first) :]
            log_probs = F.log_softmax(logits, dim=-1)  # in the logits' dtype, as HFLM computes it
            for b, i in enumerate(batch):
                end = len(rows[i]) - first
                yield i, log_probs[b, end - scored[i] : end]


def shared_prefix(contexts: list[str]) -> str:
    """The text every context starts with, cut after its last line break (few-shot blocks end with one), so the
    cut never falls inside a word; "" when they share no whole line."""
    common = os.path.commonprefix(contexts)
    return common[: common.rfind("\n") + 1]


class CachedHFLM(HFLM):
    """lm-eval's HFLM on a loaded model, reusing each task's shared prompt prefix (see the module docstring).

    The model may be a PeftModel whose active adapter the caller switches between runs; `counts` holds, per task,
    the questions (distinct contexts) scored on the prefix cache and those that took HFLM's full forward.
    """

    def __init__(self, model, tokenizer, batch_size: int, max_length: int | None, prefix_cache: bool) -> None:
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, backend="causal"
        )
        self.scorer = PrefixScorer(model, batch_size) if prefix_cache else None
        self._task_prefix: dict[str, tuple[str, str]] = {}  # context -> (task, prefix text)
        self._encoded: OrderedDict[tuple, list[int]] | None = None  # tok_encode's latest results, in one call
        self.counts: dict[str, dict[str, set]] = defaultdict(lambda: {"cached": set(), "full_forward": set()})

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.scorer is not None:
            contexts: dict[str, list[str]] = defaultdict(list)
            for request in requests:
                contexts[request.task_name].append(request.args[0])
            self._task_prefix = {
                context: (task, prefix)
                for task, texts in contexts.items()
                for prefix in [shared_prefix(texts)]
                for context in texts
            }
        # A question's choices come one after another and share its context: tokenized once, not four times.
        self._encoded = OrderedDict()
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encoded = None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        if self._encoded is None or kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        if key not in self._encoded:
            self._encoded[key] = super().tok_encode(string, add_special_tokens, left_truncate_len)
            if len(self._encoded) > 16:
                self._encoded.popitem(last=False)
        return list(self._encoded[key])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.scorer is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_prefix: dict[str, list[int]] = defaultdict(list)
        full: list[int] = []
        prefix_ids: dict[str, list[int]] = {}
        for index, ((context, _), context_ids, continuation_ids) in enumerate(requests):
            task, prefix = self._task_prefix.get(context, (None, ""))
            if task is None:  # not a multiple-choice request of ours (e.g. loglikelihood_rolling)
                full.append(index)
                continue
            if prefix and prefix not in prefix_ids:
                prefix_ids[prefix] = self.tok_encode(prefix)
            ids = prefix_ids.get(prefix, [])
            fits = len(context_ids) + len(continuation_ids) <= self.max_length + 1  # else HFLM cuts from the left
            if prefix and fits and len(ids) < len(context_ids) and context_ids[: len(ids)] == ids:
                by_prefix[prefix].append(index)
                self.counts[task]["cached"].add(context)
            else:
                full.append(index)
                self.counts[task]["full_forward"].add(context)
        for prefix, members in by_prefix.items():
            self._score_on_prefix(prefix_ids[prefix], [requests[i] for i in members], members, results)
        if full:
            rest = super()._loglikelihood_tokens([requests[i] for i in full], disable_tqdm=True)
            for index, result in zip(full, rest):
                results[index] = result
        return results

    def _score_on_prefix(self, prefix: list[int], requests: list, indices: list[int], results: list) -> None:
        """Requests sharing an input (context + continuation minus its last token) share one row, as HFLM's one-token
        continuation cache does: each takes its continuation's positions from that row's log-probs."""
        rows: dict[tuple[int, ...], list[int]] = {}
        for position, (_, context_ids, continuation_ids) in enumerate(requests):
            rows.setdefault(tuple((context_ids + continuation_ids)[len(prefix) : -1]), []).append(position)
        keys = list(rows)
        scored = [max(len(requests[p][2]) for p in rows[key]) for key in keys]
        for row, log_probs in self.scorer.log_softmax(
            self.scorer.encode_prefix(prefix), [list(k) for k in keys], scored
        ):
            for position in rows[keys[row]]:
                continuation = requests[position][2]
                picked = log_probs[-len(continuation) :]
                target = torch.tensor(continuation, device=picked.device)
                greedy = bool((picked.argmax(dim=-1) == target).all())
                results[indices[position]] = (float(picked.gather(1, target[:, None]).sum()), greedy)

    def take_counts(self) -> dict[str, dict[str, int]]:
        """Per task: questions on the prefix cache and on the full forward since the last call."""
        counts = {task: {kind: len(contexts) for kind, contexts in c.items()} for task, c in self.counts.items()}
        self.counts.clear()
        return counts
