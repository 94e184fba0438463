"""Tests of baselines.py: every classical solver against scikit-learn or a float64 reference."""

import sys

import pytest
import torch
from common import draw, reference
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Lasso, LinearRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeRegressor

import baselines
import looped


def draw64(task, B, n, d, seed=0):
    xs, ys = draw(task, B, n, d, d, seed)
    return xs.double(), ys.double()


def test_least_squares_ridge_and_knn_match_sklearn():
    xs, ys = draw64("noisy_linreg", B=6, n=14, d=5)
    torch.testing.assert_close(
        baselines.least_squares(xs, ys),
        reference(lambda i: LinearRegression(fit_intercept=False), xs, ys),
        rtol=0,
        atol=1e-8,
    )
    torch.testing.assert_close(
        baselines.ridge(xs, ys, alpha=0.5),
        reference(lambda i: Ridge(alpha=0.5, fit_intercept=False), xs, ys),
        rtol=0,
        atol=1e-8,
    )
    torch.testing.assert_close(
        baselines.nearest_neighbours(xs, ys),
        reference(lambda i: KNeighborsRegressor(n_neighbors=min(3, i)), xs, ys),
        rtol=0,
        atol=1e-12,
    )


def test_least_squares_is_minimum_norm_on_every_prefix():
    xs, ys = draw("linreg", B=5, n=12, d=6, active=6)
    preds = baselines.least_squares(xs, ys)
    for i in range(12):
        if i == 0:
            assert (preds[:, 0] == 0).all()
            continue
        w = torch.linalg.pinv(xs[:, :i].double()) @ ys[:, :i, None].double()  # (B, d, 1)
        ref = (xs[:, i].double()[:, None] @ w)[:, 0, 0]
        torch.testing.assert_close(preds[:, i].double(), ref, rtol=1e-5, atol=1e-5)
    assert preds[:, 7:].sub(ys[:, 7:]).abs().max() < 1e-3  # exact once i > d


def test_keep_freed_memory_sets_glibc_options_where_there_is_glibc():
    import platform

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    # True only if mallopt accepted both values: it returns 0 for one it refuses.
    assert baselines.keep_freed_memory() is glibc


def test_averaging_estimator():
    xs, ys = draw("linreg", B=4, n=8, d=3, active=3)
    preds = baselines.averaging(xs, ys)
    for i in range(1, 8):
        w = (ys[:, :i, None] * xs[:, :i]).mean(1)
        torch.testing.assert_close(preds[:, i], (w * xs[:, i]).sum(-1), rtol=1e-5, atol=1e-6)
    assert (preds[:, 0] == 0).all()


@pytest.mark.parametrize("task", ["sparse_linreg", "linreg"])
def test_lasso_matches_sklearn(task):
    """Under- and overdetermined prefixes (d = 8, i = 1 .. 19): within 1e-4, the issue's tolerance
    (measured: about 1e-10, since the homotopy is exact up to round-off)."""
    xs, ys = draw64(task, B=6, n=20, d=8, seed=1)
    ref = reference(
        lambda i: Lasso(alpha=0.01, fit_intercept=False, tol=1e-12, max_iter=1_000_000), xs, ys
    )
    torch.testing.assert_close(baselines.lasso(xs, ys), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("depth", [2, 4])
def test_greedy_tree_matches_sklearn(depth):
    """With one feature every split is unique, so predictions at the query must agree exactly.
    With several, scikit-learn breaks ties between features that split a node's samples the
    same way at random, which can route a new query differently; the fitted values at the
    training points cannot differ, so those are compared exactly."""
    xs, ys = draw64("linreg", B=6, n=20, d=1)
    ys = ys + torch.randn(ys.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(
        baselines.tree_predictions(xs, ys, depth),
        reference(lambda i: DecisionTreeRegressor(max_depth=depth), xs, ys),
        rtol=0,
        atol=1e-12,
    )
    xs, ys = draw64("decision_tree", B=6, n=20, d=4, seed=2)
    for sign in (False, True):  # sign(x): the matmul path for -1/1 features
        ref = reference(lambda i: DecisionTreeRegressor(max_depth=depth), xs, ys, at=0, sign=sign)
        torch.testing.assert_close(in_sample(xs, ys, depth, sign=sign), ref, rtol=0, atol=1e-12)
    xs = torch.round(xs * 2) / 2  # tied values: no threshold may fall between equal values
    xs[..., 3] = 0  # and a constant feature
    ref = reference(lambda i: DecisionTreeRegressor(max_depth=depth), xs, ys, at=0)
    torch.testing.assert_close(in_sample(xs, ys, depth), ref, rtol=0, atol=1e-12)
    # float32, the benchmark's dtype: the same fitted values up to float32 round-off
    xs32, ys32 = draw("decision_tree", B=6, n=20, d=4, active=4, seed=2)
    ref = reference(
        lambda i: DecisionTreeRegressor(max_depth=depth), xs32.double(), ys32.double(), at=0
    )
    torch.testing.assert_close(in_sample(xs32, ys32, depth).double(), ref, rtol=0, atol=1e-5)
    # sign(x) = 0 goes left in the split search, the fit and the query alike. The sign path can
    # split at 0 only, and this data's best split is there (between 0 and 1), as in sklearn.
    xs = torch.tensor([[[0.0], [0.0], [1.0], [1.0], [-1.0], [0.0], [0.0]]], dtype=torch.float64)
    ys = torch.tensor([[10.0, 10.0, 0.0, 0.0, 0.0, 5.0, 1.0]], dtype=torch.float64)

    def stump(i):
        return DecisionTreeRegressor(max_depth=1)

    torch.testing.assert_close(
        baselines.tree_predictions(xs, ys, 1, sign=True),
        reference(stump, xs, ys, sign=True),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        in_sample(xs, ys, 1, sign=True),
        reference(stump, xs, ys, at=0, sign=True),
        rtol=0,
        atol=1e-12,
    )
    # a midpoint that rounds up to the value above: the query at that value goes right, as its twin
    xs = torch.tensor(
        [[[2.0**30 + 2.0**-22], [2.0**30 + 2.0**-21], [2.0**30 + 2.0**-21]]], dtype=torch.float64
    )
    ys = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert baselines.tree_predictions(xs, ys, depth)[0, 2] == 1.0
    # Repeated rows: a node whose samples are tied on every feature stays a leaf (sklearn
    # predicts 6 at x = 3).
    xs = torch.tensor(
        [[[1.0, 4.0], [1.0, 4.0], [2.0, 4.0], [2.0, 4.0], [3.0, 4.0]]], dtype=torch.float64
    )
    ys = torch.tensor([[0.0, 0.0, 5.0, 7.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        baselines.tree_predictions(xs, ys, depth),
        reference(lambda i: DecisionTreeRegressor(max_depth=depth), xs, ys),
        rtol=0,
        atol=1e-12,
    )


def test_prefix_orders_are_each_prefix_sorted():
    """One sort per prompt, then a filter per prefix, must give each prefix's samples in the order
    of a stable sort of them (tied values in index order), the empty sample m first and the
    samples outside the prefix last."""
    xs, _ = draw64("decision_tree", B=3, n=12, d=4, seed=7)
    xs = torch.round(xs * 2) / 2  # tied values
    for lo, hi in [(1, 12), (5, 9)]:
        order, ties = baselines.prefix_orders(xs, sort_features(xs), lo, hi)
        assert ties and order.shape == (3 * (hi - lo), 4, hi)
        for q in range(len(order)):
            b, i = q // (hi - lo), lo + q % (hi - lo)
            assert (order[q, :, 0] == hi - 1).all()
            for f in range(4):
                assert (
                    order[q, f, 1 : i + 1].tolist()
                    == xs[b, :i, f].sort(stable=True).indices.tolist()
                )
                assert sorted(order[q, f, i + 1 :].tolist()) == list(range(i, hi - 1))
    xs = torch.randn(2, 12, 4, dtype=torch.float64)
    assert not baselines.prefix_orders(xs, sort_features(xs), 1, 12)[1]


def sort_features(xs):
    """Every feature's stable sort of all the samples, (B, d, n): the order that prefix_orders
    filters."""
    return xs.transpose(1, 2).argsort(dim=2, stable=True)


def in_sample(xs, ys, depth, n_trees=1, lr=1.0, sign=False):
    """Our trees' prediction at x_0, a training point of every prefix (B, n); 0 at i = 0."""
    B, n, _ = xs.shape
    X, y, valid, _ = baselines.prefix_problems(torch.sign(xs) if sign else xs, ys, 1, n)
    presorted = None if sign else baselines.prefix_orders(xs, sort_features(xs), 1, n)
    out = baselines.fit_trees(X, y, valid, X[:, 0], depth, n_trees, lr, presorted).view(B, n - 1)
    return torch.nn.functional.pad(out, (1, 0))


def test_boosted_trees_match_sklearn():
    """The same two checks for 50 boosted trees of depth 4 (learning rate 0.1): a tie changes no
    fitted value, so neither any later residual, and the fit at x_0 stays comparable."""

    def gbr(i):
        return GradientBoostingRegressor(max_depth=4, learning_rate=0.1, n_estimators=50)

    xs, ys = draw64("linreg", B=3, n=16, d=1, seed=3)
    ys = ys + torch.randn(ys.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(
        baselines.tree_predictions(xs, ys, 4, 50, 0.1), reference(gbr, xs, ys), rtol=0, atol=1e-10
    )
    xs, ys = draw64("decision_tree", B=3, n=16, d=4, seed=4)
    for sign in (False, True):
        torch.testing.assert_close(
            in_sample(xs, ys, 4, 50, 0.1, sign),
            reference(gbr, xs, ys, at=0, sign=sign),
            rtol=0,
            atol=1e-10,
        )


def test_gradient_descent_and_newton_converge_to_least_squares():
    """A well-conditioned problem (i = 40 points, d = 5): GD reaches least squares to 1e-8
    within 300 steps; Newton-Schulz needs far fewer iterations for the same accuracy."""
    xs, ys = draw64("linreg", B=8, n=41, d=5, seed=5)
    lsq = baselines.least_squares(xs, ys)[:, -1]
    # the largest distance to least squares at the last position after each step, (steps,)
    gd = baselines.gradient_descent_iterates(xs, ys, 300)[:, :, -1].sub(lsq[:, None]).abs().amax(0)
    newton = baselines.newton_iterates(xs, ys, 30)[:, :, -1].sub(lsq[:, None]).abs().amax(0)
    assert gd[-1] < 1e-8 and newton[-1] < 1e-8

    def first(err):  # the first iteration within 1e-8
        return int((err < 1e-8).nonzero()[0])

    assert 3 * first(newton) < first(gd), (first(newton), first(gd))
    assert gd[0] > 1e-2 and newton[0] > 1e-2  # neither is there from the start


def test_solvers_take_float64_and_two_point_prompts():
    xs, ys = draw64("decision_tree", B=3, n=2, d=3)  # one prefix of one pair: no split is possible
    for name, solver in baselines.BASELINES.items():
        preds = solver(xs, ys) if name != "2-layer ReLU net" else solver(xs, ys, steps=5)
        assert preds.shape == (3, 2) and preds.dtype == torch.float64, name
        assert (preds[:, 0] == 0).all(), name
    for name in ("greedy tree", "boosted trees", "3-NN"):  # one pair seen: predict its y
        torch.testing.assert_close(baselines.BASELINES[name](xs, ys)[:, 1], ys[:, 0], msg=name)


def test_relu_network_learns_the_relu_task():
    """The per-prompt networks (fewer steps than the paper's 1000, to stay fast) must clearly beat
    least squares and the zero predictor at the last position of the ReLU task."""
    xs, ys = draw("relu_2nn", B=24, n=31, d=2, active=2, seed=6)

    def err(preds):
        return (preds[:, -1] - ys[:, -1]).pow(2).mean().item()

    net = err(baselines.relu_network(xs, ys, steps=300))
    assert net < 0.5 * err(baselines.least_squares(xs, ys)), net
    assert net < 0.25 * err(torch.zeros_like(ys)), net


def test_every_task_names_known_baselines():
    assert set(baselines.TASK_BASELINES) == set(looped.TASKS)
    assert all(
        name in baselines.BASELINES for names in baselines.TASK_BASELINES.values() for name in names
    )
