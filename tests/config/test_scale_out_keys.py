"""The deepspeed / fsdp keys: the non-deprecated FSDP form, and combinations that cannot work stop with the key."""

from __future__ import annotations

import importlib.util
import json

import pytest

from component.config.parser import ConfigError
from component.config.training import build_arguments, load_arguments
from tests.utils import REPO

ZERO2 = str(REPO / "config/deepspeed/zero2.json")
ZERO3 = str(REPO / "config/deepspeed/zero3.json")
FSDP = str(REPO / "config/fsdp/full_shard.json")


@pytest.fixture()
def base(tmp_path, tiny_llama_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"kind": "k", "input": "q", "target": "a"}\n', encoding="utf-8")
    return {"model_name_or_path": str(tiny_llama_dir), "train_file": str(data), "output_dir": str(tmp_path / "out")}


@pytest.mark.parametrize("cli", [False, True])
def test_fsdp_true_with_an_fsdp_config_file_is_fsdp2(tmp_path, base, cli):
    if cli:
        path = tmp_path / "args.json"
        path.write_text(json.dumps(base), encoding="utf-8")
        _, training_args = load_arguments(["--train_args_file", str(path), "--fsdp", "true", "--fsdp_config", FSDP])
    else:
        _, training_args = build_arguments({**base, "fsdp": True, "fsdp_config": FSDP})
    assert training_args.fsdp is True
    assert training_args.fsdp_plugin_args["fsdp_version"] == 2
    assert training_args.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("name, reshard", [("full_shard", True), ("shard_grad_op", False)])
def test_every_shipped_fsdp_config_is_fsdp2(base, name, reshard):
    _, training_args = build_arguments({**base, "fsdp": True, "fsdp_config": str(REPO / f"config/fsdp/{name}.json")})
    assert training_args.fsdp_plugin_args["fsdp_version"] == 2
    assert training_args.fsdp_plugin_args["reshard_after_forward"] is reshard


def test_deepspeed_file_path_from_the_command_line_is_a_path(tmp_path, base):
    path = tmp_path / "args.json"
    path.write_text(json.dumps(base), encoding="utf-8")
    _, training_args = load_arguments(["--train_args_file", str(path), "--deepspeed", ZERO2])
    assert training_args.deepspeed == ZERO2


def test_deepspeed_without_the_package_names_the_key(base, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="'deepspeed' is set but the deepspeed package is not installed"):
        build_arguments({**base, "deepspeed": ZERO2})


@pytest.mark.parametrize("engine", [{"deepspeed": ZERO3}, {"fsdp": True, "fsdp_config": FSDP}])
def test_qlora_sharded_needs_the_4bit_storage_dtype(base, engine):
    with pytest.raises(ConfigError, match="needs 'bnb_4bit_quant_storage': \"bfloat16\""):
        build_arguments({**base, "finetuning_type": "qlora", **engine})
    with pytest.raises(ConfigError, match="'quantization': \"8bit\" cannot be combined with"):
        build_arguments({**base, "quantization": "8bit", **engine})


def test_quant_storage_only_with_4bit(base):
    with pytest.raises(ConfigError, match="'bnb_4bit_quant_storage' only applies to"):
        build_arguments({**base, "bnb_4bit_quant_storage": "bfloat16"})


def test_qlora_under_zero2_needs_no_storage_dtype_and_the_loader_sets_it_when_asked(base):
    args, _ = build_arguments({**base, "finetuning_type": "qlora", "deepspeed": ZERO2})
    assert args.bnb_4bit_quant_storage is None

    import torch

    from component.model.loader import quantization_config

    assert quantization_config("4bit", "bfloat16").bnb_4bit_quant_storage == torch.bfloat16


def test_a_missing_deepspeed_file_names_the_key(base):
    with pytest.raises(ConfigError, match="'deepspeed' file 'nowhere.json' does not exist"):
        build_arguments({**base, "deepspeed": "nowhere.json"})
