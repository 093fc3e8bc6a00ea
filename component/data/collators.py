"""Batches: pad to the longest example, or pack examples padding-free into rows with restarting position_ids;
and pairs (chosen + rejected) as one batch of sequences, padded or packed.

Packed rows carry no attention_mask: transformers (and our Baichuan) read the position_ids restarts and
keep attention inside each example. The first label of every example is set to -100 so that no example
is ever predicted from the one before it. Which of the two a run uses, and the row budget, is decided in
component/train/batching.py (docs/throughput.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from component.data.template import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Pads input_ids with pad_token_id and labels with -100; attention_mask marks real tokens.

    `attention_mask=False` leaves the mask out of right-padded batches for a causal LM: a real token never
    attends to the padding after it, so logits, loss and gradients are unchanged, and SDPA takes its
    is_causal path (no mask built, the upper triangle skipped). Callers that read the mask (the reward
    model's last-token index) keep it.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    sequence_keys: tuple[str, ...] = ("input_ids",)
    attention_mask: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], longest, self.pad_token_id)}
        if self.attention_mask or self.padding_side != "right":
            batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in features], longest, 0)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], longest, IGNORE_INDEX)
        return batch

    def _pad(self, rows: list[list[int]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out


def pack_rows(lengths: list[int], row_tokens: int | Literal["longest"] | None) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most row_tokens tokens.

    `row_tokens=None` puts every example in one row; `"longest"` uses the longest example as the budget. An
    example longer than the budget gets a row of its own.
    """
    if row_tokens is None:
        return [list(range(len(lengths)))]
    if row_tokens == "longest":
        row_tokens = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = min(lengths[index], row_tokens)
        for row, space in enumerate(free):
            if size <= space:
                rows[row].append(index)
                free[row] -= size
                break
        else:
            rows.append([index])
            free.append(row_tokens - size)
    return [sorted(row) for row in rows]


@dataclass
class PackingCollator:
    """Concatenates a batch's examples into rows of at most `row_tokens`, padding-free within a row.

    `row_tokens=None` gives one flat row per batch: the layout varlen kernels need (transformers' flash-attention
    path reads the position_ids restarts only when the batch has a single row). A budget gives several rows,
    which keeps the dense row x row mask of SDPA/eager attention small; `"longest"` makes the budget the batch's
    longest example, so a packed batch never has more positions than the same batch padded, nor more attention
    work than it padded with a mask. Rows of one batch are padded to the longest row with a pad segment (its
    own position_ids from 0, labels -100), which attends only to itself.
    """

    pad_token_id: int
    row_tokens: int | Literal["longest"] | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = pack_rows(lengths, self.row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        has_labels = "labels" in features[0]
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                ids = features[index]["input_ids"]
                end = start + len(ids)
                input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
                position_ids[r, start:end] = torch.arange(len(ids))
                if has_labels:
                    labels[r, start:end] = torch.tensor(features[index]["labels"], dtype=torch.long)
                    labels[r, start] = IGNORE_INDEX  # never predicted from the previous example
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        batch = {"input_ids": input_ids, "position_ids": position_ids}
        if has_labels:
            batch["labels"] = labels
        return batch


@dataclass
class PairCollator:
    """A batch of B pairs as 2B sequences: the B chosen first, then the B rejected.

    Padded: input_ids + attention_mask (the reward model reads it to locate each sequence's last token), right
    padding. Packed: PackingCollator's padding-free rows of at most `row_tokens` (None: one flat row; see
    train.batching.packing_row_tokens), position_ids restarting per sequence, no attention_mask, plus
    `score_index`, the flat (row * width + column) index of each sequence's last token. With labels (DPO:
    `chosen_labels` / `rejected_labels`) the batch also has `labels` and `sequence_ids` (which of the 2B
    sequences each position belongs to, -1 on padding), so per-sequence log-probs can be summed.
    """

    pad_token_id: int
    packing: bool = False
    row_tokens: int | None = None
    attention_mask: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sides = ("chosen", "rejected")
        sequences = [f[f"{side}_input_ids"] for side in sides for f in features]
        rows = [{"input_ids": ids} for ids in sequences]
        with_labels = "chosen_labels" in features[0]
        if with_labels:
            for row, labels in zip(rows, [f[f"{side}_labels"] for side in sides for f in features]):
                row["labels"] = labels
        lengths = [len(ids) for ids in sequences]
        if not self.packing:
            batch = PaddingCollator(pad_token_id=self.pad_token_id, attention_mask=self.attention_mask)(rows)
            width = batch["input_ids"].shape[1]
            last = torch.tensor([i * width + n - 1 for i, n in enumerate(lengths)])
        else:
            batch = PackingCollator(pad_token_id=self.pad_token_id, row_tokens=self.row_tokens)(rows)
            last = batch["score_index"] = packed_last_tokens(lengths, self.row_tokens, batch["position_ids"])
        if with_labels:
            batch["sequence_ids"] = sequence_ids(lengths, last, batch["input_ids"].shape)
        if "ref_chosen_logps" in features[0]:  # reference log-probs computed before training (DPO)
            batch["ref_logps"] = torch.tensor([f[f"ref_{side}_logps"] for side in sides for f in features])
        return batch


def sequence_ids(lengths: list[int], last: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[rows, width]: the index of the sequence each position holds (its flat last-token index known), -1 elsewhere."""
    ids = torch.full((shape[0] * shape[1],), -1, dtype=torch.long)
    for index, (length, end) in enumerate(zip(lengths, last.tolist())):
        ids[end - length + 1 : end + 1] = index
    return ids.view(shape)


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
