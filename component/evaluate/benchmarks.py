"""C-Eval, CMMLU and MMLU as their publishers ship them: folders -> subjects, read and checked row by row, and each
subject as lm-eval's own task definition over those rows.

Layouts (each folder as extracted from the publisher's archive):
  C-Eval  dev/{subject}_dev.csv (id,question,A,B,C,D,answer,explanation), val/{subject}_val.csv (no explanation;
          test/ has no answers, so it cannot be scored locally)
  CMMLU   dev/{subject}.csv and test/{subject}.csv, header `,Question,A,B,C,D,Answer` (first column an unnamed index)
  MMLU    dev/{subject}_dev.csv and test/{subject}_test.csv, no header: question, A, B, C, D, answer letter

A row with the wrong number of fields stops the run naming file:line. A row whose answer is not A-D, a subject
without questions, a subject whose dev file is missing or too short for `num_fewshot` are skipped and counted
(`Skip`), shown in the report. The task definitions are lm-eval's (its YAML files, read by its own loader):
prompt, description, few-shot split and order, delimiters, metrics; only the data comes from here, handed to
lm-eval as an in-memory dataset (`custom_dataset`), so nothing is downloaded and no HF datasets cache is written.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from component.config.parser import ConfigError, closest
from component.data.readers import DataFormatError, utf8_error_position

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    """Where a benchmark keeps its files and what lm-eval calls its tasks."""

    title: str
    eval_folder: str  # the scored split's folder
    eval_suffix: str  # {subject}{eval_suffix} in eval_folder
    dev_suffix: str  # {subject}{dev_suffix} in dev/
    header: tuple[str, ...] | None  # the columns a file starts with (C-Eval's dev adds "explanation"); None: none
    lm_eval_task: str  # lm-eval's task name of a subject
    lm_eval_yaml: str  # its task file under lm_eval/tasks
    lm_eval_default: str  # the template those files include (for a subject lm-eval does not list)
    description: str  # lm-eval's description of a subject, as its _generate_configs.py writes it

    def question_columns(self) -> tuple[int, int]:
        """Index of the question column and of the answer column."""
        if self.header is None:
            return 0, 5
        lowered = [name.lower() for name in self.header]
        return lowered.index("question"), lowered.index("answer")


LAYOUTS = {
    "ceval": Layout(
        title="C-Eval",
        eval_folder="val",
        eval_suffix="_val.csv",
        dev_suffix="_dev.csv",
        header=("id", "question", "A", "B", "C", "D", "answer"),
        lm_eval_task="ceval-valid_{subject}",
        lm_eval_yaml="ceval/ceval-valid_{subject}.yaml",
        lm_eval_default="ceval/_default_ceval_yaml",
        description="以下是中国关于{title}的单项选择题，请选出其中的正确答案。\n\n",
    ),
    "cmmlu": Layout(
        title="CMMLU",
        eval_folder="test",
        eval_suffix=".csv",
        dev_suffix=".csv",
        header=("", "Question", "A", "B", "C", "D", "Answer"),
        lm_eval_task="cmmlu_{subject}",
        lm_eval_yaml="cmmlu/cmmlu_{subject}.yaml",
        lm_eval_default="cmmlu/_default_template_yaml",
        description="以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n",
    ),
    "mmlu": Layout(
        title="MMLU",
        eval_folder="test",
        eval_suffix="_test.csv",
        dev_suffix="_dev.csv",
        header=None,
        lm_eval_task="mmlu_{subject}",
        lm_eval_yaml="mmlu/default/mmlu_{subject}.yaml",
        lm_eval_default="mmlu/default/_default_template_yaml",
        description="The following are multiple choice questions (with answers) about {title}.\n\n",
    ),
}

# The subject categories the publishers report (C-Eval's subject_mapping.json, CMMLU's src/categories.py; a CMMLU
# subject can also be "China specific"). MMLU's come from lm-eval's own task tags.
CATEGORIES = {
    "ceval": {
        "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
        "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics electrical_engineer "
        "metrology_engineer high_school_mathematics high_school_physics high_school_chemistry high_school_biology "
        "middle_school_mathematics middle_school_biology middle_school_physics middle_school_chemistry "
        "veterinary_medicine",
        "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
        "teacher_qualification high_school_politics high_school_geography middle_school_politics "
        "middle_school_geography",
        "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
        "chinese_language_and_literature art_studies professional_tour_guide legal_professional high_school_chinese "
        "high_school_history middle_school_history",
        "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine "
        "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer tax_accountant "
        "physician",
    },
    "cmmlu": {
        "STEM": "anatomy astronomy college_actuarial_science college_engineering_hydrology college_mathematics "
        "college_medical_statistics computer_science conceptual_physics electrical_engineering elementary_mathematics "
        "genetics high_school_biology high_school_chemistry high_school_mathematics high_school_physics "
        "machine_learning virology",
        "Humanities": "arts chinese_history chinese_literature college_law global_facts international_law "
        "jurisprudence logical marxist_theory philosophy professional_law world_history world_religions",
        "Social Science": "ancient_chinese business_ethics chinese_civil_service_exam chinese_food_culture "
        "chinese_foreign_policy chinese_teacher_qualification college_education economics education "
        "elementary_chinese ethnology high_school_geography high_school_politics journalism management marketing "
        "modern_chinese professional_accounting professional_psychology public_relations security_study sociology",
        "Other": "agronomy chinese_driving_rule clinical_knowledge college_medicine computer_security "
        "construction_project_management elementary_commonsense elementary_information_and_technology food_science "
        "human_sexuality legal_and_moral_basis nutrition professional_medicine sports_science "
        "traditional_chinese_medicine",
        "China specific": "ancient_chinese chinese_civil_service_exam chinese_driving_rule chinese_food_culture "
        "chinese_foreign_policy chinese_history chinese_literature chinese_teacher_qualification "
        "construction_project_management elementary_chinese elementary_commonsense ethnology high_school_politics "
        "modern_chinese traditional_chinese_medicine",
    },
}
MMLU_TAGS = {
    "mmlu_stem_tasks": "STEM",
    "mmlu_humanities_tasks": "Humanities",
    "mmlu_social_sciences_tasks": "Social Sciences",
    "mmlu_other_tasks": "Other",
}
SUBJECT_MAPPING = "subject_mapping.json"  # C-Eval's {subject: [English name, Chinese name, category]}, optional


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


@dataclass
class Question:
    """One row of a benchmark file: `row` counts data rows from 0, `line` is where it starts in the file."""

    row: int
    line: int
    question: str
    choices: list[str]
    answer: str  # A-D
    doc: dict[str, Any]  # the row as lm-eval's task template reads it


@dataclass
class Subject:
    benchmark: str
    name: str
    title: str  # the subject's name as the benchmark's prompts write it (Chinese for C-Eval and CMMLU)
    groups: list[str]
    questions: list[Question]
    examples: list[Question]  # dev/, in file order: the few-shot examples
    eval_file: str
    lm_eval_config: dict[str, Any] = field(default_factory=dict)

    @property
    def task_name(self) -> str:
        return LAYOUTS[self.benchmark].lm_eval_task.format(subject=self.name)


@dataclass
class Skip:
    """Something left out, and why: a row (file:line), a subject (its file)."""

    benchmark: str
    subject: str
    where: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"benchmark": self.benchmark, "subject": self.subject, "where": self.where, "reason": self.reason}


# --- reading ----------------------------------------------------------------------------------------------------
def _records(path: Path) -> list[tuple[int, list[str]]]:
    """(starting line, fields) of every CSV record of a file; a file that is not UTF-8 names file:line:column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{utf8_error_position(str(path))}: not valid UTF-8 ({error.reason})") from None
    reader = csv.reader(text.splitlines(keepends=True))
    records = []
    line = 1
    try:
        for fields in reader:
            if fields:  # blank lines
                records.append((line, fields))
            line = reader.line_num + 1
    except csv.Error as error:
        raise DataFormatError(f"{path}:{line}: not a CSV record ({error})") from None
    return records


def read_questions(path: Path, layout: Layout, benchmark: str, subject: str, skips: list[Skip]) -> list[Question]:
    """The questions of one file; rows whose answer is not A-D are skipped and counted."""
    records = _records(path)
    header = None
    if layout.header is not None:
        if not records:
            return []
        header_line, header = records.pop(0)
        expected = list(layout.header)
        extra = header[len(expected) :]
        if header[: len(expected)] != expected or extra not in ([], ["explanation"] if benchmark == "ceval" else []):
            raise DataFormatError(
                f"{path}:{header_line}: expected the {layout.title} header {','.join(expected)}"
                f"{'[,explanation]' if benchmark == 'ceval' else ''}, got {','.join(header)}"
            )
    width = len(header) if header else 6
    question_at, answer_at = layout.question_columns()
    questions = []
    for row, (line, fields) in enumerate(records):
        if len(fields) != width:
            shape = ",".join(header) if header else "question,A,B,C,D,answer"
            raise DataFormatError(f"{path}:{line}: expected {width} fields ({shape}), got {len(fields)}")
        answer = fields[answer_at].strip()
        if answer not in LETTERS:
            skips.append(Skip(benchmark, subject, f"{path}:{line}", f"answer {fields[answer_at]!r} is not A-D"))
            continue
        choices = fields[question_at + 1 : question_at + 5]
        if header is None:  # MMLU: the columns of lm-eval's cais/mmlu dataset
            doc = {"question": fields[0], "subject": subject, "choices": choices, "answer": LETTERS.index(answer)}
        else:
            doc = {name: value for name, value in zip(header, fields) if name}  # CMMLU's unnamed index dropped
            doc[header[answer_at]] = answer
        questions.append(Question(row, line, fields[question_at], choices, answer, doc))
    return questions


def _subject_mapping(folder: Path) -> dict[str, list[str]]:
    file = folder / SUBJECT_MAPPING
    if not file.is_file():
        return {}
    try:
        mapping = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataFormatError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, list) and len(v) >= 2 for v in mapping.values()):
        raise DataFormatError(f'{file}: expected {{"subject": ["English name", "中文名", "category"], ...}}')
    return mapping


def _known_config(benchmark: str, subject: str) -> dict[str, Any] | None:
    """lm-eval's own task definition of a subject, or None if lm-eval does not list the subject."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = lm_eval_tasks_dir() / LAYOUTS[benchmark].lm_eval_yaml.format(subject=subject)
    return load_yaml(path) if path.is_file() else None


def _title(benchmark: str, subject: str, config: dict[str, Any] | None, mapping: dict[str, list[str]]) -> str:
    """The subject's name in the benchmark's prompts: from lm-eval's description, C-Eval's subject_mapping.json,
    or the file name."""
    if subject in mapping:
        return mapping[subject][1 if benchmark != "mmlu" else 0]
    if config is not None and benchmark != "mmlu":
        before, after = LAYOUTS[benchmark].description.split("{title}")
        return config["description"].removeprefix(before).removesuffix(after)
    return subject.replace("_", " ")


def _groups(benchmark: str, subject: str, config: dict[str, Any] | None, mapping: dict[str, list[str]]) -> list[str]:
    if benchmark == "mmlu":
        tag = (config or {}).get("tag")
        return [MMLU_TAGS[tag]] if tag in MMLU_TAGS else []
    if subject in mapping and len(mapping[subject]) > 2:
        return [mapping[subject][2]]
    return [group for group, names in CATEGORIES[benchmark].items() if subject in names.split()]


def read_benchmark(
    benchmark: str, folder: str, subjects: list[str], num_fewshot: int
) -> tuple[list[Subject], list[Skip]]:
    """Every subject of a benchmark folder (or those named in `subjects` that it has), with what was skipped."""
    layout = LAYOUTS[benchmark]
    root = Path(folder)
    eval_dir = root / layout.eval_folder
    expected = f"{eval_dir}/{{subject}}{layout.eval_suffix} and {root}/dev/{{subject}}{layout.dev_suffix}"
    if not eval_dir.is_dir():
        raise ConfigError(f"{layout.title}: no folder {eval_dir} (expected {expected})")
    files = sorted(p for p in eval_dir.iterdir() if p.name.endswith(layout.eval_suffix) and p.is_file())
    names = [p.name[: -len(layout.eval_suffix)] for p in files]
    if not files:
        raise ConfigError(f"{layout.title}: no *{layout.eval_suffix} files in {eval_dir} (expected {expected})")
    wanted = [name for name in subjects if name in names] if subjects else names
    mapping = _subject_mapping(root)
    result: list[Subject] = []
    skips: list[Skip] = []
    for name in wanted:
        eval_file = eval_dir / f"{name}{layout.eval_suffix}"
        dev_file = root / "dev" / f"{name}{layout.dev_suffix}"
        questions = read_questions(eval_file, layout, benchmark, name, skips)
        examples = read_questions(dev_file, layout, benchmark, name, skips) if dev_file.is_file() else []
        reason = ""
        if not questions:
            reason = "no questions with an answer A-D"
        elif num_fewshot and not dev_file.is_file():
            reason = f"no dev file {dev_file} for {num_fewshot}-shot prompts"
        elif len(examples) < num_fewshot:
            reason = f"{dev_file} has {len(examples)} usable examples, fewer than num_fewshot {num_fewshot}"
        if reason:
            skips.append(Skip(benchmark, name, str(eval_file), reason))
            continue
        known = _known_config(benchmark, name)
        subject = Subject(
            benchmark,
            name,
            _title(benchmark, name, known, mapping),
            _groups(benchmark, name, known, mapping),
            questions,
            examples,
            str(eval_file),
        )
        subject.lm_eval_config = lm_eval_config(subject, known)
        result.append(subject)
    return result, skips


def check_subjects(requested: list[str], found: dict[str, list[str]]) -> None:
    """Every name in --subjects must be a subject of one of the benchmark folders read."""
    every = sorted({name for names in found.values() for name in names})
    for name in requested:
        if name not in every:
            hint = closest(name, every)
            where = ", ".join(found)
            raise ConfigError(f"'subjects': {name!r} is not a subject of {where}.{hint}")


def subject_names(benchmark: str, folder: str) -> list[str]:
    layout = LAYOUTS[benchmark]
    eval_dir = Path(folder) / layout.eval_folder
    if not eval_dir.is_dir():
        return []
    return sorted(p.name[: -len(layout.eval_suffix)] for p in eval_dir.iterdir() if p.name.endswith(layout.eval_suffix))


def write_subject(
    folder: str | Path, benchmark: str, subject: str, dev: list[tuple], questions: list[tuple]
) -> tuple[Path, Path]:
    """A subject's dev and scored files in the publisher's layout; rows are (question, [A, B, C, D], answer) or,
    for C-Eval's dev file, (question, choices, answer, explanation). Used by the demo data, tests and benchmarks."""
    layout = LAYOUTS[benchmark]
    files = []
    for split, suffix, rows in (("dev", layout.dev_suffix, dev), (layout.eval_folder, layout.eval_suffix, questions)):
        path = Path(folder) / split / f"{subject}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            explained = benchmark == "ceval" and split == "dev"
            if layout.header is not None:
                writer.writerow([*layout.header, *(["explanation"] if explained else [])])
            for i, (question, choices, answer, *explanation) in enumerate(rows):
                first = [str(i)] if layout.header is not None else []
                writer.writerow([*first, question, *choices, answer, *((explanation or [""])[:1] if explained else [])])
        files.append(path)
    return files[0], files[1]


# --- lm-eval's task definitions -------------------------------------------------------------------------------------
def lm_eval_config(subject: Subject, known: dict[str, Any] | None) -> dict[str, Any]:
    """lm-eval's task definition of the subject (its YAML through its own loader), reading our rows."""
    from lm_eval.tasks._yaml_loader import load_yaml

    layout = LAYOUTS[subject.benchmark]
    if known is None:  # a subject lm-eval does not list: its benchmark's template and description pattern
        known = load_yaml(lm_eval_tasks_dir() / layout.lm_eval_default)
        known["description"] = layout.description.format(title=subject.title)
    config = {**known, "task": subject.task_name}
    config.pop("tag", None)
    config["custom_dataset"] = functools.partial(_dataset, subject, config)
    return config


def _dataset(subject: Subject, config: dict[str, Any], **_: Any):
    """The subject's rows as the DatasetDict lm-eval would have downloaded (scored split + few-shot split)."""
    from datasets import Dataset, DatasetDict

    split = config.get("test_split") or config.get("validation_split")
    docs = [q.doc for q in subject.questions]
    examples = [q.doc for q in subject.examples] or docs[:0]
    return DatasetDict({split: Dataset.from_list(docs), config["fewshot_split"]: Dataset.from_list(examples)})
