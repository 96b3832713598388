"""The package's layers: every import flows one way (down the table in docs/architecture.md), and no module
graph has a cycle. Imports inside functions and under TYPE_CHECKING count: a lazy import is still a
dependency, and a cycle through one is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "quietgpt"

# lowest first; a module may import from its own layer and the layers above it in this list, never below
LAYERS = [
    ("errors", "utils", "presets", "stats"),
    ("nn",),
    ("quant",),
    ("config",),
    ("data", "runs"),
    ("interop",),
    ("measurement",),
    ("training",),
    ("report",),
    ("study",),
    ("cli", "__main__", "__init__"),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}
SELF_CONTAINED = ("interop.hf_modeling",)  # shipped to Hugging Face users: imports only torch and transformers


def module_name(path: Path, src: Path = SRC) -> str:
    """src/quietgpt/nn/model.py -> "nn.model"; a package's __init__ is the package; the root is "__init__"."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    """"nn.model" -> "nn"; "cli" -> "cli"."""
    return module.split(".")[0]


def imports_of(path: Path, module: str, src: Path = SRC) -> set[str]:
    """The quietgpt modules (named as module_name does) that `path` imports, at the top or inside functions."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name[len("quietgpt."):] for a in node.names if a.name.startswith("quietgpt.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [] if module == "__init__" else module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "quietgpt" or (node.module or "").startswith("quietgpt."):
                target = node.module[len("quietgpt."):] if node.module != "quietgpt" else ""
            else:
                continue
            for alias in node.names:  # `from quietgpt.nn import model` imports the module nn.model
                sub = f"{target}.{alias.name}" if target else alias.name
                as_path = src / sub.replace(".", "/")
                found.add(sub if as_path.with_suffix(".py").exists() or as_path.is_dir() else target)
    return {m or "__init__" for m in found}


def graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the quietgpt modules it imports."""
    mods = {module_name(p, src): p for p in src.rglob("*.py")}
    return {m: imports_of(p, m, src) - {m} for m, p in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in g.items() for d in deps
                  if RANK[layer_of(d)] > RANK[layer_of(m)] and not (d == "__init__" and m in ("cli", "__main__")))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first walk meets (empty when the graph is a DAG)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d in g and d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in graph() if layer_of(m) not in RANK)
    assert not missing, f"modules outside every layer of LAYERS: {missing}"


def test_imports_flow_down_the_layers():
    upward = upward_imports(graph())
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("module", SELF_CONTAINED)
def test_the_exported_modeling_file_imports_nothing_of_quietgpt(module):
    for path in (SRC / module.replace(".", "/")).rglob("*.py"):
        assert not imports_of(path, module_name(path)), f"{path} imports quietgpt"


def test_the_checker_catches_a_planted_upward_import_and_cycle(tmp_path):
    """The checkers themselves, on a planted package: nn.a imports the study layer lazily (upward), and
    data.x and data.y import each other (a cycle, one of them through a relative import)."""
    src = tmp_path / "quietgpt"
    for folder in ("nn", "study", "data"):
        (src / folder).mkdir(parents=True)
        (src / folder / "__init__.py").write_text("")
    (src / "nn" / "a.py").write_text("def f():\n    from quietgpt.study import run\n")
    (src / "study" / "run.py").write_text("from quietgpt.nn import a\n")
    (src / "data" / "x.py").write_text("from .y import g\n")
    (src / "data" / "y.py").write_text("from quietgpt.data.x import f\n")
    g = graph(src)
    assert upward_imports(g) == ["nn.a imports study.run"]
    assert sorted(tuple(c) for c in cycles(g)) == [("data.x", "data.y", "data.x"), ("nn.a", "study.run", "nn.a")]
