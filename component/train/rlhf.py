"""Online RL on transformers' Trainer: sample completions, score them, and optimise the clipped objective.

Each batch of prompts becomes a rollout: `num_generations` sampled completions per prompt (from the rollout
engine: the policy's own `generate`, or a vLLM server holding the policy's current adapter; the template's stop
tokens and strings either way, train.rollout), their rewards (the reward model re-renders each
conversation in its own template, plus rule rewards), the policy's and the reference's per-token log-probs, and
the advantages (GRPO: group-normalised; RLOO: leave-one-out with the KL in the reward; PPO: GAE with a value head
trained jointly, the KL as a per-token reward). The loss reuses the rollout for `num_iterations` optimisation
passes (the sampler repeats each global batch). The reference shares the policy's base: the adapter switched
off, or a frozen copy of a continued adapter.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer

from component.config.generation import GenerationSettings
from component.data.conversation import Conversation, Turn
from component.data.template import Template
from component.inference.engine import clean_answer
from component.inference.scoring import RewardScorer
from component.inference.vllm_client import ServerError
from component.model.packed_attention import base_causal_lm
from component.train.batching import attends_per_sequence
from component.train.checkpoints import COMPLETE_MARKER
from component.train.dpo import as_reference, unwrap
from component.train.guards import ReliableTrainerMixin, TrainingInterrupted
from component.train.lm_head import (
    DEFAULT_CHUNK_SIZE,
    ChunkSize,
    OutputHead,
    decoder_hidden_states,
    token_entropies,
    token_logprobs,
)
from component.train.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    kl_per_token,
    leave_one_out_advantages,
    masked_mean,
    sequence_clipped_loss,
    token_rewards,
    whiten,
)
from component.train.rollout import TransformersRollout, VLLMRollout, completion_end, rollout_seed
from component.train.value_head import attach_value_head, load_value_head, save_value_head

SAMPLES_PER_LOG = 4


def load_reward_function(spec: str) -> Callable:
    """'module:function' -> the function; the error names what was not found."""
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward_function {spec!r} cannot be loaded: {error}") from None


class RepeatSampler(Sampler[int]):
    """A seeded shuffle whose every group of `group` indices comes `repeat` times in a row, so each rollout (a
    global batch: per-device batch x processes x accumulation steps) is optimised `repeat` times."""

    def __init__(self, size: int, group: int, repeat: int, seed: int) -> None:
        self.size, self.group, self.repeat, self.seed, self.epoch = size, group, repeat, seed, 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        self.epoch += 1
        for start in range(0, self.size, self.group):
            block = order[start : start + self.group]
            for _ in range(self.repeat):
                yield from block

    def __len__(self) -> int:
        return self.size * self.repeat


class CompletionStats(NamedTuple):
    logps: torch.Tensor  # [N, C] log-probs of the completion tokens, 0 on padding
    entropy: torch.Tensor | None  # [N, C] the policy's entropy at each completion token (no gradient)
    values: torch.Tensor | None  # [N, C] PPO's value of the state before each completion token


def rollout_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states [N, T, H] of a rollout batch (left-padded prompts + right-padded completions).

    Where the model attends per sequence (`sdpa_segments`, a varlen kernel), the rows run as one flat packed row of
    their real tokens, positions restarting per row: no padding work, the same states at every real position
    (zeros at padding, which nothing reads).
    """
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    if not attends_per_sequence(base_causal_lm(model)):
        return decoder_hidden_states(model, inputs)
    real = inputs["attention_mask"].bool()
    flat = {"input_ids": inputs["input_ids"][real][None], "position_ids": inputs["position_ids"][real][None]}
    states = decoder_hidden_states(model, flat)[0]
    return states.new_zeros((*real.shape, states.shape[-1])).index_put((real,), states)


def completion_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk: int | ChunkSize = DEFAULT_CHUNK_SIZE,
    entropy: bool = False,
    value_head: nn.Module | None = None,
    temperature: float = 1.0,
) -> CompletionStats:
    """Per-token log-probs of the completion tokens from one decoder pass, of the logits / `temperature` (the
    distribution sampled from); with `entropy`, the per-token entropy; with a `value_head`, its values on the same
    hidden states. Logits only at completion positions, in chunks."""
    hidden = rollout_hidden_states(model, batch)
    prompt = batch["input_ids"].shape[1] - batch["completion_ids"].shape[1]
    mask = batch["completion_mask"].bool()
    states = hidden[:, prompt - 1 : -1][mask]  # position t predicts token t + 1
    head = dataclasses.replace(OutputHead.of(model), temperature=temperature)
    values = token_logprobs(states, batch["completion_ids"][mask], head, chunk)

    def spread(flat: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)

    entropies = spread(token_entropies(states, head, chunk)) if entropy else None
    state_values = spread(value_head(states)) if value_head is not None else None
    return CompletionStats(spread(values), entropies, state_values)


class RLTrainer(ReliableTrainerMixin, Trainer):
    """GRPO / RLOO / PPO over prompt batches (rows of `data.prompts`); see the module docstring."""

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        template: Template,
        settings: GenerationSettings,
        algorithm: str = "grpo",
        num_generations: int = 4,
        num_iterations: int = 1,
        beta: float = 0.04,
        clip_range: float = 0.2,
        scale_rewards: bool = True,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_clip_range: float = 0.2,
        vf_coef: float = 0.1,
        whiten_rewards: bool = False,
        reward_scorer: RewardScorer | None = None,
        reward_model_weight: float = 1.0,
        exact_match_weight: float = 0.0,
        reward_function: Callable | None = None,
        reward_function_weight: float = 1.0,
        mask_truncated_completions: bool = False,
        truncated_completion_penalty: float = 0.0,
        reference: str | nn.Module = "adapter_off",
        sample_log_steps: int = 10,
        chunk: int | ChunkSize = DEFAULT_CHUNK_SIZE,
        rollout_engine: TransformersRollout | VLLMRollout | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_collator", list)
        self.value_head = attach_value_head(kwargs["model"]) if algorithm == "ppo" else None
        super().__init__(*args, **kwargs)
        self.template, self.settings, self.algorithm = template, settings, algorithm
        self.num_generations, self.num_iterations, self.beta, self.clip_range = (
            num_generations,
            num_iterations,
            beta,
            clip_range,
        )
        self.scale_rewards, self.reference, self.sample_log_steps = scale_rewards, reference, sample_log_steps
        self.gamma, self.lam, self.value_clip_range, self.vf_coef = gamma, lam, value_clip_range, vf_coef
        self.whiten_rewards = whiten_rewards
        self.reward_scorer, self.reward_model_weight = reward_scorer, reward_model_weight
        self.exact_match_weight = exact_match_weight
        self.reward_function, self.reward_function_weight = reward_function, reward_function_weight
        self.mask_truncated_completions = mask_truncated_completions
        self.truncated_completion_penalty = truncated_completion_penalty
        self.chunk = chunk
        self.temperature = settings.temperature if settings.do_sample else 1.0  # log-probs of what is sampled
        self.model_accepts_loss_kwargs = False
        self.label_names = []
        self.rollout_engine = rollout_engine or TransformersRollout(self.processing_class, template, settings)
        self._rollouts: dict[tuple, dict] = {}
        self._rollout_seconds = 0.0
        self._logged: dict[str, list[float]] = defaultdict(list)

    # --- the sampler: each global batch num_iterations times ------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        dataset = dataset if dataset is not None else self.train_dataset
        args = self.args
        group = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return RepeatSampler(len(dataset), group, self.num_iterations, args.seed)

    # --- rollouts -------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, rows):
        if not isinstance(rows, list):  # evaluation of tensors, nothing of ours
            return super()._prepare_inputs(rows)
        key = tuple(row["index"] for row in rows)
        if key not in self._rollouts:
            if len(self._rollouts) >= self.args.gradient_accumulation_steps:
                self._rollouts.clear()  # a new global batch: the previous rollouts are done
            started = time.perf_counter()
            self._rollouts[key] = self.rollout(rows)
            self._rollout_seconds += time.perf_counter() - started
        return self._rollouts[key]

    def training_step(self, model, inputs, num_items_in_batch=None):
        started, rollouts_before = time.perf_counter(), self._rollout_seconds
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the loss's forward and backward: the step's time less the rollout that _prepare_inputs ran inside it
        self._logged["time/loss_s"].append(time.perf_counter() - started - (self._rollout_seconds - rollouts_before))
        return loss

    # --- the rollout engine: synced, asked, and stopped with a checkpoint when its server fails -------------------
    def _agreed_failure(self, error: ServerError | None) -> str | None:
        """Every rank learns whether a vLLM request failed on any rank (one all-reduce; also a barrier, so no rank
        asks for an adapter before local rank 0 loaded it)."""
        if self.args.world_size == 1 or not torch.distributed.is_initialized():
            return None if error is None else str(error)
        flag = torch.tensor([int(error is not None)], device=self.args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return None
        return str(error) if error is not None else "a vLLM request failed on another rank"

    def _engine_call(self, call, *args):
        """`call(*args)` on the rollout engine; a vLLM server that fails or goes silent stops the run like a signal:
        a checkpoint of the last finished step, then TrainingInterrupted (one line, exit code 75) to resume from."""
        if not isinstance(self.rollout_engine, VLLMRollout):
            return call(*args)
        result = error = None
        try:
            result = call(*args)
        except ServerError as caught:
            error = caught
        failure = self._agreed_failure(error)
        if failure is not None:
            self._stop_on_server_failure(failure)
        return result

    def _stop_on_server_failure(self, failure: str) -> None:
        step = self.state.global_step
        folder = Path(self.args.output_dir) / f"checkpoint-{step}"
        if step == 0:
            saved = "no step had finished, nothing saved"
        else:
            if not (folder / COMPLETE_MARKER).is_file():  # this step's checkpoint may be saved already
                self._save_checkpoint(self.model, trial=None)
            saved = f"saved {folder}"
        self.signal_guard.on_train_end(self.args, self.state, self.control)  # our signal handlers off again
        server = getattr(self.rollout_engine, "server", None)
        log = f" (its log: {server.log})" if server is not None else ""
        raise TrainingInterrupted(
            f"{failure} at step {step}; {saved}. Restart the server{log} and run the same command with "
            "--resume_from_checkpoint true to continue"
        )

    @torch.no_grad()
    def generate(self, rows: list[dict]) -> tuple[torch.Tensor, ...]:
        """(prompt ids left-padded [N, P], prompt mask, completion ids [N, C], completion mask [N, C], ended [N]) for
        N = rows x num_generations, from the rollout engine; each completion ends with its first stop token or the
        token that completed a stop string (kept: the policy learns to stop), or runs to max_new_tokens."""
        device = self.args.device
        tokenizer = self.processing_class
        prompts = [row["prompt_ids"] for row in rows]
        seeds = [
            rollout_seed(self.args.seed, self.state.global_step, len(self._rollouts), self.args.process_index, i)
            for i in range(len(prompts))
        ]
        self.rollout_engine.timings.clear()
        # the engine samples from the policy as it is now (vLLM: its adapter loaded, once per optimizer step)
        self._engine_call(self.rollout_engine.sync, unwrap(self.model), self.state.global_step)
        started = time.perf_counter()
        generated = self._engine_call(
            self.rollout_engine.generate, unwrap(self.model), prompts, self.num_generations, seeds
        )
        self._logged["time/generate_s"].append(time.perf_counter() - started)
        if "adapter_sync" in self.rollout_engine.timings:
            self._logged["time/adapter_sync_s"].append(self.rollout_engine.timings["adapter_sync"])
        stop_ids = set(self.template.stop_token_ids)
        ends = [completion_end(tokens, stop_ids, self.template, tokenizer) for tokens in generated]
        completions = [tokens[:length] for tokens, (length, _) in zip(generated, ends)]
        ended = torch.tensor([done for _, done in ends], device=device)
        lengths = torch.tensor([len(tokens) for tokens in completions], device=device)
        pad = tokenizer.pad_token_id
        width = max(1, int(lengths.max()))
        completion_ids = torch.tensor([t + [pad] * (width - len(t)) for t in completions], device=device)
        completion_mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
        if self.mask_truncated_completions:
            completion_mask = completion_mask * ended[:, None].long()
        rows_prompts = [prompt for prompt in prompts for _ in range(self.num_generations)]
        prompt_width = max(len(p) for p in rows_prompts)
        prompt_ids = torch.tensor([[pad] * (prompt_width - len(p)) + p for p in rows_prompts], device=device)
        prompt_mask = torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p in rows_prompts], device=device)
        return prompt_ids, prompt_mask, completion_ids.masked_fill(completion_mask == 0, pad), completion_mask, ended

    def rewards(self, rows: list[dict], completions: list[str]) -> dict[str, torch.Tensor]:
        """Each reward source's score per completion, and their weighted sum ("total")."""
        expanded = [row for row in rows for _ in range(self.num_generations)]
        scores: dict[str, list[float]] = {}
        if self.reward_scorer is not None:
            conversations = [
                Conversation(
                    [*(Turn(t["user"], t["assistant"]) for t in row["history"]), Turn(row["prompt"], answer)],
                    system=row["system"] or None,
                )
                for row, answer in zip(expanded, completions)
            ]
            scores["reward_model"] = [s if math.isfinite(s) else 0.0 for s in self.reward_scorer(conversations)]
        if self.exact_match_weight:
            scores["exact_match"] = [
                float(answer.strip() == row["reference"].strip()) for row, answer in zip(expanded, completions)
            ]
        if self.reward_function is not None:
            values = self.reward_function(
                [row["prompt"] for row in expanded], completions, [row["reference"] for row in expanded]
            )
            scores["function"] = [float(v) for v in values]
        weights = {
            "reward_model": self.reward_model_weight,
            "exact_match": self.exact_match_weight,
            "function": self.reward_function_weight,
        }
        device = self.args.device
        out = {name: torch.tensor(values, device=device) for name, values in scores.items()}
        out["total"] = sum(weights[name] * out[name] for name in scores)
        return out

    def rollout(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompt_ids, prompt_mask, completion_ids, completion_mask, ended = self.generate(rows)
        tokenizer = self.processing_class
        started = time.perf_counter()
        completions = [clean_answer(ids.tolist(), tokenizer, self.template) for ids in completion_ids]
        rewards = self.rewards(rows, completions)
        self._logged["time/rewards_s"].append(time.perf_counter() - started)
        if self.truncated_completion_penalty:  # completions cut by max_new_tokens lose this much
            rewards["truncated"] = -(~ended).float()
            rewards["total"] = rewards["total"] + self.truncated_completion_penalty * rewards["truncated"]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        batch = {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
        }
        model = self.model
        entropy = values = None
        started = time.perf_counter()
        with torch.no_grad():
            if self.algorithm != "grpo" or self.num_iterations > 1:  # GRPO's one pass: the loss pass is the old policy
                batch["old_logps"], entropy, values = completion_logps(
                    model, batch, self.chunk, True, self.value_head, self.temperature
                )
            if self.beta:  # beta 0: no KL anywhere, so no reference pass (and no `kl` logged), as in TRL
                with as_reference(model, self.reference) as reference:
                    batch["ref_logps"] = completion_logps(
                        reference, batch, self.chunk, temperature=self.temperature
                    ).logps
        self._logged["time/logprobs_s"].append(time.perf_counter() - started)
        if values is not None:
            batch["old_values"] = values
        batch.update(self.advantages(rewards["total"], batch))
        if values is not None:
            self._logged["explained_variance"].append(
                explained_variance(values, batch["returns"], completion_mask).item()
            )
        self.record_rollout(rows, completions, rewards, completion_mask, ended, entropy)
        return batch

    def advantages(self, total: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GRPO: group-normalised; RLOO: leave-one-out of the KL-penalised reward; PPO: GAE on per-token rewards
        (the score on the last token, -beta * KL on each) with the rollout's values, whitened."""
        mask, logps = batch["completion_mask"], batch.get("old_logps")
        ref_logps = batch.get("ref_logps", logps)  # beta 0: the KL terms vanish
        if self.algorithm == "grpo":
            return {"advantages": group_advantages(total, self.num_generations, self.scale_rewards)}
        if self.algorithm == "rloo":
            kl = ((logps - ref_logps) * mask).sum(-1)
            return {"advantages": leave_one_out_advantages(total - self.beta * kl, self.num_generations)}
        rewards = token_rewards(total, logps, ref_logps, mask, self.beta)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, batch["old_values"], mask, self.gamma, self.lam)
        return {"advantages": whiten(advantages, mask) * mask, "returns": returns}

    def record_rollout(self, rows, completions, rewards, completion_mask, ended, entropy) -> None:
        for name, values in rewards.items():
            self._logged[f"rewards/{name}/mean"].append(values.mean().item())
            self._logged[f"rewards/{name}/std"].append(values.std().item() if len(values) > 1 else 0.0)
        lengths = completion_mask.sum(-1).float()
        self._logged["completions/mean_length"].append(lengths.mean().item())
        self._logged["completions/truncated"].append(1 - ended.float().mean().item())
        if entropy is not None:  # else the loss pass logs it
            self._logged["entropy"].append(masked_mean(entropy, completion_mask).item())
        if self.state.global_step % self.sample_log_steps == 0 and self.is_world_process_zero():
            path = Path(self.args.output_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                for index in range(min(SAMPLES_PER_LOG, len(completions))):
                    row = rows[index // self.num_generations]
                    sample = {"step": self.state.global_step, "prompt": row["prompt"], "completion": completions[index]}
                    sample.update({f"reward/{name}": values[index].item() for name, values in rewards.items()})
                    handle.write(json.dumps(sample, ensure_ascii=False) + "\n")

    # --- the loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Where the rollout skipped its policy pass (GRPO, one iteration), this pass also gives the entropy.
        logps, entropy, values = completion_logps(
            model, inputs, self.chunk, "old_logps" not in inputs, self.value_head, self.temperature
        )
        mask = inputs["completion_mask"]
        if entropy is not None:
            self._logged["entropy"].append(masked_mean(entropy, mask).item())
        # One pass per rollout: the rollout's log-probs are these (ratio exactly 1); later passes use the stored ones.
        old = logps.detach() if self.num_iterations == 1 else inputs["old_logps"]
        if self.algorithm == "rloo":
            loss, stats = sequence_clipped_loss(logps, old, inputs["advantages"], mask, self.clip_range), {}
        elif self.algorithm == "ppo":  # the KL is in the per-token reward, not in the loss
            loss, stats = clipped_policy_loss(logps, old, inputs["advantages"], mask, self.clip_range)
            value_loss, stats["value_clip_fraction"] = clipped_value_loss(
                values, inputs["old_values"], inputs["returns"], mask, self.value_clip_range
            )
            stats["value_loss"] = value_loss.detach()
            loss = loss + self.vf_coef * value_loss
        else:
            loss, stats = clipped_policy_loss(
                logps, old, inputs["advantages"], mask, self.clip_range, inputs.get("ref_logps"), self.beta
            )
        if self.algorithm != "grpo" and "ref_logps" in inputs:
            stats["kl"] = masked_mean(kl_per_token(logps.detach(), inputs["ref_logps"]), mask)
        for name, value in stats.items():
            self._logged[name].append(float(value))
        return (loss, {}) if return_outputs else loss

    # --- the value head travels with the adapter and every checkpoint ---------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.value_head is not None:
            save_value_head(self.value_head, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.value_head is not None:
            load_value_head(self.value_head, resume_from_checkpoint)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._logged and "loss" in logs:
            logs = {**logs, **{key: float(np.mean(values)) for key, values in self._logged.items()}}
            self._logged.clear()
        super().log(logs, *args, **kwargs)
