"""Compare reports: answers.jsonl, summary.json, report.md and a self-contained report.html.

One row per (preset, model, question): {preset, model, index, question, answer[, reference, exact_match]
[, reward]}. The HTML escapes every piece of model output and loads nothing from outside the file.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TITLES = {"base": "Base", "sft": "Fine-tuned (SFT)", "dpo": "DPO", "sft_short": "SFT (80 steps)", "rl": "RL"}


def title(label: str) -> str:
    return MODEL_TITLES.get(label, label)


def duels(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, other, duel) for every `model_vs_other` entry of one preset's summary."""
    return [(*key.split("_vs_", 1), value) for key, value in summary.items() if "_vs_" in key]


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]  # per preset: {"models": {label: stats}, "<label>_vs_<other>": {...}, ...}
    settings: dict[str, str]  # preset -> the settings it ran with, in words
    models: dict[str, str]  # label -> model or adapter path
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self, preset: str) -> list[dict[str, Any]]:
        """One entry per question: the question, its reference and each model's row."""
        by_index: dict[int, dict[str, Any]] = {}
        for row in self.rows:
            if row["preset"] != preset:
                continue
            entry = by_index.setdefault(
                row["index"], {"question": row["question"], "reference": row.get("reference"), "rows": {}}
            )
            entry["rows"][row["model"]] = row
        return [by_index[i] for i in sorted(by_index)]


def write_reports(result: CompareResult, output_dir: str | Path) -> dict[str, Path]:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "answers": output / "answers.jsonl",
        "summary": output / "summary.json",
        "markdown": output / "report.md",
        "html": output / "report.html",
    }
    paths["answers"].write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows), encoding="utf-8"
    )
    summary = {"models": result.models, "settings": result.settings, "meta": result.meta, "results": result.summary}
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(result), encoding="utf-8")
    paths["html"].write_text(render_html(result), encoding="utf-8")
    return paths


# --- shared wording ------------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _stats_rows(result: CompareResult, preset: str) -> tuple[list[str], list[list[str]]]:
    models = result.summary[preset]["models"]
    first = next(iter(models.values()))
    header = ["Model", "Answers"]
    header += ["Exact match"] if "exact_match" in first else []
    header += ["Mean reward"] if "mean_reward" in first else []
    rows = []
    for label, stats in models.items():
        cells = [title(label), str(stats["answers"])]
        cells += [percent(stats["exact_match"])] if "exact_match" in stats else []
        cells += [_number(stats["mean_reward"])] if "mean_reward" in stats else []
        rows.append(cells)
    return header, rows


def _win_lines(result: CompareResult, preset: str) -> list[str]:
    lines = []
    for label, other, duel in duels(result.summary[preset]):
        unscored = f", {duel['unscored']} not scored (too long for the reward model)" if duel["unscored"] else ""
        lines.append(
            f"{title(label)} vs {title(other)} by reward: {duel['wins']} wins, {duel['ties']} ties, "
            f"{duel['losses']} losses{unscored}; win rate {percent(duel['win_rate'])} (ties count half)"
        )
    return lines


def _answer_note(row: dict[str, Any]) -> str:
    notes = []
    if "exact_match" in row:
        notes.append("exact match" if row["exact_match"] else "wrong")
    if "reward" in row:
        notes.append(f"reward {_number(row['reward'])}")
    return ", ".join(notes)


def _overview(result: CompareResult) -> list[tuple[str, str]]:
    items = [(f"{title(label)} model", path) for label, path in result.models.items()]
    items += [(key.replace("_", " ").capitalize(), str(value)) for key, value in result.meta.items()]
    return items


# --- Markdown ------------------------------------------------------------------------------------------------------


def md_cell(text: str | None) -> str:
    if text is None or text == "":
        return "*(empty)*" if text == "" else ""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(result: CompareResult) -> str:
    lines = ["# Base vs fine-tuned: answers side by side", ""]
    lines += md_table(["", ""], [[md_cell(k), md_cell(v)] for k, v in _overview(result)])
    labels = list(result.models)
    for preset, described in result.settings.items():
        lines += ["", f"## Preset `{preset}`", "", f"Settings: `{described}`", ""]
        lines += md_table(*_stats_rows(result, preset))
        for win in _win_lines(result, preset):
            lines += ["", win]
        table = result.table(preset)
        has_reference = any(entry["reference"] is not None for entry in table)
        header = ["#", "Question"] + (["Reference"] if has_reference else [])
        header += [title(label) for label in labels]
        rows = []
        for number, entry in enumerate(table, 1):
            cells = [str(number), md_cell(entry["question"])]
            cells += [md_cell(entry["reference"])] if has_reference else []
            for label in labels:
                row = entry["rows"].get(label)
                note = _answer_note(row) if row else ""
                cells.append(md_cell(row["answer"] if row else None) + (f" <br>*({note})*" if note else ""))
            rows.append(cells)
        lines += [""] + md_table(header, rows)
    return "\n".join(lines) + "\n"


# --- HTML ----------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.4rem 0.6rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
table.overview, table.stats { width: auto; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-family: inherit; }
.note { color: #666; font-size: 0.85em; }
.right { color: #1a7f37; } .wrong { color: #cf222e; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html_answer(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    css = ""
    if "exact_match" in row:
        css = "right" if row["exact_match"] else "wrong"
    note = _answer_note(row)
    note_html = f'<div class="note {css}">{escape(note)}</div>' if note else ""
    return f"<pre>{escape(row['answer']) or '<em>(empty)</em>'}</pre>{note_html}"


def html_page_head(page_title: str, heading: str, overview: list[tuple[str, str]]) -> list[str]:
    """The start of a self-contained report page: head with the shared style, heading, overview table."""
    return [
        "<!DOCTYPE html>",
        '<html lang="zh"><head><meta charset="utf-8">',
        f"<title>{escape(page_title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(heading)}</h1>",
        '<table class="overview"><tbody>'
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in overview)
        + "</tbody></table>",
    ]


def render_html(result: CompareResult) -> str:
    labels = list(result.models)
    parts = html_page_head("Base vs fine-tuned", "Base vs fine-tuned: answers side by side", _overview(result))
    for preset, described in result.settings.items():
        parts.append(f"<h2>Preset <code>{escape(preset)}</code></h2>")
        parts.append(f"<p>Settings: <code>{escape(described)}</code></p>")
        header, stats = _stats_rows(result, preset)
        parts.append(html_table(header, [[escape(c) for c in row] for row in stats], "stats"))
        parts += [f"<p><strong>{escape(win)}</strong></p>" for win in _win_lines(result, preset)]
        table = result.table(preset)
        has_reference = any(entry["reference"] is not None for entry in table)
        header = ["#", "Question"] + (["Reference"] if has_reference else [])
        header += [title(label) for label in labels]
        rows = []
        for number, entry in enumerate(table, 1):
            cells = [str(number), f"<pre>{escape(entry['question'])}</pre>"]
            cells += [f"<pre>{escape(entry['reference'])}</pre>"] if has_reference else []
            cells += [_html_answer(entry["rows"].get(label)) for label in labels]
            rows.append(cells)
        parts.append(html_table(header, rows, "answers"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
