"""Real text every machine with Python has: the standard library's source and docstrings."""

from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
import sysconfig
from pathlib import Path

# Modules whose public functions make the API-QA domain set: a "domain" of one library's API.
QA_MODULES = (
    "json", "os.path", "re", "string", "textwrap", "shutil", "glob", "fnmatch", "base64",
    "binascii", "bisect", "heapq", "itertools", "functools", "operator", "math", "statistics",
    "random", "datetime", "calendar", "difflib", "html", "urllib.parse", "zlib", "gzip",
    "tarfile", "zipfile", "csv", "copy", "pprint", "shlex", "tempfile", "uuid", "hashlib",
    "secrets", "ipaddress", "socket", "subprocess", "threading", "time", "traceback", "warnings",
    "inspect", "ast", "dis", "tokenize", "keyword", "codecs", "locale", "gettext", "platform",
)


def _stdlib_files(limit: int) -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]


def stdlib_source(max_chars: int, limit_files: int = 400) -> list[str]:
    """Module source text: code-heavy."""
    out, total = [], 0
    for path in _stdlib_files(limit_files):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def stdlib_docstrings(max_chars: int, limit_files: int = 400) -> list[str]:
    """Every docstring of the modules' classes and functions: prose-heavy."""
    out, total = [], 0
    for path in _stdlib_files(limit_files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return out


def _first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    text = re.sub(r"\s+", " ", para).strip()
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text)[:300]


def api_qa_rows(modules: tuple[str, ...] = QA_MODULES) -> list[dict[str, str]]:
    """'What does json.dumps do?' -> the first sentence of its docstring, for each public function."""
    rows, seen = [], set()
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            answer = _first_sentence(doc)
            key = f"{mod_name}.{name}"
            if len(answer) < 12 or key in seen:
                continue
            seen.add(key)
            try:
                signature = f"{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = name
            rows.append({"instruction": f"What does the Python function {key} do?",
                         "input": f"Signature: {signature}", "output": answer, "source": key})
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * eval_fraction)))
    eval_ids = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_ids], [r for i, r in enumerate(rows) if i in eval_ids])
