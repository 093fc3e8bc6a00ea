"""Opt-in (`make check-vllm`): vLLM's OpenAI-compatible server on our exports, asked with the official `openai`
client, answers as generate.py does.

One server per prompt template we ship (human_assistant on the Llama, the tokenizer's chat_template on Qwen2,
baichuan_chat on Baichuan2-13B through our plugin), each serving a merged folder (export.py --format hf) as
"merged" plus two LoRA adapters as "a" and "b", bound to 127.0.0.1 on a free port and stopped afterwards:
- completions on token-id prompts: generate.py's greedy tokens, for the merged model and each adapter;
- chat completions: the prompt vLLM renders from the messages (the chat_template the export wrote) is our
  template's, token for token, and the answer generate.py's;
- streaming: the streamed pieces add up to the unstreamed answer;
- a burst of every request at once (24, one thread each, on loopback): all answered, each equal to its answer
  alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.serving.conftest import CONVERSATIONS, MAX_NEW_TOKENS
from tests.serving.references import generate_py
from tests.serving.vllm_env import PYTHON, lora_slots, openai_server, vllm_environment

SERVED = ["llama", "qwen2", "baichuan2_13b"]  # one per template: human_assistant, chat_template, baichuan_chat
MODELS = {"merged": "base", "a": "a", "b": "b"}  # served name -> generate.py's label
CLIENT = Path(__file__).with_name("openai_client.py")


def messages(history, question, system) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*turns, {"role": "user", "content": question}]


@pytest.fixture(scope="module", params=SERVED)
def exchange(request, served_models, tmp_path_factory) -> dict:
    """Starts the server for one kind, sends every request through openai_client.py, stops the server."""
    served = served_models[request.param]
    prompts, expected, template = generate_py(served.merged, CONVERSATIONS, MAX_NEW_TOKENS, served.adapters)
    common = {"max_tokens": MAX_NEW_TOKENS, "stop_token_ids": template.stop_token_ids}
    completions = [
        {"api": "completions", "model": model, "prompt": prompt, **common} for model in MODELS for prompt in prompts
    ]
    chats = [
        {"api": "chat", "model": model, "messages": messages(*conversation), **common}
        for model in MODELS
        for conversation in CONVERSATIONS
    ]
    streamed = [{**chat, "stream": True} for chat in chats if chat["model"] == "a"]
    workdir = tmp_path_factory.mktemp(f"server_{request.param}")
    (workdir / "requests.json").write_text(
        json.dumps({"alone": completions + chats + streamed, "burst": completions + chats}), encoding="utf-8"
    )
    arguments = ["--served-model-name", "merged", "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    arguments += ["--max-model-len", "256", "--max-num-seqs", "16", "--enable-lora", "--max-lora-rank", "8"]
    arguments += [
        "--max-loras",
        str(lora_slots(2)),
        "--lora-modules",
        *(f"{name}={path}" for name, path in served.adapters.items()),
    ]
    with openai_server(served.merged, *arguments, log=workdir / "server.log") as base_url:
        command = [str(PYTHON), str(CLIENT), base_url, str(workdir / "requests.json"), str(workdir / "responses.json")]
        result = subprocess.run(command, env=vllm_environment(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    responses = json.loads((workdir / "responses.json").read_text(encoding="utf-8"))
    alone = iter(responses["alone"])
    return {
        "kind": request.param,
        "prompts": prompts,
        "expected": expected,
        "completions": [next(alone) for _ in completions],
        "chats": [next(alone) for _ in chats],
        "streamed": [next(alone) for _ in streamed],
        "burst": responses["burst"],
        "requests": completions + chats,
    }


def by_model(responses: list[dict]) -> dict[str, list[dict]]:
    """Responses in request order (model by model, prompt by prompt) -> served name: responses per prompt."""
    count = len(CONVERSATIONS)
    return {model: responses[i * count : (i + 1) * count] for i, model in enumerate(MODELS)}


def test_completions_equal_generate_py(exchange):
    for model, responses in by_model(exchange["completions"]).items():
        tokens = [response["token_ids"] for response in responses]
        print(f"\n{exchange['kind']} {model}: completions {tokens}")
        assert tokens == exchange["expected"][MODELS[model]], model
        assert all(response["finish_reason"] in ("stop", "length") for response in responses)


def test_chat_prompt_is_our_template_token_for_token(exchange):
    for model, responses in by_model(exchange["chats"]).items():
        assert [response["prompt_token_ids"] for response in responses] == exchange["prompts"], model
        assert [response["token_ids"] for response in responses] == exchange["expected"][MODELS[model]], model


def test_streaming_adds_up_to_the_whole_answer(exchange):
    whole = by_model(exchange["chats"])["a"]
    for streamed, answer in zip(exchange["streamed"], whole):
        assert streamed["chunks"] > 2  # pieces, not one block
        assert streamed["text"] == answer["text"] and streamed["token_ids"] == answer["token_ids"]
        assert streamed["finish_reason"] == answer["finish_reason"]


def test_a_burst_of_concurrent_requests_is_answered_each_as_alone(exchange):
    alone = exchange["completions"] + exchange["chats"]
    assert len(exchange["burst"]) == len(exchange["requests"]) == len(alone) == 24
    for request, answer, single in zip(exchange["requests"], exchange["burst"], alone):
        assert answer["token_ids"] == single["token_ids"] and answer["text"] == single["text"], request
