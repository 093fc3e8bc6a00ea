"""PPO's value head: a linear layer on the policy's last hidden state, trained with the policy and saved beside
its adapter (`value_head.safetensors`, in the output folder and in every checkpoint, so a resume restores it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"
ATTRIBUTE = "value_head"


class ValueHead(nn.Module):
    """V(s_t) from the hidden state that predicts token t; float32 whatever the decoder's dtype. Starts at 0."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def attach_value_head(model: nn.Module) -> ValueHead:
    """Register a new value head on `model` (before the Trainer wraps it: the optimizer and DDP then see it)."""
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    head = ValueHead(config.get_text_config().hidden_size).to(next(model.parameters()).device)
    setattr(model, ATTRIBUTE, head)
    return head


def value_head_of(model: nn.Module) -> ValueHead | None:
    return getattr(model, ATTRIBUTE, None) if ATTRIBUTE in model._modules else None


def save_value_head(head: ValueHead, folder: str | Path) -> Path:
    path = Path(folder) / VALUE_HEAD_FILE
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}, str(path))
    return path


def load_value_head(head: ValueHead, folder: str | Path) -> None:
    """Load the value head saved in `folder`; a missing file is an error (a PPO checkpoint always has one)."""
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} was not saved by a PPO run")
    head.load_state_dict({k: v.to(head.summary.weight.device) for k, v in load_file(str(path)).items()})
