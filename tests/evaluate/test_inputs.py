"""What evaluate.py reads and how it refuses: the three layouts row by row, skips counted and shown, one-line errors
naming what was expected where (never a traceback), the settings checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO


def write(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return str(root)


def test_each_layout_is_read_as_published(tmp_path):
    from component.evaluate.benchmarks import read_benchmark

    ceval = write(
        tmp_path / "ceval",
        {
            "dev/law_dev.csv": "id,question,A,B,C,D,answer,explanation\n0,问一,甲,乙,丙,丁,C,解释\n",
            "val/law_val.csv": 'id,question,A,B,C,D,answer\n0,"问二,带逗号",甲,乙,丙,丁,A\n1,"问三\n两行",甲,乙,丙,丁, D\n',
        },
    )
    (law,), skips = read_benchmark("ceval", ceval, [], 1)
    assert not skips and law.title == "法学" and law.groups == ["Humanities"]  # lm-eval's description, C-Eval's group
    assert [(q.row, q.line, q.question, q.answer) for q in law.questions] == [
        (0, 2, "问二,带逗号", "A"),
        (1, 3, "问三\n两行", "D"),
    ]
    assert law.examples[0].doc == {
        "id": "0",
        "question": "问一",
        "A": "甲",
        "B": "乙",
        "C": "丙",
        "D": "丁",
        "answer": "C",
        "explanation": "解释",
    }
    cmmlu = write(
        tmp_path / "cmmlu",
        {
            "dev/arts.csv": ",Question,A,B,C,D,Answer\n0,问,a,b,c,d,B\n",
            "test/arts.csv": ",Question,A,B,C,D,Answer\n7,问,a,b,c,d,B\n",
        },
    )
    (arts,), _ = read_benchmark("cmmlu", cmmlu, [], 1)
    assert arts.questions[0].doc == {"Question": "问", "A": "a", "B": "b", "C": "c", "D": "d", "Answer": "B"}
    assert arts.groups == ["Humanities"] and arts.task_name == "cmmlu_arts"
    mmlu = write(
        tmp_path / "mmlu",
        {"dev/virology_dev.csv": "Q1?,w,x,y,z,D\n", "test/virology_test.csv": "Q2?,w,x,y,z,B\n"},
    )
    (virology,), _ = read_benchmark("mmlu", mmlu, [], 1)
    assert virology.questions[0].doc == {
        "question": "Q2?",
        "subject": "virology",
        "choices": ["w", "x", "y", "z"],
        "answer": 1,
    }
    assert virology.groups == ["Other"]  # lm-eval's mmlu_other_tasks tag
    assert virology.lm_eval_config["description"].startswith("The following are multiple choice questions")


def test_bad_rows_and_subjects_are_errors_or_counted_skips(tmp_path):
    from component.data.readers import DataFormatError
    from component.evaluate.benchmarks import read_benchmark

    root = tmp_path / "ceval"
    header, dev = (
        "id,question,A,B,C,D,answer",
        "id,question,A,B,C,D,answer,explanation\n0,q,a,b,c,d,A,e\n1,q,a,b,c,d,B,e\n",
    )
    write(
        root,
        {
            "val/good_val.csv": f"{header}\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n2,q,a,b,c,d,b\n3,q,a,b,c,d,C\n",
            "dev/good_dev.csv": dev,
            "val/empty_val.csv": f"{header}\n",
            "dev/empty_dev.csv": dev,
            "val/nodev_val.csv": f"{header}\n0,q,a,b,c,d,A\n",
            "val/short_val.csv": f"{header}\n0,q,a,b,c,d,A\n",
            "dev/short_dev.csv": "id,question,A,B,C,D,answer,explanation\n0,q,a,b,c,d,A,e\n",
        },
    )
    subjects, skips = read_benchmark("ceval", str(root), [], 2)
    assert [s.name for s in subjects] == ["good"]
    assert [q.row for q in subjects[0].questions] == [0, 3]  # rows keep their place in the file
    reasons = {(s.subject, s.where): s.reason for s in skips}
    assert reasons[("good", f"{root}/val/good_val.csv:3")] == "answer 'E' is not A-D"
    assert reasons[("good", f"{root}/val/good_val.csv:4")] == "answer 'b' is not A-D"
    assert reasons[("empty", f"{root}/val/empty_val.csv")] == "no questions with an answer A-D"
    assert reasons[("nodev", f"{root}/val/nodev_val.csv")] == f"no dev file {root}/dev/nodev_dev.csv for 2-shot prompts"
    assert "has 1 usable examples, fewer than num_fewshot 2" in reasons[("short", f"{root}/val/short_val.csv")]
    assert read_benchmark("ceval", str(root), ["nodev"], 0)[0][0].examples == []  # 0-shot needs no dev file

    write(root, {"val/good_val.csv": f"{header}\n0,q,a,b,c,d,A\n1,q,a,b,c,A\n"})
    with pytest.raises(
        DataFormatError, match=r"good_val.csv:3: expected 7 fields \(id,question,A,B,C,D,answer\), got 6"
    ):
        read_benchmark("ceval", str(root), [], 2)
    write(root, {"val/good_val.csv": "question,A,B,C,D,answer\nq,a,b,c,d,A\n"})
    with pytest.raises(DataFormatError, match=r"good_val.csv:1: expected the C-Eval header id,question,A,B,C,D,answer"):
        read_benchmark("ceval", str(root), [], 2)
    (root / "val/good_val.csv").write_bytes(b"id,question,A,B,C,D,answer\n0,\xff,a,b,c,d,A\n")
    with pytest.raises(DataFormatError, match=r"good_val.csv:2:3: not valid UTF-8"):
        read_benchmark("ceval", str(root), [], 2)


def test_missing_folders_and_subjects_name_what_was_expected_where(tmp_path, eval_models):
    from component.config.evaluation import EvaluateOptions
    from component.config.parser import ConfigError
    from component.evaluate.run import read_subjects

    base = eval_models["base"]
    with pytest.raises(ConfigError, match=r"'mmlu_dir' '/nowhere' is not a folder \(MMLU: dev/\{subject\}_dev.csv"):
        EvaluateOptions(model_name_or_path=base, mmlu_dir="/nowhere").validate()
    with pytest.raises(ConfigError, match="'tasks' names cmmlu: give 'cmmlu_dir'"):
        EvaluateOptions(model_name_or_path=base, tasks="cmmlu").validate()
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvaluateOptions(model_name_or_path=base).validate()
    with pytest.raises(ConfigError, match=r"'protocol' official has the authors' prompts of ceval, cmmlu, mmlu only"):
        EvaluateOptions(model_name_or_path=base, tasks="hellaswag", protocol="official").validate()
    with pytest.raises(ConfigError, match="'num_fewshot' must be at least 0"):
        EvaluateOptions(model_name_or_path=base, mmlu_dir=str(tmp_path), num_fewshot=-1).validate()

    empty = tmp_path / "mmlu"
    empty.mkdir()
    options = EvaluateOptions(model_name_or_path=base, mmlu_dir=str(empty))
    with pytest.raises(
        ConfigError, match=rf"MMLU: no folder {empty}/test \(expected {empty}/test/{{subject}}_test.csv"
    ):
        read_subjects(options)
    write(empty, {"test/anatomy_test.csv": "q,a,b,c,d,A\n"})
    with pytest.raises(ConfigError, match=r"'subjects': 'anatomi' is not a subject of mmlu. Did you mean 'anatomy'\?"):
        read_subjects(EvaluateOptions(model_name_or_path=base, mmlu_dir=str(empty), subjects="anatomi"))
    with pytest.raises(ConfigError, match=r"MMLU \(.*\): no subject left to evaluate \(.*no dev file"):
        read_subjects(options)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_never_a_traceback(tmp_path, eval_models):
    missing = run_cli("--model_name_or_path", eval_models["base"], "--ceval_dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        f"config error: 'ceval_dir' '{tmp_path / 'nope'}' is not a folder "
        "(C-Eval: dev/{subject}_dev.csv and val/{subject}_val.csv)"
    )
    folder = write(tmp_path / "cmmlu", {"test/arts.csv": ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b\n"})
    malformed = run_cli("--model_name_or_path", eval_models["base"], "--cmmlu_dir", folder, "--num_fewshot", "0")
    assert malformed.returncode == 1 and "Traceback" not in malformed.stderr
    assert malformed.stderr.strip().splitlines()[-1] == (
        f"data error: {folder}/test/arts.csv:3: expected 7 fields (,Question,A,B,C,D,Answer), got 4"
    )
    unknown = run_cli("--model_name_or_path", eval_models["base"], "--cmmlu_dir", folder, "--num_fewshots", "0")
    assert unknown.stderr.strip().splitlines()[-1].endswith("Did you mean 'num_fewshot'? (see evaluate.py --help)")
    shown = run_cli("--help")
    assert shown.returncode == 0 and "--ceval_dir" in shown.stdout and "--protocol" in shown.stdout


def test_skips_are_shown_in_the_report(tmp_path, eval_models):
    from component.config.evaluation import EvaluateOptions
    from component.evaluate.run import run_evaluation

    folder = write(
        tmp_path / "mmlu",
        {
            "dev/anatomy_dev.csv": "q,a,b,c,d,A\n",
            "test/anatomy_test.csv": "q1,a,b,c,d,A\nq2,a,b,c,d,X\nq3,a,b,c,d,C\n",
            "test/virology_test.csv": "q1,a,b,c,d,A\n",
        },
    )
    options = EvaluateOptions(
        model_name_or_path=eval_models["base"], mmlu_dir=folder, num_fewshot=1, output_dir=str(tmp_path / "out")
    )
    options.validate()
    results, paths, _ = run_evaluation(options)
    assert results["models"]["base"]["mmlu"]["n"] == 2
    assert [(s["subject"], s["reason"]) for s in results["skipped"]] == [
        ("anatomy", "answer 'X' is not A-D"),
        ("virology", f"no dev file {folder}/dev/virology_dev.csv for 1-shot prompts"),
    ]
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert f"| MMLU | anatomy | {folder}/test/anatomy_test.csv:2 | answer 'X' is not A-D |" in markdown
    html = paths["html"].read_text(encoding="utf-8")
    assert "answer &#x27;X&#x27; is not A-D" in html and 'src="data:image/png;base64,' in html
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (paths["samples"] / "base" / "mmlu.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 2]
