"""Runs in vLLM's environment (it has the official `openai` client, requirements-vllm.txt), started by
tests/serving/test_vllm_server.py: sends requests to a vLLM OpenAI-compatible server on 127.0.0.1.

    VLLM_PYTHON openai_client.py BASE_URL REQUESTS.json RESPONSES.json

REQUESTS.json: {"alone": [request, ...], "burst": [request, ...]}; a request is {"api": "completions" | "chat",
"model": name, "prompt": [ids] | "messages": [...], "max_tokens": n, "stop_token_ids": [ids], "stream": bool}.
The "alone" requests go one after another, then the "burst" ones all at once (one thread each: a bounded
burst). RESPONSES.json: {"alone": [response], "burst": [response]}, a response being {"token_ids",
"prompt_token_ids", "text", "finish_reason", "chunks"} (chunks: how many streamed pieces; 1 unstreamed).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def extra(item, name: str):
    """A field vLLM adds to OpenAI's schema (the client keeps unknown fields)."""
    return (item.model_extra or {}).get(name)


def ask(client: OpenAI, request: dict) -> dict:
    arguments = {
        "model": request["model"],
        "max_tokens": request["max_tokens"],
        "temperature": 0,
        "stream": request.get("stream", False),
        "extra_body": {"stop_token_ids": request["stop_token_ids"], "return_token_ids": True},
    }
    if request["api"] == "completions":
        response = client.completions.create(prompt=request["prompt"], **arguments)
    else:
        response = client.chat.completions.create(messages=request["messages"], **arguments)
    chunks = response if arguments["stream"] else [response]
    answer = {"token_ids": [], "prompt_token_ids": None, "text": "", "finish_reason": None, "chunks": 0}
    for chunk in chunks:
        answer["chunks"] += 1
        answer["prompt_token_ids"] = answer["prompt_token_ids"] or extra(chunk, "prompt_token_ids")
        for choice in chunk.choices:
            answer["token_ids"] += extra(choice, "token_ids") or []
            if request["api"] == "completions":
                answer["text"] += choice.text or ""
            else:
                answer["text"] += (choice.delta.content if arguments["stream"] else choice.message.content) or ""
            answer["finish_reason"] = choice.finish_reason or answer["finish_reason"]
    return answer


def main(base_url: str, requests_file: str, responses_file: str) -> None:
    with open(requests_file, encoding="utf-8") as handle:
        requests = json.load(handle)
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=300)
    alone = [ask(client, request) for request in requests["alone"]]
    with ThreadPoolExecutor(max_workers=max(1, len(requests["burst"]))) as pool:
        burst = list(pool.map(lambda request: ask(client, request), requests["burst"]))
    with open(responses_file, "w", encoding="utf-8") as handle:
        json.dump({"alone": alone, "burst": burst}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
