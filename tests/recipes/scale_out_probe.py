"""Run a recipe under torchrun with a callback that records what each rank really holds (sharding proof).

    torchrun ... tests/recipes/scale_out_probe.py train_sft|train_rm --train_args_file ... [--key value ...]
        [--then train_sft|train_rm --train_args_file ... ...]

After the first optimizer step every rank writes `<output_dir>/shards/rank<N>.json`: the elements of the
parameters it stores locally (ZeRO-3: `ds_tensor`, FSDP2: the DTensor's local shard, else the tensor) against
the model's full count, and the bytes of optimizer state it holds.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


def local_and_full_numel(param: torch.Tensor) -> tuple[int, int]:
    if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition (padded to a multiple of the world size)
        return param.ds_tensor.numel(), param.ds_numel
    if hasattr(param, "to_local"):  # FSDP2 DTensor: the local shard
        return param.to_local().numel(), param.numel()
    return param.numel(), param.numel()


def innermost(optimizer):
    """accelerate's / DeepSpeed's wrappers down to the torch optimizer that owns the state."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def state_bytes(optimizer) -> int:
    total = 0
    for state in innermost(optimizer).state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value = value.to_local() if hasattr(value, "to_local") else value
                total += value.numel() * value.element_size()
    return total


class ShardProbe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        local = full = trainable_local = local_bytes = 0
        for param in model.parameters():
            mine, whole = local_and_full_numel(param)
            local, full = local + mine, full + whole
            trainable_local += mine if param.requires_grad else 0
            local_bytes += mine * param.element_size()
        report = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "param_numel_local": local,
            "param_numel_full": full,
            "param_bytes_local": local_bytes,
            "trainable_numel_local": trainable_local,
            "optimizer_state_bytes": state_bytes(optimizer),
        }
        folder = Path(args.output_dir) / "shards"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(report), encoding="utf-8")


def fsdp_on_cpu() -> None:
    """accelerate keeps the FSDP plugin only for accelerator types (MULTI_GPU, ...) and silently drops it on
    MULTI_CPU, so a CPU run would be plain DDP. Promote MULTI_CPU + plugin to FSDP, the state a GPU run is in."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:  # every init re-copies PartialState's type
            self.fsdp_plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
            if self.fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = init


def runs(argv: list[str]) -> list[list[str]]:
    """`recipe args...` lists separated by `--then`: several trainings in one launch share its start-up cost."""
    result = [[]]
    for arg in argv:
        result.append([]) if arg == "--then" else result[-1].append(arg)
    return result


if __name__ == "__main__":
    fsdp_on_cpu()
    for recipe, *argv in runs(sys.argv[1:]):
        importlib.import_module(recipe).main(argv, callbacks=[ShardProbe()])
