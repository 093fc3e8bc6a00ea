"""`--protocol official` against prompts written out by hand from the benchmarks' own evaluation code, the scores
against a plain forward of those prompts, and CMMLU's overall score as the mean of its subjects'."""

from __future__ import annotations

import json

import pytest
import torch

# Hand-written files in the three layouts (C-Eval's dev has the explanation column; CMMLU's unnamed index column).
FILES = {
    "ceval/dev/accountant_dev.csv": "id,question,A,B,C,D,answer,explanation\n"
    "0,甲题,一,二,三,四,B,因为\n1,乙题 ,五,六,七,八,C,所以\n",
    "ceval/val/accountant_val.csv": "id,question,A,B,C,D,answer\n0,丙题,九,十,百,千,A\n1,丁题,上,下,左,右,D\n",
    "cmmlu/dev/agronomy.csv": ",Question,A,B,C,D,Answer\n0,甲题,一,二,三,四,B\n1,乙题,五,六,七,八,C\n",
    "cmmlu/test/agronomy.csv": ",Question,A,B,C,D,Answer\n0,丙题,九,十,百,千,A\n1,丁题,上,下,左,右,D\n2,戊题,东,西,南,北,B\n",
    "cmmlu/dev/arts.csv": ",Question,A,B,C,D,Answer\n0,己题,一,二,三,四,A\n1,庚题,五,六,七,八,D\n",
    "cmmlu/test/arts.csv": ",Question,A,B,C,D,Answer\n0,辛题,九,十,百,千,C\n",
    "mmlu/dev/high_school_biology_dev.csv": "What is a cell?,A bone,A unit of life,A nerve,Blood,B\n"
    "Where is the heart?,Head,Leg,Chest,Arm,C\n",
    "mmlu/test/high_school_biology_test.csv": "What carries blood?,Veins,Bones,Skin,Hair,A\n"
    '"Which organ, of these, filters blood?",Liver,Kidney,Lung,Brain,B\n',
}
# The prompt of each benchmark's first question, 2-shot, written out from the authors' code (see official.py).
PROMPTS = {
    "ceval": "以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。\n\n"
    "甲题\nA. 一\nB. 二\nC. 三\nD. 四\n答案：B\n\n"
    "乙题 \nA. 五\nB. 六\nC. 七\nD. 八\n答案：C\n\n"
    "丙题\nA. 九\nB. 十\nC. 百\nD. 千\n答案：",
    "cmmlu": "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    "题目：甲题\nA. 一\nB. 二\nC. 三\nD. 四\n答案是：B\n\n"
    "题目：乙题\nA. 五\nB. 六\nC. 七\nD. 八\n答案是：C\n\n"
    "题目：丙题\nA. 九\nB. 十\nC. 百\nD. 千\n答案是：",
    "mmlu": "The following are multiple choice questions (with answers) about high school biology.\n\n"
    "What is a cell?\nA. A bone\nB. A unit of life\nC. A nerve\nD. Blood\nAnswer: B\n\n"
    "Where is the heart?\nA. Head\nB. Leg\nC. Chest\nD. Arm\nAnswer: C\n\n"
    "What carries blood?\nA. Veins\nB. Bones\nC. Skin\nD. Hair\nAnswer:",
}
SUBJECT = {"ceval": "accountant", "cmmlu": "agronomy", "mmlu": "high_school_biology"}


@pytest.fixture(scope="module")
def hand_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hand")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return {benchmark: str(root / benchmark) for benchmark in SUBJECT}


def hand_letter_ids(benchmark: str, tokenizer) -> list[int]:
    """As the authors' code picks them (C-Eval: encode(letter)[0]; CMMLU: the vocabulary piece; MMLU: " A")."""
    if benchmark == "ceval":
        return [tokenizer.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    if benchmark == "cmmlu":
        return [tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
    cue = tokenizer.encode("Answer:", add_special_tokens=False)
    spaced = [tokenizer.encode("Answer: " + x, add_special_tokens=False)[len(cue) :] for x in "ABCD"]
    return [s[0] if len(s) == 1 else tokenizer.convert_tokens_to_ids(x) for s, x in zip(spaced, "ABCD")]


def test_prompts_are_the_authors(hand_dirs):
    from component.evaluate.benchmarks import read_benchmark
    from component.evaluate.official import example, few_shot_prefix

    for benchmark, expected in PROMPTS.items():
        subjects, skips = read_benchmark(benchmark, hand_dirs[benchmark], [SUBJECT[benchmark]], 2)
        assert not skips
        subject = subjects[0]
        assert few_shot_prefix(subject, 2) + example(benchmark, subject.questions[0], False) == expected


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_scores_equal_a_plain_forward_of_the_hand_written_prompt(prefix_cache, hand_dirs, eval_models, tmp_path):
    from component.config.evaluation import EvaluateOptions
    from component.evaluate.run import run_evaluation
    from component.model.loader import load_for_inference, load_tokenizer

    options = EvaluateOptions(
        model_name_or_path=eval_models["base"],
        adapter=f"sft={eval_models['sft']}",
        **{f"{b}_dir": folder for b, folder in hand_dirs.items()},
        subjects=list(SUBJECT.values()),
        num_fewshot=2,
        protocol="official",
        prefix_cache=prefix_cache,
        output_dir=str(tmp_path / "out"),
        batch_size=2,
    )
    options.validate()
    results, paths, _ = run_evaluation(options)
    tokenizer = load_tokenizer(eval_models["base"])
    for model, loaded in (
        ("base", load_for_inference(eval_models["base"])),
        ("sft", load_for_inference(eval_models["base"], adapter=eval_models["sft"])),
    ):
        for benchmark, prompt in PROMPTS.items():
            rows = [json.loads(x) for x in (paths["samples"] / model / f"{benchmark}.jsonl").read_text().splitlines()]
            ids = tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                log_probs = loaded(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            expected = log_probs[hand_letter_ids(benchmark, tokenizer)].tolist()
            assert rows[0]["loglikelihoods"] == pytest.approx(expected, abs=1e-4), (model, benchmark)
            assert rows[0]["prediction"] == "ABCD"[expected.index(max(expected))]
            assert rows[0]["answer"] == {"ceval": "A", "cmmlu": "A", "mmlu": "A"}[benchmark]
        if prefix_cache:
            assert results["models"][model]["mmlu"]["prefix_cache"] == {"cached": 2, "full_forward": 0}


def test_cmmlu_overall_is_the_mean_of_its_subjects(hand_dirs, eval_models, tmp_path):
    from component.config.evaluation import EvaluateOptions
    from component.evaluate.report import headline, score_rows
    from component.evaluate.run import run_evaluation
    from component.inference.report import percent

    options = EvaluateOptions(
        model_name_or_path=eval_models["base"],
        cmmlu_dir=hand_dirs["cmmlu"],
        num_fewshot=2,
        protocol="official",
        output_dir=str(tmp_path / "out"),
    )
    options.validate()
    results, _, _ = run_evaluation(options)
    cmmlu = results["models"]["base"]["cmmlu"]
    subjects = cmmlu["subjects"]
    assert subjects["agronomy"]["n"] == 3 and subjects["arts"]["n"] == 1
    assert cmmlu["acc_macro"] == pytest.approx((subjects["agronomy"]["acc"] + subjects["arts"]["acc"]) / 2)
    assert cmmlu["acc"] == pytest.approx((3 * subjects["agronomy"]["acc"] + subjects["arts"]["acc"]) / 4)
    assert headline("cmmlu", "official") == "acc_macro" and headline("cmmlu", "lm_eval") == "acc"
    _, rows = score_rows(results)
    assert rows[0][0] == "CMMLU (mean of subjects)" and rows[0][2] == percent(cmmlu["acc_macro"])


def test_long_prompts_drop_examples_as_the_authors_do(hand_dirs, demo_tokenizer):
    """MMLU (and C-Eval) drop examples from the end until the prompt fits; CMMLU drops the longest examples."""
    from component.evaluate.benchmarks import read_benchmark
    from component.evaluate.official import example, fitting_prompt, instruction

    (mmlu,), _ = read_benchmark("mmlu", hand_dirs["mmlu"], [], 2)
    question = mmlu.questions[0]
    one_shot = instruction(mmlu) + example("mmlu", mmlu.examples[0], True) + example("mmlu", question, False)
    fits = len(demo_tokenizer(one_shot)["input_ids"])
    assert fitting_prompt(mmlu, question, 2, demo_tokenizer, fits) == demo_tokenizer(one_shot)["input_ids"]

    (cmmlu, _), _ = read_benchmark("cmmlu", hand_dirs["cmmlu"], [], 2)
    head, end = instruction(cmmlu), example("cmmlu", cmmlu.questions[0], False)
    sizes = [len(demo_tokenizer.encode(example("cmmlu", q, True))) for q in cmmlu.examples]
    budget = len(demo_tokenizer.encode(head) + demo_tokenizer.encode(end)) + sum(sizes)  # both examples: too long
    kept = [q for q, n in zip(cmmlu.examples, sizes) if n != max(sizes)] if len(set(sizes)) > 1 else []
    expected = demo_tokenizer(head + "".join(example("cmmlu", q, True) for q in kept) + end)["input_ids"]
    assert fitting_prompt(cmmlu, cmmlu.questions[0], 2, demo_tokenizer, budget) == expected[-budget:]


def test_letter_tokens_follow_each_benchmarks_code(eval_models):
    from component.evaluate.official import letter_ids
    from component.model.loader import load_tokenizer

    tokenizer = load_tokenizer(eval_models["base"])
    for benchmark in SUBJECT:
        assert letter_ids(benchmark, tokenizer) == hand_letter_ids(benchmark, tokenizer)
