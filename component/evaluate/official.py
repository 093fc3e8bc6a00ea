"""`--protocol official`: each benchmark's prompts and scoring as its authors' evaluation code has them.

The prompt is the subject's instruction, `num_fewshot` solved dev examples and the question, ending where the
answer letter goes; the prediction is whichever of the four letters' tokens has the highest logit at that last
position (the reported log-likelihoods are the log-softmax there, so their argmax is the same).

- C-Eval (hkust-nlp/ceval code/evaluator_series/evaluators/llama.py, answer-only few-shot):
  "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n", examples "{question}\\nA. {A}...\\nD. {D}\\n答案：{answer}\\n\\n",
  letter tokens `tokenizer.encode("A", add_special_tokens=False)[0]`.
- CMMLU (haonan-li/CMMLU src/mp_utils.py + src/hf_causal_model.py):
  "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n", examples "题目：{question}\\nA. {A}...\\n答案是：{answer}\\n\\n",
  letter tokens `tokenizer.convert_tokens_to_ids("A")`; a prompt longer than max_length drops its longest
  examples; the overall score is the mean of the subject accuracies (`acc_macro`).
- MMLU (hendrycks/test evaluate.py): "The following are multiple choice questions (with answers) about
  {the subject's words}.\\n\\n", examples "{question}\\nA. {A}...\\nAnswer: {answer}\\n\\n"; the original scores the next
  token " A" (with its space): here the token " A" becomes after "Answer:" (the letter's own token where a
  tokenizer has no single " A"); a prompt longer than max_length drops examples from the end (C-Eval's code has
  no rule; it is treated the same way).
Questions are not stripped (the authors' code does not strip them; lm-eval does).
"""

from __future__ import annotations

from dataclasses import dataclass

from component.config.parser import ConfigError
from component.evaluate.benchmarks import LETTERS, Question, Subject
from component.evaluate.scorer import PrefixScorer

INSTRUCTIONS = {
    "ceval": "以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n",
    "mmlu": "The following are multiple choice questions (with answers) about {title}.\n\n",
}
QUESTION_START = {"ceval": "", "cmmlu": "题目：", "mmlu": ""}
ANSWER_CUE = {"ceval": "\n答案：", "cmmlu": "\n答案是：", "mmlu": "\nAnswer:"}
ANSWER_AFTER_CUE = {"ceval": "{answer}\n\n", "cmmlu": "{answer}\n\n", "mmlu": " {answer}\n\n"}


def instruction(subject: Subject) -> str:
    # MMLU's format_subject joins the file name's words, each after a space ("about abstract algebra").
    title = subject.name.replace("_", " ") if subject.benchmark == "mmlu" else subject.title
    return INSTRUCTIONS[subject.benchmark].format(title=title)


def example(benchmark: str, question: Question, with_answer: bool) -> str:
    text = QUESTION_START[benchmark] + question.question
    text += "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    text += ANSWER_CUE[benchmark]
    return text + (ANSWER_AFTER_CUE[benchmark].format(answer=question.answer) if with_answer else "")


def few_shot_prefix(subject: Subject, num_fewshot: int) -> str:
    """The instruction and the first `num_fewshot` dev examples: what every question's prompt starts with."""
    return instruction(subject) + "".join(example(subject.benchmark, q, True) for q in subject.examples[:num_fewshot])


def letter_ids(benchmark: str, tokenizer) -> list[int]:
    """The token ids of A, B, C, D whose logits each benchmark's code compares."""
    if benchmark == "ceval":
        ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    elif benchmark == "cmmlu":
        ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ConfigError(
                "CMMLU's official scoring needs tokens 'A'..'D' in the vocabulary; this tokenizer lacks one"
            )
    else:  # " A" after "Answer:", when the tokenizer has it as one token; else the letter's own token
        cue = tokenizer.encode("Answer:", add_special_tokens=False)
        ids = []
        for letter in LETTERS:
            both = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
            after = both[len(cue) :] if both[: len(cue)] == cue else []
            ids.append(after[0] if len(after) == 1 else both[-1])
    if len(set(ids)) < len(ids):
        raise ConfigError(f"{benchmark}: the answer letters A-D share a token in this tokenizer ({ids})")
    return ids


def fitting_prompt(subject: Subject, question: Question, num_fewshot: int, tokenizer, max_length: int) -> list[int]:
    """The prompt's ids with the examples that fit in max_length, dropped as the benchmark's code drops them."""
    head, end = instruction(subject), example(subject.benchmark, question, False)
    examples = list(subject.examples[:num_fewshot])
    if subject.benchmark == "cmmlu":  # gen_prompt: drop every example of the longest length until the rest fits
        budget = max_length - len(tokenizer.encode(head) + tokenizer.encode(end))
        if budget < 0:
            head, examples = "", []
        sized = [(q, len(tokenizer.encode(example("cmmlu", q, True)))) for q in examples]
        while sized and sum(n for _, n in sized) >= budget:
            longest = max(n for _, n in sized)
            sized = [(q, n) for q, n in sized if n != longest]
        examples = [q for q, _ in sized]
    while True:  # MMLU: one example fewer until it fits
        ids = tokenizer(head + "".join(example(subject.benchmark, q, True) for q in examples) + end)["input_ids"]
        if len(ids) <= max_length or not examples:
            return ids[-max_length:]
        examples.pop()


@dataclass
class Scored:
    question: Question
    log_likelihoods: list[float]

    @property
    def prediction(self) -> str:
        values = self.log_likelihoods
        return LETTERS[values.index(max(values))]


def score_subject(
    scorer: PrefixScorer,
    tokenizer,
    subject: Subject,
    num_fewshot: int,
    limit: int | None,
    max_length: int,
    prefix_cache: bool,
) -> tuple[list[Scored], dict[str, int]]:
    """Every question of the subject (the first `limit`), scored at its prompt's last position; and how many ran on
    the prefix cache / a full forward (a prompt whose tokens do not start with the prefix's, or cut to fit)."""
    letters = letter_ids(subject.benchmark, tokenizer)
    questions = subject.questions[:limit] if limit else subject.questions
    prefix_text = few_shot_prefix(subject, num_fewshot)
    prefix = tokenizer(prefix_text)["input_ids"]
    cached: list[tuple[int, list[int]]] = []
    full: list[tuple[int, list[int]]] = []
    for i, question in enumerate(questions):
        ids = tokenizer(prefix_text + example(subject.benchmark, question, False))["input_ids"]
        if len(ids) > max_length:
            full.append((i, fitting_prompt(subject, question, num_fewshot, tokenizer, max_length)))
        elif prefix_cache and len(prefix) < len(ids) and ids[: len(prefix)] == prefix:
            cached.append((i, ids[len(prefix) :]))
        else:
            full.append((i, ids))
    values: list[list[float]] = [[] for _ in questions]
    for prefix_state, rows in ((scorer.encode_prefix(prefix) if cached else None, cached), (None, full)):
        if not rows:
            continue
        for row, log_probs in scorer.log_softmax(prefix_state, [ids for _, ids in rows], [1] * len(rows)):
            values[rows[row][0]] = [float(v) for v in log_probs[-1, letters]]
    counts = {"cached": len(cached), "full_forward": len(full)}
    return [Scored(q, v) for q, v in zip(questions, values)], counts
