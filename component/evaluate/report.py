"""evaluate.py's outputs: results.json, samples/NAME/TASK.jsonl, report.md, report.html (self-contained, the
chart inlined) and chart.png.

The reports look like generate.py compare's: models as columns; rows are each benchmark, then its subject
groups; an adapter's cell shows its score and its difference from the base with the 95% paired-bootstrap
interval (percentage points), so a drop whose interval holds 0 cannot be told from noise. Per-subject tables,
the prefix-cache counts and every skip follow. results.json holds no timings, so the same command writes the
same file; the reports add wall times.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from component.evaluate.benchmarks import LAYOUTS
from component.inference.report import escape, html_page_head, html_table, md_cell, md_table, percent, title


def headline(task: str, protocol: str) -> str:
    """The score a benchmark reports as overall: CMMLU's authors average the subjects; the others count questions."""
    return "acc_macro" if protocol == "official" and task == "cmmlu" else "acc"


def task_title(task: str) -> str:
    return LAYOUTS[task].title if task in LAYOUTS else task


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def difference_text(entry: dict[str, Any]) -> str:
    """'+1.8 [-0.5, +4.1]' in percentage points."""
    low, high = entry.get("low"), entry.get("high")
    interval = f" [{_points(low)}, {_points(high)}]" if low is not None else ""
    return f"{_points(entry['delta'])}{interval}"


def score_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table: per task its overall row, then its groups; a cell per model."""
    models = list(results["models"])
    protocol = results["settings"]["protocol"]
    header = ["Benchmark", "Questions", *[title(m) for m in models]]
    rows = []
    for task, base in results["models"]["base"].items():
        key = headline(task, protocol)
        lines = [(f"{task_title(task)} ({'mean of subjects' if key == 'acc_macro' else 'accuracy'})", base, None)]
        lines += [(f"  {group}", scores, group) for group, scores in base["groups"].items()]
        for label, scores, group in lines:
            cells = [label, str(scores["n"])]
            for model in models:
                mine = results["models"][model][task]
                mine = mine["groups"][group] if group else mine
                cell = percent(mine[key])
                if model != "base":
                    diff = results["differences"][model][task]
                    diff = diff["groups"][group] if group else diff
                    cell += f" ({difference_text(diff[key])})"
                cells.append(cell)
            rows.append(cells)
    return header, rows


def subject_rows(results: dict[str, Any], task: str) -> tuple[list[str], list[list[str]]]:
    models = list(results["models"])
    header = ["Subject", "Questions", *[title(m) for m in models]]
    rows = []
    for subject, base in results["models"]["base"][task]["subjects"].items():
        cells = [subject, str(base["n"])]
        cells += [percent(results["models"][m][task]["subjects"][subject]["acc"]) for m in models]
        rows.append(cells)
    return header, rows


def cache_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for model, tasks in results["models"].items():
        for task, scores in tasks.items():
            counts = scores.get("prefix_cache")
            if counts:
                lines.append(
                    f"{title(model)}, {task_title(task)}: {counts['cached']} questions on the shared prefix's cache, "
                    f"{counts['full_forward']} full forward (tokens not splitting at the prefix, or too long)"
                )
    return lines


def overview(results: dict[str, Any], meta: dict[str, Any]) -> list[tuple[str, str]]:
    settings = results["settings"]
    items = [("Base model", str(settings["model_name_or_path"]))]
    items += [(f"{title(name)} adapter", path) for name, path in settings["adapters"].items()]
    items += [
        ("Protocol", settings["protocol"]),
        ("Tasks", ", ".join(settings["tasks"])),
        ("Few-shot examples", str(settings["num_fewshot"])),
        ("Limit per subject", str(settings["limit"] or "none")),
        ("Quantization", str(settings["quantization"] or "none")),
        ("Prefix cache", "on" if settings["prefix_cache"] else "off"),
        ("Interval", f"95% paired bootstrap, {settings['bootstrap']} resamples, seed {settings['seed']}"),
        ("Skipped", f"{len(results['skipped'])} (listed below)"),
    ]
    items += [(f"{title(m)} seconds", f"{s:.1f}") for m, s in meta.get("seconds", {}).items()]
    return items


def skip_rows(results: dict[str, Any]) -> list[list[str]]:
    return [[task_title(s["benchmark"]), s["subject"], s["where"], s["reason"]] for s in results["skipped"]]


# --- chart ----------------------------------------------------------------------------------------------------------
def render_chart(results: dict[str, Any]) -> bytes:
    """PNG: per benchmark, each model's score (left) and each adapter's difference from the base with its 95%
    interval (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    tasks = list(results["models"]["base"])
    protocol = results["settings"]["protocol"]
    adapters = models[1:]
    figure, axes = plt.subplots(1, 2 if adapters else 1, figsize=(11 if adapters else 6, 4), squeeze=False)
    left = axes[0][0]
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        values = [100 * (results["models"][model][t][headline(t, protocol)] or 0) for t in tasks]
        left.bar([i + m * width for i in range(len(tasks))], values, width, label=title(model))
    left.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], [task_title(t) for t in tasks])
    left.set_ylabel("accuracy (%)")
    left.set_title("Score per benchmark")
    left.legend(fontsize="small")
    if adapters:
        right = axes[0][1]
        step = 0.8 / len(adapters)
        for a, adapter in enumerate(adapters):
            entries = [results["differences"][adapter][t][headline(t, protocol)] for t in tasks]
            xs = [i + a * step for i in range(len(tasks))]
            deltas = [100 * e["delta"] for e in entries]
            errors = [
                [100 * (e["delta"] - e["low"]) if e["low"] is not None else 0 for e in entries],
                [100 * (e["high"] - e["delta"]) if e["high"] is not None else 0 for e in entries],
            ]
            right.errorbar(xs, deltas, yerr=errors, fmt="o", capsize=4, label=title(adapter))
        right.axhline(0, color="#888", linewidth=1)
        right.set_xticks(
            [i + step * (len(adapters) - 1) / 2 for i in range(len(tasks))], [task_title(t) for t in tasks]
        )
        right.set_ylabel("difference from base (points)")
        right.set_title("Adapter minus base, 95% interval")
        right.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


# --- documents --------------------------------------------------------------------------------------------------------
HEADING = "Benchmarks: base vs adapters"
NOTE = (
    "An adapter's cell: its score, then (its difference from the base in percentage points [95% interval]). "
    "An interval that holds 0 is a difference these questions cannot tell from noise."
)


def render_markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# {HEADING}", ""]
    lines += md_table(["", ""], [[md_cell(k), md_cell(v)] for k, v in overview(results, meta)])
    lines += ["", "## Scores", "", NOTE, ""]
    header, rows = score_rows(results)
    lines += md_table(header, [[md_cell(c) for c in row] for row in rows])
    lines += ["", "![scores and differences](chart.png)", ""]
    for line in cache_lines(results):
        lines += [f"- {line}"]
    for task in results["models"]["base"]:
        header, rows = subject_rows(results, task)
        lines += ["", f"## {task_title(task)}: subjects", ""]
        lines += md_table(header, [[md_cell(c) for c in row] for row in rows])
    lines += ["", "## Skipped", ""]
    skipped = skip_rows(results)
    lines += (
        md_table(["Benchmark", "Subject", "Where", "Why"], [[md_cell(c) for c in r] for r in skipped])
        if skipped
        else ["Nothing."]
    )
    return "\n".join(lines) + "\n"


def render_html(results: dict[str, Any], meta: dict[str, Any], chart: bytes) -> str:
    parts = html_page_head(HEADING, HEADING, overview(results, meta))
    header, rows = score_rows(results)
    parts += ["<h2>Scores</h2>", f'<p class="note">{escape(NOTE)}</p>']
    parts.append(html_table(header, [[escape(c) for c in row] for row in rows], "stats"))
    encoded = base64.b64encode(chart).decode("ascii")
    parts.append(f'<p><img alt="scores and differences" src="data:image/png;base64,{encoded}"></p>')
    parts += [f'<p class="note">{escape(line)}</p>' for line in cache_lines(results)]
    for task in results["models"]["base"]:
        header, rows = subject_rows(results, task)
        parts.append(f"<details><summary>{escape(task_title(task))}: {len(rows)} subjects</summary>")
        parts.append(html_table(header, [[escape(c) for c in row] for row in rows], "stats") + "</details>")
    parts.append("<h2>Skipped</h2>")
    skipped = skip_rows(results)
    parts.append(
        html_table(["Benchmark", "Subject", "Where", "Why"], [[escape(c) for c in r] for r in skipped])
        if skipped
        else "<p>Nothing.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_outputs(
    results: dict[str, Any], rows: dict[str, dict[str, list[dict]]], output_dir: str | Path, meta: dict[str, Any]
) -> dict[str, Path]:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": output / "results.json",
        "markdown": output / "report.md",
        "html": output / "report.html",
        "chart": output / "chart.png",
        "samples": output / "samples",
    }
    paths["results"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for model, tasks in rows.items():
        folder = paths["samples"] / model
        folder.mkdir(parents=True, exist_ok=True)
        for task, task_rows in tasks.items():
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in task_rows)
            (folder / f"{task}.jsonl").write_text(text, encoding="utf-8")
    chart = render_chart(results)
    paths["chart"].write_bytes(chart)
    paths["markdown"].write_text(render_markdown(results, meta), encoding="utf-8")
    paths["html"].write_text(render_html(results, meta, chart), encoding="utf-8")
    return paths
