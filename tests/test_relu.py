"""The planted model: data layout, loss, gradient, and SGD from w0 = 0."""

import numpy as np
import pytest

from worker import relu


@pytest.mark.parametrize("d,n,workers", [(5, 100, 1), (5, 100, 3), (7, 1001, 4), (3000, 200, 7)])
def test_shards_concatenate_to_the_whole_problem(d, n, workers):
    X, y, w_star = relu.planted_problem(d, n, seed=3)
    parts = [relu.shard(d, n, 3, r, workers) for r in range(workers)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), X)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    sizes = [len(p[1]) for p in parts]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_problem_depends_on_seed_and_is_reproducible():
    a = relu.planted_problem(10, 50, seed=1)
    b = relu.planted_problem(10, 50, seed=1)
    c = relu.planted_problem(10, 50, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert np.linalg.norm(a[2]) == pytest.approx(1.0)
    np.testing.assert_allclose(a[1], np.maximum(a[0] @ a[2], 0), atol=1e-12)


def test_online_batches_are_fresh_per_round_and_reproducible():
    x0, y0 = relu.online_batch(20, 0, rank=1, round_=0, batch_size=8)
    x1, _ = relu.online_batch(20, 0, rank=1, round_=1, batch_size=8)
    again, _ = relu.online_batch(20, 0, rank=1, round_=0, batch_size=8)
    other, _ = relu.online_batch(20, 0, rank=2, round_=0, batch_size=8)
    assert x0.shape == (8, 20) and y0.shape == (8,)
    assert np.array_equal(x0, again)
    assert not np.array_equal(x0, x1) and not np.array_equal(x0, other)


def test_online_batch_at_large_d_needs_no_n_by_d_matrix():
    # d = 1e6 with a small batch: only batch x d floats exist.
    X, y = relu.online_batch(1_000_000, 0, 0, 0, batch_size=2)
    assert X.shape == (2, 1_000_000) and y.shape == (2,)


def test_gradient_matches_finite_differences_away_from_the_kink():
    rng = np.random.default_rng(0)
    X, y, w_star = relu.planted_problem(8, 64, seed=0)
    w = rng.standard_normal(8)
    assert np.min(np.abs(X @ w)) > 1e-3  # no sample on the kink
    g = relu.gradient(w, X, y)
    eps = 1e-6
    fd = np.array([
        (relu.loss(w + eps * e, X, y) - relu.loss(w - eps * e, X, y)) / (2 * eps)
        for e in np.eye(8)
    ])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_gradient_at_zero_uses_half_derivative_and_is_not_zero():
    X, y, w_star = relu.planted_problem(10, 500, seed=0)
    g = relu.gradient(np.zeros(10), X, y)
    # relu'(0) = 1/2: g = -1/(2n) * sum y_i x_i, which points towards w*.
    np.testing.assert_allclose(g, -(y @ X) / (2 * len(y)))
    assert np.linalg.norm(g) > 0.1
    assert g @ w_star < 0


def test_sgd_from_zero_converges_geometrically_and_needs_the_half_derivative():
    X, y, w_star = relu.planted_problem(50, 2000, seed=0)
    rng = np.random.default_rng(1)

    def sgd(grad, rounds=400):
        w, errs = np.zeros(50), []
        for _ in range(rounds):
            Xb, yb = relu.minibatch(X, y, 64, rng)
            w = w - 0.5 * grad(w, Xb, yb)
            errs.append(relu.rel_error(w, w_star))
        return np.array(errs)

    errs = sgd(relu.gradient)
    first = int(np.argmax(errs < 1e-6))
    assert errs[-1] < 1e-6 and first > 0
    # geometric: log error falls on a straight line, halving at a steady pace
    k = np.arange(5, first)
    slope, icpt = np.polyfit(k, np.log(errs[5:first]), 1)
    resid = np.log(errs[5:first]) - (slope * k + icpt)
    assert slope < -0.05 and np.std(resid) < 1.0

    def grad_kink_zero(w, Xb, yb):  # relu'(0) = 0: the usual subgradient choice
        z = Xb @ w
        return ((np.maximum(z, 0) - yb) * (z > 0)) @ Xb / len(yb)

    assert np.all(sgd(grad_kink_zero, rounds=20) == 1.0)  # never leaves w0 = 0


def test_population_loss_matches_monte_carlo():
    rng = np.random.default_rng(0)
    d = 6
    w_star = relu.planted_weights(d, 0)
    w = rng.standard_normal(d)
    X = rng.standard_normal((400_000, d))
    mc = relu.loss(w, X, np.maximum(X @ w_star, 0))
    assert relu.population_loss(w, w_star) == pytest.approx(mc, rel=0.02)
    assert relu.population_loss(w_star, w_star) == pytest.approx(0, abs=1e-12)
    assert relu.population_loss(np.zeros(d), w_star) == pytest.approx(0.25)


def test_an_online_batch_with_the_planted_weights_passed_in_is_the_same_batch():
    d, seed = 300, 7
    X, y = relu.online_batch(d, seed, 2, 5, 16)
    X2, y2 = relu.online_batch(d, seed, 2, 5, 16, relu.planted_weights(d, seed))
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    _, y3 = relu.online_batch(d, seed, 2, 5, 16, relu.planted_weights(d, seed + 1))
    assert not np.array_equal(y, y3)  # the labels do come from the w* given


def test_a_minibatch_copied_into_a_buffer_is_the_same_rows_and_draws():
    X, y, _ = relu.planted_problem(30, 400, seed=3)
    buf = np.full((16, 30), np.nan)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):
        Xa, ya = relu.minibatch(X, y, 16, a)
        Xb, yb = relu.minibatch(X, y, 16, b, out=buf)
        assert Xb is buf and np.array_equal(Xa, Xb) and np.array_equal(ya, yb)
    assert a.bit_generator.state == b.bit_generator.state
