"""Layer pruning and sparse merging on a model whose layers are trained, not random.

Pretrains a small Llama-like model on the standard library's source for a few minutes, then
for each pruning ratio and merge method compresses it and prints the loss of the original,
plain-pruned and merged model on the calibration rows and on held-out rows; and the scoring
pass's time as a ratio to one plain forward pass over the same calibration set (target
<= 1.3x: scoring needs nothing but that one pass). Never run by the test suite.

    .venv/bin/python bench/layer_merge.py --steps 800 --layers 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from damoc.lm.arch import adapter_for
from damoc.model.compress import Source, compress_candidate
from damoc.model.merge import METHODS
from damoc.model.scores import batches, calibrate, calibration_loss, encode
from damoc.spec import ModelSpec
from damoc.zoo.build import CandidatePlan, pretrain_candidate
from damoc.zoo.corpus import stdlib_source
from damoc.zoo.tiny import train_tokenizer


def load_with_batches(folder: Path, texts: list[str], max_length: int):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, batches(encode(tok, texts, max_length), 8, tok.pad_token_id)


def held_out_loss(folder: Path, texts: list[str], max_length: int) -> float:
    return calibration_loss(*load_with_batches(folder, texts, max_length))


def scoring_overhead(folder: Path, texts: list[str], max_length: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-n seconds of the scoring pass and of a plain forward pass over the same batches."""
    model, data = load_with_batches(folder, texts, max_length)
    adapter = adapter_for(model.config)
    score, plain = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        calibration_loss(model, data)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        calibrate(model, adapter, data)
        score.append(time.perf_counter() - t)
    return min(score), min(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps (a few minutes on 2 cores)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.3, 0.1], help="merge scales λ to try")
    ap.add_argument("--rows", type=int, default=64, help="calibration rows (and as many held-out rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="damoc-merge-") as tmp:
        tmp = Path(tmp)
        texts = stdlib_source(4_000_000, limit_files=2000)
        train, rest = [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if not i % 8]
        tok = train_tokenizer(train, 1024)
        tok.save_pretrained(tmp / "tok")
        # Calibration and held-out rows: 512-char windows of every 8th file, never trained on.
        chunks = [t[i:i + 512] for t in rest for i in range(0, len(t) - 512, 2048)]
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))]
        calib, held = chunks[: args.rows], chunks[args.rows: 2 * args.rows]
        plan = CandidatePlan("bench", "llama", args.hidden, args.layers, 4, steps=args.steps, mix="code")
        t = time.perf_counter()
        info = pretrain_candidate(plan, str(tmp / "tok"), str(tmp / "model"), train, seq_len=128,
                                  batch_size=16, lr=3e-3, seed=args.seed)
        print(f"pretrained {info['params'] / 1e6:.2f}M params, {args.layers} layers, {args.steps} steps "
              f"on {sum(map(len, train)) / 1e6:.1f}M chars "
              f"in {time.perf_counter() - t:.0f}s; final train loss {info['final_loss']:.3f}")

        score_s, plain_s = scoring_overhead(tmp / "model", calib, 256)
        print(f"scoring pass {score_s:.3f}s vs plain forward {plain_s:.3f}s over {len(calib)} rows: "
              f"{score_s / plain_s:.2f}x (target <= 1.3x)")

        base_held = held_out_loss(tmp / "model", held, 256)
        print(f"\n| prune | merge | λ | removed | calib original | calib pruned | calib merged | "
              f"held-out pruned | held-out merged (original {base_held:.3f}) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for ratio in args.ratios:
            pruned_held = None
            runs = [("none", 1.0)] + [(m, s) for s in args.scales for m in METHODS if m != "none"]
            for method, scale in runs:
                spec = ModelSpec(prune_ratio=ratio, merge={"method": method, "density": args.density, "scale": scale},
                                 calibration={"rows": len(calib), "max_length": 256, "batch_size": 8})
                out = tmp / f"c-{ratio}-{method}-{scale}"
                r = compress_candidate(Source("bench", str(tmp / "model")), calib, spec, out, args.seed)
                held_loss = held_out_loss(out, held, 256)
                pruned_held = held_loss if method == "none" else pruned_held
                c = r["calibration_loss"]
                print(f"| {ratio:.0%} | {method} | {scale:g} | {r['removed']} | {c['original']:.3f} | {c['pruned']:.3f} | "
                      f"{c['merged']:.3f} | {pruned_held:.3f} | {held_loss:.3f} |")


if __name__ == "__main__":
    main()
