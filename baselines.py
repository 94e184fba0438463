"""Classical in-context learners, scored on the same prompts as the looped transformer.

Every solver maps `(xs (B, n, d), ys (B, n)) -> preds (B, n)` (B prompts, n points, d input dim),
`preds[:, i]` fitted on the first i pairs only and `preds[:, 0] = 0`, so its error curve lines up
with the transformer's; all are batched in torch over the Q = B * (prefixes) fitting problems, on
CPU or CUDA. A leaf: imports nothing of the project. Error tables: `python experiments.py
baselines`; timings against per-prompt scikit-learn: `python bench.py baselines`.
"""

import ctypes
import math
from functools import partial, wraps

import torch
import torch.nn.functional as F


def keep_freed_memory():
    """Ask glibc's malloc to keep the solvers' many freed temporaries of a few MB for reuse, not
    hand them back to the OS and page-fault them in again (measured: Newton 1.8x, greedy tree 1.6x,
    Lasso 1.3x faster), what jemalloc gives, without a preload. False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # set to glibc's maxima; 0 means refused
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def chunked(solver, size, xs, ys, *args, **kwargs):
    """Run solver on `size` prompts at a time: chunks bound the memory of the (B, n, n, d) or
    (B, n, d, d) tensors, and keep the working set in cache (Lasso, trees: 1.4x to 1.9x faster)."""
    parts = [(xs[s : s + size], ys[s : s + size]) for s in range(0, len(xs), size)]
    return torch.cat([solver(x, y, *args, **kwargs) for x, y in parts])


def by_prompts(size):
    """chunked as a decorator: `@by_prompts(64)` runs the solver below on 64 prompts at a time."""

    def decorate(solver):
        return wraps(solver)(partial(chunked, solver, size))

    return decorate


def prefix_gram(xs, ys):
    """G_i = sum_{j<i} x_j x_j^T (B, n, d, d) and c_i = sum_{j<i} y_j x_j (B, n, d), in float64:
    the sufficient statistics of every prefix's least-squares problem."""
    x, y = xs.double(), ys.double()
    G = torch.cumsum(x[..., :, None] * x[..., None, :], dim=1)  # sums over j <= i
    c = torch.cumsum(y[..., None] * x, dim=1)
    return tuple(torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1) for t in (G, c))  # j < i


def predict_linear(w, xs):
    """w (B, n, d) fitted per prefix -> pred_i = w_i . x_i (B, n), in the inputs' dtype."""
    return (w * xs.double()).sum(-1).to(xs.dtype)


# ---------------------------------------------------------------------------- linear solvers, k-NN


@by_prompts(64)
def least_squares(xs, ys):
    """Minimum-norm least squares, w_i = pinv(X_{<i}) y_{<i}: zeroed rows j >= i leave it unchanged,
    so all n prefixes are one batched pinv of the (n, d) design, right for i < d too."""
    n = xs.shape[1]
    mask = torch.ones(n, n, dtype=torch.float64, device=xs.device).tril(-1)  # (n, n): j < i
    X = xs.double()[:, None] * mask[None, :, :, None]  # (B, n, n, d): prefix i, row j
    Y = ys.double()[:, None] * mask[None]  # (B, n, n)
    w = (torch.linalg.pinv(X) @ Y[..., None])[..., 0]  # (B, n, d)
    return predict_linear(w, xs)


@by_prompts(256)
def ridge(xs, ys, alpha=0.01):
    """Ridge without intercept: w_i = (G_i + alpha I)^-1 c_i. alpha = 0.01 = noise variance / prior
    variance of w is Bayes-optimal for noisy linear regression (noise std 0.1, w ~ N(0, I))."""
    G, c = prefix_gram(xs, ys)
    eye = torch.eye(xs.shape[2], dtype=G.dtype, device=G.device)
    return predict_linear(torch.linalg.solve(G + alpha * eye, c), xs)


def averaging(xs, ys):
    """Averaging estimator: w_i = mean_{j<i} y_j x_j; pred_i = w_i . x_i (0 at i = 0)."""
    sums = torch.cumsum(ys[..., None] * xs, dim=1) - ys[..., None] * xs  # (B, n, d): sum over j < i
    counts = torch.arange(xs.shape[1], device=xs.device).clamp(min=1)[None, :, None]
    return ((sums / counts) * xs).sum(-1)


@by_prompts(128)
def nearest_neighbours(xs, ys, k=3):
    """k-NN, uniform weights: pred_i = mean of y_j over the k nearest x_j (j < i) to x_i; fewer
    neighbours when i < k, as Garg et al. do."""
    B, n, _ = xs.shape
    x, k = xs.double(), min(k, n)
    dist = (x[:, :, None] - x[:, None]).pow(2).sum(-1)  # (B, n, n): query i, candidate j
    future = torch.ones(n, n, dtype=torch.bool, device=xs.device).triu()  # j >= i is not seen
    idx = dist.masked_fill(future, math.inf).topk(k, dim=2, largest=False).indices  # (B, n, k)
    neighbours = ys.gather(1, idx.flatten(1)).view(B, n, k)
    # (n, k): query i has seen min(i, k) neighbours
    seen = torch.arange(k, device=xs.device)[None] < torch.arange(n, device=xs.device)[:, None]
    return (neighbours * seen).sum(-1) / seen.sum(-1).clamp(min=1)


@by_prompts(64)
def lasso(xs, ys, alpha=0.01):
    """Lasso without intercept as in scikit-learn, min_w ||y - X w||^2 / (2 i) + alpha ||w||_1,
    solved exactly for all problems at once by the homotopy (LARS with drops, Efron et al. 2004): w,
    piecewise linear in the penalty lam, is followed from 0 at lam = max |c_j| to lam = i alpha."""
    B, n, d = xs.shape
    G, c = (t.flatten(0, 1) for t in prefix_gram(xs, ys))  # (Q, d, d), (Q, d): Q = B n problems
    target = alpha * torch.arange(n, dtype=G.dtype, device=G.device).repeat(B)  # (Q,): i alpha
    lam, first = c.abs().max(1)  # w = 0 is optimal down to lam = max_j |c_j|
    # rho, the correlations c - G w: lam sign(w_j) on the active set, |.| <= lam off it
    w, rho, active = torch.zeros_like(c), c.clone(), F.one_hot(first, d).bool()
    todo = torch.nonzero(lam > target)[:, 0]
    eye = torch.eye(d, dtype=G.dtype, device=G.device)
    for _ in range(10 * d + 100):
        if len(todo) == 0:
            break
        Gt, on, wt, rt, lt = G[todo], active[todo], w[todo], rho[todo], lam[todo, None]
        s = torch.sign(rt) * on
        # direction: moving lam down by g moves w_A by g u_A, with G_AA u_A = s_A
        A = torch.where(on[:, :, None] & on[:, None, :], Gt, eye * ~on[:, :, None])
        u = torch.linalg.solve(A, s)  # (q, d), zero off the active set
        a = (Gt @ u[..., None])[..., 0]  # rho moves by -g a; a_A = s_A
        # the next event: an inactive |rho_j| reaches lam - g, or an active w_j reaches 0
        join = torch.minimum(positive((lt - rt) / (1 - a), lt), positive((lt + rt) / (1 + a), lt))
        g_join, j_join = join.masked_fill(on, math.inf).min(1)
        g_drop, j_drop = positive(-wt / u, lt).masked_fill(~on, math.inf).min(1)
        g_end = lt[:, 0] - target[todo]
        g = torch.minimum(torch.minimum(g_join, g_drop), g_end)  # (q,)
        wt, rt = wt + g[:, None] * u, rt - g[:, None] * a
        rows = torch.arange(len(todo), device=G.device)
        joined = (g == g_join) & (g < g_end)
        dropped = (g == g_drop) & (g < g_end)  # a join and a drop at the same step both happen
        on[rows[joined], j_join[joined]] = True
        on[rows[dropped], j_drop[dropped]] = False
        wt[rows[dropped], j_drop[dropped]] = 0.0
        w[todo], rho[todo], lam[todo], active[todo] = wt, rt, lt[:, 0] - g, on
        todo = todo[g < g_end]
    if len(todo) or not w.isfinite().all():  # never return a point of the path short of lam
        raise RuntimeError(f"Lasso homotopy did not finish for {len(todo)} problem(s)")
    return predict_linear(w.view(B, n, d), xs)


def positive(step, lam):
    """Steps to an event, with those not ahead (<= 0 up to round-off) or undefined set to inf."""
    return torch.where(step > 1e-12 * lam, step, math.inf).nan_to_num(math.inf)


def gradient_descent_steps(G, c, steps):
    """Gradient descent's w_1 .. w_steps on ||X w - y||^2 / (2 i) from w = 0, from G = X^T X and
    c = X^T y (any leading dimensions): w <- w - (G w - c) / lambda_max(G); the 1/i cancels. It
    converges to minimum-norm least squares."""
    step = 1 / torch.linalg.eigvalsh(G)[..., -1].clamp(min=1e-12)
    w = torch.zeros_like(c)
    for _ in range(steps):
        w = w - step[..., None] * ((G @ w[..., None])[..., 0] - c)
        yield w


def newton_steps(G, c, steps):
    """Iterative Newton (Newton-Schulz) for pinv(G): M_0 = G / lambda_max^2, M_{k+1} = 2 M_k -
    M_k G M_k; its w_k = M_k c, k = 1 .. steps, tends to minimum-norm least squares, quadratically
    once started."""
    top = torch.linalg.eigvalsh(G)[..., -1].clamp(min=1e-12)
    M = G / top[..., None, None] ** 2
    for _ in range(steps):
        M = 2 * M - M @ G @ M
        yield (M @ c[..., None])[..., 0]


@by_prompts(256)
def gradient_descent_iterates(xs, ys, steps=100):
    """Gradient descent (gradient_descent_steps) on every prefix: the prediction after every
    step, (B, steps, n)."""
    G, c = prefix_gram(xs, ys)
    return torch.stack([predict_linear(w, xs) for w in gradient_descent_steps(G, c, steps)], 1)


@by_prompts(256)
def newton_iterates(xs, ys, steps=30):
    """Iterative Newton (newton_steps) on every prefix: the prediction after every step,
    (B, steps, n)."""
    G, c = prefix_gram(xs, ys)
    return torch.stack([predict_linear(w, xs) for w in newton_steps(G, c, steps)], 1)


# ---------------------------------------------------------------------------- trees, networks


def prefix_problems(xs, ys, lo, hi):
    """The fitting problems of prefixes lo <= i < hi, padded to m = hi - 1 samples:
    X (Q, m, d), y (Q, m), valid (Q, m) (sample j < i), query x_i (Q, d); Q = B (hi - lo)."""
    B, n, d = xs.shape
    i, m = torch.arange(lo, hi, device=xs.device), hi - 1
    X = xs[:, None, :m].expand(B, len(i), m, d).reshape(-1, m, d)
    y = ys[:, None, :m].expand(B, len(i), m).reshape(-1, m)
    valid = (torch.arange(m, device=xs.device)[None] < i[:, None]).repeat(B, 1)  # (Q, m)
    return X, y, valid, xs[:, lo:hi].reshape(-1, d)


def fit_trees(X, y, valid, query, depth, n_trees=1, lr=1.0, presorted=None):
    """Greedy regression trees as scikit-learn's DecisionTreeRegressor (CART): each node splits at
    the feature and threshold (a midpoint between consecutive values; x <= t goes left) maximising
    sum_L^2 / n_L + sum_R^2 / n_R. n_trees > 1: gradient boosting from the mean, adding lr times a
    tree fitted to the residuals. All Q problems and nodes grow level by level at once: X (Q, m, d),
    y, valid (Q, m) (real samples first), query (Q, d) -> prediction (Q,). presorted: prefix_orders'
    (order, ties), or None if every feature is -1 or 1 (sign(x): a matmul, unchecked)."""
    Q, m, d = X.shape
    y = y * valid
    n_real = valid.sum(1, keepdim=True)  # (Q, 1)
    mean = (y.sum(1, keepdim=True) / n_real.clamp(min=1)).expand(Q, m)
    fit = mean if n_trees > 1 else torch.zeros_like(y)  # boosting starts from the mean
    at_query = fit[:, 0].clone()
    binary = presorted is None
    up = (X > 0).to(y.dtype) if binary else None  # (Q, m, d)
    order, ties = (None, False) if binary else presorted
    values = X.transpose(1, 2).masked_fill(~valid[:, None], math.inf) if ties else None
    for _ in range(n_trees):
        r = (y - fit) * valid  # residuals, (Q, m)
        node = torch.zeros(Q, m, dtype=torch.long, device=X.device)
        q = torch.zeros(Q, 1, dtype=torch.long, device=X.device)  # the query's node
        # sorted features: each node is a segment of every feature's order, the padding a last
        # one: (start, count) of each segment (Q, K + 1), and the segment of each position (Q, m)
        if not binary:
            perm, seg = order, (torch.arange(m, device=X.device) >= n_real).long()
            start, count = torch.cat([0 * n_real, n_real], 1), torch.cat([n_real, m - n_real], 1)
        for level in range(depth):
            if binary:
                f, below, above = binary_split(up, valid, r, node, 2**level)
            else:
                f, below, above = sorted_split(X, values, r, perm, seg, start, count)
            x_f = X.gather(2, f.gather(1, node)[..., None])[..., 0]  # (Q, m): its node's feature
            right = (x_f > below.gather(1, node)) & valid  # above the value below the threshold
            if not binary and level < depth - 1:
                perm, seg, start, count = partition(perm, right, node, seg, start, count)
            node = 2 * node + right.long()
            # the query goes by the midpoint, as in sklearn, which takes the value below when the
            # midpoint rounds up to the value above (so a query there goes where its twin went)
            mid = below.double() / 2 + above.double() / 2
            thr = torch.where(mid == above.double(), below.double(), mid)
            q = 2 * q + (query.gather(1, f.gather(1, q)) > thr.gather(1, q)).long()
        n_leaf = r.new_zeros(Q, 2**depth).scatter_add(1, node, valid.to(r.dtype))
        leaf = torch.zeros_like(n_leaf).scatter_add(1, node, r) / n_leaf.clamp(min=1)  # mean r
        fit = fit + lr * leaf.gather(1, node)
        at_query = at_query + lr * leaf.gather(1, q)[:, 0]
    return at_query


def binary_split(up, valid, r, node, K):
    """Best split of each node when every feature is -1 or 1 (sign(x)): the threshold is 0, so the
    right side's counts and sums, all nodes and features, are one matmul with up = (x > 0)."""
    member = F.one_hot(node, K).to(r.dtype) * valid[..., None]  # (Q, m, K)
    both = torch.cat([member, member * r[..., None]], 2)  # (Q, m, 2K): counts, then residual sums
    right, total = both.transpose(1, 2) @ up, both.sum(1)[..., None]  # (Q, 2K, d), (Q, 2K, 1)
    n_right, s_right = right[:, :K], right[:, K:]
    n_left, s_left = total[:, :K] - n_right, total[:, K:] - s_right
    gain = s_left**2 / n_left.clamp(min=1) + s_right**2 / n_right.clamp(min=1)
    best, f = gain.masked_fill((n_left == 0) | (n_right == 0), -math.inf).max(2)  # (Q, K)
    thr = torch.where(best > -math.inf, 0.0, math.inf).to(up.dtype)  # no split: all go left
    return f, thr, thr  # the values below and above the threshold, as far as routing goes


def sorted_split(X, values, r, perm, seg, start, count):
    """Best split of each node from every feature's order perm (Q, d, 1 + m), the empty sample m
    then each node's samples by value, so one cumsum gives all left sums; values (Q, d, m) (padding
    inf) if some tie. Each node's feature and values either side of its threshold (Q, K)."""
    Q, d, m = perm.shape[0], perm.shape[1], perm.shape[2] - 1
    K, pos = start.shape[1] - 1, torch.arange(m, device=r.device)
    seg0 = start.gather(1, seg)  # (Q, m): where the segment of each position starts and ends
    seg1 = seg0 + count.gather(1, seg)
    cs = F.pad(r, (0, 1)).gather(1, perm.flatten(1)).view(Q, d, m + 1).cumsum(2)  # cs[..., 0] = 0
    # every feature's order holds the same samples before a segment and up to its end (the
    # nodes before it), so the segment's start sum and total T are read from the first feature
    before = cs[:, 0].gather(1, seg0)  # (Q, m)
    total = cs[:, 0].gather(1, seg1) - before
    # gain L^2 / n_L + (T - L)^2 / n_R = T^2 / n + D^2 (1 / n_L + 1 / n_R), n = n_L + n_R, with
    # D = L - n_L T / n the left sum's excess over its share (Friedman's form, as sklearn's boosting
    # uses): T^2 / n is the node's constant, and no large terms cancel when y is far from 0
    n_left = (pos + 1 - seg0).to(r.dtype)
    inv_right = (seg1 - 1 - pos).clamp_(min=1).to(r.dtype).reciprocal_()
    shift = before + n_left * total / (seg1 - seg0).clamp(min=1).to(r.dtype)  # cs - shift = D
    # 1 / n_L + 1 / n_R is the same for every feature, so the best one has the largest |D|
    excess = (cs[..., 1:] - shift[:, None]).abs_()  # |D|, (Q, d, m)
    if values is not None:  # no threshold between equal values
        excess[..., :-1].masked_fill_(values.gather(2, perm[..., 1:]).diff(dim=2) <= 1e-7, -1)
    top = excess.amax(1)  # (Q, m): the best feature's |D| at each position (max(1) is 10x slower)
    ok = (seg1 - pos > 1) & (seg < K) & (top >= 0)  # the node has samples on both sides
    best = (top.square() * (n_left.reciprocal() + inv_right)).masked_fill(~ok, -math.inf)
    node_best = best.new_full((Q, K + 1), -math.inf).scatter_reduce(1, seg, best, "amax")
    first = torch.where((best == node_best.gather(1, seg)) & ok, pos, m)
    p = torch.full((Q, K + 1), m, device=r.device).scatter_reduce(1, seg, first, "amin")
    has = node_best[:, :K] > -math.inf  # else every value of the node is tied: it stays a leaf
    p = p[:, :K].clamp(max=max(m - 2, 0))  # (Q, K); m (no split) is clamped to stay in range
    f = excess.transpose(1, 2).gather(1, p[..., None].expand(Q, K, d)).argmax(2)
    lo = perm.flatten(1).gather(1, f * (m + 1) + p + 1)
    hi = perm.flatten(1).gather(1, f * (m + 1) + (p + 2).clamp(max=m))
    x = X.flatten(1)  # (Q, m d)
    below, above = (x.gather(1, sample * d + f).masked_fill(~has, math.inf) for sample in (lo, hi))
    return f, below, above


def partition(perm, right, node, seg, start, count):
    """Split every segment of every feature's order stably into its children, which keeps each
    sorted: a segment's k-th right-goer moves to its right child's k-th place, and a left-goer back
    by the number of right-goers before it. The new perm, seg, start and count."""
    Q, d, m = perm.shape[0], perm.shape[1], perm.shape[2] - 1
    K, pos = start.shape[1] - 1, torch.arange(m, device=perm.device)
    # float32 (exact below 2^24): torch.where and integer arithmetic are 2x slower on a CPU
    bits = F.pad(right.float(), (0, 1)).gather(1, perm.flatten(1)).view(Q, d, m + 1)  # 0 for m
    ones = bits.cumsum(2)  # right-goers up to each position, O
    before = ones[:, 0].gather(1, start.gather(1, seg))  # ... before the segment, O_0 (as above)
    n_right = torch.zeros_like(count).scatter_add(1, node, right.long())[:, :K]  # (Q, K)
    n_left = count[:, :K] - n_right
    right_start = start[:, :K] + n_left
    into = F.pad(right_start, (0, 1), value=m).gather(1, seg)  # (Q, m): its right child's start
    # a left-goer moves to pos - (O - O_0), a right-goer to into + (O - O_0) - 1, that is,
    # new = to_left - O + bit (to_right - to_left + 2 O)
    to_left, to_right = (pos + before)[:, None], (into - before - 1)[:, None]
    ones = ones[..., 1:]
    change = torch.add(to_right - to_left, ones, alpha=2)
    new = torch.addcmul(to_left - ones, bits[..., 1:], change).long()
    moved = torch.empty_like(perm)
    moved[..., 0] = m
    moved[..., 1:].scatter_(2, new, perm[..., 1:])
    seg = 2 * seg + (pos >= into)  # the padding, K, becomes 2K
    start = torch.cat([torch.stack([start[:, :K], right_start], 2).flatten(1), start[:, K:]], 1)
    count = torch.cat([torch.stack([n_left, n_right], 2).flatten(1), count[:, K:]], 1)
    return moved, seg, start, count


def prefix_orders(xs, order, lo, hi):
    """Each feature's order (Q, d, 1 + m) for prefixes lo <= i < hi of prefix_problems (an empty
    sample m, the prefix's samples by value, the others) and whether two values are within 1e-7
    (sklearn's "equal"), by stable filters of order (B, d, L >= m): 2.2x faster than sorting."""
    B, m = xs.shape[0], hi - 1
    order = front(order, m, torch.empty_like(order))[..., :m]  # (B, d, m)
    ties = bool((xs[:, :m].transpose(1, 2).gather(2, order).diff(dim=2) <= 1e-7).any())
    i = torch.arange(lo, hi, device=xs.device)[:, None, None]  # (hi - lo, 1, 1)
    out = order.new_empty(B, hi - lo, order.shape[1], m + 1)
    out[..., 0] = m
    front(order[:, None], i, out[..., 1:])  # (B, hi - lo, d, m): every prefix of every prompt
    return out.flatten(0, 1), ties


def front(order, i, out):
    """Write each row of order into out with the samples < i first, both parts in their order
    (order and i broadcast). Float32 arithmetic: exact below 2^24, 2x faster than torch.where."""
    keep = (i - order.float()).clamp_(0, 1)  # 1 if < i, else 0: 5x faster than (order < i).float()
    kept = keep.cumsum(-1)  # kept samples up to each position
    pos = torch.arange(order.shape[-1], device=order.device)
    # a kept sample goes to kept - 1 and another to i + pos - kept, which is, in one expression,
    # new = i + pos - kept + keep (2 kept - i - pos - 1)
    change = torch.add(-1 - i - pos, kept, alpha=2)
    new = torch.addcmul(torch.sub(i + pos, kept), keep, change).long()
    return out.scatter_(-1, new, order.expand_as(new))


def tree_predictions(xs, ys, depth, n_trees=1, lr=1.0, sign=False, bucket=8):
    """Fit every prefix's tree(s) and predict its query: (B, n), preds[:, 0] = 0. Prefixes are
    grouped by length, bucket at a time, so that the padding stays small."""
    B, n, _ = xs.shape
    x = torch.sign(xs) if sign else xs
    # (B, d, n - 1): every feature's order, filtered for each prefix by prefix_orders
    order = None if sign else xs[:, : n - 1].transpose(1, 2).argsort(dim=2, stable=True)
    preds = torch.zeros(B, n, dtype=torch.float64, device=xs.device)
    for lo in range(1, n, bucket):
        hi = min(lo + bucket, n)
        X, y, valid, query = prefix_problems(x, ys, lo, hi)
        presorted = None if sign else prefix_orders(x, order, lo, hi)
        preds[:, lo:hi] = fit_trees(X, y, valid, query, depth, n_trees, lr, presorted).view(B, -1)
    return preds.to(ys.dtype)


def relu_network(xs, ys, hidden=100, steps=1000, batch=10, lr=5e-3, seed=0):
    """A 2-layer ReLU network d -> 100 -> 1 per prompt and prefix, trained as Garg et al. do: Adam
    (lr 5e-3), 1000 steps on minibatches of 10 of the prefix's pairs drawn with replacement, all as
    slices of one model, losses summed (Adam is element-wise: each trains as if alone)."""
    if len(xs) > 16:  # 16 prompts at a time keep Adam's state in cache (1.5x faster than 64)
        args = hidden, steps, batch, lr
        chunks = [(s, xs[s : s + 16], ys[s : s + 16]) for s in range(0, len(xs), 16)]
        return torch.cat([relu_network(x, y, *args, seed + s) for s, x, y in chunks])
    B, n, d = xs.shape
    gen = torch.Generator(xs.device).manual_seed(seed)  # each chunk of prompts has its own seed
    Q = B * (n - 1)  # problem (b, i): prompt b, fitted on its first i = 1 .. n-1 pairs
    size = torch.arange(1, n, device=xs.device).repeat(B)  # (Q,): i
    first = torch.arange(B, device=xs.device).repeat_interleave(n - 1) * n  # (Q,): x_1's row
    flat_x, flat_y = xs.reshape(B * n, d), ys.reshape(B * n)
    shapes = [((d, hidden), d), ((1, hidden), d), ((hidden, 1), hidden), ((1, 1), hidden)]
    params = []  # W1 (Q, d, hidden), b1 (Q, 1, hidden), W2 (Q, hidden, 1), b2 (Q, 1, 1)
    for shape, fan_in in shapes:  # torch.nn.Linear's initialisation, U(+-1 / sqrt(fan_in))
        u = torch.rand(Q, *shape, generator=gen, device=xs.device, dtype=xs.dtype)
        params.append(((u * 2 - 1) * (1 / math.sqrt(fan_in))).requires_grad_())
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    with torch.enable_grad():  # evaluation may run under no_grad
        for _ in range(steps):
            pick = (torch.rand(Q, batch, generator=gen, device=xs.device) * size[:, None]).long()
            rows = first[:, None] + pick  # (Q, batch)
            loss = (two_layer(params, flat_x[rows]) - flat_y[rows]).pow(2).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        at_query = two_layer(params, flat_x[first + size][:, None])[:, 0]  # (Q,): x_i
    return F.pad(at_query.view(B, n - 1), (1, 0)).to(ys.dtype)  # preds[:, 0] = 0


def two_layer(params, x):
    """The batched networks: x (Q, k, d) -> relu(x W1 + b1) W2 + b2, (Q, k)."""
    W1, b1, W2, b2 = params
    return (F.relu(x @ W1 + b1) @ W2 + b2)[..., 0]


# ---------------------------------------------------------------------------- which baselines


BOOSTED = {"depth": 4, "n_trees": 50, "lr": 0.1}  # gradient boosting on squared error
BASELINES = {
    "least squares": least_squares,
    "ridge": ridge,
    "averaging": averaging,
    "3-NN": nearest_neighbours,
    "Lasso": lasso,
    "gradient descent": lambda xs, ys: gradient_descent_iterates(xs, ys, 100)[:, -1],
    "Newton": lambda xs, ys: newton_iterates(xs, ys, 30)[:, -1],
    # the paper's trees: depth 2 on x; depth 4 on sign(x), the features the task's trees test
    "greedy tree": partial(chunked, tree_predictions, 64, depth=2),
    "greedy tree, sign(x)": partial(chunked, tree_predictions, 256, depth=4, sign=True),
    "boosted trees": partial(chunked, tree_predictions, 64, **BOOSTED),
    "boosted trees, sign(x)": partial(chunked, tree_predictions, 32, **BOOSTED, sign=True),
    "2-layer ReLU net": relu_network,
    "zero": lambda xs, ys: torch.zeros_like(ys),  # scores about 1 under the paper's normaliser
}
# The classical learners each task's figures show: the paper's, plus zero as the floor.
TREES = ["greedy tree", "greedy tree, sign(x)", "boosted trees", "boosted trees, sign(x)"]
TASK_BASELINES = {
    "linreg": ["least squares", "averaging", "3-NN", "zero"],
    "noisy_linreg": ["least squares", "ridge", "averaging", "3-NN", "zero"],
    "sparse_linreg": ["least squares", "Lasso", "averaging", "3-NN", "zero"],
    "decision_tree": [*TREES, "least squares", "3-NN", "averaging", "zero"],
    "relu_2nn": ["2-layer ReLU net", "least squares", "3-NN", "averaging", "zero"],
}
# Solvers whose iterations are drawn beside the looped model's loop iterations.
ITERATES = {"gradient descent": gradient_descent_iterates, "Newton": newton_iterates}


def task_errors(task, xs, ys, norm):
    """Each of the task's baselines' normalised squared error per position, "NAME" (n,), and the 90%
    bootstrap band of that mean over the prompts, "band NAME" (2, n)."""
    errors = {}
    for name in TASK_BASELINES[task]:
        sq = (BASELINES[name](xs, ys) - ys).pow(2) / norm  # (P, n)
        errors[name], errors[f"band {name}"] = sq.mean(0).cpu(), bootstrap_band(sq).cpu()
    return errors


def bootstrap_band(sq, resamples=1000, seed=0):
    """90% bootstrap interval of the mean over prompts, per position: sq (P, n) -> (2, n). A
    resample is a vector of counts per prompt, so all 1000 means are one matmul."""
    P = len(sq)
    gen = torch.Generator(sq.device).manual_seed(seed)
    picks = torch.randint(0, P, (resamples, P), generator=gen, device=sq.device)
    ones = torch.ones_like(picks, dtype=torch.float)
    counts = torch.zeros(resamples, P, device=sq.device).scatter_add_(1, picks, ones)
    means = counts @ sq.float() / P  # (resamples, n)
    return torch.quantile(means, torch.tensor([0.05, 0.95], device=sq.device), dim=0)


def memory_needed(prompts, n, d):
    """Rough peak bytes of scoring the baselines: the prompts, predictions and bootstrap counts; the
    solvers' (64, n, n, d) float64 tensors (least squares of 64 prompts; others need less)."""
    return 12 * prompts * (n * (d + 1) + 1000), 32 * 64 * n * n * d
