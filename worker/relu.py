"""The planted ReLU model: data, loss and gradient. Pure numpy, float64.

Inputs ``x ~ N(0, I_d)``, labels ``y = max(0, <w*, x>)``; ``w*`` has unit norm.

The data set is defined row by row, independently of how many workers share it:
row ``i`` lives in block ``i // block_rows(d)``, and each block is drawn from its own
generator seeded by ``(seed, block)``. A worker therefore builds its shard (a contiguous
range of rows) from ``(seed, rank)`` alone, drawing only the blocks it needs, and
``planted_problem(d, n, seed)`` is exactly the concatenation of the shards of any
worker count. With ``n = 0`` (the online setting) each worker draws a fresh batch
every round from ``(seed, rank, round)``; no n-by-d matrix ever exists.

Gradient convention: ``relu'(z) = (1 + sgn z) / 2``, so ``relu'(0) = 1/2`` and SGD can
leave ``w0 = 0`` (with ``relu'(0) = 0`` the gradient at zero vanishes).
"""

from __future__ import annotations

import numpy as np

# Stream ids keep the generators of different purposes independent for one seed.
_WSTAR, _BLOCK, _ONLINE, _BATCH, _QUANT, _QUANT_DOWN, _QUANT_MEAN = 1, 2, 3, 4, 5, 6, 7
_BLOCK_ELEMENTS = 1 << 18  # ~2 MiB of float64 per generated block


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def batch_rng(seed: int, rank: int) -> np.random.Generator:
    """The generator a worker uses to pick its mini-batches."""
    return _rng(_BATCH, seed, rank)


def quant_rng(seed: int, rank: int) -> np.random.Generator:
    """The generator a worker uses for QSGD's stochastic rounding."""
    return _rng(_QUANT, seed, rank)


def down_quant_rng(seed: int) -> np.random.Generator:
    """The generator the master uses to quantize the mean it broadcasts (``broadcast``)."""
    return _rng(_QUANT_DOWN, seed)


def mean_quant_rng(seed: int, round_: int, chunk: int) -> np.random.Generator:
    """The generator that quantizes mean chunk ``chunk`` of round ``round_`` (``allreduce``):
    whoever owns the chunk draws the same numbers, so a re-planned chunk stays reproducible."""
    return _rng(_QUANT_MEAN, seed, round_, chunk)


def planted_weights(d: int, seed: int) -> np.ndarray:
    """The planted ``w*`` (unit norm), a function of ``(d, seed)`` only."""
    w = _rng(_WSTAR, seed).standard_normal(d)
    return w / np.linalg.norm(w)


def block_rows(d: int) -> int:
    """Rows per generated block: a function of ``d`` only, so shards never depend on M."""
    return max(1, _BLOCK_ELEMENTS // d)


def planted_rows(d: int, seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the data set of ``(d, seed)`` and their labels.

    Only the blocks holding those rows are drawn. Labels are computed per whole block, so
    a row's label is bit-identical however the rows are split (a matrix product's rounding
    depends on its shape).
    """
    if not 0 <= start <= stop:
        raise ValueError(f"bad row range [{start}, {stop})")
    br = block_rows(d)
    w_star = planted_weights(d, seed)
    # filled in place: the peak is the shard plus one block, not twice the shard
    X, y = np.empty((stop - start, d)), np.empty(stop - start)
    for b in range(start // br, -(-stop // br)):
        block = _rng(_BLOCK, seed, b).standard_normal((br, d))
        lo, hi = max(start - b * br, 0), min(stop - b * br, br)
        at = b * br + lo - start
        X[at:at + hi - lo] = block[lo:hi]
        y[at:at + hi - lo] = labels(block, w_star)[lo:hi]
    return X, y


def labels(X: np.ndarray, w_star: np.ndarray) -> np.ndarray:
    return np.maximum(X @ w_star, 0.0)


def shard_range(n: int, workers: int, rank: int) -> tuple[int, int]:
    """Rows of the shard of ``rank``: as even as possible, sizes differ by at most one."""
    return rank * n // workers, (rank + 1) * n // workers


def shard(d: int, n: int, seed: int, rank: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(X, y)`` shard of one worker, built without generating the others."""
    return planted_rows(d, seed, *shard_range(n, workers, rank))


def planted_problem(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole planted problem: ``X`` (n x d), ``y`` (n,), ``w*`` (d,)."""
    if d < 1 or n < 0:
        raise ValueError(f"need d >= 1 and n >= 0, got d={d}, n={n}")
    X, y = planted_rows(d, seed, 0, n)
    return X, y, planted_weights(d, seed)


def online_batch(
    d: int, seed: int, rank: int, round_: int, batch_size: int,
    w_star: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh samples for one worker and round (the ``n = 0`` setting). ``w_star``: the
    planted weights of ``(d, seed)`` when the caller holds them (at d = 1e6 drawing them
    again costs 13 ms, 7% of the batch)."""
    X = _rng(_ONLINE, seed, rank, round_).standard_normal((batch_size, d))
    return X, labels(X, planted_weights(d, seed) if w_star is None else w_star)


def loss(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """``1/(2|S|) * sum (max(0, <w, x_i>) - y_i)^2``."""
    r = np.maximum(X @ w, 0.0) - y
    return float(r @ r) / (2 * len(y))


def gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Generalized gradient of ``loss`` with ``relu'(0) = 1/2``."""
    z = X @ w
    r = (np.maximum(z, 0.0) - y) * (0.5 * (1.0 + np.sign(z)))
    return (r @ X) / len(y)


def population_loss(w: np.ndarray, w_star: np.ndarray) -> float:
    """Expected loss over ``x ~ N(0, I)``, in closed form (the arc-cosine kernel).

    ``E[relu(<u,x>) relu(<v,x>)] = |u||v| (sin t + (pi - t) cos t) / (2 pi)``, t the
    angle between u and v. O(d), so the master can report it every round for any n.
    """
    nw, ns = float(np.linalg.norm(w)), float(np.linalg.norm(w_star))
    if nw == 0.0 or ns == 0.0:
        return (nw * nw + ns * ns) / 4.0
    cos = float(np.clip(w @ w_star / (nw * ns), -1.0, 1.0))
    t = np.arccos(cos)
    cross = nw * ns * (np.sin(t) + (np.pi - t) * cos) / (2 * np.pi)
    return max(0.5 * (nw * nw / 2 + ns * ns / 2 - 2 * cross), 0.0)


def rel_error(w: np.ndarray, w_star: np.ndarray) -> float:
    """``||w - w*|| / ||w*||``."""
    return float(np.linalg.norm(w - w_star) / np.linalg.norm(w_star))


def minibatch(
    X: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` rows drawn uniformly with replacement from a shard. ``out``: a
    (batch_size, d) float64 buffer to copy the rows into, overwritten by the next call
    that is given it (the same rows; at d = 1e4, batch 128, the 10 MB gather takes 0.61-0.69
    ms against 0.83-0.93 ms into a new array: benchmarks/gather.py)."""
    idx = rng.integers(0, len(y), size=batch_size)
    if out is None:
        return X[idx], y[idx]
    # indices are in range, so 'wrap' only spares take() the bounds check's extra copy
    return np.take(X, idx, axis=0, out=out, mode="wrap"), y[idx]
