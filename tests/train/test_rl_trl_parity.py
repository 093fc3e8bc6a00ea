"""Our GRPO and RLOO against TRL 1.16's GRPOTrainer / RLOOTrainer on the same fixed completions and rewards.

Both trainers run their own rollout step on one batch (3 prompts of different lengths x 4 completions) whose
generation is fixed: the policy's `generate` returns the same completion ids in both (one ends after 2 tokens
with junk after its EOS, one is EOS alone, the rest hit max_new_tokens), and the rewards are fixed per
completion (one group all equal, so its advantages are 0). Then each computes its loss on its rollout and
backpropagates; advantages, per-token log-probs, losses and LoRA gradients must agree (fp32).

Our settings and TRL's that correspond (TRL's defaults except where marked *):
- the batch: ours `per_device_train_batch_size` counts prompts, TRL's counts completions (prompts x
  `num_generations`); one process, no accumulation, so both see the whole rollout in one micro-batch.
- `num_generations`, `beta`, `num_iterations` <-> the same names; `clip_range` <-> `epsilon` (both sides).
- GRPO `scale_rewards` true / false <-> `scale_rewards` "group" / "none" (std + 1e-4 in both).
- GRPO loss: the clipped per-token loss (+ beta * k3 KL) averaged over every completion token of the batch <->
  `loss_type` "dapo" (TRL's default), whose normaliser is then the batch's completion-token count.
- GRPO KL: ours adds beta * k3 as it is <-> * `use_bias_correction_kl=False`. TRL's default (True) multiplies the
  k3 term by the probability ratio: the same loss value at ratio 1, but the gradient gains beta * k3 * d(logp).
- RLOO: the sequence-level clipped ratio, mean over completions; the KL in the reward as
  beta * sum_t (logp_old - logp_ref) <-> RLOOTrainer's defaults (`normalize_advantages` false).
- reference: ours "adapter_off" <-> TRL with `peft_config` (a new adapter; its reference is the adapter off).
- log-probs, KL and entropy: of logits / the sampling `temperature` in both (tested at 1 and 0.7).
- `num_iterations` 2: both keep the rollout's log-probs as the old policy; the LoRA weights are then moved so the
  ratio leaves [0.8, 1.2] on some tokens and the clipping is exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from component.config.generation import resolve_settings
from component.data.template import get_template
from component.train.rlhf import RLTrainer

pytestmark = pytest.mark.slow

QUESTIONS = ["1+1=?", "12+30=?", "7*8=?"]  # prompts of 14, 16 and 14 tokens: left padding in the batch
GENERATIONS = 4
MAX_NEW_TOKENS = 5
REWARDS = [0.5, 1.0, -1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 0.0, 1.0, 0.0, 4.0]  # the second group: all equal
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def fixed_completions(eos: int) -> torch.Tensor:
    completions = torch.randint(
        40, 200, (len(QUESTIONS) * GENERATIONS, MAX_NEW_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    completions[1, 2], completions[1, 3:] = eos, 77  # ends early; what follows its EOS must not count
    completions[5, 0] = eos  # EOS alone
    completions[6, 4] = eos  # ends on the last allowed token
    return completions


def fixed_generate(completions: torch.Tensor, seen: list):
    """A `generate` that answers every batch of prompts with `completions` (and records the prompts it saw)."""

    def generate(input_ids, attention_mask=None, **kwargs):
        seen.append((input_ids.clone(), attention_mask.clone()))
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    return generate


def perturb_lora(model, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def trl_trainer(algorithm, model_dir, tokenizer, prompt_ids, tmp_path, **settings):
    import trl

    config_class, trainer_class = (
        (trl.GRPOConfig, trl.GRPOTrainer) if algorithm == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    )

    class FixedPrompts(trainer_class):
        """TRL's trainer on our template's prompt ids (it would tokenize the prompt text itself)."""

        def _tokenize_prompts(self, prompts):
            return [prompt_ids[QUESTIONS.index(p)] for p in prompts], None, {}

    config = config_class(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(QUESTIONS) * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default bf16 autocast would run on the CPU too; we compare fp32
        gradient_checkpointing=False,
        **settings,
    )
    trainer = FixedPrompts(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=lambda prompts, completions, **kwargs: list(REWARDS),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": QUESTIONS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we do not run
    return trainer


def our_trainer(algorithm, model_dir, tokenizer, template, tmp_path, state_dict, temperature=1.0, **settings):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA))
    model.load_state_dict(state_dict)
    return RLTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "ours"), per_device_train_batch_size=len(QUESTIONS), report_to=[], use_cpu=True
        ),
        train_dataset=Dataset.from_dict({"index": list(range(len(QUESTIONS)))}),
        processing_class=tokenizer,
        template=template,
        settings=resolve_settings("top_k", {"max_new_tokens": MAX_NEW_TOKENS, "temperature": temperature}),
        algorithm=algorithm,
        num_generations=GENERATIONS,
        reward_function=lambda prompts, completions, references: list(REWARDS),
        **settings,
    )


def lora_gradients(model) -> dict[str, torch.Tensor]:
    return {name.replace(".default", ""): p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("algorithm", "beta", "scale_rewards", "num_iterations", "temperature"),
    [
        ("grpo", 0.0, True, 1, 1.0),
        ("grpo", 0.04, True, 1, 1.0),
        ("grpo", 0.04, False, 1, 1.0),
        ("grpo", 0.04, True, 2, 0.7),
        ("rloo", 0.0, True, 1, 1.0),
        ("rloo", 0.05, True, 2, 0.7),
    ],
)
def test_advantages_loss_and_gradients_equal_trl(
    tiny_llama_dir, demo_tokenizer, tmp_path, algorithm, beta, scale_rewards, num_iterations, temperature
):
    template = get_template("human_assistant", demo_tokenizer)
    assert template.stop_token_ids == [demo_tokenizer.eos_token_id]  # TRL stops at EOS
    prompt_ids = [template.encode_prompt([], q) for q in QUESTIONS]
    completions = fixed_completions(demo_tokenizer.eos_token_id)
    shared = {"beta": beta, "num_iterations": num_iterations}
    trl_settings = dict(shared, epsilon=0.2, temperature=temperature)
    if algorithm == "grpo":
        trl_settings.update(scale_rewards="group" if scale_rewards else "none", use_bias_correction_kl=False)

    torch.manual_seed(0)
    theirs = trl_trainer(algorithm, tiny_llama_dir, demo_tokenizer, prompt_ids, tmp_path, **trl_settings)
    assert algorithm == "rloo" or theirs.loss_type == "dapo"
    perturb_lora(theirs.model, seed=1, scale=0.05)  # a policy away from its reference: the KL terms count
    ours = our_trainer(
        algorithm,
        tiny_llama_dir,
        demo_tokenizer,
        template,
        tmp_path,
        theirs.model.state_dict(),
        clip_range=0.2,
        scale_rewards=scale_rewards,
        temperature=temperature,
        **shared,
    )
    seen_theirs, seen_ours = [], []
    theirs.model.generate = fixed_generate(completions, seen_theirs)
    ours.model.generate = fixed_generate(completions, seen_ours)

    theirs.model.train()
    ours.model.train()
    their_batch = theirs._generate_and_score_completions([{"prompt": q} for q in QUESTIONS for _ in range(GENERATIONS)])
    rows = [
        {"index": i, "prompt_ids": p, "prompt": q, "history": [], "system": "", "reference": ""}
        for i, (p, q) in enumerate(zip(prompt_ids, QUESTIONS))
    ]
    our_batch = ours.rollout(rows)

    # The same left-padded prompts went to generate, the same completion tokens count (EOS kept, after it not).
    for (their_ids, their_mask), (our_ids, our_mask) in zip(seen_theirs, seen_ours, strict=True):
        assert torch.equal(their_ids, our_ids) and torch.equal(their_mask, our_mask)
    assert torch.equal(our_batch["completion_ids"], their_batch["completion_ids"])
    assert torch.equal(our_batch["completion_mask"], their_batch["completion_mask"])
    assert our_batch["completion_mask"].sum(-1).tolist()[:8] == [5, 3, 5, 5, 5, 1, 5, 5]

    mask = our_batch["completion_mask"].bool()
    if beta and algorithm == "grpo":  # (TRL's RLOO keeps its reference log-probs inside the rewards only)
        torch.testing.assert_close(
            our_batch["ref_logps"][mask], their_batch["ref_per_token_logps"][mask], rtol=0, atol=2e-6
        )
    their_old = their_batch.get("old_per_token_logps")
    if algorithm == "rloo":
        their_old = their_batch["old_logps"]  # summed per completion
        torch.testing.assert_close((our_batch["old_logps"] * mask).sum(-1), their_old, rtol=0, atol=1e-5)
    elif their_old is not None:
        torch.testing.assert_close(our_batch["old_logps"][mask], their_old[mask], rtol=0, atol=2e-6)
    torch.testing.assert_close(our_batch["advantages"], their_batch["advantages"], rtol=1e-6, atol=1e-6)
    if algorithm == "grpo":
        assert our_batch["advantages"][4:8].abs().max() == 0  # the group of equal rewards

    if num_iterations > 1:  # the second pass over the rollout: the policy has moved since, ratios leave the clip range
        perturb_lora(theirs.model, seed=2, scale=0.3)
        perturb_lora(ours.model, seed=2, scale=0.3)
    their_loss = theirs._compute_loss(theirs.model, their_batch)
    our_loss = ours.compute_loss(ours.model, our_batch)
    if num_iterations > 1:
        assert theirs._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clipped branch is taken
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-7)
    their_loss.backward()
    our_loss.backward()
    their_gradients, our_gradients = lora_gradients(theirs.model), lora_gradients(ours.model)
    assert their_gradients.keys() == our_gradients.keys() and len(our_gradients) == 28
    for name, gradient in our_gradients.items():  # fp32 round-off, relative to the gradient's largest entry
        scale = their_gradients[name].abs().max().item()
        torch.testing.assert_close(
            gradient, their_gradients[name], rtol=0, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_trl_default_kl_bias_correction_changes_only_the_gradient(tiny_llama_dir, demo_tokenizer, tmp_path):
    """What `use_bias_correction_kl=False` above stands for: TRL's default multiplies the k3 KL by the ratio
    (value 1 on the first pass), so its loss equals ours while its gradient differs by beta * k3 * d(logp)."""
    template = get_template("human_assistant", demo_tokenizer)
    prompt_ids = [template.encode_prompt([], q) for q in QUESTIONS]
    completions = fixed_completions(demo_tokenizer.eos_token_id)
    results = {}
    for correction in (False, True):
        torch.manual_seed(0)
        trainer = trl_trainer(
            "grpo", tiny_llama_dir, demo_tokenizer, prompt_ids, tmp_path, beta=0.04, use_bias_correction_kl=correction
        )
        perturb_lora(trainer.model, seed=1, scale=0.05)
        trainer.model.generate = fixed_generate(completions, [])
        trainer.model.train()
        batch = trainer._generate_and_score_completions([{"prompt": q} for q in QUESTIONS for _ in range(GENERATIONS)])
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        results[correction] = (loss.detach(), copy.deepcopy(lora_gradients(trainer.model)))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-7)
    difference = max((results[True][1][n] - g).abs().max().item() for n, g in results[False][1].items())
    assert difference > 1e-5
