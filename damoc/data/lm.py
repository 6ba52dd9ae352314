"""A reference causal LM, loaded once per Ray Data actor, scoring rows in batches.

Per row it gives: mean answer cross-entropy given the prompt (ce_cond) and alone
(ce_alone), IFD = ce_cond / ce_alone (Cherry), answer perplexity exp(ce_cond), a
mean-pooled, L2-normalised embedding of the whole sample, and on request the
self-information -log p(x_t | x_<t) of each prompt token (for token compression).
"""

from __future__ import annotations

import math
import os

import numpy as np

PROMPT_SEP = "\n"


def prompt_of(instruction: str, inp: str) -> str:
    return instruction + (PROMPT_SEP + inp if inp else "")


def load_causal_lm(path: str, trust_remote_code: bool = False, device: str = "cpu"):
    """Tokenizer and model from a local folder or hub id; weights as safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        token=os.environ.get("HF_TOKEN") or None)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch.float32,
        token=os.environ.get("HF_TOKEN") or None)
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


class LMScorer:
    """Callable class for `map_batches`: adds ce_cond, ce_alone, ifd, ppl (and embedding)."""

    def __init__(self, model_path: str, max_length: int = 256, embeddings: bool = True,
                 trust_remote_code: bool = False, embedding_model: str | None = None):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok, self.model = load_causal_lm(model_path, trust_remote_code, self.device)
        self.max_length = max_length
        self.embeddings = embeddings
        self.encoder = None
        if embeddings and embedding_model:
            from damoc.data.embed import SentenceEncoder

            self.encoder = SentenceEncoder(embedding_model, max_length, self.device)

    def _pack(self, prompts: list[str], answers: list[str]):
        """Token ids of prompt+answer (prompt cut from the left to fit) and the answer mask."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        seqs, masks = [], []
        for p, a in zip(prompts, answers):
            a_ids = self.tok(a, add_special_tokens=False)["input_ids"][: self.max_length - 1]
            p_ids = (bos + self.tok(p + PROMPT_SEP, add_special_tokens=False)["input_ids"]) if p is not None else bos
            room = self.max_length - len(a_ids)
            p_ids = p_ids[-room:] if room > 0 else []
            seqs.append(p_ids + a_ids)
            masks.append([0] * len(p_ids) + [1] * len(a_ids))
        return seqs, masks

    def _forward(self, seqs: list[list[int]], masks: list[list[int]], hidden: bool):
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.zeros((len(seqs), width), dtype=torch.float32)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            lab[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        with torch.no_grad():
            out = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                             output_hidden_states=hidden)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(self.device),
                                                reduction="none").cpu()
        target_mask = lab[:, 1:]
        ce = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
        emb = None
        if hidden:
            h = out.hidden_states[-1].float().cpu()
            a = attn.unsqueeze(-1).float()
            emb = (h * a).sum(1) / a.sum(1).clamp(min=1)
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return ce.numpy(), nll.numpy(), attn.numpy(), emb

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [prompt_of(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        answers = list(batch["output"])
        seqs, masks = self._pack(prompts, answers)
        ce_cond, _, _, emb = self._forward(seqs, masks, hidden=self.embeddings and self.encoder is None)
        if self.encoder is not None:
            emb = self.encoder.encode([p + PROMPT_SEP + a for p, a in zip(prompts, answers)])
        alone, alone_masks = self._pack([None] * len(answers), answers)
        ce_alone, _, _, _ = self._forward(alone, alone_masks, hidden=False)
        batch["ce_cond"] = ce_cond.astype(np.float32)
        batch["ce_alone"] = ce_alone.astype(np.float32)
        batch["ifd"] = (ce_cond / np.maximum(ce_alone, 1e-6)).astype(np.float32)
        batch["ppl"] = np.exp(np.minimum(ce_cond, 50.0)).astype(np.float32)
        if emb is not None:
            batch["embedding"] = list(np.asarray(emb, dtype=np.float32))
        return batch

    def self_information_batch(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """`self_information` for many texts: those that fit one window share a forward pass."""
        encs = [self.tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        out: list = [None] * len(texts)
        short = [i for i, e in enumerate(encs) if 0 < len(e["input_ids"]) and len(bos) + len(e["input_ids"]) <= self.max_length]
        if short:
            seqs = [bos + encs[i]["input_ids"] for i in short]
            _, nll, _, _ = self._forward(seqs, [[0] * len(q) for q in seqs], hidden=False)
            for row, i in enumerate(short):
                n = len(encs[i]["input_ids"])
                info = ([] if bos else [math.inf]) + [float(v) for v in nll[row][: len(seqs[row]) - 1]]
                out[i] = ([tuple(s) for s in encs[i]["offset_mapping"]], info[:n])
        for i, e in enumerate(encs):
            if out[i] is None:
                out[i] = self.self_information(texts[i]) if e["input_ids"] else ([], [])
        return out

    def self_information(self, text: str) -> tuple[list[tuple[int, int]], list[float]]:
        """Character spans of `text`'s tokens and each token's -log p(x_t | x_<t) in nats.
        The first token has no context: it gets +inf (never the first to be dropped)."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], [tuple(s) for s in enc["offset_mapping"]]
        if not ids:
            return [], []
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        info: list[float] = [] if bos else [math.inf]
        window = self.max_length
        # Long prompts are scored in windows: each token keeps up to `window` tokens of context.
        seq = bos + ids
        for start in range(0, len(seq) - 1, window - 1):
            chunk = seq[start: start + window]
            _, nll, _, _ = self._forward([chunk], [[0] * len(chunk)], hidden=False)
            info.extend(float(v) for v in nll[0][: len(chunk) - 1])
        return spans, info[: len(ids)]


def smallest_model(paths: list[str]) -> str:
    """The candidate with the fewest weight bytes: the cheapest reference LM."""
    from pathlib import Path

    def size(p: str) -> float:
        files = list(Path(p).glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else math.inf

    return min(paths, key=size)
