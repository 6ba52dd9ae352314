"""The house rules, read from the source (AST): stages never import each other or the `damoc plan` command;
no function is longer than a screen; private library names live in damoc/compat.py alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "damoc"
STAGES = ("data", "model", "train", "report")
MAX_LINES = 60
PRIVATE = [r"ray\._private", r"\._brackets\b", r"\._rungs\b", r"deepspeed\.utils\.groups\._", r"__compatible_ops__",
           r"_actor_task_failed", r"RayParams\.__init__", r"_release_process_group_references"]


def modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))]


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_stages_import_no_other_stage_and_not_the_plan_command():
    problems = []
    for path, tree in modules():
        rel = path.relative_to(PACKAGE).parts
        if rel[0] not in STAGES:
            continue
        for name in imported(tree):
            parts = name.split(".")
            if name == "damoc.plan" or name.startswith("damoc.plan."):
                problems.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
            elif parts[0] == "damoc" and len(parts) > 1 and parts[1] in STAGES and parts[1] != rel[0]:
                problems.append(f"{path.relative_to(PACKAGE.parent)} imports {name} (another stage)")
    assert not problems, "\n".join(problems)


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path, tree in modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "\n".join(long)


def test_private_library_names_are_in_the_workarounds_module_only():
    found = [f"{path.relative_to(PACKAGE.parent)}: {pattern}" for path, _ in modules() if path.name != "compat.py"
             for pattern in PRIVATE if re.search(pattern, path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)
