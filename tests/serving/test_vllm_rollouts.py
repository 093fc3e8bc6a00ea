"""Opt-in (`make check-vllm`): train_rlhf.py with `rollout_engine: vllm` on a real vLLM server samples from the
policy it trains. Greedy completions from the server (the policy's adapter as the trainer loaded it) equal, token
for token, those of the policy's own `generate` (the transformers engine) before the first step and after 1 and 3
GRPO steps, and the step-3 answers differ from the step-0 ones (the adapter moved far enough to matter: a server
that kept an old adapter would fail).

For a Llama LoRA policy (the demo tokenizer, human_assistant: a stop token and a stop string) and a Baichuan-13B
one (ALiBi, through our plugin; baichuan_chat, the real Baichuan2 tokenizer). `vllm_launch` starts each server
from the environment (float32, eager: comparable with PyTorch token for token) on a free loopback port; it is
gone after the run.
"""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

import train_rlhf
from component.config.generation import resolve_settings
from component.data.template import get_template
from component.inference.vllm_server import healthy
from component.model.loader import load_tokenizer
from component.train.dpo import unwrap
from component.train.rollout import TransformersRollout, VLLMRollout, completion_end
from tests.serving.conftest import build_base
from tests.serving.vllm_env import VENV, require_vllm
from tests.train.test_rlhf import rl_args
from tests.utils import REPO

CHECKED_STEPS = (0, 1, 3)
QUESTIONS = [json.loads(line)["input"] for line in (REPO / "data/demo/digits_eval.jsonl").open(encoding="utf-8")][:6]
GREEDY_TOKENS = 12


class GreedyProbe(TrainerCallback):
    """At the start of the checked steps: the policy's greedy completions from the server and from `generate`."""

    def __init__(self, engines: list, tokenizer, template) -> None:
        self.engines, self.tokenizer, self.template = engines, tokenizer, template
        self.prompts = [template.encode_prompt([], question) for question in QUESTIONS]
        self.settings = resolve_settings("greedy", {"max_new_tokens": GREEDY_TOKENS})
        self.results: dict[int, tuple[list, list]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step not in CHECKED_STEPS:
            return
        engine = self.engines[-1]
        policy = unwrap(model)
        engine.sync(policy, state.global_step)  # what the step's rollout would load (it is then loaded already)
        greedy = VLLMRollout(engine.client, self.tokenizer, self.template, self.settings, "probe", loads_adapters=False)
        greedy.adapter = engine.adapter
        served = greedy.generate(policy, self.prompts, 1, [0] * len(self.prompts))
        own = TransformersRollout(self.tokenizer, self.template, self.settings).generate(policy, self.prompts, 1, [])
        stops = set(self.template.stop_token_ids)

        def cut(tokens: list[int]) -> list[int]:
            return tokens[: completion_end(tokens, stops, self.template, self.tokenizer)[0]]

        self.results[state.global_step] = ([cut(t) for t in served], [cut(t) for t in own])


@pytest.mark.parametrize("kind", ["llama", "baichuan_13b"])
def test_vllm_rollouts_sample_the_policy_being_trained(kind, tmp_path, demo_tokenizer, monkeypatch, capsys):
    require_vllm()
    base = build_base(tmp_path / "base", kind, demo_tokenizer)
    template_name = json.loads((base / "train_args.json").read_text())["template"]
    tokenizer = load_tokenizer(str(base), padding_side="left")
    template = get_template(template_name, tokenizer)
    engines: list[VLLMRollout] = []
    original_init = VLLMRollout.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if kwargs.get("loads_adapters", True):
            engines.append(self)

    monkeypatch.setattr(VLLMRollout, "__init__", recording_init)
    args = rl_args(
        tmp_path,
        base,
        template=template_name,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        temperature=1.0,
        max_new_tokens=8,
        learning_rate=0.05,
        max_steps=max(CHECKED_STEPS) + 1,
        sample_log_steps=10,
        rollout_engine="vllm",
        vllm_launch=True,
        vllm_venv=str(VENV),
        vllm_dtype="float32",
        vllm_args=["--enforce-eager"],
    )
    probe = GreedyProbe(engines, tokenizer, template)
    trainer = train_rlhf.main(["--train_args_file", args], callbacks=[probe])
    assert trainer.state.global_step == max(CHECKED_STEPS) + 1
    output = capsys.readouterr().out  # the recipe logs to stdout
    url = output.split(" answers at ")[1].split()[0]
    assert not healthy(url)  # stopped with the run
    for step in CHECKED_STEPS:
        served, own = probe.results[step]
        print(f"\n{kind} step {step}: vLLM {served}\n{kind} step {step}: generate {own}")
        assert served == own, step
    assert probe.results[3][1] != probe.results[0][1]  # the adapter changed the greedy answers
