"""train_rlhf.py's two rollout engines without vLLM: the policy's `generate` and a fake vLLM server (fake_vllm.py)
answer with the same injected completions (some run to max_new_tokens, some end with EOS and junk after it, some
contain the template's stop string, some are EOS alone), so everything after sampling can be compared:

- the update is identical: losses, logged rewards, samples.jsonl and the LoRA weights after 3 steps are equal
  (GRPO, and PPO with its value head);
- the vLLM engine loads the policy's adapter each step under a new name (only its LoRA weights, equal to the
  policy's at that step), unloads the previous one, and asks for each prompt as token ids with the config's
  sampling settings and its own seed;
- a server that dies or hangs mid-run stops the run with a checkpoint of the last finished step and exit code 75;
  resumed with a server again, the run ends on the weights of an uninterrupted one;
- a server serving another base model (or tokenizing otherwise) is refused before training; a copy of our model
  folder elsewhere is accepted;
- `vllm_launch` starts the server from the environment (a fake one here), waits for it, and it is gone after the
  run; a server that fails to start is one line naming its log;
- the vLLM keys are checked before anything loads;
- under torchrun (2 processes) each rank asks for its own prompts from the one server, and the adapter is loaded
  once per step, before any rank asks.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationMixin, TrainerCallback

import train_rlhf
from component.config.errors import EXIT_INTERRUPTED
from component.config.parser import ConfigError
from component.inference.vllm_server import ServerStartError, healthy
from component.train.guards import TrainingInterrupted
from tests.train.fake_vllm import STOP_STRING, FakeVLLM, injected_completion
from tests.train.test_rlhf import rl_args
from tests.utils import REPO, run_torchrun

pytestmark = pytest.mark.slow

GENERATIONS = 4


@pytest.fixture
def fake_server(tiny_llama_dir):
    server = FakeVLLM(tiny_llama_dir).start()
    yield server
    server.stop()


@pytest.fixture
def injected_generate(monkeypatch, demo_tokenizer):
    """The policy's generate answers with `injected_completion`, as transformers would leave it: what follows a
    completed stop string is padding (what follows an EOS stays junk: the cut must ignore it)."""
    eos, pad = demo_tokenizer.eos_token_id, demo_tokenizer.pad_token_id
    stop_ids = demo_tokenizer(STOP_STRING, add_special_tokens=False)["input_ids"]

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, **kwargs):
        rows = []
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            prompt = [token for token, keep in zip(ids, mask) if keep]
            tokens = injected_completion(prompt, row % GENERATIONS, max_new_tokens, eos, stop_ids)[:max_new_tokens]
            if row % GENERATIONS == 2:  # the stop string ends it: transformers pads the rest
                end = 1 + len(stop_ids)
                tokens = tokens[:end] + [pad] * (len(tokens) - end)
            rows.append(tokens)
        return torch.cat([input_ids, torch.tensor(rows, device=input_ids.device)], dim=1)

    monkeypatch.setattr(GenerationMixin, "generate", generate)


class LoraSnapshots(TrainerCallback):
    """The policy's LoRA weights at the start of every step (what the rollout of that step must sample from)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {
            name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name and ".default." in name
        }


def engine_args(tmp_path: Path, model: Path, engine: str, url: str | None = None, **overrides) -> str:
    vllm = {"rollout_engine": "vllm", "vllm_url": url} if engine == "vllm" else {}
    return rl_args(tmp_path, model, num_generations=GENERATIONS, learning_rate=0.01, **vllm, **overrides)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_same_completions_give_the_same_update(tiny_llama_dir, tmp_path, fake_server, injected_generate, algorithm):
    snapshots = LoraSnapshots()
    ours = train_rlhf.main(
        ["--train_args_file", engine_args(tmp_path / "tf", tiny_llama_dir, "transformers", algorithm=algorithm)]
    )
    args = engine_args(tmp_path / "vllm", tiny_llama_dir, "vllm", fake_server.url, algorithm=algorithm)
    served = train_rlhf.main(["--train_args_file", args], callbacks=[snapshots])

    def logged(trainer) -> list[dict]:  # everything but wall times
        return [
            {k: v for k, v in e.items() if not k.startswith("time/") and "runtime" not in k and "per_second" not in k}
            for e in trainer.state.log_history
        ]

    assert logged(served) == logged(ours)
    assert any(e.get("completions/truncated", 0) > 0 for e in logged(ours))  # every kind of completion occurred
    for name in ("samples.jsonl",) + (("value_head.safetensors",) if algorithm == "ppo" else ()):
        assert (tmp_path / "vllm/out" / name).read_bytes() == (tmp_path / "tf/out" / name).read_bytes(), name
    trained, reference = adapter(tmp_path / "vllm/out"), adapter(tmp_path / "tf/out")
    assert trained.keys() == reference.keys()
    for key in reference:
        assert torch.equal(trained[key], reference[key]), key
    assert any(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)  # the policy did move

    # one adapter per step, under a new name, the previous unloaded; exactly the policy's weights at that step
    loads = [body for path, body in fake_server.requests if path == "/v1/load_lora_adapter"]
    unloads = [body["lora_name"] for path, body in fake_server.requests if path == "/v1/unload_lora_adapter"]
    names = [body["lora_name"] for body in loads]
    assert len(names) == len(set(names)) == 3 and names[0].endswith("-step0") and unloads == names[:-1]
    for step, (name, loaded) in enumerate(fake_server.loaded):
        policy = {k.replace(".default", ""): v for k, v in snapshots.steps[step].items()}
        assert loaded["tensors"].keys() == policy.keys()  # LoRA weights only: no reference adapter, no value head
        for key, tensor in loaded["tensors"].items():
            assert torch.equal(tensor, policy[key]), (name, key)
    # prompts as token ids, the config's sampling, one seed per prompt, the template's stops
    completions = [body for path, body in fake_server.requests if path == "/v1/completions"]
    assert len(completions) == 3 * 4  # 3 steps x 4 prompts
    assert {body["model"] for body in completions[:4]} == {names[0]}
    first = completions[0]
    assert first["n"] == GENERATIONS and first["max_tokens"] == 6 and first["temperature"] == 0.7
    assert first["top_k"] == 50 and first["top_p"] == 1.0 and first["repetition_penalty"] == 1.0
    assert first["stop_token_ids"] == [2] and first["stop"] == [STOP_STRING] and first["ignore_eos"] is True
    assert len({body["seed"] for body in completions}) == len(completions)


def test_a_server_that_dies_stops_the_run_with_a_checkpoint_and_resume_finishes_it(
    tiny_llama_dir, tmp_path, fake_server
):
    straight_server = FakeVLLM(tiny_llama_dir).start()
    try:
        train_rlhf.main(
            [
                "--train_args_file",
                engine_args(tmp_path / "straight", tiny_llama_dir, "vllm", straight_server.url, max_steps=4),
            ]
        )
    finally:
        straight_server.stop()

    args = engine_args(tmp_path / "broken", tiny_llama_dir, "vllm", fake_server.url, max_steps=4)
    fake_server.die_after = 2 * 4  # two rollouts of 4 prompts, then the server is gone
    with pytest.raises(TrainingInterrupted, match=r"at step 2; saved .*checkpoint-2\. Restart the server") as caught:
        train_rlhf.main(["--train_args_file", args])
    assert caught.value.exit_code == EXIT_INTERRUPTED == 75
    assert "cannot be reached" in str(caught.value)
    assert (tmp_path / "broken/out/checkpoint-2/checkpoint_complete.json").is_file()
    assert not (tmp_path / "broken/out/adapter_model.safetensors").exists()  # not finished

    again = FakeVLLM(tiny_llama_dir).start()
    try:
        train_rlhf.main(["--train_args_file", args, "--vllm_url", again.url, "--resume_from_checkpoint", "true"])
    finally:
        again.stop()
    straight, resumed = adapter(tmp_path / "straight/out"), adapter(tmp_path / "broken/out")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


def test_torchrun_ranks_share_one_server_and_one_adapter_per_step(tiny_llama_dir, tmp_path, fake_server):
    args = engine_args(tmp_path, tiny_llama_dir, "vllm", fake_server.url, max_steps=2)
    run_torchrun(REPO / "train_rlhf.py", "--train_args_file", args, timeout=600)
    assert (tmp_path / "out/adapter_model.safetensors").is_file()

    names = [body["lora_name"] for path, body in fake_server.requests if path == "/v1/load_lora_adapter"]
    assert len(names) == len(set(names)) == 2  # once per step, not once per rank
    order = [(path, body) for path, body in fake_server.requests if path != "/tokenize"]
    for step, name in enumerate(names):
        loaded_at = next(i for i, (path, body) in enumerate(order) if body.get("lora_name") == name)
        asked = [(i, tuple(body["prompt"])) for i, (path, body) in enumerate(order) if body.get("model") == name]
        assert len(asked) == 2 * 4, step  # 2 ranks x 4 prompts, each rank its own
        assert len({prompt for _, prompt in asked}) == len(asked), step  # no prompt asked by both ranks
        assert min(i for i, _ in asked) > loaded_at, step  # no rank asked before its step's adapter was there


def test_a_server_that_hangs_stops_the_run(tiny_llama_dir, tmp_path, fake_server):
    fake_server.delay = 3
    args = engine_args(tmp_path, tiny_llama_dir, "vllm", fake_server.url, vllm_timeout=1)
    with pytest.raises(TrainingInterrupted, match="did not answer within 1 s at step 0; no step had finished"):
        train_rlhf.main(["--train_args_file", args])


def test_a_server_of_another_model_is_refused_before_training(tiny_llama_dir, tmp_path, demo_tokenizer):
    from component.demo_assets import build_tiny_model
    from tests.utils import TINY_LLAMA

    other = build_tiny_model(tmp_path / "other", config=TINY_LLAMA, seed=5, tokenizer=demo_tokenizer)
    server = FakeVLLM(tiny_llama_dir, root=other).start()
    try:
        with pytest.raises(ConfigError, match="serves .*other.*not this run's model_name_or_path"):
            train_rlhf.main(["--train_args_file", engine_args(tmp_path / "a", tiny_llama_dir, "vllm", server.url)])
        assert not [path for path, _ in server.requests if path != "/tokenize"]  # nothing loaded, nothing asked
        server.root = str(tmp_path / "copy")  # the same weights in another folder: the same model
        shutil.copytree(tiny_llama_dir, server.root)
        args = engine_args(tmp_path / "b", tiny_llama_dir, "vllm", server.url, max_steps=1)
        assert train_rlhf.main(["--train_args_file", args]).state.global_step == 1
        server.tokenizer = FakeTokenizer(server.tokenizer)
        with pytest.raises(ConfigError, match="tokenizes differently"):
            train_rlhf.main(["--train_args_file", engine_args(tmp_path / "c", tiny_llama_dir, "vllm", server.url)])
    finally:
        server.stop()


class FakeTokenizer:
    """Another tokenizer: every id shifted by one."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        return {"input_ids": [i + 1 for i in self.tokenizer(text, **kwargs)["input_ids"]]}

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def fake_environment(folder: Path, server_script: str) -> Path:
    """A vLLM environment whose `bin/python` runs the watchdog with this Python and `server_script` as vLLM."""
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\nexec {sys.executable} {server_script} "$@"\n',
        encoding="utf-8",
    )
    python.chmod(0o755)
    return folder


def test_vllm_launch_starts_the_server_and_stops_it(tiny_llama_dir, tmp_path, capsys):
    venv = fake_environment(tmp_path / "venv", str(Path(__file__).with_name("fake_vllm.py")))
    args = engine_args(tmp_path, tiny_llama_dir, "vllm", max_steps=1, vllm_launch=True, vllm_venv=str(venv))
    trainer = train_rlhf.main(["--train_args_file", args])
    assert trainer.state.global_step == 1
    log = tmp_path / "out/vllm_server.log"
    assert "fake vLLM for" in log.read_text() and "--enable-lora" in log.read_text()
    output = capsys.readouterr().out  # the recipe logs to stdout
    url = output.split(" answers at ")[1].split()[0]
    assert not healthy(url)  # stopped with the run
    assert f"stopped vLLM's server {url} (log: {log})" in output

    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('ValueError: no such model')\nsys.exit(3)\n", encoding="utf-8")
    venv = fake_environment(tmp_path / "broken_venv", str(broken))
    args = engine_args(tmp_path / "b", tiny_llama_dir, "vllm", vllm_launch=True, vllm_venv=str(venv))
    with pytest.raises(ServerStartError, match=r"exited with code 3 while starting \(ValueError: no such model\)"):
        train_rlhf.main(["--train_args_file", args])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_engine": "vllm"}, "needs either 'vllm_url'"),
        ({"rollout_engine": "vllm", "vllm_url": "http://x", "vllm_launch": True}, "needs either 'vllm_url'"),
        ({"vllm_url": "http://127.0.0.1:8000"}, "'vllm_url' needs 'rollout_engine': \"vllm\""),
        ({"rollout_engine": "vllm", "vllm_url": "127.0.0.1:8000"}, "must start with http://"),
        ({"rollout_engine": "vllm", "vllm_url": "http://x", "vllm_args": ["--x"]}, "only applies with 'vllm_launch'"),
        (
            {"rollout_engine": "vllm", "vllm_url": "http://x", "generation_preset": "beam", "temperature": None},
            "cannot sample with num_beams 4",
        ),
        ({"rollout_engine": "vllm", "vllm_launch": True, "vllm_venv": "/nonexistent"}, "no vLLM environment at"),
        (
            {"rollout_engine": "vllm", "vllm_url": "http://x", "finetuning_type": "full"},
            "trains LoRA/QLoRA adapters; set 'finetuning_type' to lora or qlora",
        ),
    ],
)
def test_vllm_settings_that_cannot_work_name_the_key(tiny_llama_dir, tmp_path, overrides, message):
    with pytest.raises((ConfigError, ServerStartError), match=message):
        train_rlhf.main(["--train_args_file", rl_args(tmp_path, tiny_llama_dir, **overrides)])
