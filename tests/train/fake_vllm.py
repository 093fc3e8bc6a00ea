"""A stand-in for vLLM's OpenAI-compatible server (the routes train_rlhf.py's vLLM engine uses), for the normal
suite where vLLM is not installed: /health, /v1/models, /tokenize, runtime LoRA load / unload, and completions of
token-id prompts answered with `injected_completion` (a fixed function of the prompt), cut as vLLM cuts them.

In-process (`FakeVLLM(model).start()`, a thread) it records every request and can fail on purpose: `die_after` N
completion requests (the server goes away), or `delay` seconds before each answer (a server that hangs). As a
process (`python fake_vllm.py --port P --model M`, what a fake vLLM environment's `bin/python` runs) it serves the
same, so `vllm_launch` is tested end to end: start, readiness, stop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STOP_STRING = "\nHuman:"


def injected_completion(prompt: list[int], index: int, max_tokens: int, eos: int, stop_ids: list[int]) -> list[int]:
    """The tokens an engine 'generates' for the index-th completion of `prompt`, before any cut: by index, runs to
    max_tokens, ends with EOS after a few tokens (then junk), contains the stop string (then junk), or is EOS
    alone; the others a mix. Tokens 40..199 (no special tokens)."""
    digest = hashlib.sha256(json.dumps([prompt, index]).encode()).digest()
    tokens = [40 + byte % 160 for byte in digest[: max_tokens + 4]]
    kind = index % 4
    if kind == 1:
        tokens[2] = eos
    elif kind == 2:
        tokens[1 : 1 + len(stop_ids)] = stop_ids
    elif kind == 3:
        tokens[0] = eos
    return tokens[: max_tokens + 4]


def cut_as_vllm(tokens: list[int], max_tokens: int, stop_token_ids: list[int], tokenizer, stop: list[str]) -> tuple:
    """What vLLM returns for `tokens`: through the first stop token or the token completing a stop string, else
    max_tokens of them; with its finish reason."""
    for end in range(1, min(len(tokens), max_tokens) + 1):
        if tokens[end - 1] in stop_token_ids:
            return tokens[:end], "stop"
        if stop and any(s in tokenizer.decode(tokens[:end], skip_special_tokens=True) for s in stop):
            return tokens[:end], "stop"
    return tokens[:max_tokens], "length"


class FakeVLLM:
    """The fake server for `model` (its tokenizer answers /tokenize); `root` is what /v1/models says it serves."""

    def __init__(self, model: str | Path, root: str | Path | None = None, port: int = 0) -> None:
        from transformers import AutoTokenizer

        self.model = str(model)
        self.root = str(root or model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.requests: list[tuple[str, dict]] = []  # (path, body) of every POST
        self.adapters: dict[str, str] = {}
        self.loaded: list[tuple[str, dict]] = []  # (name, the adapter's tensors as loaded)
        self.die_after: int | None = None
        self.delay = 0.0
        self.completions_answered = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, status: int, payload) -> None:
                body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self.answer(200, "")
                elif self.path == "/v1/models":
                    cards = [{"id": fake.model, "root": fake.root, "parent": None, "max_model_len": 256}]
                    cards += [{"id": name, "root": path, "parent": fake.model} for name, path in fake.adapters.items()]
                    self.answer(200, {"object": "list", "data": cards})
                else:
                    self.answer(404, {"error": {"message": "Not Found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                status, payload = fake.handle(self.path, body)
                if status is None:  # the server died: the connection drops without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.answer(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None

    def handle(self, path: str, body: dict) -> tuple[int | None, dict | str | None]:
        if path == "/tokenize":
            return 200, {"tokens": self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]}
        if path == "/v1/load_lora_adapter":
            from safetensors.torch import load_file

            folder = Path(body["lora_path"])
            if body["lora_name"] in self.adapters:
                return 400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}}
            self.adapters[body["lora_name"]] = str(folder)
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            self.loaded.append((body["lora_name"], {"config": config, "tensors": tensors}))
            return 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully."
        if path == "/v1/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:
                return 404, {"error": {"message": f"The lora adapter '{body['lora_name']}' cannot be found."}}
            return 200, "Success"
        if path == "/v1/completions":
            return self.complete(body)
        return 404, {"error": {"message": "Not Found"}}

    def complete(self, body: dict) -> tuple[int | None, dict | None]:
        if self.die_after is not None and self.completions_answered >= self.die_after:
            threading.Thread(target=self.stop, daemon=True).start()  # gone, as a crashed server is
            return None, None
        time.sleep(self.delay)
        if body["model"] not in self.adapters and body["model"] != self.model:
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist."}}
        eos = self.tokenizer.eos_token_id
        stop_ids = self.tokenizer(STOP_STRING, add_special_tokens=False)["input_ids"]
        choices = []
        for index in range(body["n"]):
            tokens = injected_completion(body["prompt"], index, body["max_tokens"], eos, stop_ids)
            tokens, reason = cut_as_vllm(
                tokens, body["max_tokens"], body["stop_token_ids"], self.tokenizer, body.get("stop") or []
            )
            choices.append({"index": index, "token_ids": tokens, "finish_reason": reason, "text": ""})
        self.completions_answered += 1
        return 200, {"object": "text_completion", "choices": choices}

    def start(self) -> FakeVLLM:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str]) -> None:
    """As vLLM's api_server is started: `-m vllm.entrypoints.openai.api_server --host H --port P --model M ...`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model")
    options, rest = parser.parse_known_args(argv)
    print(f"fake vLLM for {options.model}, arguments {rest}", flush=True)
    FakeVLLM(options.model, port=options.port).server.serve_forever()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
