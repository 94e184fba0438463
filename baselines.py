"""Classical in-context learners, scored on the same prompts as the looped transformer.

Every solver has one signature, `(xs (B, n, d), ys (B, n)) -> preds (B, n)`, where
`preds[:, i]` is fitted on the first i pairs only and `preds[:, 0] = 0`, so its error curve
lines up with the transformer's (the prediction of y_i sees x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i).
All are batched over prompts and prefix lengths in torch and run on CPU or CUDA alike.
This file imports nothing from looped.py.
"""
import torch


def prefix_masks(n, device):
    """mask[i, j] = 1 when pair j is in the prefix that predicts position i (j < i)."""
    return torch.ones(n, n, device=device).tril(-1)  # (n, n)


def least_squares(xs, ys):
    """Minimum-norm least squares: w_i = pinv(X_{<i}) y_{<i}; pred_i = w_i . x_i.

    Zero rows do not change a minimum-norm solution, so every prefix is the full (n, d)
    design with the rows j >= i zeroed, and all n prefixes are solved in one batched pinv.
    Right for underdetermined prefixes (i < d), where a full-rank-only solver fails."""
    B, n, d = xs.shape
    x64, y64 = xs.double(), ys.double()
    mask = prefix_masks(n, xs.device).double()  # (n, n)
    preds = torch.empty(B, n, dtype=torch.float64, device=xs.device)
    for s in range(0, B, 64):  # chunks of prompts bound the (b, n, n, d) design tensor
        X = x64[s:s + 64, None] * mask[None, :, :, None]  # (b, n, n, d): prefix i, row j
        Y = y64[s:s + 64, None] * mask[None]  # (b, n, n)
        w = (torch.linalg.pinv(X) @ Y[..., None])[..., 0]  # (b, n, d)
        preds[s:s + 64] = (w * x64[s:s + 64]).sum(-1)
    return preds.to(xs.dtype)


def averaging(xs, ys):
    """Averaging estimator: w_i = mean_{j<i} y_j x_j; pred_i = w_i . x_i (0 at i = 0)."""
    n = xs.shape[1]
    sums = torch.cumsum(ys[..., None] * xs, dim=1) - ys[..., None] * xs  # (B, n, d): sum over j < i
    counts = torch.arange(n, device=xs.device).clamp(min=1)[None, :, None]
    return ((sums / counts) * xs).sum(-1)


def zero(xs, ys):
    """The zero predictor: scores about 1 under the paper's normaliser."""
    return torch.zeros_like(ys)


# Which classical learners each task's figures show (the paper's choice, grown in baselines work).
BASELINES = {
    "least squares": least_squares,
    "averaging": averaging,
    "zero": zero,
}
TASK_BASELINES = {
    "linreg": ["least squares", "averaging", "zero"],
    "noisy_linreg": ["least squares", "averaging", "zero"],
    "sparse_linreg": ["least squares", "averaging", "zero"],
    "decision_tree": ["least squares", "averaging", "zero"],
    "relu_2nn": ["least squares", "averaging", "zero"],
}
