"""Shared fixtures: a tokenizer trained locally and tiny HF models built from configs.

Nothing is downloaded. Builders are session-scoped: a model folder is built once and
copied by tests that change it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from damoc.zoo.corpus import stdlib_source
    from damoc.zoo.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(stdlib_source(max_chars=200_000), vocab_size=384).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """Factory: tiny_model("llama", hidden=32, layers=4) -> folder, built once per shape."""
    from transformers import AutoTokenizer

    from damoc.zoo.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("models")
    built: dict[tuple, Path] = {}

    def make(family: str = "llama", hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
        key = (family, hidden, layers, seed)
        if key not in built:
            built[key] = build_tiny_model(family, root / f"{family}-h{hidden}-l{layers}-s{seed}", tok,
                                          hidden=hidden, layers=layers, seed=seed)
        return built[key]

    return make


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QA_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    for a in range(6) for b in range(5)
]


@pytest.fixture
def job_dir(tmp_path, tiny_model) -> Path:
    """A folder with a small QA set and one candidate: a valid job's surroundings."""
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS)
    (tmp_path / "zoo").mkdir()
    os.symlink(tiny_model("llama"), tmp_path / "zoo" / "llama-s")
    return tmp_path


def spec_dict(**overrides) -> dict:
    spec = {
        "name": "t",
        "output_dir": "runs/t",
        "data": {"train": {"path": "data/train.jsonl"}},
        "candidates": [{"name": "llama-s", "path": "zoo/llama-s"}],
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


LOOKUP = [("Capital of France?", "Paris"), ("Capital of Japan?", "Tokyo"), ("Capital of Peru?", "Lima"),
          ("Capital of Kenya?", "Nairobi"), ("Capital of Chile?", "Santiago"), ("Capital of Egypt?", "Cairo"),
          ("Capital of Italy?", "Rome"), ("Capital of Spain?", "Madrid"), ("Capital of Canada?", "Ottawa"),
          ("Capital of Norway?", "Oslo")]


@pytest.fixture(scope="session")
def lookup_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny llama that has memorised LOOKUP, rendered as every stage renders a QA row (damoc/lm/prompts.py):
    the question makes the answer certain."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from damoc.lm.prompts import prompt_text
    from damoc.zoo.tiny import tiny_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), 64, 2, special_ids=ids))
    seqs = [[tok.bos_token_id] + tok(prompt_text("qa", q, "") + a, add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id] for q, a in LOOKUP]
    width = max(map(len, seqs))
    batch = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.where(batch == tok.pad_token_id, -100, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("lookup")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
