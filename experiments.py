"""The paper's claims as commands, at laptop scale, and the report that shows what they found.

    python experiments.py claim1             # linear regression: looped (1 layer) against 12 layers, lr swept
    python experiments.py claim2             # sparse linear regression: the same
    python experiments.py claim3             # decision trees and ReLU networks: the same
    python experiments.py claim4             # the loop settles past b; the window T
    python experiments.py claim5             # Garg et al.'s out-of-distribution suite (after claim1)
    python experiments.py seeds              # the default command with ten seeds: its spread
    python experiments.py converge           # claim1's best runs for 8 times the steps (hours; after claim1)
    python experiments.py all                # claim1 ... claim5 and seeds in turn (not converge)
    python experiments.py report             # docs/results.md and figures/ from results/, no training

Each claim trains its runs with looped.py's `train` into results/CLAIM/RUN (a run already
evaluated there is kept, not trained again), and records beside each run's log.jsonl and
eval.json a run.json: its config, the machine, the torch version and the wall time. Those files
are committed; the checkpoints are not. `report` reads them alone and writes docs/results.md.

Tools on top of looped.py, for any runs:

    python experiments.py compare RUN_A RUN_B --out DIR   # several runs on the same prompts, one plot
    python experiments.py compare RUN_A RUN_B --shift skewed  # the same under a distribution shift
    python experiments.py baselines --task sparse_linreg  # every classical baseline's error, no model
    python experiments.py probe RUN_DIR                   # what linear probes read from the loop state
    python experiments.py adaptive RUN_DIR                # a loop that stops when it has converged

Citations, as in looped.py: [LT] the authors' code, https://github.com/Leiay/looped_transformer;
[G] Garg et al.'s, https://github.com/dtsip/in-context-learning.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import baselines
import bench
import harness
import looped

RESULTS, FIGURES, REPORT = "results", "figures", os.path.join("docs", "results.md")

# ---------------------------------------------------------------------------- out of distribution
# Garg et al.'s suite for linear regression ([G], `src/eval.py`). The first five change how x or y
# are drawn. The last three change the query: the prompt predicting y_i is then
# x_1 y_1 ... x_{i-1} y_{i-1} q_i, so each test prompt becomes m prompts, of which prompt i
# is scored at position i only.
SHIFTS = [
    "skewed",
    "half_subspace",
    "noisy_y",
    "scale_x=C",
    "scale_y=C",
    "random_quadrants",
    "orthogonal",
    "overlapping",
]
GARG_SHIFTS = [
    "skewed",
    "half_subspace",
    "noisy_y",
    "scale_x=0.333",
    "scale_x=0.5",
    "scale_x=2",
    "scale_x=3",
    "scale_y=0.333",
    "scale_y=0.5",
    "scale_y=2",
    "scale_y=3",
    "random_quadrants",
    "orthogonal",
    "overlapping",
]


def parse_shift(name):
    """--shift NAME -> (kind, scale C, 1 when there is none); UserError for a name not in SHIFTS."""
    kind, _, value = name.partition("=")
    if kind not in [s.split("=")[0] for s in SHIFTS] or (value and not kind.startswith("scale")):
        raise harness.UserError(f"unknown shift {name!r}: use one of {', '.join(SHIFTS)}")
    if kind in ("scale_x", "scale_y") and not (
        value.replace(".", "", 1).isdigit() and float(value) > 0
    ):
        raise harness.UserError(f"shift {name}: give a positive scale, as in {kind}=2")
    return kind, float(value) if value else 1.0


def sample_shifted(name, B, n, d, gen):
    """Linear-regression test prompts under a shift: (xs, ys, normaliser), xs (B, n, d) for a plain
    batch or (B, m, n, d) for query prompts, ys to match. The normaliser is E[y^2] under the
    shift, so that predicting 0 still scores about 1."""
    kind, c = parse_shift(name)
    dev = gen.device
    z = torch.randn(B, n, d, generator=gen, device=dev)
    w = torch.randn(B, d, 1, generator=gen, device=dev)
    xs, queries = z, None
    if kind in ("skewed", "half_subspace"):  # covariance U diag(eig) U^T, U a random rotation
        i = torch.arange(
            1, d + 1, device=dev
        )  # skewed: [G] maps x by U diag(1/i) U^T, so eig ~ 1/i^2
        eig = 1 / i**2 if kind == "skewed" else (i <= d // 2).float()
        eig = eig * d / eig.sum()  # trace d, as N(0, I_d) has
        U = torch.linalg.qr(torch.randn(B, d, d, generator=gen, device=dev)).Q  # (B, d, d)
        xs = (z * eig.sqrt()) @ U.transpose(1, 2)
    elif kind == "scale_x":
        xs = c * z
    elif kind == "random_quadrants":  # in-context x in one random orthant; queries anywhere
        xs = z.abs() * torch.randn(B, 1, d, generator=gen, device=dev).sign()
        queries = z
    elif kind == "orthogonal":  # q_i orthogonal to x_1 .. x_{i-1}, |q_i| = |x_i|; exists for i <= d
        queries = z.clone()
        for i in range(1, min(n, d)):
            Q = torch.linalg.qr(z[:, :i].transpose(1, 2)).Q  # (B, d, i): basis of the prefix
            q = z[:, i] - (Q @ (Q.transpose(1, 2) @ z[:, i, :, None]))[..., 0]
            queries[:, i] = q * z[:, i].norm(dim=1, keepdim=True) / q.norm(dim=1, keepdim=True)
    elif kind == "overlapping":  # q_i is one of x_1 .. x_{i-1}, picked at random
        pick = (torch.rand(B, n, generator=gen, device=dev) * torch.arange(n, device=dev)).long()
        queries = z.gather(1, pick[..., None].expand(B, n, d))
    scale, noise = (c if kind == "scale_y" else 1.0), (1.0 if kind == "noisy_y" else 0.0)
    norm = d * c**2 + noise**2  # E[y^2]
    if queries is None:
        return (
            xs,
            scale * (xs @ w)[..., 0] + noise * torch.randn(B, n, generator=gen, device=dev),
            norm,
        )
    m = min(n, d) if kind == "orthogonal" else n  # m query prompts per drawn prompt
    use_query = (
        torch.arange(n, device=dev) >= torch.arange(m, device=dev)[:, None]
    )  # (m, n): from position i on
    xs = torch.where(use_query[None, :, :, None], queries[:, None], xs[:, None])  # (B, m, n, d)
    return xs, scale * (xs.reshape(B, m * n, d) @ w)[..., 0].reshape(B, m, n), norm


def shifted_errors(models, name, cfg, device):
    """model_errors and baselines.task_errors for each (cfg, model, ctx) on the shifted prompts of `name`.
    Query prompts are scored one query position i at a time: column i of the errors comes from the
    prompts that ask their query at i (NaN at positions with no query)."""
    xs, ys, norm = sample_shifted(
        name,
        cfg.eval_prompts,
        cfg.n_points,
        cfg.n_dims,
        torch.Generator(device).manual_seed(cfg.eval_seed),
    )
    score = lambda x, y: (
        [looped.model_errors(model, c, (x, y, norm), ctx) for c, model, ctx in models]  # noqa: E731
        + [baselines.task_errors(cfg.task, x, y, norm)]
    )
    if xs.dim() == 3:
        return score(xs, ys)
    columns = [
        score(xs[:, i], ys[:, i]) for i in range(xs.shape[1])
    ]  # m evaluations, each (..., n)
    return [
        {
            key: F.pad(
                torch.stack([col[r][key][..., i] for i, col in enumerate(columns)], -1),
                (0, cfg.n_points - len(columns)),
                value=float("nan"),
            )
            for key in columns[0][r]
        }
        for r in range(len(columns[0]))
    ]


# ---------------------------------------------------------------------------- several runs


def solver_errors(test, steps):
    """Error at the last position after each iteration of gradient descent (steps) and Newton's
    iteration (at most 40): what the loop's iterations are drawn against."""
    xs, ys, norm = test
    errors = {}
    for name, iterates in baselines.ITERATES.items():
        preds = iterates(xs, ys, steps if name == "gradient descent" else min(steps, 40))[
            :, :, -1
        ]  # (P, t)
        errors[name] = ((preds - ys[:, None, -1]).pow(2).mean(0) / norm).cpu()
    return errors


def labels(cfgs):
    """A legend name per run: the model, and the run folder where models repeat."""
    names = [looped.describe(c) for c in cfgs]
    return [
        f"{name} ({os.path.basename(os.path.normpath(c.out))})" if names.count(name) > 1 else name
        for name, c in zip(names, cfgs)
    ]


def load_runs(run_dirs, given):
    """[(cfg, model, ctx)] of saved runs that can be compared: same task, d and n; UserError if not."""
    runs = []
    for run_dir in run_dirs:
        ckpt, cfg = looped.saved_run(run_dir, given)
        device, ctx = looped.setup_device(cfg)
        runs.append((cfg, looped.restore_model(ckpt, cfg, device), ctx))
    first = runs[0][0]
    for cfg, _, _ in runs:
        if (cfg.task, cfg.n_dims, cfg.n_points) != (first.task, first.n_dims, first.n_points):
            raise harness.UserError(
                f"{cfg.out} ({cfg.task}, d {cfg.n_dims}, n {cfg.n_points}) cannot be compared "
                f"with {first.out} ({first.task}, d {first.n_dims}, n {first.n_points})"
            )
    return runs


def compare(run_dirs, out=None, given=None, shift=None):
    """Evaluate saved runs on the same test prompts, the baselines once: one table, figures in out
    (default runs/compare_TASK). With shift, on Garg et al.'s shifted prompts (linear regression
    only). Returns the errors."""
    runs = load_runs(run_dirs, given or {})
    cfg, model, _ = runs[0]
    device, out = model.read_out.weight.device, out or os.path.join("runs", f"compare_{cfg.task}")
    if shift and cfg.task not in ("linreg", "noisy_linreg"):
        raise harness.UserError(
            f"the shifts are Garg et al.'s suite for linear regression, not {cfg.task}"
        )
    if shift:
        *errors, classical = shifted_errors(runs, shift, cfg, device)
        solvers = {}
    else:
        test = looped.eval_prompts(cfg, device)
        errors = [looped.model_errors(model, c, test, ctx) for c, model, ctx in runs]
        classical = baselines.task_errors(cfg.task, *test)
        linear = cfg.task in ("linreg", "noisy_linreg", "sparse_linreg")
        solvers = solver_errors(test, max(c.eval_loops for c, _, _ in runs)) if linear else {}
    names = labels([c for c, _, _ in runs])
    named = [(name, c, {**e, **classical}) for name, (c, _, _), e in zip(names, runs, errors)]
    harness.check_folder(out)  # a run folder is refused: its own plots have these names
    title = f"{cfg.task}, shift {shift}" if shift else cfg.task
    looped.plot(named, out, title, f"_{shift}" if shift else "", solvers, loops=not shift)
    print(looped.table(named, title))
    print(f"figures in {out}")
    return named, solvers


# ---------------------------------------------------------------------------- the claims


def run(claim, name, task, **overrides):
    """Train one run of a claim into results/CLAIM/NAME, unless it was evaluated there before (an
    interrupted one continues from its checkpoint); record run.json beside its log and evaluation.
    Returns its folder."""
    out = os.path.join(RESULTS, claim, name)
    cfg = looped.make_config(task, out=out, **overrides)
    if os.path.isfile(os.path.join(out, "run.json")):
        with open(os.path.join(out, "run.json")) as f:
            if run_config(json.load(f)) != cfg:
                raise harness.UserError(
                    f"{out} holds a run of another config (an earlier preset?): delete it "
                    f"to train the claim's run there"
                )
        print(f"{out}: done before, kept")
        return out
    resume = (
        looped.load_checkpoint(out)[0] if os.path.isfile(os.path.join(out, "ckpt.pt")) else None
    )
    if resume is not None and resume["config"] != looped.asdict(cfg):
        raise harness.UserError(
            f"{out} holds a run of another config: delete it to train the claim's run there"
        )
    t0, diverged = time.perf_counter(), {}
    try:
        looped.train(
            cfg, resume=resume, overwrite=True
        )  # an interrupted run continues from its checkpoint
    except harness.Interrupted as e:
        raise harness.Interrupted(
            f"{e.message.split(';')[0]}; python experiments.py {claim} continues it", e.signum
        ) from None
    except (
        harness.Diverged
    ) as e:  # a result of a sweep, recorded as such: the run has no evaluation
        print(f"{out}: {e}")
        diverged = {"diverged": str(e).split(";")[0]}
    record = {
        **diverged,
        "command": f"python experiments.py {claim}",
        "config": looped.asdict(cfg),
        "machine": bench.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
        **({"resumed_at_step": resume["step"]} if resume else {}),
    }  # then seconds count from there
    harness.write_json(os.path.join(out, "run.json"), record, indent=1)
    return out


STANDARD = dict(
    n_layer=12, n_loops=1, eval_loops=1
)  # the paper's 12-layer GPT-2, with the same budget
MODELS = {"looped": {}, "standard": STANDARD}
SWEEP = [3e-5, 1e-4, 3e-4, 6e-4, 1e-3, 2e-3]  # Adam's learning rate, the same six for both models
SEEDS = range(42, 52)  # the default command's spread over seeds
CURVES = dict(eval_every=250)  # a learning-curve point every 250 steps, on validation prompts
CLAIMS = {  # claim: [(run name, task, overrides)]
    "claim1": [
        (f"{model}_lr{lr:g}", "linreg", dict(overrides, lr=lr, **CURVES))
        for lr in SWEEP
        for model, overrides in MODELS.items()
    ],  # then each model's best with another seed (claim)
    "claim2": [("looped", "sparse_linreg", {}), ("standard", "sparse_linreg", STANDARD)],
    "claim3": [
        ("tree_looped", "decision_tree", {}),
        ("tree_standard", "decision_tree", STANDARD),
        ("relu_looped", "relu_2nn", {}),
        ("relu_standard", "relu_2nn", STANDARD),
    ],
    "claim4": [
        ("T5", "linreg", dict(loop_window=5)),
        ("T3", "linreg", dict(loop_window=3)),
        ("T1", "linreg", dict(loop_window=1)),
    ],  # T = 10: claim1's looped run at the default rate
    "seeds": [
        (f"seed{seed}", "linreg", dict(seed=seed)) for seed in SEEDS
    ],  # the default command, ten seeds
}


CONVERGE = (
    8  # claim1 to convergence: each model at its best rate, for this many times the preset's steps
)
THRESHOLDS = [0.2, 0.1, 0.05]  # validation errors at k = 2d whose first step converge reports


def converge_runs():
    """claim1 to convergence: [(run name, task, overrides)], each model as claim1's sweep trained it at
    the learning rate found best for it, but for CONVERGE times the steps, seeds 42 and 43. Each run may
    take several sessions: an interrupted one continues from its checkpoint (every 500 steps)."""
    best = {model: best_run("claim1", model) for model in MODELS}
    if not all(best.values()):
        raise harness.UserError(
            "converge trains each model at claim1's best learning rate: run python "
            "experiments.py claim1 first"
        )
    runs = []
    for model, folder in best.items():
        cfg = read_run(folder)[0]
        for seed in (42, 43):
            runs.append(
                (
                    f"{model}_lr{cfg.lr:g}" + (f"_seed{seed}" if seed != 42 else ""),
                    cfg.task,
                    {
                        **config_overrides(cfg),
                        "steps": CONVERGE * cfg.steps,
                        "seed": seed,
                        "ckpt_every": 500,
                    },
                )
            )
    return runs


def claim(name):
    for run_name, task, overrides in (
        converge_runs() if name == "converge" else CLAIMS.get(name, [])
    ):
        run(name, run_name, task, **overrides)
    if (
        name == "claim1"
    ):  # each model at its best learning rate, with another seed: what a user should expect
        for model in MODELS:
            folder = best_run("claim1", model)
            if folder:
                cfg = read_run(folder)[0]
                run(
                    name,
                    f"{os.path.basename(folder)}_seed43",
                    cfg.task,
                    **{**config_overrides(cfg), "seed": 43},
                )
    if name in ("claim2", "claim3"):  # each model also at claim1's best learning rate for it
        rates = best_rates()
        for model, model_overrides in MODELS.items():
            lr = rates[model]
            for run_name, task, overrides in CLAIMS[name]:
                if (
                    lr and overrides == model_overrides and lr != looped.make_config(task).lr
                ):  # a new run
                    run(name, f"{run_name}_lr{lr:g}", task, **overrides, lr=lr)
                    if (
                        name == "claim3"
                    ):  # where the ReLU network's verdict turned on the rate: another seed
                        run(name, f"{run_name}_lr{lr:g}_seed43", task, **overrides, lr=lr, seed=43)
    if (
        name == "claim4"
    ):  # gradient descent and Newton on the same test prompts, iteration by iteration
        cfg = looped.make_config("linreg")
        solvers = solver_errors(looped.eval_prompts(cfg, torch.device("cpu")), cfg.eval_loops)
        harness.write_json(
            os.path.join(RESULTS, "claim4", "solvers.json"),
            {"machine": bench.machine(), **{k: v.tolist() for k, v in solvers.items()}},
        )
    if (
        name == "claim5"
    ):  # every shift, on claim1's two models at their best learning rates (their checkpoints)
        runs = [best_run("claim1", model) for model in MODELS]
        if not all(r and os.path.isfile(os.path.join(r, "ckpt.pt")) for r in runs):
            raise harness.UserError(
                "claim5 evaluates claim1's trained runs: run python experiments.py claim1 first"
            )
        for shift in GARG_SHIFTS:
            named, _ = compare(runs, os.path.join(RESULTS, "claim5", "figures"), shift=shift)
            save_errors(os.path.join(RESULTS, "claim5", f"{shift}.json"), named, shift=shift)


def save_errors(path, named, **meta):
    """A comparison's errors as JSON, with the machine it ran on."""
    record = {
        **meta,
        "machine": bench.machine(),
        "torch": torch.__version__,
        "runs": {
            name: {"config": looped.asdict(c), **{k: v.tolist() for k, v in e.items()}}
            for name, c, e in named
        },
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    harness.write_json(path, record)


# ---------------------------------------------------------------------------- probes of the loop state
# Does the loop compute an iterative solver? After each iteration t, a linear probe (closed-form
# ridge) reads a quantity of the in-context data from the loop state Y_t, fitted on half of fresh
# prompts and scored on the other half. [LT]'s `scripts/model_probe.py` probes the loop state too.


def probe_r2(fit_x, fit_y, test_x, test_y, alpha=1e-3):
    """R^2 on (test_x, test_y) of a ridge map with intercept fitted on (fit_x, fit_y), all (P, features):
    1 for a target that is a linear function of the state, about 0 (or below) for one that is not."""
    mean_x, mean_y = fit_x.mean(0), fit_y.mean(0)
    X, Y = (fit_x - mean_x).double(), (fit_y - mean_y).double()
    ridge = (
        alpha * X.pow(2).sum(0).mean() * torch.eye(X.shape[1], dtype=X.dtype)
    )  # relative to the states' scale
    W = torch.linalg.solve(X.T @ X + ridge, X.T @ Y)
    pred = (test_x - mean_x).double() @ W + mean_y.double()
    return 1 - ((pred - test_y).pow(2).sum() / (test_y - test_y.mean(0)).pow(2).sum()).item()


def solver_weights(xs, ys, steps):
    """For the last query, from the n - 1 pairs before it: {name: (steps, P, d)} the least-squares
    solution, X^T y / k (one gradient step from 0, up to scale), and the iterates of gradient descent
    and Newton's iteration, w_t after t steps as baselines.py runs them."""
    X, y = xs[:, :-1].double(), ys[:, :-1].double()
    G, c = X.transpose(1, 2) @ X, (X.transpose(1, 2) @ y[..., None])[..., 0]  # (P, d, d), (P, d)
    top = torch.linalg.eigvalsh(G)[..., -1].clamp(min=1e-12)[:, None]  # (P, 1)
    w, M, gd, newton = torch.zeros_like(c), G / top[..., None] ** 2, [], []
    for _ in range(steps):
        w = w - ((G @ w[..., None])[..., 0] - c) / top
        M = 2 * M - M @ G @ M
        gd.append(w)
        newton.append((M @ c[..., None])[..., 0])
    ols = torch.linalg.lstsq(G, c[..., None], driver="gelsd").solution[..., 0]
    return {
        "least squares": ols.expand(steps, *ols.shape),
        "X^T y / k": (c / X.shape[1]).expand(steps, *c.shape),
        "gradient descent iterate t": torch.stack(gd),
        "Newton iterate t": torch.stack(newton),
    }


@torch.no_grad()
def probe(run_dir, prompts=2048, loops=None):
    """Probe a linear-regression run's loop state after each iteration; writes results/probe/RUN.json and
    figures/probe_RUN.png, prints a table. Fresh prompts (seed eval_seed + 2): half fit, half score."""
    ckpt, cfg = looped.load_checkpoint(run_dir)
    if cfg.task not in ("linreg", "noisy_linreg") or cfg.n_loops == 1:
        raise harness.UserError(
            f"{run_dir}: probes need a looped linear-regression run (this one: {looped.describe(cfg)}, {cfg.task})"
        )
    loops = loops or 2 * cfg.n_loops
    model = looped.restore_model(ckpt, cfg, torch.device("cpu")).eval()
    xs, ys = looped.TASKS[cfg.task](
        prompts,
        cfg.n_points,
        cfg.n_dims,
        cfg.n_dims,
        torch.Generator().manual_seed(cfg.eval_seed + 2),
    )
    P = model.embed(xs, ys)
    Y, states, preds = torch.zeros_like(P), {"last x token": [], "mean over tokens": []}, []
    for _ in range(loops):
        Y = model.iterate(Y, P)
        states["last x token"].append(Y[:, -2])  # the token whose read-out predicts the last y
        states["mean over tokens"].append(Y.mean(1))
        preds.append(model.read(Y)[:, -1])
    targets, half = solver_weights(xs, ys, loops), prompts // 2
    r2 = {
        where: {
            name: [
                probe_r2(s[:half], target[t, :half], s[half:], target[t, half:])
                for t, s in enumerate(states[where])
            ]
            for name, target in targets.items()
        }
        for where in states
    }
    preds, norm = torch.stack(preds, 1), looped.error_normaliser(cfg.task, cfg.n_dims)  # (P, t)
    gap = {
        name: ((iterates(xs, ys, loops)[:, :, -1] - preds).pow(2).mean(0) / norm).tolist()
        for name, iterates in baselines.ITERATES.items()
    }
    record = {
        "command": f"python experiments.py probe {run_dir}",
        "run": run_dir,
        "config": looped.asdict(cfg),
        "machine": bench.machine(),
        "torch": torch.__version__,
        "prompts": prompts,
        "loops": loops,
        "r2": r2,
        "prediction gap": gap,
        "error": ((preds - ys[:, -1:]).pow(2).mean(0) / norm).tolist(),
    }
    return save_study("probe", run_dir, record, plot_probe, probe_table)


def save_study(kind, run_dir, record, plot, table):
    """A study of one run: results/KIND/RUN.json, figures/KIND_RUN.png, and its table printed."""
    name = os.path.basename(os.path.normpath(run_dir))
    os.makedirs(os.path.join(RESULTS, kind), exist_ok=True)
    harness.write_json(os.path.join(RESULTS, kind, f"{name}.json"), record, indent=1)
    plot(record, os.path.join(FIGURES, f"{kind}_{name}.png"))
    print(table(record))
    return record


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with harness.atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def probe_table(record):
    """Markdown: the probes' R^2 at a few iterations, and the prediction's distance from the solvers'."""
    b, loops = record["config"]["n_loops"], record["loops"]
    ts = sorted({1, 2, 5, b // 2, b, loops} & set(range(1, loops + 1)))
    rows = [
        [f"R^2, {target}, {where}", *(curve[t - 1] for t in ts)]
        for where, by in record["r2"].items()
        for target, curve in by.items()
    ]
    rows += [
        [f"gap to the {name} prediction after t steps", *(curve[t - 1] for t in ts)]
        for name, curve in record["prediction gap"].items()
    ]
    rows += [["the model's error at the last position", *(record["error"][t - 1] for t in ts)]]
    return markdown(["after loop iteration t", *map(str, ts)], rows)


def plot_probe(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = range(1, record["loops"] + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, target in enumerate(record["r2"]["last x token"]):
        for where, ls in (("last x token", "-"), ("mean over tokens", "--")):
            a.plot(t, record["r2"][where][target], ls, color=f"C{i}", label=f"{target}, {where}")
    a.set(
        xlabel="loop iteration t",
        ylabel="probe R^2 (held-out prompts)",
        ylim=(-0.1, 1.02),
        title="what a linear probe reads from the loop state",
    )
    for i, (name, curve) in enumerate(record["prediction gap"].items()):
        b.semilogy(t, curve, color=f"C{i}", label=f"model vs {name} after t steps")
    b.semilogy(t, record["error"], "k", label="model's error")
    b.axvline(record["config"]["n_loops"], color="gray", ls=":", lw=1)
    b.set(
        xlabel="loop iteration t (dotted: trained b)",
        ylabel="normalised squared difference, last position",
        title="the read-out against the solvers",
    )
    for ax in (a, b):
        ax.legend(fontsize=7)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- adaptive depth
# The paper's users pick the loop count; export.wrappers' UntilConverged lets the model decide: a
# prompt stops when its predictions (or its loop state) change by less than a tolerance.

TOLERANCES = [0.1, 0.03, 0.01, 0.003, 0.001]


@torch.no_grad()
def adaptive(run_dir, tolerances=TOLERANCES, max_loops=None):
    """Error against compute of adaptive depth on a run's test prompts, both stopping signals and every
    tolerance against the fixed b; writes results/adaptive/RUN.json and figures/adaptive_RUN.png."""
    import export

    model, cfg = export.load_model(run_dir)
    if cfg.n_loops == 1:
        raise harness.UserError(f"{run_dir} is not a looped model: there is no loop to stop")
    max_loops = max_loops or cfg.eval_loops
    xs, ys, norm = looped.eval_prompts(cfg, torch.device("cpu"))
    fixed = looped.model_errors(model, cfg, (xs, ys, norm))["loops"][cfg.n_loops - 1]
    rows = {
        f"fixed b = {cfg.n_loops}": {
            "error": fixed.tolist(),
            "mean loops": cfg.n_loops,
            "max loops": cfg.n_loops,
        }
    }
    for signal in ("prediction", "state"):
        for tol in tolerances:
            preds, loops = export.wrappers()[2](model, tol, max_loops, signal)(xs, ys)
            rows[f"{signal}, tol {tol:g}"] = {
                "signal": signal,
                "tol": tol,
                "error": ((preds - ys).pow(2).mean(0) / norm).tolist(),
                "mean loops": loops.float().mean().item(),
                "max loops": loops.max().item(),
            }
    record = {
        "command": f"python experiments.py adaptive {run_dir}",
        "config": looped.asdict(cfg),
        "machine": bench.machine(),
        "torch": torch.__version__,
        "max_loops": max_loops,
        "rows": rows,
    }
    return save_study("adaptive", run_dir, record, plot_adaptive, adaptive_table)


def adaptive_table(record):
    cfg = run_config(record)
    ks = at_k(cfg)
    rows = [
        [name, *(r["error"][k] for k in ks), f"{r['mean loops']:.1f}", r["max loops"]]
        for name, r in record["rows"].items()
    ]
    return markdown(["stopping rule", *(f"k = {k}" for k in ks), "mean loops", "max loops"], rows)


def plot_adaptive(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = run_config(record)
    k = at_k(cfg)[-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, signal in enumerate(("prediction", "state")):
        rows = [r for r in record["rows"].values() if r.get("signal") == signal]
        ax.plot(
            [r["mean loops"] for r in rows],
            [r["error"][k] for r in rows],
            "o-",
            color=f"C{i}",
            label=f"stop on the {signal}",
        )
        for r in rows:
            ax.annotate(
                f"{r['tol']:g}",
                (r["mean loops"], r["error"][k]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    fixed = next(iter(record["rows"].values()))
    ax.plot(
        [fixed["mean loops"]], [fixed["error"][k]], "k*", ms=14, label=f"fixed b = {cfg.n_loops}"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mean loops per prompt",
        ylabel=f"normalised squared error at k = {k}",
        title=f"adaptive depth (labels: tolerance; at most {record['max_loops']} loops)",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- baselines alone


def baseline_table(task, n_dims, n_points, prompts, ks, seed, names, save=False):
    """Every named baseline's normalised squared error at in-context examples ks, on fixed prompts."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = looped.TASKS[task](prompts, n_points, n_dims, n_dims, gen)
    norm = looped.error_normaliser(task, n_dims)
    table = bench.Table(
        f"normalised squared error, {task}, d = {n_dims}, n = {n_points}, {prompts} prompts",
        ["k (in-context examples)", *map(str, ks), "seconds"],
        [26] + [9] * len(ks) + [10],
        digits=4,
    )
    for name in names:
        t0 = time.perf_counter()
        err = (baselines.BASELINES[name](xs, ys) - ys).pow(2).mean(0) / norm
        table.add(name, *(err[k].item() for k in ks), time.perf_counter() - t0)
    if save:
        table.save(
            os.path.join(RESULTS, f"baselines_{task}.json"),
            "python experiments.py " + shlex.join(sys.argv[1:]),
        )


# ---------------------------------------------------------------------------- report
# docs/results.md is written from the files under results/ alone, so that a clean checkout
# rewrites it byte for byte. The paper's numbers: [LT]'s notebooks, full scale (d = 20, 500k steps).

PAPER = {
    "claim1": "at k = 10, 20, 40 (d = 20): standard 0.519, 0.0204, 0.00048; looped 0.519, 0.0242, 0.00078; "
    "least squares 0.515, ~0, ~0",
    "claim2": "at k = 10, 40 (d = 20, s = 3): standard 0.0848, 0.0017; looped 0.0213, 0.00061; Lasso 0.0498, 0.00013",
    "claim3": "ReLU network at k = 100: standard 0.170, looped 0.180; decision tree: no number in the paper",
    "claim4": "the looped model's error stays flat when run far past b (to 500 loops); a too-small T diverges there",
    "claim5": "no number for Garg et al.'s shifts; Garg et al. find that a trained transformer degrades under "
    "them much as least squares does",
}


CAVEATS = {
    "claim1": "Each model is compared at its own best learning rate, picked on validation prompts, with one "
    "seed per learning rate; {steps} steps are {share:.2%} of the paper's 500k, at d = {d} rather than 20.",
    "claim2": "At d = 5 with s = 3 the weights are barely sparse, so Lasso has little to gain over least squares here.",
}


FINDINGS = {
    "match": "the two matching (within 25%)",
    "looped ahead": "the looped model ahead",
    "standard ahead": "the standard model ahead",
}


def read_run(folder):
    """(cfg, errors as tensors or None for a run that diverged, run record) of a claim's run folder."""
    with open(os.path.join(folder, "run.json")) as f:
        record = json.load(f)
    errors = None
    if "diverged" not in record:
        with open(os.path.join(folder, "eval.json")) as f:
            errors = {k: torch.tensor(v) for k, v in json.load(f).items()}
    return run_config(record), errors, record


def run_config(record):
    """The config of a run.json record; runs made before the learning-rate schedule existed had none."""
    return looped.make_config(**{"warmup": 0, "decay": 0, **record["config"]})


def config_overrides(cfg):
    """A run's config as run()'s overrides, to train it again with a change."""
    return {k: v for k, v in looped.asdict(cfg).items() if k not in ("task", "out")}


def sweep_runs(claim, model):
    """{lr: (folder, cfg, errors or None, validation curve [(step, error per position)])} of one model's
    learning-rate sweep: the runs MODEL_lrLR of a claim (not their other seeds)."""
    runs = {}
    for folder in glob.glob(os.path.join(RESULTS, claim, f"{model}_lr*")):
        if "_seed" not in os.path.basename(folder) and os.path.isfile(
            os.path.join(folder, "run.json")
        ):
            cfg, errors, _ = read_run(folder)
            with open(os.path.join(folder, "log.jsonl")) as f:
                curve = [
                    (r["step"], r["val_error"]) for r in map(json.loads, f) if "val_error" in r
                ]
            runs[cfg.lr] = (folder, cfg, errors, curve)
    return dict(sorted(runs.items()))


def best_run(claim, model, runs=None):
    """The folder of a model's best learning rate: the lowest validation error at k = 2d at the last step
    (prompts apart from the test prompts, so that the test stays fair to both models); None before a sweep.
    runs: the sweep as sweep_runs reads it, when already read."""
    done = [
        (curve[-1][1][at_k(cfg)[-1]], folder)
        for folder, cfg, errors, curve in (runs or sweep_runs(claim, model)).values()
        if errors is not None and curve and math.isfinite(curve[-1][1][at_k(cfg)[-1]])
    ]
    return min(done)[1] if done else None


def best_rates():
    """claim1's best learning rate for each model (best_run), or None before its sweep."""
    return {model: (best := best_run("claim1", model)) and read_run(best)[0].lr for model in MODELS}


def at_best_rates(claim, names, rates):
    """A claim's looped and standard run names, each at its model's rate in rates where that run
    (NAME_lrLR) finished, else as given: trained at the default rate."""
    found = []
    for model, name in zip(MODELS, names):
        folder = rates[model] and os.path.join(RESULTS, claim, f"{name}_lr{rates[model]:g}")
        done = (
            folder
            and os.path.isfile(os.path.join(folder, "run.json"))
            and read_run(folder)[1] is not None
        )
        found.append(os.path.basename(folder) if done else name)
    return found


def fmt(x):
    """Four digits; ~0 below 1e-8, where exact solvers leave round-off that changes with the CPU."""
    return (
        "-" if x != x else "~0" if abs(x) < 1e-8 else f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.1e}"
    )


def markdown(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(
        lines
        + [
            "| " + " | ".join(fmt(c) if isinstance(c, float) else str(c) for c in row) + " |"
            for row in rows
        ]
    )


def at_k(cfg):
    """The paper's k = d/2, d, 2d (10, 20, 40 at d = 20), where they fit in the prompt."""
    return [k for k in (cfg.n_dims // 2, cfg.n_dims, 2 * cfg.n_dims) if 0 < k < cfg.n_points] or [
        cfg.n_points - 1
    ]


def compare_section(claim, pairs, lines):
    """Looped against standard for each (task, looped run, standard run, the paper's finding, its
    numbers) of a claim: a table, a figure, and whether the paper's finding reproduced."""
    seen = set()
    for task, a, b, expected, paper in pairs:
        (ca, ea, _), (cb, eb, _) = (
            read_run(os.path.join(RESULTS, claim, a)),
            read_run(os.path.join(RESULTS, claim, b)),
        )
        names = labels([ca, cb])
        named = [(names[0], ca, ea), (names[1], cb, eb)]  # the baselines: the first run's
        suffix = f"_{claim}_{task}" + (
            f"_{b}" if task in seen else ""
        )  # a task's second pair: its own figures
        seen.add(task)
        looped.plot(named, FIGURES, task, suffix)
        shown = [n for n in baselines.TASK_BASELINES[task] if n != "zero"][:4]
        rows = [
            [
                k,
                ea["loops"][ca.n_loops - 1][k].item(),
                eb["loops"][0][k].item(),
                *(ea[n][k].item() for n in shown),
            ]
            for k in at_k(ca) + ([ca.n_points - 1] if ca.n_points - 1 not in at_k(ca) else [])
        ]
        lines += [
            f"**{task}**, d = {ca.n_dims}, n = {ca.n_points}, {ca.eval_prompts} test prompts: "
            f"{names[0]} ({looped.count_parameters(looped.LoopedTransformer(ca))[0]:,} parameters by the paper's "
            f"count) against {names[1]} ({looped.count_parameters(looped.LoopedTransformer(cb))[0]:,}), "
            f"{ca.steps} steps each, at learning rates {ca.lr:g} and {cb.lr:g}.",
            "",
            markdown(["k", "looped", "standard", *shown], rows),
            "",
            f"![{task}: error against in-context examples](../{FIGURES}/error_vs_examples{suffix}.png)",
            "",
        ]
        k = (
            ca.n_points - 1 if task in ("decision_tree", "relu_2nn") else at_k(ca)[-1]
        )  # where the paper reads them
        L, S = ea["loops"][ca.n_loops - 1][k].item(), eb["loops"][0][k].item()
        found = (
            "match"
            if max(L, S) <= 1.25 * min(L, S)
            else "looped ahead"
            if L < S
            else "standard ahead"
        )
        outcome = f"here at k = {k} the looped model has {fmt(L)} and the standard one {fmt(S)}: {FINDINGS[found]}"
        if expected:
            verdict = "Reproduced" if found == expected else "Not reproduced"
            lines += [
                f"**{verdict} at this scale.** The paper has {FINDINGS[expected]}: {paper}; {outcome}.",
                "",
            ]
        else:
            lines += [f"The paper gives no number ({paper}); {outcome}.", ""]
        for run_name, c in (
            (a, ca),
            (b, cb),
        ):  # the same run with other seeds: what a user should expect
            seeds = [
                os.path.dirname(p)
                for p in sorted(
                    glob.glob(os.path.join(RESULTS, claim, f"{run_name}_seed*", "run.json"))
                )
            ]
            if seeds:
                runs = [read_run(f) for f in [os.path.join(RESULTS, claim, run_name), *seeds]]
                loops = c.eval_loops > c.n_loops
                spread = [
                    f"seed {s.seed}: diverged"
                    if e is None
                    else f"seed {s.seed}: {fmt(e['loops'][s.n_loops - 1][k].item())}"
                    + (f", {fmt(e['loops'][-1][k].item())}" if loops else "")
                    for s, e, _ in runs
                ]
                at = (
                    f"at b = {c.n_loops} loops, and at {c.eval_loops}"
                    if loops
                    else "at its one pass"
                )
                lines += [
                    f"The {looped.describe(c)} at k = {k} over seeds ({at}): "
                    + "; ".join(spread)
                    + ".",
                    "",
                ]


def sweep_section(claim, lines):
    """The learning-rate sweep of both models: a table, the error against the learning rate, and the
    learning curves. Returns each model's best run (by validation prompts), or None before the sweep."""
    sweeps = {model: sweep_runs(claim, model) for model in MODELS}
    best = {model: best_run(claim, model, sweeps[model]) for model in MODELS}
    if not all(best.values()):
        return None
    cfg = next(iter(sweeps["looped"].values()))[1]
    ks, k = at_k(cfg), at_k(cfg)[-1]
    rows = []
    for model, runs in sweeps.items():
        for lr, (folder, c, errors, curve) in runs.items():
            name = model + " (best)" * (folder == best[model])
            if errors is None:
                rows.append([f"{lr:g}", name, "diverged", *["-"] * len(ks)])
            else:
                rows.append(
                    [
                        f"{lr:g}",
                        name,
                        curve[-1][1][k],
                        *(errors["loops"][c.n_loops - 1][j].item() for j in ks),
                    ]
                )
    lines += [
        f"Both models trained at each of {' and '.join(sorted({str(len(r)) for r in sweeps.values()}))} learning rates, "
        f"with everything else the same "
        f"({cfg.steps} steps, batch {cfg.batch_size}, the same prompts and curriculum). Each model's best "
        f"learning rate is the one with the lowest error at k = {k} on 256 validation prompts at the last step, "
        f"drawn apart from the {cfg.eval_prompts} test prompts that the table's other columns and the comparison "
        f"below use.",
        "",
        markdown(["lr", "model", f"validation, k = {k}", *(f"test, k = {j}" for j in ks)], rows),
        "",
        f"![test error against learning rate](../{FIGURES}/lr_sweep_{claim}.png)",
        "",
        f"![validation error against training step](../{FIGURES}/learning_curves_{claim}.png)",
        "",
    ]
    plot_sweep(sweeps, best, k, claim)
    return [os.path.basename(best[model]) for model in MODELS]


def plot_sweep(sweeps, best, k, claim):
    """Two figures of a sweep: test error at k against learning rate, one line per model; validation
    error at k against training step, one panel per model, one line per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (model, runs) in enumerate(sweeps.items()):
        done = [
            (lr, r[2]["loops"][r[1].n_loops - 1][k].item())
            for lr, r in runs.items()
            if r[2] is not None
        ]
        ax.loglog(
            *zip(*done), "o-", color=f"C{i}", label=looped.describe(next(iter(runs.values()))[1])
        )
        ax.plot(
            *zip(*[(lr, e) for lr, e in done if runs[lr][0] == best[model]]),
            "*",
            ms=16,
            color=f"C{i}",
        )
        for lr in [lr for lr, r in runs.items() if r[2] is None]:
            ax.axvline(lr, color=f"C{i}", ls=":", label=f"{model} diverged at lr {lr:g}")
    ax.set(
        xlabel="Adam learning rate",
        ylabel=f"normalised squared error at k = {k} (test)",
        title="learning-rate sweep (star: best by validation prompts)",
    )
    figures = [(fig, [ax], f"lr_sweep_{claim}")]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(11, 4.2), sharey=True)
    for ax, (model, runs) in zip(axes, sweeps.items()):
        for i, (lr, (folder, c, errors, curve)) in enumerate(runs.items()):
            ax.semilogy(
                [s for s, _ in curve],
                [e[k] for _, e in curve],
                color=f"C{i}",
                lw=2.5 if folder == best[model] else 1.2,
                label=f"lr {lr:g}"
                + " (best)" * (folder == best[model])
                + " (diverged)" * (errors is None),
            )
        ax.set(
            title=looped.describe(c), xlabel="training step", ylabel=f"validation error at k = {k}"
        )
    figures.append((fig, axes, f"learning_curves_{claim}"))
    for fig, axes, name in figures:
        for ax in axes:
            ax.legend(fontsize=8)
        save_figure(fig, os.path.join(FIGURES, f"{name}.png"))


def learning_rate_caveat(claim, pairs, best_lr):
    """For a claim not swept: whether its models trained at the learning rates claim1's sweep found best."""
    if claim == "claim1" or not all(best_lr.values()):
        return []
    used = {
        "looped": {read_run(os.path.join(RESULTS, claim, a))[0].lr for _, a, *_ in pairs},
        "standard": {read_run(os.path.join(RESULTS, claim, b))[0].lr for _, _, b, *_ in pairs},
    }
    off = [
        f"the {model} model trained at lr {', '.join(f'{lr:g}' for lr in sorted(used[model]))}, where claim1's sweep "
        f"found {best_lr[model]:g} best on linear regression"
        for model in MODELS
        if best_lr[model] not in used[model]
    ]
    if off:
        return [f"Not swept here: {'; '.join(off)}.", ""]
    return [
        f"Not swept here: a task's second pair has each model at the learning rate claim1's sweep found best for it "
        f"on linear regression ({', '.join(f'{m} {best_lr[m]:g}' for m in MODELS)}); which rate is best on this "
        f"task is not measured.",
        "",
    ]


def write_report():
    """docs/results.md and its figures from results/ alone."""
    os.makedirs(FIGURES, exist_ok=True)
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    lines = [
        "# Results at laptop scale",
        "",
        "Written by `python experiments.py report` from the files under `results/`; do not edit by hand.",
        "Each claim's runs come from `python experiments.py CLAIM` (see the README); every number",
        "below is read from a file there, which also records the machine and the torch version.",
        "",
    ]
    runs = sorted(
        glob.glob(os.path.join(RESULTS, "claim*", "*", "run.json"))
        + glob.glob(os.path.join(RESULTS, "converge", "*", "run.json"))
    )
    if runs:
        rows = []
        for path in runs:
            with open(path) as f:
                r = json.load(f)
            c = run_config(r)
            rows.append(
                [
                    os.path.dirname(path),
                    c.task,
                    looped.describe(c),
                    f"{c.lr:g}",
                    c.steps,
                    f"{r['seconds'] / 60:.1f} min" + (" (diverged)" if "diverged" in r else ""),
                    r["machine"],
                    r["threads"],
                    r["torch"],
                ]
            )
        lines += [
            "## Runs",
            "",
            "Wall time: training and evaluation, as `run` measured it; runs made side by side "
            "with one thread each took longer than one alone would.",
            "",
            markdown(
                ["run", "task", "model", "lr", "steps", "wall time", "machine", "threads", "torch"],
                rows,
            ),
            "",
        ]
    seeds_section(lines)
    sections = [
        (
            "claim1",
            "Linear regression: the looped model against the 12-layer transformer",
            [
                (
                    "linreg",
                    "looped_lr*",
                    "standard_lr*",
                    "match",
                    "0.00078 against 0.00048 at k = 40, d = 20",
                )
            ],
        ),
        (
            "claim2",
            "Sparse linear regression",
            [
                (
                    "sparse_linreg",
                    "looped",
                    "standard",
                    "looped ahead",
                    "0.00061 against 0.0017 at k = 40, d = 20",
                )
            ],
        ),
        (
            "claim3",
            "Decision trees and ReLU networks",
            [
                ("decision_tree", "tree_looped", "tree_standard", None, "for the decision tree"),
                (
                    "relu_2nn",
                    "relu_looped",
                    "relu_standard",
                    "match",
                    "0.180 against 0.170 at k = 100, d = 20",
                ),
            ],
        ),
    ]
    rates = best_rates()  # claim1's, read once: claims 2 and 3 compare at them too
    for claim_name, title, pairs in sections:
        lines += [f"## {claim_name}: {title}", "", f"The paper: {PAPER[claim_name]}.", ""]
        if claim_name == "claim1":  # the sweep, then each model at its best learning rate
            best = sweep_section("claim1", lines)
            pairs = [(pairs[0][0], *best, *pairs[0][3:])] if best else pairs
        else:  # and each model at claim1's best learning rate for it, where those runs exist: a second pair
            pairs = [
                p
                for task, a, b, *rest in pairs
                for p in dict.fromkeys(
                    [(task, a, b, *rest), (task, *at_best_rates(claim_name, [a, b], rates), *rest)]
                )
            ]
        if all(
            os.path.isfile(os.path.join(RESULTS, claim_name, r, "run.json"))
            for _, a, b, *_ in pairs
            for r in (a, b)
        ):
            compare_section(claim_name, pairs, lines)
            c = read_run(os.path.join(RESULTS, claim_name, pairs[0][1]))[0]
            caveat = CAVEATS.get(claim_name, "").format(
                steps=c.steps, share=c.steps / 500_000, d=c.n_dims
            )
            lines += [caveat, ""] if caveat else []
            lines += learning_rate_caveat(claim_name, pairs, rates)
        else:
            lines += [f"Not run yet: `python experiments.py {claim_name}`.", ""]
    converge_section(lines)
    window_section(lines)
    shift_section(lines)
    study_section(
        lines,
        "probe",
        "What the loop computes: linear probes of the loop state",
        "After each loop iteration t, a ridge probe (fitted on half of the fresh prompts, R^2 on the other "
        "half) reads a quantity of the in-context data for the last query from the loop state: at the token "
        "whose read-out predicts the last y, or averaged over all tokens. The gaps compare the model's "
        "prediction after t loops with gradient descent's and Newton's after t steps, normalised like the error.",
        probe_table,
        plot_probe,
    )
    study_section(
        lines,
        "adaptive",
        "Adaptive depth: a loop that stops when it has converged",
        "Each test prompt runs until the relative change of its predictions (or of its loop state) between "
        "two iterations falls below the tolerance, then freezes; the same rule as `export.py --until-converged`.",
        adaptive_table,
        plot_adaptive,
    )
    tables_section(
        lines,
        "Classical baselines at the paper's scale",
        "baselines_*.json",
        "The paper (d = 20, 1280 prompts): least squares 0.515 at k = 10; at k = 40 3-NN ~0.71, averaging "
        "~0.53; sparse regression: Lasso 0.0498 at k = 10, 0.00013 at k = 40.",
    )
    tables_section(lines, "Speed", "bench_*.json")
    with harness.atomic(REPORT) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT} and its figures in {FIGURES}/")


def seeds_section(lines):
    """The default command over ten seeds: each one's error at the paper's k, the spread at k = 2d,
    and a figure of their training losses (where a seed sits on the plateau, and for how long)."""
    folders = [os.path.join(RESULTS, "seeds", f"seed{seed}") for seed in SEEDS]
    runs = [read_run(f) for f in folders if os.path.isfile(os.path.join(f, "run.json"))]
    lines += ["## The default command over ten seeds", ""]
    if not runs:
        lines += ["Not run yet: `python experiments.py seeds`.", ""]
        return
    cfg = runs[0][0]
    ks, k2d, b = at_k(cfg), 2 * cfg.n_dims, cfg.n_loops
    rows, ends = [], []
    for c, errors, record in runs:
        ends.append(errors["loops"][b - 1][k2d].item())
        rows.append(
            [
                c.seed,
                *[errors["loops"][b - 1][k].item() for k in ks],
                errors["loops"][-1][k2d].item(),
                f"{record['seconds'] / 60:.1f} min",
            ]
        )
    ends.sort()
    good = sum(e <= 0.05 for e in ends)
    lines += [
        f"`python looped.py --task linreg --loops 20 --seed S` for S = {SEEDS[0]} to {SEEDS[-1]} "
        f"({cfg.steps} steps; Adam's rate up to {cfg.lr:g} over {cfg.warmup} steps, down to 0 over the last "
        f"{cfg.decay}), made by `python experiments.py seeds` on {runs[0][2]['machine']} with "
        f"{runs[0][2]['threads']} thread per run, two runs side by side: one alone with two threads is faster.",
        "",
        markdown(
            ["seed", *[f"k = {k}" for k in ks], f"k = {k2d}, {cfg.eval_loops} loops", "wall time"],
            rows,
        ),
        "",
        f"At k = 2d = {k2d} after b = {b} loops, over {len(ends)} seeds: median {fmt(statistics.median(ends))}, "
        f"from {fmt(ends[0])} to {fmt(ends[-1])}; {good} of {len(ends)} at most 0.05.",
        "",
        "![training loss of each seed](../figures/seeds.png)",
        "",
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((c, errors, _), folder) in enumerate(zip(runs, folders)):
        with open(os.path.join(folder, "log.jsonl")) as f:
            log = [r for r in map(json.loads, f) if "loss" in r]
        ax.semilogy(
            [r["step"] for r in log],
            [r["loss"] for r in log],
            color=f"C{i % 10}",
            lw=1.2,
            label=f"seed {c.seed}: {fmt(errors['loops'][b - 1][k2d].item())} at k = {k2d}",
        )
    # The loss at the last stage's d and n of two estimators, averaged over the n positions (k = 0 .. n-1):
    # least squares, (d - k) / d for k < d, and one step of gradient descent from 0 with the best step
    # for each k, w = X^T y / (k + d + 1), whose error is (d + 1) / (k + d + 1) (a Wishart moment).
    d, n = cfg.n_dims, cfg.n_points
    for level, name, style in [
        (sum(max(d - k, 0) / d for k in range(n)) / n, "least squares", ":"),
        (sum((d + 1) / (k + d + 1) for k in range(n)) / n, "one step of gradient descent", "--"),
    ]:
        ax.axhline(level, color="k", ls=style, lw=1, label=f"{name} (d = {d}, n = {n})")
    ax.set(
        xlabel="training step",
        ylabel="training loss / d (d grows by the curriculum)",
        title="the default command over ten seeds",
    )
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, os.path.join(FIGURES, "seeds.png"))


def step_flops(cfg):
    """Floating-point operations of one training step at the last curriculum stage (full d, n and b),
    batch cfg.batch_size, as torch's FlopCounterMode counts them: b block passes forward and T
    backward for the looped model, 12 of each for the standard one."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = looped.LoopedTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    xs, ys = looped.TASKS[cfg.task](cfg.batch_size, cfg.n_points, cfg.n_dims, cfg.n_dims, gen)
    with FlopCounterMode(display=False) as counter:
        looped.train_step(
            model, opt, contextlib.nullcontext(), xs, ys, cfg.n_loops, cfg.n_loops - cfg.loop_window
        )
    return counter.get_total_flops()


def training_seconds(folder):
    """A run's training time from its log (ms per step on each line), summed over every session it took."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        log = [r for r in map(json.loads, f) if "ms_per_step" in r]
    return (
        sum(
            r["ms_per_step"] * (r["step"] - last["step"])
            for last, r in zip([{"step": 0}] + log, log)
        )
        / 1000
    )


def first_step(curve, k, level):
    """The first step whose validation error at k is at most level; None if none is."""
    return next((step for step, errors in curve if errors[k] <= level), None)


def converge_section(lines):
    """claim1 to convergence: the final errors, both learning curves on one figure, the steps (and
    training FLOPs) each model takes to reach given errors, and the verdict by the paper's criterion
    (within 25% at k = 2d), or the model still improving when its curve still falls by more than the
    seed spread over the last eighth of the steps at the peak rate."""
    folders = sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(RESULTS, "converge", "*", "run.json"))
    )
    lines += [f"## claim1 to convergence: both models for {CONVERGE} times the steps", ""]
    runs = {}
    for folder in folders:
        cfg, errors, record = read_run(folder)
        with open(os.path.join(folder, "log.jsonl")) as f:
            curve = [(r["step"], r["val_error"]) for r in map(json.loads, f) if "val_error" in r]
        runs[os.path.basename(folder)] = (cfg, errors, record, curve, folder)
    models = {
        m: [r for r in runs.values() if (r[0].n_layer > 1) == (m == "standard")] for m in MODELS
    }
    if not all(models.values()) or any(r[1] is None for r in runs.values()):
        lines += [
            "Not run yet (or a run diverged): `python experiments.py converge`, after claim1.",
            "",
        ]
        return
    cfg = models["looped"][0][0]
    ks, k = at_k(cfg), at_k(cfg)[-1]
    final = {m: [r[1]["loops"][r[0].n_loops - 1][k].item() for r in rs] for m, rs in models.items()}
    target = statistics.mean(final["looped"])
    flops = {m: step_flops(rs[0][0]) for m, rs in models.items()}
    rows, reach = [], []
    for name, (c, errors, record, curve, folder) in runs.items():
        model = "standard" if c.n_layer > 1 else "looped"
        rows.append(
            [
                name,
                looped.describe(c),
                c.seed,
                f"{c.lr:g}",
                *(errors["loops"][c.n_loops - 1][j].item() for j in ks),
            ]
        )
        steps = [first_step(curve, k, level) for level in THRESHOLDS + [target]]
        reach.append(
            [
                name,
                *("-" if s is None else f"{s:,} ({s * flops[model] / 1e12:.3g})" for s in steps),
                f"{flops[model] / 1e9:.2f}",
                f"{training_seconds(folder) / 60:.0f} min",
            ]
        )
    rows.append(
        [
            "least squares",
            "",
            "",
            "",
            *(models["looped"][0][1]["least squares"][j].item() for j in ks),
        ]
    )
    lines += [
        f"Each model at the learning rate claim1's sweep found best for it, for {cfg.steps:,} steps "
        f"({CONVERGE} times the preset's; Adam's rate warmed up over {cfg.warmup} steps and decayed to 0 over "
        f"the last {cfg.decay}), seeds 42 and 43, a validation point (256 prompts) every {cfg.eval_every} "
        f"steps; made by `python experiments.py converge` on {models['looped'][0][2]['machine']}.",
        "",
        markdown(["run", "model", "seed", "lr", *(f"test, k = {j}" for j in ks)], rows),
        "",
        f"![validation error of both models against training step](../{FIGURES}/converge.png)",
        "",
        f"The first step whose validation error at k = {k} is at most each level (in brackets: the training "
        f"TFLOP to get there, at the full-size step's count; the curriculum's early steps cost less), the "
        f"GFLOP of one step at full size (batch {cfg.batch_size}), and the training time from the log:",
        "",
        markdown(
            [
                "run",
                *(f"to {fmt(x)}" for x in THRESHOLDS),
                f"to {fmt(target)} (looped's final)",
                "GFLOP per step",
                "training time",
            ],
            reach,
        ),
        "",
    ]
    # the verdict, from the mean over seeds of each model's test error at k = 2d
    L, S = statistics.mean(final["looped"]), statistics.mean(final["standard"])
    behind = "standard" if S > L else "looped"
    flat_end = (
        cfg.steps - cfg.decay
    )  # the last step at the peak rate: the decay's own drop is not progress
    still = []
    for model, rs in models.items():

        def at(curve, step):  # the validation error at k at the curve's point nearest the step
            return min(curve, key=lambda p: abs(p[0] - step))[1][k]

        first = [r[3] for r in rs if r[0].seed == 42][0]
        fall = at(first, flat_end * 7 / 8) - at(first, flat_end)
        ends = [at(r[3], flat_end) for r in rs]
        spread = max(ends) - min(ends)
        if fall > spread:
            still.append((model, fall, spread))
    found = (
        "match" if max(L, S) <= 1.25 * min(L, S) else "looped ahead" if L < S else "standard ahead"
    )
    outcome = (
        f"at k = {k}, the mean over two seeds of the test error is {fmt(L)} for the looped model and {fmt(S)} "
        f"for the standard one: {FINDINGS[found]}"
    )
    if found == "match":
        verdict = f"**Reproduced at this scale.** The paper has {FINDINGS['match']}; {outcome}."
    elif any(model == behind for model, *_ in still):
        _, fall, spread = next(x for x in still if x[0] == behind)
        verdict = (
            f"**Not settled: the {behind} model is still improving at {cfg.steps:,} steps.** {outcome[0].upper()}"
            f"{outcome[1:]}; over the last eighth of the steps at the peak rate (to step {flat_end:,}) its "
            f"validation error (seed 42) fell by {fmt(fall)}, more than the spread over seeds ({fmt(spread)})."
        )
    else:
        verdict = (
            f"**Not reproduced at this scale.** The paper has {FINDINGS['match']}; {outcome}; the {behind} "
            f"model's curve fell by less than the spread over seeds over the last eighth of its peak-rate steps."
        )
    lines += [verdict, ""]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (model, rs) in enumerate(models.items()):
        for c, _, _, curve, _ in rs:
            ax.semilogy(
                [p[0] for p in curve],
                [p[1][k] for p in curve],
                color=f"C{i}",
                ls="-" if c.seed == 42 else "--",
                label=f"{looped.describe(c)}, lr {c.lr:g}, seed {c.seed}",
            )
    for level in THRESHOLDS:
        ax.axhline(level, color="gray", lw=0.6, ls=":")
    ax.axvline(flat_end, color="k", lw=0.8, ls=":", label="the learning rate's decay starts")
    ax.set(
        xlabel="training step", ylabel=f"validation error at k = {k}", title="claim1 to convergence"
    )
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(FIGURES, "converge.png"))


def window_section(lines):
    lines += [
        "## claim4: the loop settles past b; the window T",
        "",
        f"The paper: {PAPER['claim4']}.",
        "",
    ]
    default = os.path.join(
        RESULTS, "claim1", f"looped_lr{looped.make_config('linreg').lr:g}"
    )  # T = 10
    folders = [default] + [os.path.join(RESULTS, "claim4", f"T{t}") for t in (5, 3, 1)]
    if not all(os.path.isfile(os.path.join(f, "run.json")) for f in folders):
        lines += [
            "Not run yet: `python experiments.py claim1 && python experiments.py claim4`.",
            "",
        ]
        return
    named = [(f"T = {c.loop_window}", c, e) for c, e, _ in map(read_run, folders)]
    with open(os.path.join(RESULTS, "claim4", "solvers.json")) as f:
        solvers = {k: torch.tensor(v) for k, v in json.load(f).items() if k != "machine"}
    looped.plot(named, FIGURES, "linreg, windows", "_claim4", solvers)
    cfg = named[0][1]
    last, b = cfg.n_points - 1, cfg.n_loops
    rows = []
    for name, c, e in named:
        curve = e["loops"][:, last]
        rows.append(
            [
                name,
                curve[b - 1].item(),
                f"{fmt(curve.min().item())} ({curve.argmin().item() + 1})",
                curve[2 * b - 1].item(),
                curve[-1].item(),
                f"{curve[-1].item() / curve[b - 1].item():.2f}",
            ]
        )
    lines += [
        f"Error at k = {last} against loop iterations, to {cfg.eval_loops} = {cfg.eval_loops // b} b "
        f"(b = {b}); gradient descent and Newton's iteration on the same prompts in the figure.",
        "",
        markdown(
            [
                "window",
                "at b",
                "best (at loop)",
                "at 2b",
                f"at {cfg.eval_loops}",
                f"{cfg.eval_loops} / b",
            ],
            rows,
        ),
        "",
        f"![error against loop iterations, four windows](../{FIGURES}/error_vs_loops_claim4.png)",
        "",
    ]
    settled = [name for name, *_, ratio in rows if float(ratio) <= 1.5]
    drifted = [name for name, *_, ratio in rows if float(ratio) > 1.5]
    smallest = rows[-1][0]  # T = 1
    lines += [
        f"**The fixed point: reproduced for {', '.join(settled) or 'no window'}"
        + (f", not for {', '.join(drifted)}" if drifted else "")
        + f"**, taking 'settled' as an error at "
        f"{cfg.eval_loops} loops within 1.5x of the error at b. **The paper's warning that a too-small window "
        + (
            "diverges past b did not reproduce**: the small windows settle, at a higher error."
            if smallest in settled
            else "diverges past b: reproduced**."
        ),
        "",
    ]


def shift_section(lines):
    lines += ["## claim5: out of distribution", "", f"The paper: {PAPER['claim5']}.", ""]
    files = [os.path.join(RESULTS, "claim5", f"{s}.json") for s in GARG_SHIFTS]
    if not all(map(os.path.isfile, files)):
        lines += [
            "Not run yet: `python experiments.py claim1 && python experiments.py claim5`.",
            "",
        ]
        return
    rows, behind = [], []
    for path in files:
        with open(path) as f:
            record = json.load(f)
        (a, ra), (b, rb) = record["runs"].items()
        cfg = run_config(ra)
        ks = at_k(cfg)
        L = [ra["loops"][cfg.n_loops - 1][k] for k in ks]
        S = [rb["loops"][0][k] for k in ks]
        rows.append([record["shift"], *L, *S, *(ra["least squares"][k] for k in ks)])
        behind += [] if L[-1] < S[-1] else [record["shift"]]
    head = [f"{who}, k = {k}" for who in ("looped", "standard", "least squares") for k in ks]
    lrs = " and ".join(f"{run_config(r).lr:g}" for r in record["runs"].values())
    lines += [
        f"Normalised by E[y^2] under the shift; {cfg.eval_prompts} prompts; claim1's runs at learning rates {lrs} "
        f"(looped, standard), each model's best.",
        "",
        markdown(["shift", *head], rows),
        "",
        f"With no number in the paper to reproduce: the looped model is ahead of the standard one at "
        f"k = {ks[-1]} under {len(rows) - len(behind)} of the {len(rows)} shifts"
        + (
            f"; not under {', '.join(behind)} (a NaN, where no query exists, counts as not ahead)."
            if behind
            else "."
        ),
        "",
    ]


def study_section(lines, kind, title, intro, table, plot):
    """The studies of single runs (save_study) of one kind: each one's command, table and figure."""
    files = sorted(glob.glob(os.path.join(RESULTS, kind, "*.json")))
    if files:
        lines += [f"## {title}", "", intro, ""]
    for path in files:
        with open(path) as f:
            record = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [
            f"`{record['command']}` on {record['machine']}, torch {record['torch']}:",
            "",
            table(record),
            "",
            f"![{kind} of {name}](../{FIGURES}/{kind}_{name}.png)",
            "",
        ]
        plot(record, os.path.join(FIGURES, f"{kind}_{name}.png"))


def tables_section(lines, title, pattern, note=""):
    """Saved tables (bench.Table.save) under a heading."""
    files = sorted(glob.glob(os.path.join(RESULTS, pattern)))
    if files:
        lines += [f"## {title}", ""] + ([note, ""] if note else [])
    for path in files:
        with open(path) as f:
            r = json.load(f)
        lines += [
            f"`{r['command']}` on {r['machine']}, torch {r['torch']}, {r['threads']} threads, {r['date']}:",
            "",
            r["title"],
            "",
            markdown(r["columns"], r["text"]),
            "",
        ]


# ---------------------------------------------------------------------------- command line


def main(argv=None):
    parser = harness.Parser(
        prog="experiments.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        (
            "claim1",
            "linear regression: the looped model against the 12-layer one, each over 6 learning rates",
        ),
        ("claim2", "sparse linear regression: the same"),
        ("claim3", "decision trees and 2-layer ReLU networks: the same"),
        ("claim4", "the loop settles on a fixed point past b; windows T = 10, 5, 3, 1"),
        ("claim5", "out of distribution: Garg et al.'s shifts, on claim1's best runs"),
        ("seeds", "the default command (laptop preset, linear regression) with seeds 42 to 51"),
        (
            "converge",
            f"claim1's two models at their best rates for {CONVERGE}x the steps, "
            "two seeds: hours on a CPU; an interrupted run continues",
        ),
        ("all", "claim1 ... claim5 and seeds in turn (not converge)"),
        ("report", "write docs/results.md and its figures from results/, no training"),
    ]:
        sub.add_parser(name, help=text)
    p = sub.add_parser(
        "compare", help="evaluate several runs on the same prompts: one table, one plot"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="looped.py run folders of one task, d and n"
    )
    p.add_argument("--out", help="folder for the figures (default runs/compare_TASK)")
    p.add_argument(
        "--eval_loops", type=int, help="loop iterations to run (default: each run's own)"
    )
    p.add_argument(
        "--shift", help=f"Garg et al.'s shifted prompts for linear regression: {', '.join(SHIFTS)}"
    )
    p = sub.add_parser(
        "probe", help="linear probes of a looped run's loop state, iteration by iteration"
    )
    p.add_argument(
        "run", metavar="RUN_DIR", help="a looped linear-regression run folder (with ckpt.pt)"
    )
    p.add_argument(
        "--prompts",
        type=int,
        default=2048,
        help="fresh prompts, half to fit the probes, half to score them",
    )
    p.add_argument("--loops", type=int, help="iterations to probe (default 2b)")
    p = sub.add_parser(
        "adaptive",
        help="adaptive depth: error and loops used for several tolerances, against fixed b",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a looped.py run folder (with ckpt.pt)")
    p.add_argument(
        "--tolerances",
        type=float,
        nargs="+",
        default=TOLERANCES,
        help="relative changes to stop at",
    )
    p.add_argument(
        "--max_loops", type=int, help="the most loops per prompt (default the run's --eval_loops)"
    )
    p = sub.add_parser(
        "baselines", help="every baseline's error at chosen k, no model (paper scale by default)"
    )
    p.add_argument("--task", default="linreg", help=f"function class: {', '.join(looped.TASKS)}")
    p.add_argument("--n_dims", type=int, default=20, help="d (paper: 20)")
    p.add_argument(
        "--n_points",
        type=int,
        default=0,
        help="n; 0: the paper's (41, or 101 for trees and networks)",
    )
    p.add_argument("--prompts", type=int, default=1280, help="test prompts (paper: 1280)")
    p.add_argument(
        "--k", type=int, nargs="+", help="in-context examples to show; default d/2, d, 2d, n-1"
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the prompts")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"baselines to run (default: the task's): {', '.join(baselines.BASELINES)}",
    )
    p.add_argument(
        "--save", action="store_true", help="also write the table to results/baselines_TASK.json"
    )
    args = parser.parse_args(argv)
    baselines.keep_freed_memory()
    if args.command == "compare":
        if args.shift:
            parse_shift(args.shift)  # a bad name fails here, before any work
        compare(
            args.runs,
            args.out,
            {"eval_loops": args.eval_loops} if args.eval_loops else {},
            args.shift,
        )
    elif args.command == "baselines":
        if args.task not in looped.TASKS:
            raise harness.UserError(
                f"unknown task {args.task!r}: use one of {', '.join(looped.TASKS)}"
            )
        for name in args.only or []:
            if name not in baselines.BASELINES:
                raise harness.UserError(
                    f"unknown baseline {name!r}: use one of {', '.join(baselines.BASELINES)}"
                )
        n, d = args.n_points or looped.PAPER_TASKS[args.task]["n_points"], args.n_dims
        ks = args.k or sorted({k for k in (d // 2, d, 2 * d, n - 1) if 0 < k < n})
        if min(args.prompts, d, n) < 1 or any(not 0 <= k < n for k in ks):
            raise harness.UserError(
                f"--prompts, --n_dims and --n_points must be at least 1, --k in 0 .. n-1 = {n - 1}"
            )
        prompts, prefixes = baselines.memory_needed(args.prompts, n, d)
        harness.fits(
            {"--prompts": prompts, "--n_points or --n_dims": prefixes},
            torch.device("cpu"),
            "fitting the baselines",
        )
        with harness.memory_guard("--prompts, --n_points or --n_dims"):
            baseline_table(
                args.task,
                d,
                n,
                args.prompts,
                ks,
                args.seed,
                args.only or baselines.TASK_BASELINES[args.task],
                args.save,
            )
    elif args.command == "probe":
        if args.prompts < 4 or (args.loops is not None and args.loops < 1):
            raise harness.UserError("--prompts must be at least 4 and --loops at least 1")
        probe(args.run, args.prompts, args.loops)
    elif args.command == "adaptive":
        if min(args.tolerances) <= 0 or (args.max_loops is not None and args.max_loops < 1):
            raise harness.UserError("--tolerances must be positive and --max_loops at least 1")
        adaptive(args.run, args.tolerances, args.max_loops)
    elif args.command == "report":
        write_report()
    else:
        for name in (
            ["claim1", "claim2", "claim3", "claim4", "claim5", "seeds"]
            if args.command == "all"
            else [args.command]
        ):
            claim(name)


if __name__ == "__main__":
    harness.cli(main)
