"""The embedded demo: a task, its data, a tokenizer we build ourselves and a tiny random-init model.

Nothing is downloaded. The task: write a 4-digit number digit by digit in Chinese numerals
("把 4071 逐位写成汉字" -> "四零七一"). A random model never gets it right; a model that learned the
digit-to-character mapping does so on numbers it never saw, which gives a held-out exact-match metric.

`python -m component.demo_assets data data/demo` rewrites the bundled demo files (they are committed);
`python -m component.demo_assets model config/demo/model/config.json OUT` builds the tiny base model folder.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

CHINESE_DIGITS = "零一二三四五六七八九"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def digits_question(number: str) -> str:
    return f"把 {number} 逐位写成汉字"


def digits_answer(number: str) -> str:
    return "".join(CHINESE_DIGITS[int(d)] for d in number)


def wrong_answer(number: str, rng: random.Random) -> str:
    """A plausible wrong answer: one or two digits mistranslated."""
    digits = list(number)
    for position in rng.sample(range(len(digits)), rng.choice([1, 2])):
        digits[position] = rng.choice([d for d in "0123456789" if d != digits[position]])
    return digits_answer("".join(digits))


def demo_numbers(seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out 4-digit numbers."""
    numbers = [f"{n:04d}" for n in range(10000)]
    random.Random(seed).shuffle(numbers)
    return numbers[:3000], numbers[3000:3200]


def write_demo_data(folder: str | Path) -> None:
    """The bundled demo files: SFT data in Firefly's layout, preference pairs, held-out questions, and the
    multiple-choice set evaluate.py reads (C-Eval layout, ceval/)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out = demo_numbers()
    rng = random.Random(1)

    def firefly(numbers: list[str]) -> str:
        rows = [{"kind": "DigitsToChinese", "input": digits_question(n), "target": digits_answer(n)} for n in numbers]
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def pairs(numbers: list[str]) -> str:
        rows = [
            {"prompt": digits_question(n), "chosen": digits_answer(n), "rejected": wrong_answer(n, rng)}
            for n in numbers
        ]
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    (folder / "digits_train.jsonl").write_text(firefly(train), encoding="utf-8")
    (folder / "digits_eval.jsonl").write_text(firefly(held_out), encoding="utf-8")
    (folder / "preference_train.jsonl").write_text(pairs(train[:2000]), encoding="utf-8")
    (folder / "preference_eval.jsonl").write_text(pairs(held_out), encoding="utf-8")
    (folder / "questions.txt").write_text("".join(digits_question(n) + "\n" for n in held_out[:8]), "utf-8")
    write_demo_benchmark(folder / "ceval", train[:5], held_out[:100], rng)


DEMO_SUBJECT = "chinese_numerals"


def multiple_choice(number: str, rng: random.Random) -> tuple[str, list[str], str]:
    """The demo question with the right answer and three plausible wrong ones, the right one at a random letter."""
    choices = {digits_answer(number)}
    while len(choices) < 4:
        choices.add(wrong_answer(number, rng))
    ordered = sorted(choices - {digits_answer(number)})
    at = rng.randrange(4)
    ordered.insert(at, digits_answer(number))
    return digits_question(number), ordered, "ABCD"[at]


def write_demo_benchmark(folder: Path, dev: list[str], val: list[str], rng: random.Random) -> None:
    """The demo task as a multiple-choice benchmark in C-Eval's layout (dev/ with explanations, val/), with the
    subject_mapping.json C-Eval publishes beside them (English name, Chinese name, category) for its prompt."""
    from component.evaluate.benchmarks import SUBJECT_MAPPING, write_subject

    def explained(number: str) -> tuple:
        steps = "，".join(f"{d}→{CHINESE_DIGITS[int(d)]}" for d in number)
        return (*multiple_choice(number, rng), f"逐位对应：{steps}")

    write_subject(folder, "ceval", DEMO_SUBJECT, [explained(n) for n in dev], [multiple_choice(n, rng) for n in val])
    mapping = {DEMO_SUBJECT: ["Chinese Numerals", "汉字数字", "Other"]}
    (folder / SUBJECT_MAPPING).write_text(json.dumps(mapping, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE trained on the demo texts; digits and Han characters stay single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        train, _ = demo_numbers()
        corpus = [digits_question(n) + digits_answer(n) for n in train] + ["Human: \n\nAssistant: "] * 50
    tokenizer = Tokenizer(models.BPE())
    # Every digit and every Han character is its own word, so BPE never merges two of them into one token.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(output_dir: str | Path, config: dict, seed: int = 0, tokenizer=None) -> Path:
    """A random-init causal LM folder of `config` (a transformers config dict with model_type) with our tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = dict(config)
    config.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_type = config.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str]) -> None:
    if argv[:1] == ["data"] and len(argv) == 2:
        write_demo_data(argv[1])
    elif argv[:1] == ["model"] and len(argv) == 3:
        build_tiny_model(argv[2], json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    else:
        raise SystemExit("usage: python -m component.demo_assets data FOLDER | model CONFIG_JSON OUTPUT_DIR")


if __name__ == "__main__":
    main(sys.argv[1:])
