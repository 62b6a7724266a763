"""The package's layers, read from its import statements: no cycle, no upward import, no hidden import;
and every file onsft writes goes through the atomic writers of `onsft.runtime.records`.

Layers, bottom to top (a module may import its own folder and the folders below; no two folders import
each other, at module level or inside a function; the folders' order is docs/design.md's table's):
    onsft.errors                      foundation
    onsft.formulas                    pure tensor math (phi, gamma, lambda, sampling, statistics)
    onsft.runtime                     device, dtype, ranks, seeds, model loading, Hub, records, run guard
    onsft.data                        rows, chat encoding, verifiers, reasoning-gym, the data specs
    onsft.organism                    the embedded model: its tasks (checked with data's verifier helpers)
    onsft.engine                      decoding loop, hinted decoding, scorer, trainers
    onsft.pipeline                    one folder per stage (audit, rewrite, evaluate, pairs, train, data, compare,
                                      demo), each with its typed `run` in `stage.py`; shared figures in report.py
    onsft.commands                    one thin module per CLI command: parse argv, call its stage's run, print
    onsft.cli                         dispatch
A command imports only its own stage's folder, the runtime and onsft.errors; no command imports another.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import onsft

ROOT = Path(onsft.__file__).parent
DESIGN = ROOT.parents[1] / "docs" / "design.md"
ORDER = ("errors", "formulas", "runtime", "data", "organism", "engine", "pipeline", "commands", "cli")
LAYERS = {name: rank for rank, name in enumerate(ORDER)}
# The stage folder (onsft.pipeline.<stage>) each command calls; a command imports only it, the runtime and errors.
COMMAND_STAGES = {
    "audit": "audit",
    "rewrite": "rewrite",
    "eval": "evaluate",
    "pairs": "pairs",
    "train": "train",
    "data": "data",
    "compare": "compare",
    "demo": "demo",
}
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
    assert "def centered_log_likelihood" in (ROOT / "formulas" / "ddt.py").read_text()  # phi, once
    assert "def centered_log_likelihood" not in (ROOT / "formulas" / "weighting.py").read_text()
    assert "def token_gamma" in (ROOT / "formulas" / "weighting.py").read_text()
    assert "def mixing_weight" in (ROOT / "formulas" / "mixing.py").read_text()


def test_one_module_per_command_named_like_it_with_run_and_main():
    """Each command is `main(argv)` over its stage's `run`, re-exported as `onsft.commands.<name>.run` (the
    Python API) and the very function the stage defines."""
    import importlib

    from onsft.cli import COMMANDS

    modules = {p.stem for p in (ROOT / "commands").glob("*.py") if p.stem != "__init__"}
    assert modules == set(COMMANDS) == set(COMMAND_STAGES)
    for name in COMMANDS:
        text = (ROOT / "commands" / f"{name}.py").read_text(encoding="utf-8")
        assert "\ndef main(" in text, name
        assert "\ndef run(" not in text, f"{name}: the command's work belongs to its stage"
        command = importlib.import_module(f"onsft.commands.{name}")
        stage = importlib.import_module(f"onsft.pipeline.{COMMAND_STAGES[name]}.stage")
        assert command.run is stage.run, name
        assert "\ndef run(" in (ROOT / "pipeline" / COMMAND_STAGES[name] / "stage.py").read_text(encoding="utf-8")


def test_commands_import_only_their_stage_the_runtime_and_errors():
    problems = []
    for module, found in graph().items():
        if not module.startswith("onsft.commands."):
            continue
        stage = f"onsft.pipeline.{COMMAND_STAGES[module.split('.')[2]]}"
        for target, line, _ in found:
            allowed = (stage + ".", "onsft.runtime.", "onsft.errors")
            if not (target == stage or target.startswith(allowed)):
                problems.append(f"{module}:{line} imports {target}: a command imports only {stage}, runtime, errors")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ folders


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "onsft"


def folder_edges() -> dict[tuple[str, str], str]:
    """(importing folder, imported folder) -> one `module:line` that makes the edge, over every import
    statement, at module level or inside a function."""
    edges: dict[tuple[str, str], str] = {}
    for module, found in graph().items():
        for target, line, _ in found:
            pair = (folder(module), folder(target))
            if "onsft" not in pair and pair[0] != pair[1]:
                edges.setdefault(pair, f"{module}:{line}")
    return edges


def test_no_two_folders_import_each_other_and_folders_import_only_down():
    edges = folder_edges()
    both_ways = [
        f"{a} <-> {b} ({edges[(a, b)]} imports {b}; {edges[(b, a)]} imports {a})"
        for a, b in edges
        if (b, a) in edges and a < b
    ]
    assert not both_ways, "\n".join(both_ways)
    upward = [f"{where}: {a} imports {b}, a later folder" for (a, b), where in edges.items() if LAYERS[b] > LAYERS[a]]
    assert not upward, "\n".join(upward)
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
    assert folders - {"__init__"} == set(ORDER), "every folder (and top-level module) has a place in ORDER"


def design_order() -> list[str]:
    """The folders of docs/design.md's layer table, in its row order (bottom layer first)."""
    text = DESIGN.read_text(encoding="utf-8")
    table = text[text.index("## The layers") :].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `(\w+)/` \|", table, re.M)]


def test_the_folder_order_is_the_one_docs_design_states():
    assert design_order() == [name for name in ORDER if (ROOT / name).is_dir()]


# ------------------------------------------------------------------------------------------ writers

# Every file onsft writes goes through onsft.runtime.records: a whole file through atomic_open (the
# write_*_atomic helpers), a folder through atomic_directory. These are the only other writes, each with why.
WRITES_ALLOWED = {
    ("onsft.runtime.records:atomic_open", "open(mode=<computed>)"): "the temporary file of every whole-file "
    "write, renamed into place",
    ("onsft.runtime.records:atomic_open", "os.replace"): "the rename of that temporary file",
    ("onsft.runtime.records:atomic_directory", "os.replace"): "the rename of a folder built under a temporary name",
    ("onsft.runtime.records:open_for_append", "open(mode='a')"): "append-only records: the .partial JSONL of a "
    "resumable job (ResumableJsonl), fsynced row by row so a killed job resumes where it stopped; the finished "
    "file is written by write_jsonl_atomic",
    ("onsft.runtime.records:ResumableJsonl._load_existing", "open(mode='r+b')"): "append-only records: cuts a "
    "torn last line (a SIGKILL mid-write) off that same .partial file before appending again",
    ("onsft.pipeline.report:figure_png", "savefig"): "renders into an in-memory io.BytesIO; the bytes reach "
    "disk through save_png (write_bytes_atomic)",
    ("onsft.cli:main", "os.open"): "points stdout at os.devnull after a closed pipe; writes no file",
}
WRITE_METHODS = {"write_text", "write_bytes", "savefig", "to_csv", "to_json", "to_parquet", "save_to_disk"}
WRITE_FUNCTIONS = {
    "json": {"dump"},
    "yaml": {"dump", "safe_dump"},
    "pickle": {"dump"},
    "torch": {"save"},
    "np": {"save", "savez", "savetxt"},
    "numpy": {"save", "savez", "savetxt"},
    "os": {"replace", "rename", "renames", "link", "fdopen"},
    "shutil": {"copy", "copy2", "copyfile", "copytree", "move"},
}
OS_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC")


def write_kind(call: ast.Call) -> str | None:
    """What kind of file write `call` is, or None for a call that writes no file."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
    if owner == "os" and name == "open":
        flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
        return "os.open" if any(flag in flags for flag in OS_WRITE_FLAGS) else None
    if name == "open":
        builtin = isinstance(func, ast.Name)  # open(file, mode) vs Path(...).open(mode)
        modes = [k.value for k in call.keywords if k.arg == "mode"]
        modes += call.args[1:2] if builtin else call.args[:1]
        if not modes:
            return None
        mode = modes[0]
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            if re.fullmatch(r"[rwxabt+]+", mode.value) and set(mode.value) & set("wxa+"):
                return f"open(mode={mode.value!r})"
            return None
        return "open(mode=<computed>)" if builtin or any(k.arg == "mode" for k in call.keywords) else None
    if isinstance(func, ast.Attribute) and name in WRITE_METHODS:
        return name
    if owner in WRITE_FUNCTIONS and name in WRITE_FUNCTIONS[owner]:
        return f"{owner}.{name}"
    if isinstance(func, ast.Attribute) and name == "rename":
        return "Path.rename"
    if isinstance(func, ast.Attribute) and name == "replace" and len(call.args) == 1 and not call.keywords:
        return "Path.replace"  # str.replace takes two arguments
    return None


def writes(tree: ast.AST, module: str) -> list[tuple[str, str, int]]:
    """(module:function, kind, line) for every file write in `tree`."""
    found = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = [*scope, child.name]
            if isinstance(child, ast.Call) and (kind := write_kind(child)):
                found.append((f"{module}:{'.'.join(scope)}", kind, child.lineno))
            visit(child, inner)

    visit(tree, [])
    return found


def all_writes() -> list[tuple[str, str, int]]:
    return [
        w for p in sorted(ROOT.rglob("*.py")) for w in writes(ast.parse(p.read_text(encoding="utf-8")), module_name(p))
    ]


def test_every_file_is_written_through_the_atomic_writers():
    found = all_writes()
    bare = [f"{where} line {line}: {kind}" for where, kind, line in found if (where, kind) not in WRITES_ALLOWED]
    assert not bare, "write through onsft.runtime.records (write_text_atomic, write_json_atomic, ...):\n" + "\n".join(
        bare
    )
    stale = set(WRITES_ALLOWED) - {(where, kind) for where, kind, _ in found}
    assert not stale, f"allowed writes that no longer exist: {sorted(stale)}"


def test_the_writer_check_sees_what_it_must_refuse():
    source = """
import json, os
def f(path, text, fig, df, handle, mode):
    path.write_text(text)
    path.write_bytes(b"")
    open(path, "w")
    open(path, mode=mode)
    path.open("ab")
    json.dump({}, handle)
    fig.savefig(path)
    df.to_csv(path)
    os.replace(path, path)
    path.with_suffix(".tmp").replace(path)
    os.open(path, os.O_WRONLY | os.O_CREAT)
    open(path)
    open(path, "rb")
    path.open()
    text.replace("a", "b")
    json.dumps({})
    os.open(path, os.O_RDONLY)
"""
    kinds = [kind for _, kind, _ in writes(ast.parse(source), "onsft.x")]
    assert kinds == [
        "write_text",
        "write_bytes",
        "open(mode='w')",
        "open(mode=<computed>)",
        "open(mode='ab')",
        "json.dump",
        "savefig",
        "to_csv",
        "os.replace",
        "Path.replace",
        "os.open",
    ]
