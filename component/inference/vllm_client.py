"""A client of vLLM's OpenAI-compatible server for token-id work: completions of token-id prompts returned as
token ids, LoRA adapters loaded and unloaded at runtime, and the check that it serves our base model.

Plain HTTP from the standard library (no proxy: the server is on this machine), so the training environment needs
no client package. Sampling requests carry every setting explicitly (`sampling_fields`), so the server's defaults
and the model folder's generation_config.json change nothing: a completion ends at exactly the template's stop
tokens and stop strings, as in `engine.generate_token_ids`.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from component.config.errors import EXIT_INTERRUPTED, UserFacingError
from component.config.generation import GenerationSettings, unsupported_by_vllm
from component.config.parser import ConfigError
from component.data.template import Template
from component.inference.answers import stop_strings

MAX_PARALLEL_REQUESTS = 64
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(UserFacingError):
    """The server did not answer, answered with an error, or went away; the message names it and the request."""

    label = "vLLM server"
    exit_code = EXIT_INTERRUPTED  # restart the server and resume


class Completion(NamedTuple):
    token_ids: list[int]  # the new tokens, the stop token (or the one completing a stop string) included
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens)


def sampling_fields(settings: GenerationSettings, template: Template) -> dict[str, Any]:
    """The completion request's sampling fields that mean what `settings` mean to transformers' generate:
    temperature (0: greedy), top_k (0: off), top_p, repetition_penalty, the template's stop tokens only
    (`ignore_eos`: neither the tokenizer's EOS nor generation_config.json adds any) and stop strings."""
    if unsupported_by_vllm(settings):
        raise ConfigError(f"vLLM cannot sample with {', '.join(unsupported_by_vllm(settings))}")
    fields: dict[str, Any] = {
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature if settings.do_sample else 0.0,
        "top_k": settings.top_k if settings.do_sample else 0,
        "top_p": settings.top_p if settings.do_sample else 1.0,
        "min_p": 0.0,
        "repetition_penalty": settings.repetition_penalty,
        "ignore_eos": True,
        "stop_token_ids": list(template.stop_token_ids),
        "stop": stop_strings(template),
        "skip_special_tokens": True,  # as clean_answer decodes: stop strings are matched in that text
        "return_token_ids": True,
    }
    return fields


class VLLMClient:
    """vLLM's server at `url` (http://host:port, with or without /v1); `timeout` seconds for each answer."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.timeout = timeout

    def call(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """POST `body` (GET without one) to `path`; the decoded JSON answer (or text). ServerError otherwise."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with _NO_PROXY.open(request, timeout=timeout or self.timeout) as response:
                raw = response.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")
            with_message = _error_message(detail)
            raise ServerError(f"{self.url}{path} answered {error.code}: {with_message}") from None
        except TimeoutError:
            raise ServerError(f"{self.url}{path} did not answer within {timeout or self.timeout:.0f} s") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServerError(f"{self.url}{path} cannot be reached ({reason})") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    # --- the server and its models ------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self.call("/v1/models")["data"]

    def base_model(self) -> dict:
        """The served base model's card: `id` (its name), `root` (the folder it was loaded from), `max_model_len`."""
        bases = [card for card in self.models() if not card.get("parent")]
        if not bases:
            raise ServerError(f"{self.url} lists no base model")
        return bases[0]

    def tokenize(self, model: str, text: str) -> list[int]:
        return self.call("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})["tokens"]

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Loads a LoRA adapter folder under `name` (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and
        --enable-lora with --max-lora-rank at least the adapter's rank)."""
        try:
            self.call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except ServerError as error:
            if "404" in str(error) and "load_lora_adapter" in str(error):
                raise ServerError(
                    f"{error}: start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
                ) from None
            raise

    def unload_adapter(self, name: str) -> None:
        self.call("/v1/unload_lora_adapter", {"lora_name": name})

    # --- sampling -----------------------------------------------------------------------------------------------
    def complete(
        self, model: str, prompt: list[int], fields: dict[str, Any], n: int, seed: int | None
    ) -> list[Completion]:
        """`n` completions of one token-id prompt from `model` (a served name: the base or an adapter)."""
        body = {"model": model, "prompt": prompt, "n": n, **fields}
        if seed is not None:
            body["seed"] = seed  # vLLM gives the i-th of the n completions seed + i
        answer = self.call("/v1/completions", body)
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        return [Completion(list(choice["token_ids"]), choice["finish_reason"]) for choice in choices]

    def complete_all(
        self, model: str, prompts: list[list[int]], fields: dict[str, Any], n: int, seeds: list[int | None]
    ) -> list[list[Completion]]:
        """`complete` for each prompt (each its own seed), sent at once: the server batches them."""
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL_REQUESTS, len(prompts)))) as pool:
            return list(pool.map(lambda args: self.complete(model, args[0], fields, n, args[1]), zip(prompts, seeds)))


def _error_message(detail: str) -> str:
    """vLLM's error JSON ({"error": {"message": ...}} or {"message": ...}) reduced to its message."""
    try:
        parsed = json.loads(detail)
    except ValueError:
        return detail.strip()[:500]
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:500]
    return detail.strip()[:500]


# --- is it our base model? --------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SAMPLE_BYTES = 1 << 16


def weights_fingerprint(folder: str | Path) -> str:
    """A digest of a model folder's weights that reads a few blocks, not every byte: each weight file's name and
    size and 64 KiB from its start, middle and end. Two folders with the same weights give the same digest; a
    fine-tuned copy of a model (same names and sizes) gives another."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest() if files else ""


def same_model_folder(served: str, ours: str | Path) -> bool:
    """Whether the folder the server loaded is ours: the same path, or a folder with the same weights."""
    served_path, our_path = Path(served), Path(ours)
    if not served_path.is_dir():
        return False
    if served_path.resolve() == our_path.resolve():
        return True
    ours_print = weights_fingerprint(our_path)
    return bool(ours_print) and weights_fingerprint(served_path) == ours_print


def check_served_model(client: VLLMClient, model_name_or_path: str | Path, tokenizer, needed_length: int) -> str:
    """Refuses (ConfigError, before training) a server that serves another base model, tokenizes otherwise, or
    cannot hold prompt + completion; returns the served base model's name."""
    card = client.base_model()
    root = str(card.get("root") or card["id"])
    if not same_model_folder(root, model_name_or_path):
        raise ConfigError(
            f"the vLLM server at {client.url} serves {root!r}, not this run's model_name_or_path "
            f"{str(model_name_or_path)!r} (another folder, or other weights): start it with --model "
            f"{model_name_or_path}"
        )
    probe = "Human: 把 4071 逐位写成汉字\n\nAssistant: 四零七一 hello, world!"
    ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
    theirs = client.tokenize(card["id"], probe)
    if theirs != ours:
        raise ConfigError(
            f"the vLLM server at {client.url} tokenizes differently from this run's tokenizer ({len(theirs)} vs "
            f"{len(ours)} tokens for a probe text): serve the folder with the tokenizer training uses"
        )
    if card.get("max_model_len") and card["max_model_len"] < needed_length:
        raise ConfigError(
            f"the vLLM server at {client.url} takes sequences of {card['max_model_len']} tokens, this run needs "
            f"{needed_length} (max_seq_length): start it with --max-model-len {needed_length}"
        )
    return card["id"]
