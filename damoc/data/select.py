"""Pure selection functions on numpy arrays; the operators run them per block, then on survivors.

Ties are always broken by `order` (the row's read order), so results are deterministic.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

# ---------------------------------------------------------------- ranking


def top_k(scores: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ties to the earlier row; NaN scores rank last."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    idx = np.lexsort((order, -s))
    return idx[: max(0, k)]


# ---------------------------------------------------------------- k-center greedy


def k_center(emb: np.ndarray, k: int, order: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-center: start from the earliest row, then repeatedly add the point farthest
    (Euclidean) from everything chosen. Returns indices in the order chosen."""
    n = len(emb)
    if n == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.arange(n) if order is None else order
    first = int(np.argmin(order))
    chosen = [first]
    dist = np.linalg.norm(emb - emb[first], axis=1)
    dist[first] = -1
    while len(chosen) < min(k, n):
        best = np.flatnonzero(dist == dist.max())
        nxt = int(best[np.argmin(order[best])])
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
        dist[chosen] = -1
    return np.asarray(chosen, dtype=np.int64)


# ---------------------------------------------------------------- DEITA admission


def deita_admit(scores: np.ndarray, emb: np.ndarray, tau: float, k: int,
                order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Walk rows by score (high first); admit a row if its max cosine similarity to the rows
    admitted so far is <= tau, until k are admitted. Returns (admitted, rejected-as-similar)."""
    n = len(scores)
    order = np.arange(n) if order is None else order
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    admitted: list[int] = []
    similar: list[int] = []
    bank = np.zeros((min(k, n), emb.shape[1] if emb.ndim == 2 else 0), dtype=unit.dtype)
    for i in top_k(scores, order, n):
        if len(admitted) >= k:
            break
        if admitted and float((bank[: len(admitted)] @ unit[i]).max()) > tau:
            similar.append(int(i))
            continue
        bank[len(admitted)] = unit[i]
        admitted.append(int(i))
    return np.asarray(admitted, dtype=np.int64), np.asarray(similar, dtype=np.int64)


# ---------------------------------------------------------------- k-means, cluster balance


def kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd's k-means with k-means++ seeding. Returns (centroids, labels)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centers.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    c = np.stack(centers)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        labels = assign(x, c)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c, assign(x, c)


def assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)


def balanced_quota(sizes: np.ndarray, k: int) -> np.ndarray:
    """Equal share per cluster; what a small cluster cannot use goes to the others."""
    quota = np.zeros_like(sizes)
    left, open_ = k, sizes > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        for j in np.flatnonzero(open_):
            take = min(share, sizes[j] - quota[j], left)
            quota[j] += take
            left -= take
            if quota[j] >= sizes[j]:
                open_[j] = False
            if left == 0:
                break
    return quota


# ---------------------------------------------------------------- MinHash / LSH

_WORD = re.compile(r"\w+", re.UNICODE)
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)


def shingles(text: str, n: int = 3) -> set[int]:
    """Hashed word n-grams of the lower-cased text (one shingle for very short texts)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {zlib.crc32(" ".join(words).encode())}
    return {zlib.crc32(" ".join(words[i: i + n]).encode()) for i in range(len(words) - n + 1)}


def minhash_params(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
    return a, b


def minhash(sh: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature of a shingle set (universal hashing modulo a Mersenne prime)."""
    x = np.fromiter(sh, dtype=np.uint64, count=len(sh))[:, None]
    with np.errstate(over="ignore"):
        h = ((x * a[None, :] + b[None, :]) % _MERSENNE) & _MAX_HASH
    return h.min(0).astype(np.uint32)


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) whose S-curve midpoint (1/b)^(1/r) sits a little *below* the threshold:
    recall first (a missed duplicate survives), precision comes from verification."""
    target = max(0.05, threshold - 0.15)
    shapes = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(shapes, key=lambda s: abs((1 / s[0]) ** (1 / s[1]) - target))


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    return [zlib.crc32(sig[i * rows:(i + 1) * rows].tobytes()) | (i << 32) for i in range(bands)]


def estimated_jaccard(s1: np.ndarray, s2: np.ndarray) -> float:
    return float((s1 == s2).mean())
