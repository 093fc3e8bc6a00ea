"""The docs name only files that exist: every repository path in README.md, docs/*.md and benchmarks/README.md.

A repository path is any `dir/...` whose first folder is one of the repository's top-level folders (in
backticks, links or prose), a relative Markdown link, or a bare `name.py` / `name.sh`; globs must match a file.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

from tests.utils import REPO

DOCS = ["README.md", "docs/*.md", "benchmarks/README.md"]
# Named in the docs but written by a run or a command, not kept in the repository.
WRITTEN_BY_A_RUN = {
    "cpp/llm_chat": "cpp/build.sh builds it",
    "cpp/llm_logits": "cpp/build.sh builds it",
    "cpp/llm_bench": "cpp/build.sh builds it",
    "benchmarks/wheels": "the wheel folder a GPU-machine user downloads for gpu_check.sh",
    "config/x.json": "an example file name in an error message",
    "data/x.jsonl": "an example file name in an error message",
}
PLACEHOLDER = re.compile(r"[<{\[]|\.\.\.")
LINK = re.compile(r"\]\(([^)\s]+)\)")
BARE_SCRIPT = re.compile(r"(?<![\w/.-])([\w-]+\.(?:py|sh))\b")


def repository_files(repo: Path) -> list[str]:
    """Tracked files and new ones git does not ignore."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout.split()


def missing_paths(doc: Path, repo: Path, files: list[str]) -> list[str]:
    """`doc:line: path` for each repository path the document names that does not exist."""
    folders = sorted({name.split("/")[0] for name in files if "/" in name})
    alternatives = "|".join(map(re.escape, folders))
    in_repo = re.compile(r"(?<![\w/.~-])((?:" + alternatives + r")/[\w./*{},<>\[-]*)")
    names = {Path(name).name for name in files}
    missing = []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        named = [m.rstrip(".,:;)]").rstrip("/") for m in in_repo.findall(line)]
        exists = [
            path in WRITTEN_BY_A_RUN
            or bool(PLACEHOLDER.search(path))
            or (fnmatch.filter(files, path) or fnmatch.filter(files, path + "/*") if "*" in path else False)
            or (repo / path).exists()
            for path in named
        ]
        links = [t.split("#")[0] for t in LINK.findall(line) if "://" not in t and not t.startswith("#")]
        named += links
        exists += [(doc.parent / target).exists() for target in links]
        scripts = BARE_SCRIPT.findall(line)
        named += scripts
        exists += [name in names or (doc.parent / name).exists() for name in scripts]
        missing += dict.fromkeys(f"{doc.relative_to(repo)}:{number}: {p}" for p, ok in zip(named, exists) if not ok)
    return missing


def test_the_docs_name_only_files_that_exist():
    files = repository_files(REPO)
    docs = sorted({path for pattern in DOCS for path in REPO.glob(pattern)})
    assert len(docs) > 10, docs
    missing = [line for doc in docs for line in missing_paths(doc, REPO, files)]
    assert not missing, "documents name files that do not exist:\n" + "\n".join(missing)


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    (tmp_path / "component").mkdir()
    (tmp_path / "component" / "reader.py").write_text("", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.md").write_text("# Data\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "# Tiny\n\nReaders: `component/reader.py`; details in [the data page](docs/data.md).\n"
        "Run `python component/reader.py --help`; outputs go to `output_dir/...`.\n",
        encoding="utf-8",
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def test_a_renamed_file_fails_naming_the_document_line_and_path(tiny_repo):
    readme = tiny_repo / "README.md"
    assert missing_paths(readme, tiny_repo, repository_files(tiny_repo)) == []
    (tiny_repo / "component" / "reader.py").rename(tiny_repo / "component" / "readers.py")
    (tiny_repo / "docs" / "data.md").rename(tiny_repo / "docs" / "datasets.md")
    assert missing_paths(readme, tiny_repo, repository_files(tiny_repo)) == [
        "README.md:3: component/reader.py",
        "README.md:3: docs/data.md",
        "README.md:4: component/reader.py",
    ]
