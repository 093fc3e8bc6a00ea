"""The layout's rules that import-linter does not check: no private names across modules, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.utils import REPO

PACKAGE = REPO / "component"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `import` / `from ... import` in a file, relative ones resolved."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        f"{name} imports {imported}.{item}"
        for name, path in MODULES.items()
        for imported, items in imports_of(path)
        if imported.startswith("component") and imported != name
        for item in items
        if item.startswith("_") and not item.startswith("__")
    ]
    assert offenders == []


def test_no_import_cycles_between_modules():
    graph = {
        name: {m for m, items in imports_of(path) for m in [m, *(f"{m}.{i}" for i in items)] if m in MODULES}
        for name, path in MODULES.items()
    }
    for name in graph:  # a package's __init__ importing its own submodules is not a cycle
        graph[name] = {m for m in graph[name] if m != name and not m.startswith(name + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


PLUGIN = REPO / "vllm_plugin" / "llm_training_vllm"
# What a vLLM environment (requirements-vllm.txt) has besides the standard library.
VLLM_ENVIRONMENT = {"vllm", "torch", "transformers", "huggingface_hub", "sentencepiece"}


def test_the_vllm_plugin_imports_only_what_a_vllm_environment_has():
    """vllm_plugin/ runs in vLLM's environment: never this project's component package, nothing vLLM lacks. Its
    Baichuan config and tokenizer are component/model/baichuan's standalone files themselves (links, one source)."""
    import sys

    for name in ("configuration_baichuan.py", "tokenization_baichuan.py"):
        assert (PLUGIN / name).resolve() == (REPO / "component" / "model" / "baichuan" / name).resolve(), name
    own = "vllm_plugin.llm_training_vllm"
    outside = sorted(
        f"{path.name}: {module}"
        for path in PLUGIN.glob("*.py")
        for module, _ in imports_of(path)
        if not module.startswith(own)
        and module.split(".")[0] not in VLLM_ENVIRONMENT | set(sys.stdlib_module_names) | {"__future__"}
    )
    assert not outside, outside
