"""The package's layers, read from its import statements: no cycle, no upward import, no hidden import.

Layers, bottom to top (a module may import its own layer and those below):
    onsft.errors                      foundation
    onsft.formulas                    pure tensor math (phi, gamma, lambda, sampling, statistics)
    onsft.runtime                     device, dtype, ranks, seeds, model loading, Hub, records, run guard
    onsft.data, onsft.organism        rows, chat encoding, verifiers, data sources, the embedded model
    onsft.engine                      decoding loop, hinted decoding, scorer, trainers
    onsft.pipeline                    the steps commands compose (auditing, rewriting, evaluation, ...)
    onsft.commands                    one module per CLI command
    onsft.cli                         dispatch
Only `compare` (which runs the others in process) and `demo` (the organism's compare experiment) import
other commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import onsft

ROOT = Path(onsft.__file__).parent
LAYERS = {
    "errors": 0,
    "formulas": 1,
    "runtime": 2,
    "data": 3,
    "organism": 3,
    "engine": 4,
    "pipeline": 5,
    "commands": 6,
    "cli": 7,
}
COMMAND_IMPORTS = {"compare": {"audit", "data", "rewrite", "pairs", "train", "eval"}, "demo": {"compare"}}
LINE_LIMIT = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0  # `onsft` itself (its __init__) is the foundation


def imports(tree: ast.AST, module: str) -> list[tuple[str, int, bool]]:
    """(imported onsft module, line, inside a function) for every import statement."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("onsft"))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("onsft"):
                for alias in child.names:
                    # `from onsft.pipeline import report` imports a module; `from onsft.x import name` its module.
                    candidate = f"{child.module}.{alias.name}"
                    target = (
                        candidate
                        if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").is_file()
                        or (ROOT.parent / candidate.replace(".", "/")).is_dir()
                        else child.module
                    )
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {
        module_name(p): imports(ast.parse(p.read_text(encoding="utf-8")), module_name(p))
        for p in sorted(ROOT.rglob("*.py"))
    }


def test_no_upward_import_and_no_function_local_import():
    problems = []
    for module, found in graph().items():
        for target, line, local in found:
            if target == "onsft":
                continue
            if local:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if layer(target) > layer(module):
                problems.append(f"{module}:{line} imports {target} from a higher layer")
            if module.startswith("onsft.commands.") and target.startswith("onsft.commands."):
                mine, theirs = module.split(".")[2], target.split(".")[2]
                if theirs not in COMMAND_IMPORTS.get(mine, set()):
                    problems.append(f"{module}:{line} imports the command {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    edges = {m: sorted({t for t, _, _ in found if t != m and t != "onsft"}) for m, found in graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt in edges and not state.get(nxt):
                dfs(nxt, [*path, nxt])
        state[node] = 2

    for module in edges:
        if not state.get(module):
            dfs(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_what_it_must_refuse():
    """The rules above catch an upward import, a function-local import and a cycle (the checker can fail)."""
    tree = ast.parse("from onsft.commands.train import run\n\ndef f():\n    from onsft.engine import hinted\n")
    found = imports(tree, "onsft.formulas.ddt")
    assert [(t, local) for t, _, local in found] == [("onsft.commands.train", False), ("onsft.engine.hinted", True)]
    assert layer("onsft.commands.train") > layer("onsft.formulas.ddt")


def test_modules_are_small_and_every_layer_exists():
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")}
    too_long = {m: n for m, n in sizes.items() if n > LINE_LIMIT}
    assert not too_long, too_long
    for folder in ("formulas", "runtime", "data", "engine", "pipeline", "commands"):
        assert (ROOT / folder / "__init__.py").is_file(), folder
    # A newcomer finds where phi, gamma and lambda are computed from the names alone.
    assert "def centered_log_likelihood" in (ROOT / "formulas" / "weighting.py").read_text()
    assert "phi" in (ROOT / "formulas" / "ddt.py").read_text()
    assert "def mixing_weight" in (ROOT / "formulas" / "mixing.py").read_text()


def test_one_module_per_command_named_like_it_with_run_and_main():
    from onsft.cli import COMMANDS

    modules = {p.stem for p in (ROOT / "commands").glob("*.py") if p.stem != "__init__"}
    assert modules == set(COMMANDS)
    for name in COMMANDS:
        text = (ROOT / "commands" / f"{name}.py").read_text(encoding="utf-8")
        assert "\ndef main(" in text, name
        assert "\ndef run(" in text, name
