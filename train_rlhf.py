"""Online RLHF recipe: GRPO, RLOO or PPO on a LoRA / QLoRA policy against our reward model and rule rewards.

    python train_rlhf.py --train_args_file config/rlhf/lora_config.json [--key value ...]
    sh run.sh train_rlhf.py config/rlhf/lora_config.json          # torchrun: each rank samples for its own prompts

Steps: read the train args (SFT's keys + algorithm, rewards, sampling, rollout engine) -> load the tokenizer and
template -> read the prompts (any SFT or preference file: the conversation up to its last user turn; write
data_report.json / data_preview.jsonl, prompts.jsonl) -> [stop here with --dry_run true] -> open the rollout engine
(the policy's generate, or a vLLM server: `vllm_url`, or started with `vllm_launch` and stopped at the end) -> load
the policy (a new LoRA or `adapter_name_or_path` continued; the reference shares its base) and the reward model
(once) -> train with RLTrainer (sample, with vLLM from the policy's adapter loaded into the server each step; score,
advantages, clipped loss; PPO's value head) -> save the adapter (+ PPO's value_head.safetensors), tokenizer,
metrics, samples.jsonl and training_loss.png.
See docs/rlhf.md.
"""

from __future__ import annotations

import logging
import sys

from component.config.training import RLArguments, check_usage_early

if __name__ == "__main__":  # --help and a missing train-args file answer before torch loads
    check_usage_early(sys.argv[1:], "train_rlhf.py", __doc__, RLArguments)

from transformers import set_seed

from component.config.generation import resolve_settings
from component.config.parser import run_cli, usage
from component.config.training import TRAIN_ARGS_FLAG, recipe_fields
from component.data.prompts import prepare_prompt_data, write_prompts_jsonl
from component.inference.scoring import load_reward_scorer
from component.model.loader import load_model
from component.train.batching import use_packed_attention
from component.train.lm_head import ChunkSize
from component.train.recipe import finish_training, record_data, resolve_resume, start_recipe
from component.train.reference import REFERENCE_ADAPTER
from component.train.rlhf import RLTrainer, load_reward_function
from component.train.rollout import open_rollout_engine

logger = logging.getLogger("train_rlhf")

PLOT_KEYS = ("loss", "rewards/total/mean", "kl", "completions/mean_length")


def main(argv: list[str], callbacks: list | None = None) -> RLTrainer | None:
    args, training_args, lock, tokenizer, template = start_recipe(
        argv, RLArguments, "train_rlhf.py", padding_side="left"
    )

    data = prepare_prompt_data(args, template, training_args)
    record_data(
        args,
        training_args,
        data,
        ("prompt_ids",),
        lambda first: "Example prompt:\n" + tokenizer.decode(first["prompt_ids"], skip_special_tokens=False),
        unit="prompts",
    )
    if training_args.process_index == 0:  # the same prompts for OpenRLHF / verl (docs/rlhf.md)
        write_prompts_jsonl(data.train, tokenizer, f"{training_args.output_dir}/prompts.jsonl")
    if args.dry_run:
        return None

    overrides = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    settings = resolve_settings(args.generation_preset, overrides)
    # the vLLM server (if any) before the policy: on one GPU it needs its share of the memory free when it starts
    with open_rollout_engine(args, training_args, tokenizer, template, settings) as engine:
        set_seed(training_args.seed)
        model = load_model(args, training_args.gradient_checkpointing)
        use_packed_attention(args, model)  # the loss and reference passes run the rollout as one packed row
        reference = "adapter_off"
        if args.adapter_name_or_path:  # KL to the SFT policy being continued, not to the bare base
            model.load_adapter(args.adapter_name_or_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            reference = REFERENCE_ADAPTER
        scorer = None
        if args.reward_model:
            scorer = load_reward_scorer(
                args.reward_model,
                args.reward_base_model,
                args.reward_quantization,
                training_args.per_device_eval_batch_size,
            )
        trainer = RLTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train.add_column("index", list(range(len(data.train)))),
            processing_class=tokenizer,
            callbacks=callbacks,
            on_nonfinite=args.on_nonfinite,
            template=template,
            settings=settings,
            algorithm=args.algorithm,
            num_generations=args.num_generations,
            num_iterations=args.num_iterations,
            beta=args.beta,
            clip_range=args.clip_range,
            scale_rewards=args.scale_rewards,
            gamma=args.gamma,
            lam=args.lam,
            value_clip_range=args.value_clip_range,
            vf_coef=args.vf_coef,
            whiten_rewards=args.whiten_rewards,
            reward_scorer=scorer,
            reward_model_weight=args.reward_model_weight,
            exact_match_weight=args.exact_match_weight,
            reward_function=load_reward_function(args.reward_function) if args.reward_function else None,
            reward_function_weight=args.reward_function_weight,
            mask_truncated_completions=args.mask_truncated_completions,
            truncated_completion_penalty=args.truncated_completion_penalty,
            reference=reference,
            sample_log_steps=args.sample_log_steps,
            chunk=ChunkSize(args.logits_chunk_size, args.logits_chunk_mib),
            rollout_engine=engine,
        )
        result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
        finish_training(trainer, result, PLOT_KEYS, lock=lock)
    return trainer


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], lambda: usage("train_rlhf.py", __doc__, TRAIN_ARGS_FLAG, recipe_fields(RLArguments)))
