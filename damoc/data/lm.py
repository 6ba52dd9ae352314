"""A reference causal LM, loaded once per Ray Data actor, scoring rows in batches.

Rows are rendered as training will see them (damoc/lm/prompts.py). Per row: mean answer
cross-entropy given the prompt (ce_cond) and alone (ce_alone), IFD = ce_cond / ce_alone (Cherry),
answer perplexity exp(ce_cond), a mean-pooled, L2-normalised embedding, the prompt tokens of the
row's fields, and, when compression is on, the fields compressed from the same forward pass's
self-information (c_instruction, c_input, c_output) with the token count after.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from damoc.data.compress import DEFAULT_FORCED, compress_fields
from damoc.lm.load import load_causal_lm, pad_id, weight_bytes
from damoc.lm.prompts import Prompt, render
from damoc.lm.tokens import encode


@dataclass(frozen=True)
class CompressArgs:
    ratio: float
    forced: tuple[str, ...] = DEFAULT_FORCED
    compress_answer: bool = False
    words: bool = True  # keep or drop whole words (spec data.compress.granularity)

    @classmethod
    def of(cls, c, enabled: bool = True) -> CompressArgs:
        """From the spec's data.compress; disabled: ratio 1 (every token kept, still counted)."""
        if not enabled:
            return cls(1.0)
        return cls(c.ratio, DEFAULT_FORCED + tuple(c.forced_tokens), c.compress_answer, c.granularity == "word")


def count_tokens(tok, texts: list[str]) -> list[int]:
    """Token counts of texts, straight from the Rust tokenizer where there is one (no ids copied out)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [len(e) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def field_text(instruction: str, inp: str) -> str:
    """A row's own prompt text (its fields, without the template), for counting its tokens."""
    return instruction + ("\n" + inp if inp else "")


class LMScorer:
    """Callable class for `map_batches`: adds the stats above to a batch of rows."""

    def __init__(self, model_path: str, task: str = "qa", template: str = "auto", max_length: int = 256,
                 embeddings: bool = True, trust_remote_code: bool = False, embedding_model: str | None = None,
                 compress: CompressArgs | None = None):
        import torch

        # Imported here, not with the module: the data stage's read and map tasks import this module
        # and have no use for torch (1 s per worker process).
        from damoc.lm.nll import score

        self.score = score
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok, self.model = load_causal_lm(model_path, trust_remote_code=trust_remote_code, device=self.device)
        self.pad = pad_id(self.tok)
        self.task, self.template, self.max_length = task, template, max_length
        self.embeddings, self.compress = embeddings, compress
        self.compress_seconds = 0.0  # of the calls so far: the stage reports compression apart
        self.encoder = None
        if embeddings and embedding_model:
            from damoc.data.embed import SentenceEncoder

            self.encoder = SentenceEncoder(embedding_model, max_length, self.device)

    def prompts(self, instructions, inputs) -> list[Prompt]:
        return [render(self.task, i, x, self.tok, self.template) for i, x in zip(instructions, inputs)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = self.prompts(batch["instruction"], batch["input"])
        answers = [str(a) for a in batch["output"]]
        cond = [encode(self.tok, p.text, a, self.max_length, spans=True) for p, a in zip(prompts, answers)]
        alone = [encode(self.tok, "", a, self.max_length) for a in answers]
        pooled = self.embeddings and self.encoder is None
        # Logits at the prompt positions only where compression reads their self-information; the answer
        # alone is IFD's denominator, nothing more.
        s_cond = self.score(self.model, cond, self.pad, self.device, hidden=pooled,
                            prompt_info=self.compress is not None)
        ce_cond = np.array([s.answer_ce for s in s_cond], dtype=np.float32)
        ce_alone = np.array([s.answer_ce for s in self.score(self.model, alone, self.pad, self.device,
                                                             prompt_info=False)], dtype=np.float32)
        batch["ce_cond"], batch["ce_alone"] = ce_cond, ce_alone
        batch["ifd"] = (ce_cond / np.maximum(ce_alone, 1e-6)).astype(np.float32)
        batch["ppl"] = np.exp(np.minimum(ce_cond, 50.0)).astype(np.float32)
        if self.embeddings:
            emb = (self.encoder.encode([p.text + a for p, a in zip(prompts, answers)]) if self.encoder is not None
                   else np.stack([s.embedding for s in s_cond]))
            batch["embedding"] = list(np.asarray(emb, dtype=np.float32))
        if self.compress is None:
            texts = [field_text(str(i), str(x or "")) for i, x in zip(batch["instruction"], batch["input"])]
            batch["prompt_tokens_before"] = batch["prompt_tokens_after"] = np.array(
                count_tokens(self.tok, texts), dtype=np.int64)
            return batch
        return self._compressed(batch, prompts, cond, s_cond)

    def _compressed(self, batch, prompts: list[Prompt], cond, s_cond) -> dict[str, np.ndarray]:
        c, t0 = self.compress, time.perf_counter()
        out = {"instruction": [], "input": [], "before": [], "after": []}
        owed = 0.0  # tokens the rows so far kept beyond (+) or short of (-) the ratio: the next rows settle it
        for p, e, s, answer in zip(prompts, cond, s_cond, batch["output"]):
            info = list(s.prompt_info)
            if e.prompt_cut and info:  # the first scored token carries the unscored text before it
                info[0] = float("inf")
            fields, before, after = compress_fields(p.text, p.fields, e.prompt_spans, info, c.ratio, c.forced,
                                                    c.words, carry=-owed, answer=str(answer))
            owed += after - c.ratio * before
            out["instruction"].append(fields.get("instruction", ""))
            out["input"].append(fields.get("input", ""))
            out["before"].append(before)
            out["after"].append(after)
        batch["c_instruction"] = np.array(out["instruction"], dtype=object)
        batch["c_input"] = np.array(out["input"], dtype=object)
        batch["prompt_tokens_before"] = np.array(out["before"], dtype=np.int64)
        batch["prompt_tokens_after"] = np.array(out["after"], dtype=np.int64)
        if c.compress_answer:
            batch["c_output"] = np.array([self.compress_text(str(a)) for a in batch["output"]], dtype=object)
        self.compress_seconds += time.perf_counter() - t0
        return batch

    def compress_text(self, text: str) -> str:
        """A free text compressed on its own (the answer, when the spec asks)."""
        e = encode(self.tok, text, "", self.max_length, eos=False, spans=True)
        info = self.score(self.model, [e], self.pad, self.device)[0].prompt_info
        if e.prompt_cut and info:
            info[0] = float("inf")
        fields, _, _ = compress_fields(text, {"text": (0, len(text))}, e.prompt_spans, info,
                                       self.compress.ratio, self.compress.forced, self.compress.words)
        return fields["text"]


def loadable(paths: list[str]) -> list[str]:
    """The folders that can serve as a reference LM: one whose config or weights are broken is never
    chosen (it fails in its own stage, named); when none loads, the error names each one's problem."""
    from damoc.preflight import folder_problems

    problems = {p: folder_problems(Path(p)) for p in paths}
    ok = [p for p in paths if not problems[p]]
    if not ok:
        raise ValueError("no candidate can serve as the data stage's reference LM: "
                         + "; ".join(f"{Path(p).name}: {v[0]}" for p, v in problems.items())
                         + " (set data.reference_model)")
    return ok


def smallest_model(paths: list[str]) -> str:
    """The loadable candidate with the fewest parameters (from its safetensors headers): the cheapest
    reference LM."""
    from damoc.preflight import header_params

    return min(loadable(paths), key=lambda p: header_params(Path(p)) or weight_bytes(p))


def row_key(instruction, inp, output) -> bytes:
    """A row's identity for hashing: its normalised fields, not where it was read from, so the same
    rows as JSONL or as CSV are split and shared the same way."""
    return "\x1f".join("" if v is None else str(v) for v in (instruction, inp, output)).encode()


def unit_hash(seed: int, salt: str, key: bytes) -> float:
    """A stable draw in [0, 1) from a seed, a salt and a row key."""
    h = hashlib.blake2b(key, digest_size=8, key=f"{seed}:{salt}".encode()[:64])
    return int.from_bytes(h.digest(), "big") / 2**64


def shares(keys: list[bytes], names: list[str], seed: int) -> np.ndarray:
    """Which reference LM scores each row: the name with the highest seeded hash of (name, row)
    (rendezvous hashing). Every name gets an equal share in expectation; the draw does not depend on
    the names' order, and dropping a name moves only its own rows."""
    if len(names) == 1:
        return np.zeros(len(keys), dtype=np.int64)
    draws = np.array([[unit_hash(seed, n, k) for n in names] for k in keys]).reshape(len(keys), len(names))
    return draws.argmax(axis=1).astype(np.int64)
