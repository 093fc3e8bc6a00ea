"""Compare: the base model (adapter off) and the fine-tuned one (adapter on) on the same questions.

One loaded base; per preset and model the answers are generated in batches, optionally scored by a reward
model (loaded after the generator is freed), summarised (exact match, mean reward, win rate) and written as
report.html / report.md / answers.jsonl / summary.json.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from component.config.generation import GenerationSettings
from component.config.inference import DEFAULT_QUESTIONS, CompareOptions
from component.config.parser import ConfigError
from component.data.conversation import Conversation, Turn
from component.data.readers import DataFormatError, read_sft_file, utf8_error_position
from component.data.template import Template
from component.inference.answers import context_length
from component.inference.backends import load_generator
from component.inference.report import CompareResult, write_reports

if TYPE_CHECKING:  # the scorer (torch) loads only when a reward model is given
    from component.inference.scoring import RewardScorer


@dataclass
class Question:
    query: str
    history: list[Turn] = field(default_factory=list)
    system: str | None = None
    reference: str | None = None

    def conversation(self, answer: str) -> Conversation:
        return Conversation([*self.history, Turn(self.query, answer)], system=self.system)


def read_questions(path: str, with_references: bool = False, system: str | None = None) -> list[Question]:
    """A .txt file holds one question a line; other files are read as SFT data (format auto-detected)."""
    if Path(path).suffix == ".txt":
        if with_references:
            raise ConfigError(f"'references' {path!r}: a .txt file has no answers; use JSONL (e.g. Firefly layout)")
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as error:
            raise DataFormatError(f"{utf8_error_position(path)}: not valid UTF-8 ({error.reason})") from None
        questions = [Question(line.strip(), system=system) for line in lines if line.strip()]
        if not questions:
            raise DataFormatError(f"{path}: no questions (one a line)")
        return questions
    try:
        conversations, _ = read_sft_file(path)
    except DataFormatError as error:
        raise ConfigError(str(error)) from None
    if not conversations:
        raise DataFormatError(f"{path}: no usable questions (see the skip warnings above)")
    questions = []
    for conversation in conversations:
        *history, last = conversation.turns
        reference = last.assistant if with_references else None
        questions.append(Question(last.user, history, conversation.system or system, reference))
    return questions


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def compare_models(
    model,
    tokenizer,
    template: Template,
    questions: list[Question],
    settings_list: list[GenerationSettings],
    batch_size: int = 8,
    context: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (preset, model, question). With a PeftModel, "base" is the same weights with the adapters off,
    then each adapter by name, switched on in turn. An onnxruntime generator (an exported graph, its adapter
    merged in) is the one model "onnx"."""
    prompts = [template.encode_prompt(q.history, q.query, q.system) for q in questions]
    rows = []
    for settings in settings_list:
        for label, switch, answer_fn in answerers(model, tokenizer, template):
            with switch():
                answers = answer_fn(prompts, settings, batch_size, context)
            for index, (question, answer) in enumerate(zip(questions, answers)):
                row = {"preset": settings.preset, "model": label, "index": index, "question": question.query}
                row["answer"] = answer
                if question.reference is not None:
                    row["reference"] = question.reference
                    row["exact_match"] = exact_match(answer, question.reference)
                rows.append(row)
    return rows


AnswerFn = Callable[[list[list[int]], GenerationSettings, int, int | None], list[str]]


def answerers(model, tokenizer, template: Template) -> list[tuple[str, Callable[[], Any], AnswerFn]]:
    """(label, context manager that switches the model to it, batch answer function) per model to compare."""
    from component.inference.onnx_engine import OnnxGenerator

    if isinstance(model, OnnxGenerator):  # checked first: the onnxruntime path never imports torch
        from component.inference.onnx_engine import generate_answers as onnx_answers

        return [("onnx", contextlib.nullcontext, functools.partial(onnx_answers, model))]

    import torch

    from component.inference.engine import generate_answers

    def answer(prompts, settings, batch_size, context):
        torch.manual_seed(settings.seed)  # each model draws the same random numbers
        return generate_answers(model, tokenizer, template, prompts, settings, batch_size, context)

    return [(label, switch, answer) for label, switch in model_variants(model)]


def model_variants(model) -> list[tuple[str, Callable[[], Any]]]:
    """(label, context manager that makes the model answer as it): "base" (adapters off), then each adapter."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return [("base", contextlib.nullcontext)]
    variants: list[tuple[str, Callable[[], Any]]] = [("base", model.disable_adapter)]
    return variants + [(name, functools.partial(active_adapter, model, name)) for name in model.peft_config]


@contextlib.contextmanager
def active_adapter(model, name: str) -> Iterator[None]:
    """Generate with the adapter `name` (of several loaded on one base)."""
    model.set_adapter(name)
    yield


def duel(rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> dict[str, Any]:
    """Per question, does `rows`' model score higher than `others`'? A tie counts half in the win rate."""
    pairs = [
        (mine["reward"], theirs["reward"])
        for mine, theirs in zip(rows, others)
        if mine["reward"] is not None and theirs["reward"] is not None
    ]
    wins = sum(mine > theirs for mine, theirs in pairs)
    ties = sum(mine == theirs for mine, theirs in pairs)
    return {
        "wins": wins,
        "ties": ties,
        "losses": len(pairs) - wins - ties,
        "unscored": len(rows) - len(pairs),
        "win_rate": (wins + 0.5 * ties) / len(pairs) if pairs else None,
    }


def add_reward_scores(rows: list[dict[str, Any]], questions: list[Question], scorer: RewardScorer) -> None:
    """Each distinct (question, answer) is scored once: two models giving the same answer tie exactly, whatever
    batch their rows would have been scored in."""
    keys = [(row["index"], row["answer"]) for row in rows]
    distinct = list(dict.fromkeys(keys))
    scores = dict(zip(distinct, scorer([questions[index].conversation(answer) for index, answer in distinct])))
    for row, key in zip(rows, keys):
        row["reward"] = None if math.isnan(scores[key]) else scores[key]  # NaN: the RM could not fit the answer


def summarize(rows: list[dict[str, Any]], settings_list: list[GenerationSettings]) -> dict[str, Any]:
    """Per preset and model: answers, exact match, mean reward; per preset, `A_vs_B` win rates by reward."""
    summary: dict[str, Any] = {}
    for settings in settings_list:
        by_model: dict[str, list[dict]] = {}
        for row in rows:
            if row["preset"] == settings.preset:
                by_model.setdefault(row["model"], []).append(row)
        entry: dict[str, Any] = {"models": {}}
        for label, model_rows in by_model.items():
            stats: dict[str, Any] = {"answers": len(model_rows)}
            if "exact_match" in model_rows[0]:
                stats["exact_match"] = sum(r["exact_match"] for r in model_rows) / len(model_rows)
            scored = [r["reward"] for r in model_rows if r.get("reward") is not None]
            if "reward" in model_rows[0]:
                stats["mean_reward"] = sum(scored) / len(scored) if scored else None
            entry["models"][label] = stats
        labels = list(by_model)
        if "reward" in by_model[labels[0]][0]:  # each fine-tuned model vs the base, and vs the column before it
            for previous, label in zip(labels, labels[1:]):
                for other in dict.fromkeys(["base", previous]):
                    entry[f"{label}_vs_{other}"] = duel(by_model[label], by_model[other])
        summary[settings.preset] = entry
    return summary


def free_model(model) -> None:
    """Drop the generator before the reward model loads: two 13B models rarely fit one GPU."""
    del model
    gc.collect()
    torch = sys.modules.get("torch")  # the onnxruntime path runs without torch
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_reward_scorer(*args: Any, **kwargs: Any) -> RewardScorer:
    """`inference.scoring.load_reward_scorer`, imported when a reward model is given (scoring needs torch)."""
    from component.inference import scoring

    return scoring.load_reward_scorer(*args, **kwargs)


def run_compare(options: CompareOptions) -> tuple[CompareResult, dict[str, Path]]:
    """The compare recipe: read questions, load once, generate per preset and model, score, write reports."""
    settings_list = options.settings()
    path = options.references or options.questions or DEFAULT_QUESTIONS
    questions = read_questions(path, with_references=bool(options.references), system=options.system)
    questions = questions[: options.max_questions] if options.max_questions else questions
    if not questions:
        raise ConfigError(f"{path}: no questions")
    started = time.time()
    model, tokenizer, template = load_generator(options)
    context = context_length(model, tokenizer, options.max_context)
    rows = compare_models(model, tokenizer, template, questions, settings_list, options.batch_size, context)
    free_model(model)
    if options.reward_model:
        scorer = load_reward_scorer(
            options.reward_model, options.reward_base_model, options.quantization, options.batch_size
        )
        add_reward_scores(rows, questions, scorer)
    result = CompareResult(
        rows=rows,
        summary=summarize(rows, settings_list),
        settings={s.preset: s.describe() for s in settings_list},
        models={
            "onnx" if options.backend == "onnxruntime" else "base": options.model_name_or_path,
            **options.adapters(),
        },
        meta={
            "questions_file": path,
            "questions": len(questions),
            "template": template.name,
            "quantization": options.quantization or "none",
            "backend": options.backend,
            "reward_model": options.reward_model or "none",
            "seconds": round(time.time() - started, 1),
        },
    )
    return result, write_reports(result, options.output_dir)
