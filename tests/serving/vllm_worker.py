"""Runs in vLLM's environment (make vllm-env), started by tests/serving: greedy tokens of token-id prompts.

    VLLM_PYTHON vllm_worker.py JOBS.json RESULTS.json

JOBS.json is a list of {"model": folder, "prompts": [[ids]], "max_tokens": n, "stop_token_ids": [ids], "stop":
[strings], "adapters": {name: adapter folder}}; RESULTS.json gets, per job, {"base": [[ids]], name: [[ids]]}: the
new tokens of each prompt, the base model's and each adapter's (vLLM's LoRA, all adapters in one batch). One
process for every job: vLLM's engine and worker run in it (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"), so
vLLM is imported once. fp32 and eager mode, so that the answers are comparable with PyTorch's token for token.
Imports vLLM only, never this project (its transformers is not ours).
"""

from __future__ import annotations

import gc
import json
import sys


def run_job(job: dict) -> dict[str, list[list[int]]]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters") or {}
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        seed=0,
        max_model_len=job.get("max_model_len", 256),
        max_num_seqs=16,
        distributed_executor_backend="uni",
        enable_lora=bool(adapters),
        max_loras=len(adapters) + 1,  # a spare, empty slot: see lora_slots in tests/serving/vllm_env.py
        max_lora_rank=job.get("max_lora_rank", 8),
    )
    params = SamplingParams(
        temperature=0, max_tokens=job["max_tokens"], stop_token_ids=job["stop_token_ids"], stop=job.get("stop")
    )
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    names = ["base", *adapters]
    requests = [None] + [LoRARequest(name, index, path) for index, (name, path) in enumerate(adapters.items(), 1)]
    # every model's prompts in one batch: vLLM serves several adapters of one base side by side
    outputs = llm.generate(prompts * len(names), params, lora_request=[r for r in requests for _ in prompts])
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    del llm
    gc.collect()
    return {name: tokens[i * len(prompts) : (i + 1) * len(prompts)] for i, name in enumerate(names)}


def main(jobs_file: str, results_file: str) -> None:
    with open(jobs_file, encoding="utf-8") as handle:
        jobs = json.load(handle)
    results = [run_job(job) for job in jobs]
    with open(results_file, "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":  # vLLM starts processes: the guard keeps them from rerunning this
    main(*sys.argv[1:])
