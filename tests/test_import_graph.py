"""The project's import graph has no cycle, and the generic backbone code names no backbone family.

The graph is read from the source (``ast``), not from ``sys.modules``: every ``import``/``from … import`` statement of
``prune/``, ``eval/`` and ``scripts/`` is an edge, wherever it sits. Function-level imports count too: a lazy import
only postpones a circle to the first call, and the next module-level import added on either side makes it fail at
import time. Imports under ``if TYPE_CHECKING:`` do not count: they never run (annotations are strings under
``from __future__ import annotations``), and a type-only reference back to a caller is how a callee names it.

``eval.backbones`` imports the modules of ``eval/families/`` by discovery (``pkgutil``), which ``ast`` cannot see;
those edges are added by hand below, so a family module importing ``eval.backbones`` is caught as a circle too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("prune", "eval", "scripts")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module under :data:`ROOTS` (``scripts/x.py`` is ``scripts.x``)."""
    return {_module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the import nodes inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    skipped |= {id(n) for n in ast.walk(stmt)}
    return skipped


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` loads: itself, else its longest prefix that is one (``a.b.attr`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules its import statements load (module- and function-level, not TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: drop level-1 packages from the importer's package
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from pkg import sub`` loads the submodule; ``from mod import attr`` loads mod.
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            edges |= {t for t in (_resolve(t, modules) for t in targets) if t is not None and t != name}
        graph[name] = edges
    # Discovery edges ast cannot see: eval.backbones imports every module of eval/families/ (see the docstring).
    graph.setdefault("eval.backbones", set()).update(m for m in modules if m.startswith("eval.families."))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, …, a]``, or ``None`` (iterative depth-first search, sorted for a stable answer)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle_between_project_modules():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_function_level_imports_and_skips_type_checking(tmp_path):
    # The checker itself must be able to fail: a circle closed by a lazy import is found, a TYPE_CHECKING one is not.
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py", "c": tmp_path / "c.py"}
    modules["a"].write_text("import b\n")
    modules["b"].write_text("def f():\n    from a import x\n")
    modules["c"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import x\nimport a\n")
    graph = import_graph(modules)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}, "eval.backbones": set()}
    assert find_cycle(graph) == ["a", "b", "a"]
    modules["b"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import x\n")
    assert find_cycle(import_graph(modules)) is None


# Words that name a backbone family, a model, or a piece only some families have. eval/backbones.py is the code every
# family shares; a family's tokenizer, prompt, weight check, loader or preprocessing goes to eval/families/.
FAMILY_WORDS = (
    "llava", "onevision", "pllava", "st_llm", "st-llm", "stllm", "qwen", "vicuna", "llama", "siglip",
    "q-former", "qformer", "bert", "eva", "im_start", "im_end", "<video>", "<image>",
)  # fmt: skip


def test_generic_backbone_module_names_no_family():
    from eval.backbones import FAMILIES

    models = [p.stem for p in (REPO / "configs" / "model").glob("*.yaml")]
    words = {*FAMILY_WORDS, *FAMILIES, *models}
    text = (REPO / "eval" / "backbones.py").read_text().lower()
    found = sorted(w for w in words if re.search(rf"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])", text))
    assert not found, f"eval/backbones.py names family-specific things {found}; move them to eval/families/<family>.py"
