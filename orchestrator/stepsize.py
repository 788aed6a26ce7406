"""``train.lr = "auto"``: a step size from the problem's own second moment, no tuning.

Pure arithmetic on a trial's shape; the derivation is in docs/reference.md, "Step size".
Near ``w*``, with ``h = w - w*`` and ``x ~ N(0, I_d)``, one sample's gradient is
``g = 1{<w*,x> > 0} <h, x> x``, so ``E[g] = h/2`` and ``E||g||^2 = (d + 2)/2 ||h||^2``. If the
round's gradient ``G`` has ``E||G||^2 = a ||h||^2``, one step gives

    E||h - lr G||^2 = (1 - lr + a lr^2) ||h||^2,

which shrinks for ``lr < 1/a``, fastest at ``lr = 1/(2a)``. ``a`` grows with the variance of
``G``: the mini-batch's (about ``d/(2m)`` for a global batch of m samples, hence the
"lr of order m/d") and QSGD's (a quantization multiplies a second moment by at most
``1 + beta``). With a finite data set whose size n is below the global batch, a round is
nearly full-batch gradient descent, and the data set's curvature caps the step instead.
"""

from __future__ import annotations

import math

from worker.node import TrialSpec

# lr = MARGIN / a: the largest step the bound allows (1/a) halved, where the expected
# squared error shrinks fastest. --backend sim agrees (docs/reference.md, "Step size").
MARGIN = 0.5


def quantizations(topology: str) -> int:
    """How many times QSGD quantizes a round's gradient before the step: each worker's
    gradient once, and in ``broadcast`` (the mean, on its way down) and ``allreduce``
    (each mean chunk, before the allgather) once more."""
    return 2 if topology in ("broadcast", "allreduce") else 1


def qsgd_beta(levels: int, bucket: int) -> float:
    """QSGD's variance bound: ``E||Q(v) - v||^2 <= beta ||v||^2`` with buckets of ``bucket``
    coordinates and ``levels`` levels."""
    return min(bucket / levels**2, math.sqrt(bucket) / levels)


def second_moment(d: int, batch_size: int, workers: int, levels: int | None = None,
                  bucket: int = 0, quantized: int = 1) -> float:
    """``a`` in ``E||G||^2 <= a ||h||^2`` for the round's gradient ``G`` near ``w*``.

    One worker's mini-batch gradient of B samples has ``E||g_i||^2 = (1/4 + c/B) ||h||^2``
    with ``c = (d + 3/2)/2`` (the per-sample variance: ``(d + 2)/2 - 1/4``). The first
    quantization adds at most ``beta E||g_i||^2`` of independent noise per worker, which
    the mean over M workers divides by M; each later quantization (of the mean) multiplies
    the whole second moment by ``1 + beta``. ``levels=None`` is float32 (no such noise);
    ``bucket`` is QSGD's bucket size (0: the whole vector, d coordinates); ``quantized`` is
    how many times the round's gradient is quantized (``quantizations(topology)``).
    """
    beta = 0.0 if levels is None else qsgd_beta(levels, bucket if 0 < bucket < d else d)
    worker = 0.25 + (d + 1.5) / 2 / batch_size
    first = 1 + beta if quantized >= 1 else 1.0
    mean = 0.25 + (first * worker - 0.25) / workers
    return mean * (1 + beta) ** max(quantized - 1, 0)


def data_cap(d: int, n: int) -> float:
    """The step of full-batch gradient descent on n samples: ``2/(lambda_min + lambda_max)``
    of their curvature ``(1/n) sum 1{<w*,x> > 0} x x^T``, whose spectrum runs over
    ``(1 -+ sqrt(2d/n))^2 / 2`` (about n/2 samples count), so ``2/(1 + 2d/n)``. ``n = 0``
    (fresh samples every round) has no such cap."""
    return math.inf if n == 0 else 2.0 / (1.0 + 2.0 * d / n)


def auto_lr(d: int, batch_size: int, workers: int, n: int = 0, levels: int | None = None,
            bucket: int = 0, quantized: int = 1, margin: float = MARGIN) -> float:
    """``min(margin / a, data_cap(d, n))``, ``a = second_moment(...)`` (same arguments)."""
    a = second_moment(d, batch_size, workers, levels, bucket, quantized)
    return min(margin / a, data_cap(d, n))


def shape(spec: TrialSpec) -> dict[str, int | None]:
    """The arguments of ``second_moment`` that a trial spec fixes."""
    return {"d": spec.d, "batch_size": spec.batch_size, "workers": spec.workers,
            "levels": None if spec.scheme == "none" else spec.levels,
            "bucket": spec.bucket_size, "quantized": quantizations(spec.topology)}


def for_spec(spec: TrialSpec) -> float:
    """``auto_lr`` for a trial (its own ``lr`` is ignored)."""
    return auto_lr(n=spec.n, **shape(spec))


def rounds_to(target: float, lr: float, a: float) -> float:
    """Rounds the bound needs from ``w0 = 0`` (rel_error 1) down to ``target``:
    ``E[rel_error^2]`` shrinks by ``1 - lr + a lr^2`` a round (inf when it does not)."""
    factor = 1.0 - lr + a * lr * lr
    if factor >= 1.0:
        return math.inf
    return 2.0 * math.log(1.0 / target) / -math.log(max(factor, 1e-300))
