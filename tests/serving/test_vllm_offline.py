"""Opt-in (`make check-vllm`): our exports in vLLM's offline engine give generate.py's greedy tokens.

On tiny models of every kind we serve (the demo-shaped Llama, Qwen2, the four Baichuan variants through our
plugin), with prompts of different lengths in one batch rendered by our template:
- the merged folder (export.py --format hf of base + adapter "a") in vLLM = generate.py on that folder;
- the base with two LoRA adapters unmerged (vLLM's enable_lora, both adapters and the base in one batch) =
  generate.py on the base with `--adapter a=... --adapter b=...`, each adapter switched on in turn.
One vLLM process runs every model (tests/serving/vllm_worker.py); greedy, fp32, eager.
"""

from __future__ import annotations

import pytest

from tests.serving.conftest import CONVERSATIONS, KINDS, MAX_NEW_TOKENS
from tests.serving.references import generate_py
from tests.serving.vllm_env import run_worker


@pytest.fixture(scope="module")
def vllm_answers(served_models, tmp_path_factory) -> dict[str, dict]:
    """kind -> {"merged": (generate.py's answers, vLLM's), "lora": (...)}; vLLM runs once for all kinds."""
    jobs, expected = [], {}
    for kind, served in served_models.items():
        prompts, merged_answers, template = generate_py(served.merged, CONVERSATIONS, MAX_NEW_TOKENS)
        _, lora_answers, _ = generate_py(served.base, CONVERSATIONS, MAX_NEW_TOKENS, served.adapters)
        common = {"prompts": prompts, "max_tokens": MAX_NEW_TOKENS, "stop_token_ids": template.stop_token_ids}
        jobs.append({"model": str(served.merged), **common})
        jobs.append({"model": str(served.base), **common, "adapters": {k: str(v) for k, v in served.adapters.items()}})
        expected[kind] = {"merged": merged_answers["base"], "lora": lora_answers, "prompts": prompts}
    results = iter(run_worker(jobs, tmp_path_factory.mktemp("vllm_offline")))
    return {
        kind: {**expected[kind], "vllm_merged": next(results)["base"], "vllm_lora": next(results)} for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_merged_folder_greedy_tokens_equal_generate_py(kind, vllm_answers):
    answers = vllm_answers[kind]
    assert len({len(prompt) for prompt in answers["prompts"]}) == len(answers["prompts"])  # different lengths
    print(f"\n{kind} merged: vLLM {answers['vllm_merged']}")
    assert answers["vllm_merged"] == answers["merged"]


@pytest.mark.parametrize("kind", KINDS)
def test_two_lora_adapters_on_one_base_equal_generate_py(kind, vllm_answers):
    expected, served = vllm_answers[kind]["lora"], vllm_answers[kind]["vllm_lora"]
    assert set(served) == set(expected) == {"base", "a", "b"}
    assert expected["a"] != expected["base"] and expected["b"] != expected["a"]  # the adapters change the answers
    for name in ("base", "a", "b"):
        assert served[name] == expected[name], name
