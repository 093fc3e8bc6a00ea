"""Where RL rollouts come from (`rollout_engine`): the policy's own `generate` ("transformers"), or a vLLM server
that samples from the policy's current LoRA adapter ("vllm").

Both engines take the same token-id prompts and sampling settings and return each completion's token ids: up to
and including its first stop token, or the token that completed a stop string, or `max_new_tokens` of them
(`completion_end` cuts both the same way). The trainer computes every log-prob, KL and value itself, so the loss
of a batch of completions does not depend on the engine that sampled them.

vLLM's engine loads the adapter being trained into the server whenever the policy has changed (each optimizer
step): saved alone (no reference adapter, no value head) to a temporary folder, loaded under a new name
(`<run>-step<N>`), the previous one unloaded. `open_rollout_engine` connects to `vllm_url` or starts the server
(`vllm_launch`), checks that it serves this run's base model, and stops what it started on every exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from component.config.generation import GenerationSettings
from component.config.training import RLArguments
from component.data.template import Template
from component.inference.answers import stop_strings
from component.inference.engine import generate_kwargs
from component.inference.vllm_client import ServerError, VLLMClient, check_served_model, sampling_fields
from component.inference.vllm_server import ServerStartError, server_environment, start_server, venv_python
from component.model.loader import read_adapter_config

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # peft's name for the adapter being trained (the reference, if any, has its own)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's choices for --max-lora-rank


def completion_end(tokens: list[int], stop_ids: set[int], template: Template, tokenizer) -> tuple[int, bool]:
    """(length, ended) of a completion within `tokens`: through the first stop token, else through the token that
    completed a stop string (what transformers' StopStringCriteria and vLLM's `stop` end on), else all of them."""
    first_stop = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
    if first_stop is not None:
        return first_stop + 1, True
    strings = stop_strings(template)
    if strings and any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in strings):
        for end in range(1, len(tokens) + 1):
            text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            if any(s in text for s in strings):
                return end, True
    return len(tokens), False


def rollout_seed(seed: int, step: int, rollout: int, process: int, prompt: int) -> int:
    """A sampling seed for one prompt's completions that depends only on the run's seed and where it is sampled,
    so a resumed run asks for what the uninterrupted one asked (vLLM gives the i-th completion seed + i)."""
    digest = hashlib.sha256(f"{seed}:{step}:{rollout}:{process}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


class TransformersRollout:
    """Today's engine: the policy's `generate` (KV cache, left-padded batch, transformers' sampling)."""

    name = "transformers"

    def __init__(self, tokenizer, template: Template, settings: GenerationSettings) -> None:
        self.tokenizer, self.template, self.settings = tokenizer, template, settings
        self.timings: dict[str, float] = {}

    def sync(self, model: nn.Module, step: int) -> None:
        """Nothing to do: the policy generates with its own weights."""

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[list[int]], num_generations: int, seeds: list[int]) -> list:
        """`num_generations` completions of each prompt (prompt by prompt), each a list of token ids."""
        rows = [prompt for prompt in prompts for _ in range(num_generations)]
        device = next(model.parameters()).device
        width = max(len(p) for p in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        kwargs = generate_kwargs(self.tokenizer, self.template, self.settings)
        was_training = model.training
        model.eval()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        model.train(was_training)
        return output[:, width:].tolist()

    def close(self) -> None:
        pass


class VLLMRollout:
    """Completions from a vLLM server, sampled with the policy's current adapter (see the module docstring).

    `loads_adapters`: this process saves and loads the adapter (one process per server: local rank 0); the others
    use the name once it is loaded (the trainer makes every rank wait for the load)."""

    name = "vllm"

    def __init__(
        self,
        client: VLLMClient,
        tokenizer,
        template: Template,
        settings: GenerationSettings,
        run_name: str,
        loads_adapters: bool = True,
        server=None,
    ) -> None:
        self.client, self.tokenizer, self.template, self.settings = client, tokenizer, template, settings
        self.fields = sampling_fields(settings, template)
        self.run_name, self.loads_adapters, self.server = run_name, loads_adapters, server
        self.folder = Path(tempfile.mkdtemp(prefix="rl-adapter-")) if loads_adapters else None
        self.adapter: str | None = None
        self.synced_step: int | None = None
        self.timings: dict[str, float] = {}

    def sync(self, model: nn.Module, step: int) -> None:
        """Loads the policy's adapter as it is at optimizer step `step` (once per step)."""
        if step == self.synced_step:
            return
        started = time.perf_counter()
        name = f"{self.run_name}-step{step}"
        if self.loads_adapters:
            folder = self.folder / f"step{step}"
            model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER])  # only the trained LoRA weights
            self.client.load_adapter(name, folder)
            if self.adapter is not None:
                self.client.unload_adapter(self.adapter)
                shutil.rmtree(self.folder / f"step{self.synced_step}", ignore_errors=True)
        self.adapter, self.synced_step = name, step
        self.timings["adapter_sync"] = time.perf_counter() - started

    def generate(self, model: nn.Module, prompts: list[list[int]], num_generations: int, seeds: list[int]) -> list:
        fields = self.fields
        greedy = fields["temperature"] == 0
        n = 1 if greedy else num_generations  # vLLM refuses n > 1 when greedy; the copies are equal anyway
        answers = self.client.complete_all(self.adapter, prompts, fields, n, [None if greedy else s for s in seeds])
        completions = []
        for choices in answers:
            for index in range(num_generations):
                completions.append(choices[0 if greedy else index].token_ids)
        return completions

    def describe(self) -> str:
        where = f" (started by this run, log: {self.server.log})" if self.server is not None else ""
        return f"vLLM server {self.client.url}{where}"

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# --- the recipe's choice -----------------------------------------------------------------------------------------
def lora_rank_slots(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def policy_lora_rank(args: RLArguments) -> int:
    """The largest LoRA rank of the adapter being trained: `lora_rank`, or the continued adapter's own."""
    saved = read_adapter_config(args.adapter_name_or_path) if args.adapter_name_or_path else None
    if not saved:
        return args.lora_rank
    return max([int(saved.get("r", args.lora_rank)), *map(int, (saved.get("rank_pattern") or {}).values())])


def server_arguments(args: RLArguments, training_args) -> list[str]:
    """vLLM server arguments for this run: our base at `vllm_dtype`, sequences of max_seq_length, LoRA of the
    run's rank loaded at runtime (two slots: vLLM 0.32's CPU kernels need one spare, docs/export.md#serving), the
    run's seed, no defaults from the folder's generation_config.json, then `vllm_args`."""
    arguments = [
        "--dtype",
        args.vllm_dtype,
        "--max-model-len",
        str(args.max_seq_length),
        "--seed",
        str(training_args.seed),
    ]
    arguments += ["--enable-lora", "--max-lora-rank", str(lora_rank_slots(policy_lora_rank(args))), "--max-loras", "2"]
    arguments += ["--max-cpu-loras", "2", "--generation-config", "vllm"]
    if args.trust_remote_code:
        arguments.append("--trust-remote-code")
    if torch.cuda.is_available():
        utilization = args.vllm_gpu_memory_utilization or (0.9 if args.vllm_devices else 0.3)
        arguments += ["--gpu-memory-utilization", str(utilization)]
    return arguments + list(args.vllm_args or [])


def _gather(value: Any, training_args) -> list[Any]:
    """Every process's `value` (one per rank), or [value] without torchrun."""
    if training_args.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    values: list[Any] = [None] * training_args.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _launch(args: RLArguments, training_args):
    """Starts this node's server (called on its local rank 0); its log goes in output_dir."""
    node = os.environ.get("GROUP_RANK", "0")
    log = Path(training_args.output_dir) / ("vllm_server.log" if node == "0" else f"vllm_server.node{node}.log")
    extra = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if args.vllm_devices:
        extra["CUDA_VISIBLE_DEVICES"] = args.vllm_devices
    return start_server(
        args.model_name_or_path,
        server_arguments(args, training_args),
        log,
        python=venv_python(args.vllm_venv),
        env=server_environment(**extra),
        timeout=args.vllm_start_timeout,
    )


@contextlib.contextmanager
def open_rollout_engine(
    args: RLArguments, training_args, tokenizer, template: Template, settings: GenerationSettings
) -> Iterator[TransformersRollout | VLLMRollout]:
    """The engine `rollout_engine` names. For vLLM: the server at `vllm_url`, or one started per node by its local
    rank 0 (`vllm_launch`; every rank of the node sends its requests there), checked to serve this run's base
    model (ConfigError otherwise, before any training), and stopped on every way out of this block."""
    if args.rollout_engine == "transformers":
        yield TransformersRollout(tokenizer, template, settings)
        return
    first_on_node = training_args.local_process_index == 0
    server = failure = None
    try:
        if args.vllm_launch and first_on_node:
            try:
                server = _launch(args, training_args)
            except ServerStartError as error:
                failure = str(error)
        url = server.url if server is not None else args.vllm_url
        shared = _gather((socket.gethostname(), first_on_node, url, failure, uuid.uuid4().hex[:8]), training_args)
        problems = [entry[3] for entry in shared if entry[3]]
        if problems:  # every rank stops, not only the one whose server failed
            raise ServerStartError(problems[0])
        if args.vllm_launch:  # this node's server
            url = next(entry[2] for entry in shared if entry[0] == socket.gethostname() and entry[1])
        client = VLLMClient(url, timeout=args.vllm_timeout)
        try:
            check_served_model(client, args.model_name_or_path, tokenizer, args.max_seq_length)
        except ServerError as error:  # before training: an unusable server is a setup error, not an interruption
            raise ServerStartError(str(error)) from None
        engine = VLLMRollout(
            client, tokenizer, template, settings, f"rl-{shared[0][4]}", loads_adapters=first_on_node, server=server
        )
        logger.info("rollouts from the %s", engine.describe())
        try:
            yield engine
        finally:
            engine.close()
    finally:
        if server is not None:
            server.stop()
            logger.info("stopped vLLM's server %s (log: %s)", server.url, server.log)
