"""Train-args files: overrides, and errors that name the key and the valid choices before anything loads."""

from __future__ import annotations

import json

import pytest

from component.config.parser import ConfigError
from component.config.training import build_arguments, data_file_specs, load_arguments, save_resolved


@pytest.fixture()
def base(tmp_path, tiny_llama_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"kind": "k", "input": "q", "target": "a"}\n', encoding="utf-8")
    return {"model_name_or_path": str(tiny_llama_dir), "train_file": str(data), "output_dir": str(tmp_path / "out")}


def test_json_file_then_cli_overrides(tmp_path, base):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**base, "lora_rank": 8, "learning_rate": 1e-4}), encoding="utf-8")
    args, training_args = load_arguments(
        ["--train_args_file", str(path), "--lora_rank", "16", "--num_train_epochs", "2", "--bf16", "false"]
    )
    assert args.lora_rank == 16 and training_args.num_train_epochs == 2 and training_args.learning_rate == 1e-4
    assert training_args.bf16 is False
    assert training_args.report_to == ["tensorboard"]  # our default, a config can change it
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_unknown_key_names_the_closest_valid_key(base):
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak'.*Did you mean 'lora_rank'"):
        build_arguments({**base, "lora_rnak": 8})


def test_wrong_type_names_the_key(base):
    with pytest.raises(ConfigError, match="'lora_rank' must be an integer"):
        build_arguments({**base, "lora_rank": "eight"})
    with pytest.raises(ConfigError, match="'train_on_prompt' must be true or false"):
        build_arguments({**base, "train_on_prompt": "yes please"})


def test_choices_are_listed(base):
    with pytest.raises(ConfigError, match=r"'template' must be one of .*human_assistant.*Did you mean 'chat_template'"):
        build_arguments({**base, "template": "chat_templat"})
    with pytest.raises(ConfigError, match=r"'quantization' must be one of \"4bit\", \"8bit\", null"):
        build_arguments({**base, "quantization": "4-bit"})


def test_impossible_combinations(base):
    with pytest.raises(ConfigError, match="cannot be combined with 'finetuning_type': \"full\""):
        build_arguments({**base, "finetuning_type": "full", "quantization": "4bit"})
    with pytest.raises(ConfigError, match="not a local model folder"):
        build_arguments({**base, "model_name_or_path": "/nonexistent/Baichuan-13B-Base"})
    with pytest.raises(ConfigError, match="'train_file' file .* does not exist"):
        build_arguments({**base, "train_file": ["/nonexistent.jsonl"]})
    with pytest.raises(ConfigError, match="required key 'output_dir'"):
        build_arguments({k: v for k, v in base.items() if k != "output_dir"})


def test_qlora_means_4bit(base):
    args, _ = build_arguments({**base, "finetuning_type": "qlora"})
    assert args.quantization == "4bit"


def test_file_specs_accept_paths_and_objects(base):
    specs = data_file_specs([base["train_file"], {"path": base["train_file"], "max_samples": 3}], "train_file")
    assert [s["max_samples"] for s in specs] == [None, 3]
    with pytest.raises(ConfigError, match="'train_file' entry key 'max_sample' is unknown.*'max_samples'"):
        data_file_specs([{"path": "x", "max_sample": 3}], "train_file")


def test_resolved_config_is_saved(base, tmp_path):
    args, training_args = build_arguments({**base, "lora_rank": 4})
    saved = json.loads(save_resolved(args, training_args, training_args.output_dir).read_text())
    assert saved["lora_rank"] == 4 and saved["output_dir"] == base["output_dir"] and "learning_rate" in saved


def test_resume_true_is_accepted(base):
    _, training_args = build_arguments({**base, "resume_from_checkpoint": True})
    assert training_args.resume_from_checkpoint == "true"
