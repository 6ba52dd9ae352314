"""Real text every machine with Python has: the standard library's source and docstrings."""

from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
import sys
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


SKIP_PARTS = ("idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "this", "antigravity")


def _stdlib_files(limit: int, packages: bool = False) -> list[Path]:
    """The standard library's modules (and, with `packages`, the modules one level into its packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + (sorted(root.glob("*/*.py")) if packages else [])
    keep = [f for f in files if not any(p.startswith(("_", "test")) or p in SKIP_PARTS
                                        for p in f.relative_to(root).with_suffix("").parts)]
    return keep[:limit] if not packages else keep


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


def api_qa_rows(modules: tuple[str, ...] = QA_MODULES, wide: bool = False) -> list[dict[str, str]]:
    """'What does json.dumps do?' -> the first sentence of its docstring, for each public function.
    `wide`: every public function and method the standard library documents, read from its source."""
    if wide:
        return _api_qa_rows_from_source()
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


def _api_qa_rows_from_source() -> list[dict[str, str]]:
    rows, seen = [], set()
    for name, node, doc in _documented_defs():
        answer = _first_sentence(doc)
        if len(answer) < 12 or name in seen:
            continue
        seen.add(name)
        kind = "method" if name.count(".") > 1 else "function"
        try:
            signature = f"{node.name}({ast.unparse(node.args)})"
        except Exception:  # noqa: BLE001 - an odd signature is skipped, not the row
            signature = node.name
        rows.append({"instruction": f"What does the Python {kind} {name} do?", "input": f"Signature: {signature}",
                     "output": answer, "source": name})
    return rows


def _documented_defs():
    """(module.[Class.]name, node, docstring) of the public functions and methods in stdlib sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(0, packages=True):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    yield f"{module}.{node.name}", node, doc
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for m in node.body:
                    if isinstance(m, ast.FunctionDef) and not m.name.startswith("_"):
                        doc = ast.get_docstring(m)
                        if doc:
                            yield f"{module}.{node.name}.{m.name}", m, doc


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * eval_fraction)))
    eval_ids = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_ids], [r for i, r in enumerate(rows) if i in eval_ids])


def _documented(kinds: tuple[type, ...], limit_files: int = 400, wide: bool = False):
    """(module.name, docstring) of public classes or functions defined in stdlib sources, read with
    `ast` (importing every stdlib module has side effects: some open a browser or a window).
    `wide`: the packages' modules too, and the classes' methods."""
    if wide:
        for name, node, doc in _documented_defs():
            if isinstance(node, kinds):
                yield name, doc
        kinds = tuple(k for k in kinds if k is not ast.FunctionDef)
        if not kinds:
            return
    for path in _stdlib_files(limit_files, packages=wide):
        if path.stem.startswith(("_", "test")) or path.stem in ("this", "antigravity"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:  # module level only: nested helpers are not the API
            if isinstance(node, kinds) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    yield f"{path.stem}.{node.name}", doc


def _topic_sections(text: str) -> list[tuple[str, str]]:
    """(heading, first prose paragraph) of each section of a pydoc topic (headings are underlined)."""
    lines, out = text.splitlines(), []
    for i in range(len(lines) - 1):
        if lines[i].strip() and re.fullmatch(r"[*=\-~^]{3,}", lines[i + 1].strip()):
            body = "\n".join(lines[i + 2:]).strip().split("\n\n")
            para = next((p for p in body if p and not p.startswith(" ")), "")
            out.append((lines[i].strip(), para))
    return out


def general_qa_rows(wide: bool = False) -> list[dict[str, str]]:
    """Broad questions about the Python language and its built-ins: the language reference's
    topics (pydoc), the built-in functions, types and exceptions, and the standard library's
    classes. Answer: the first sentence of the matching documentation."""
    import builtins

    from pydoc_data.topics import topics

    rows, seen = [], set()

    def add(question: str, doc: str, source: str) -> None:
        answer = re.sub(r":$", ".", _first_sentence(doc))  # "... into a program:" introduces a grammar rule
        if len(answer) >= 12 and question not in seen \
                and not re.match(r"(New|Changed|Added|Deprecated) in version", answer):
            seen.add(question)
            rows.append({"question": question, "answer": answer, "source": source})

    for key in sorted(topics):
        for heading, para in _topic_sections(topics[key]):
            add(f"In Python, what is {re.sub(r'^The ', 'the ', heading).rstrip('.')}?", para, f"pydoc:{key}")
    for name, obj in sorted(vars(builtins).items()):
        if not name.startswith("_") and (inspect.isbuiltin(obj) or inspect.isclass(obj)) and obj.__doc__:
            kind = "exception" if inspect.isclass(obj) and issubclass(obj, BaseException) else "built-in"
            add(f"What is the {kind} {name} in Python?", inspect.getdoc(obj) or "", f"builtins.{name}")
    for name, doc in _documented((ast.ClassDef,), wide=wide):
        add(f"What is the Python class {name}?", doc, name)
    if wide:  # what each module is for, from its own docstring
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in _stdlib_files(0, packages=True):
            try:
                doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
            except SyntaxError:
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            if doc:
                add(f"What is the Python module {module} for?", doc, module)
    return rows


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def reading_comprehension_rows(wide: bool = False) -> list[dict[str, str]]:
    """Passage (a docstring's opening paragraphs), question, answer span copied from the passage.
    Where a sentence says what the function returns, the question asks for it; otherwise the
    question quotes the start of a later sentence and asks how it ends (a cloze)."""
    rows = []
    for name, doc in _documented((ast.FunctionDef, ast.ClassDef), wide=wide):
        paras = [re.sub(r"\s+", " ", p).strip() for p in doc.split("\n\n")]
        passage = " ".join(p for p in paras[:3] if p and not p.startswith((">>>", "-", "*", ":")))[:700]
        sents = _sentences(passage)
        if len(sents) < 2 or not passage.endswith((".", "!", "?")):
            continue
        short = name.split(".")[-1]
        ret = next((m.group(1) for s in sents if (m := re.match(r"^Returns? (.{8,200})\.$", s))), None)
        if ret:
            question, answer = f"What does {short} return?", ret
        else:
            words = sents[1].rstrip(".!?").split()
            if len(words) < 6:
                continue
            cut = max(3, len(words) * 2 // 5)
            question = f"How does this sentence of the passage end: \"{' '.join(words[:cut])} ...\"?"
            answer = " ".join(words[cut:])
        rows.append({"question": question, "context": passage, "answer": answer, "source": name})
    return rows


def lookup_qa_rows(wide: bool = False, n: int = 1200, seed: int = 0) -> list[dict[str, str]]:
    """A record of settings (six standard-library module names, each set to a number) and a question
    about one of them; the answer is its number, read from the record. No candidate has seen the task
    in pretraining, so zero-shot loss ranks them by how well they guess numbers, not by how well they
    learn to look one up: the domain where the zero-shot ranking and fine-tuning's disagree. Generated,
    so `wide` (the other sets' switch to the whole standard library) has nothing to widen: `n` sizes it."""
    names = sorted(m for m in sys.stdlib_module_names if m.isalpha() and len(m) > 2)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        keys = rng.sample(names, 6)
        values = [str(rng.randrange(100, 1000)) for _ in keys]
        i = rng.randrange(len(keys))
        rows.append({"instruction": f"What number is {keys[i]} set to?",
                     "input": "; ".join(f"{k} = {v}" for k, v in zip(keys, values)), "output": values[i],
                     "source": keys[i]})
    return rows
