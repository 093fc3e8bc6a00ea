"""The demo's multiple-choice set (data/demo/ceval) and make demo's evaluation step (config/demo/evaluate.json)."""

from __future__ import annotations

import json

from tests.utils import REPO, skip_without_demo


def test_bundled_set_is_what_demo_assets_writes(tmp_path):
    from component.demo_assets import digits_answer, write_demo_data
    from component.evaluate.benchmarks import read_benchmark

    write_demo_data(tmp_path)
    shipped = sorted(p.relative_to(REPO / "data/demo") for p in (REPO / "data/demo").rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (REPO / "data/demo" / name).read_bytes(), name

    (subject,), skips = read_benchmark("ceval", str(REPO / "data/demo/ceval"), [], 5)
    assert not skips and subject.title == "汉字数字" and subject.groups == ["Other"]
    assert len(subject.questions) == 100 and len(subject.examples) == 5
    for question in subject.questions + subject.examples:
        number = question.question.split()[1]
        assert question.choices["ABCD".index(question.answer)] == digits_answer(number)
        assert len(set(question.choices)) == 4


def test_demo_config_fits_the_demo_model(tmp_path):
    """config/demo/evaluate.json as make demo runs it, on a random model of the demo's shape (256 positions): every
    prompt fits, so every question runs on the shared prefix; the adapters are make demo's (opt-in check below)."""
    from component.config.evaluation import EvaluateOptions
    from component.config.inference import parse_options
    from component.demo_assets import build_tiny_model
    from component.evaluate.run import run_evaluation

    config = json.loads((REPO / "config/demo/model/config.json").read_text(encoding="utf-8"))
    base = build_tiny_model(tmp_path / "base", config)
    argv = ["--config", str(REPO / "config/demo/evaluate.json"), "--model_name_or_path", str(base), "--adapter", "null"]
    argv += ["--ceval_dir", str(REPO / "data/demo/ceval"), "--output_dir", str(tmp_path / "out"), "--limit", "20"]
    options = parse_options(EvaluateOptions, argv, "evaluate.py")
    results, _, _ = run_evaluation(options)
    assert results["models"]["base"]["ceval"]["prefix_cache"] == {"cached": 20, "full_forward": 0}
    assert results["settings"]["num_fewshot"] == 2


def test_demo_config_names_make_demos_models():
    config = json.loads((REPO / "config/demo/evaluate.json").read_text(encoding="utf-8"))
    folders = [config["model_name_or_path"], *(a.partition("=")[2] for a in config["adapter"])]
    assert [a.partition("=")[0] for a in config["adapter"]] == ["sft", "dpo", "rl"]
    skip_without_demo(*folders)
    from component.config.evaluation import EvaluateOptions
    from component.config.inference import parse_options

    options = parse_options(EvaluateOptions, ["--config", str(REPO / "config/demo/evaluate.json")], "evaluate.py")
    assert list(options.adapters()) == ["sft", "dpo", "rl"]
