"""The paper's claims as commands, at laptop scale, and the report that shows what they found.

    python experiments.py claim1    # linear regression: looped against 12 layers, lr swept
    python experiments.py claim2    # sparse linear regression: the same
    python experiments.py claim3    # decision trees and ReLU networks: the same
    python experiments.py claim4    # the loop settles past b; the window T
    python experiments.py claim5    # Garg et al.'s out-of-distribution suite (after claim1)
    python experiments.py seeds     # the default command with ten seeds: its spread
    python experiments.py converge  # claim1's best runs for 8 times the steps (hours; after claim1)
    python experiments.py paper     # linear regression at the paper's scale, in minutes (a GPU)
    python experiments.py all       # claim1 ... claim5 and seeds in turn (not converge or paper)
    python experiments.py report    # docs/results.md and figures/ from results/, no training

Each claim trains its runs with looped.py's `train` into results/CLAIM/RUN (a run already
evaluated there is kept, not trained again), and records beside each run's log.jsonl and
eval.json a run.json: its config, the machine, the torch version and the wall time. Those files
are committed; the checkpoints are not. `report` (report.py) reads them alone and writes
docs/results.md.

Tools on top of looped.py, for any runs:

    python experiments.py compare RUN_A RUN_B --out DIR       # several runs on the same prompts
    python experiments.py compare RUN_A RUN_B --shift skewed  # the same, shifted
    python experiments.py baselines --task sparse_linreg      # each classical baseline, no model
    python experiments.py probe RUN_DIR                       # linear probes of the loop state
    python experiments.py adaptive RUN_DIR                    # a loop that stops once converged

Citations, as in looped.py: [LT] the authors' code, https://github.com/Leiay/looped_transformer;
[G] Garg et al.'s, https://github.com/dtsip/in-context-learning.
"""

import dataclasses
import functools
import math
import numbers
import os
import shlex
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import baselines
import bench
import cli
import export
import harness
import looped
import plots
import report
from report import FIGURES, RESULTS

LOOPS = cli.Count(1, looped.MAX_LOOPS)  # the loop counts that compare, probe and adaptive take

# ---------------------------------------------------------------------------- out of distribution
# Garg et al.'s suite for linear regression ([G], `src/eval.py`). The first five change how x or y
# are drawn. The last three change the query: the prompt predicting y_i is then
# x_1 y_1 ... x_{i-1} y_{i-1} q_i, so each test prompt becomes m prompts, of which prompt i
# is scored at position i only.
SHIFTS = (
    "skewed half_subspace noisy_y scale_x=C scale_y=C random_quadrants orthogonal overlapping"
).split()
SCALES = [f"{kind}={c}" for kind in ("scale_x", "scale_y") for c in ("0.333", "0.5", "2", "3")]
GARG_SHIFTS = SHIFTS[:3] + SCALES + SHIFTS[5:]


def parse_shift(name):
    """--shift NAME -> (kind, scale C, 1 when there is none); UserError for a name not in SHIFTS."""
    kind, _, value = name.partition("=")
    if kind not in [s.split("=")[0] for s in SHIFTS] or (value and not kind.startswith("scale")):
        raise harness.UserError(f"unknown shift {name!r}: use one of {', '.join(SHIFTS)}")
    try:
        scale = float(value) if value else 1.0
    except ValueError:
        scale = float("nan")
    if not 0 < scale <= 1e6:  # a scale the float32 prompts can hold, squared in the solvers
        raise harness.UserError(f"shift {name}: give a scale above 0, at most 1e6, as in {kind}=2")
    return kind, scale


def sample_shifted(name, B, n, d, gen):
    """Linear-regression test prompts under a shift: (xs (B, n, d), or (B, m, n, d) for query
    prompts; ys to match; the normaliser E[y^2] under the shift, so that 0 still scores about 1)."""
    kind, c = parse_shift(name)
    dev = gen.device
    randn = functools.partial(torch.randn, generator=gen, device=dev)
    z, w = randn(B, n, d), randn(B, d, 1)
    xs, queries = z, None
    if kind in ("skewed", "half_subspace"):  # covariance U diag(eig) U^T, U a random rotation
        # Skewed: [G] maps x by U diag(1/i) U^T, so the eigenvalues go as 1/i^2.
        i = torch.arange(1, d + 1, device=dev)
        eig = 1 / i**2 if kind == "skewed" else (i <= d // 2).float()
        eig = eig * d / eig.sum()  # trace d, as N(0, I_d) has
        U = torch.linalg.qr(randn(B, d, d)).Q  # (B, d, d)
        xs = (z * eig.sqrt()) @ U.transpose(1, 2)
    elif kind == "scale_x":
        xs = c * z
    elif kind == "random_quadrants":  # in-context x in one random orthant; queries anywhere
        xs = z.abs() * randn(B, 1, d).sign()
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
        return xs, scale * (xs @ w)[..., 0] + noise * randn(B, n), norm
    m = min(n, d) if kind == "orthogonal" else n  # m query prompts per drawn prompt
    # Query prompt i holds queries from position i on: (m, n).
    use_query = torch.arange(n, device=dev) >= torch.arange(m, device=dev)[:, None]
    xs = torch.where(use_query[None, :, :, None], queries[:, None], xs[:, None])  # (B, m, n, d)
    return xs, scale * (xs.reshape(B, m * n, d) @ w)[..., 0].reshape(B, m, n), norm


def errors_on(models, cfg, test):
    """model_errors of each (cfg, model, ctx), then baselines.task_errors, on test (xs, ys, norm):
    of query prompts, column i comes from the prompts asking at i (NaN where none do)."""
    xs, ys, norm = test

    def score(x, y):
        errors = [looped.model_errors(model, c, (x, y, norm), ctx) for c, model, ctx in models]
        return errors + [baselines.task_errors(cfg.task, x, y, norm)]

    if xs.dim() == 3:
        return score(xs, ys)
    # One evaluation per query position, each with errors at every position (..., n).
    columns = [score(xs[:, i], ys[:, i]) for i in range(xs.shape[1])]
    pad, errors = (0, cfg.n_points - len(columns)), []
    for r, first in enumerate(columns[0]):  # r: the model (or the baselines) whose errors these are
        column = {key: [c[r][key][..., i] for i, c in enumerate(columns)] for key in first}
        errors.append(
            {k: F.pad(torch.stack(e, -1), pad, value=float("nan")) for k, e in column.items()}
        )
    return errors


# ---------------------------------------------------------------------------- several runs


def solver_errors(test, steps):
    """Error at the last position after each iteration of gradient descent (steps) and Newton's
    iteration (at most 40): what the loop's iterations are drawn against."""
    xs, ys, norm = test
    errors = {}
    for name, iterates in baselines.ITERATES.items():
        iterations = steps if name == "gradient descent" else min(steps, 40)
        preds = iterates(xs, ys, iterations)[:, :, -1]  # (P, t)
        errors[name] = ((preds - ys[:, None, -1]).pow(2).mean(0) / norm).cpu()
    return errors


def load_runs(run_dirs, given):
    """[(cfg, model, ctx)] of saved runs; a UserError unless they share their task, d and n."""
    runs = []
    for run_dir in run_dirs:
        ckpt, cfg = looped.saved_run(run_dir, given)
        try:
            device, ctx = harness.setup_device(cfg)
        except harness.UserError:
            if "device" in given:
                raise
            raise harness.UserError(  # a GPU's run on a CPU, say
                f"{run_dir} was trained with --device {cfg.device}, not available here: "
                "give --device (cpu, or auto)"
            ) from None
        looped.check_memory(cfg, device, training=False)  # --eval_loops: before any work
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
    """Saved runs on the same test prompts, the baselines once: one table, figures in out (default
    runs/compare_TASK). With shift, on Garg et al.'s shifted prompts (linear regression only)."""
    if shift:
        parse_shift(shift)  # a bad name fails here, before any work
    if out is not None and not out:
        raise harness.UserError("--out must name a folder")
    runs = load_runs(run_dirs, given or {})
    cfg, model, _ = runs[0]
    device, out = model.read_out.weight.device, out or os.path.join("runs", f"compare_{cfg.task}")
    if shift and cfg.task not in ("linreg", "noisy_linreg"):
        raise harness.UserError(
            f"the shifts are Garg et al.'s suite for linear regression, not {cfg.task}"
        )
    # Before any work: a run folder is refused, its own plots having these names.
    harness.check_folder(out)
    if shift:
        gen = torch.Generator(device).manual_seed(cfg.eval_seed)
        test = sample_shifted(shift, cfg.eval_prompts, cfg.n_points, cfg.n_dims, gen)
    else:
        test = looped.eval_prompts(cfg, device)
    *errors, classical = errors_on(runs, cfg, test)
    linear = not shift and cfg.task in ("linreg", "noisy_linreg", "sparse_linreg")
    solvers = solver_errors(test, max(c.eval_loops for c, _, _ in runs)) if linear else {}
    names = report.labels([c for c, _, _ in runs])
    named = [(name, c, {**e, **classical}) for name, (c, _, _), e in zip(names, runs, errors)]
    title = f"{cfg.task}, shift {shift}" if shift else cfg.task
    shown = baselines.TASK_BASELINES[cfg.task]
    plots.plot(named, out, title, shown, f"_{shift}" if shift else "", solvers, loops=not shift)
    print(plots.table(named, title, shown))
    print(f"figures in {out}")
    return named, solvers


# ---------------------------------------------------------------------------- the claims

STANDARD = dict(n_layer=12, n_loops=1, eval_loops=1)  # the paper's 12-layer GPT-2, the same budget
MODELS = {"looped": {}, "standard": STANDARD}
SWEEP = [3e-5, 1e-4, 3e-4, 6e-4, 1e-3, 2e-3]  # Adam's learning rate, the same six for both models
SEEDS = range(looped.Config.seed, looped.Config.seed + 10)  # the default command's spread
SECOND_SEED = 43  # a claim's second seed, where it trains one
TWO_SEEDS = (looped.Config.seed, SECOND_SEED)  # the preset's seed and the second: converge's
CURVES = dict(eval_every=250)  # a learning-curve point every 250 steps, on validation prompts
CONVERGE = 8  # converge trains claim1's best runs for this many times the preset's steps
# paper's steps: 4 minutes at 100 steps/s, a guess until a GPU has timed the paper's step
PAPER_SCALE = 24_000


def paper_scale(steps=PAPER_SCALE):
    """The paper's linear regression (--preset paper: d 20, n 41, D 256, 8 heads, b 20, T 15, batch
    64) in `steps` steps: the laptop preset's learning rate, warm-up and initialisation, its share
    of the steps decaying to 0, and the paper's curriculum at a pace scaled to the steps (d and n
    grow over the first 15% of them, as over the first 75k of the paper's 500k). The paper's
    constant 1e-4 is for 500k steps: in claim1's sweep, 1e-4 learned least of the rates from 1e-4
    to 2e-3 in the laptop preset's 3400. 1e-3 is the preset's, checked over ten seeds; the sweep's
    best for the looped model, 2e-3, was found at d = 5 and D = 64 only."""
    laptop, share = looped.Config, steps / looped.PAPER["steps"]
    pace = {k: max(1, round(share * looped.PAPER[k])) for k in ("curriculum_every", "loops_every")}
    schedule = dict(lr=laptop.lr, warmup=laptop.warmup, decay=steps * laptop.decay // laptop.steps)
    init = dict(embed_init=laptop.embed_init, attn_init=laptop.attn_init)
    curve = dict(eval_every=max(1, steps // 40))  # 40 validation points
    return dict(preset="paper", steps=steps, compile=True, **pace, **schedule, **init, **curve)


def run(claim, name, task, **overrides):
    """Train one run of a claim into results/CLAIM/NAME, unless it was evaluated there before (an
    interrupted one continues from its checkpoint); record run.json beside its log and eval.json."""
    out = os.path.join(RESULTS, claim, name)
    cfg = looped.make_config(task, out=out, **overrides)
    again = "delete it to train the claim's run there"
    if report.done(out):
        if report.run_config(report.read_json(f"{out}/run.json")) != cfg:
            raise harness.UserError(
                f"{out} holds a run of another config (an earlier preset?): {again}"
            )
        print(f"{out}: done before, kept")
        return out
    resume = looped.load_checkpoint(out)[0] if os.path.isfile(f"{out}/ckpt.pt") else None
    if resume is not None and resume["config"] != dataclasses.asdict(cfg):
        raise harness.UserError(f"{out} holds a run of another config: {again}")
    t0, diverged = time.perf_counter(), {}
    try:
        looped.train(cfg, resume=resume, overwrite=True)
    except harness.Interrupted as e:
        raise harness.Interrupted(
            f"{e.message.split(';')[0]}; python experiments.py {claim} continues it", e.signum
        ) from None
    except harness.Diverged as e:
        # A run that diverges is a result of the sweep, recorded as such, without an evaluation.
        print(f"{out}: {e}")
        diverged = {"diverged": str(e).split(";")[0]}
    record = {**diverged, "command": f"python experiments.py {claim}"}
    record.update(config=dataclasses.asdict(cfg), **bench.provenance())
    # A resumed run's seconds count from the step it resumed at.
    record["seconds"] = time.perf_counter() - t0
    if resume:
        record["resumed_at_step"] = resume["step"]
    harness.write_json(os.path.join(out, "run.json"), record, indent=1)
    return out


def train_best_again(name, claim, seeds=(SECOND_SEED,), times=1, **changes):
    """Each model's best run in the claim's own sweep (claim1: seed 43 says what a user of that rate
    should expect) or in the one it needs (converge), again at each seed, for `times` its steps."""
    sweep = claim.needs or name
    best = [report.best_run(sweep, model) for model in MODELS]
    if claim.needs and not all(best):
        raise harness.UserError(
            f"{name} trains each model at {sweep}'s best learning rate: run python "
            f"experiments.py {sweep} first"
        )
    for folder in filter(None, best):  # None: every run of that model in the sweep diverged
        cfg = report.read_run(folder)[0]
        kept = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
        for seed in seeds:
            suffix = None if seed == cfg.seed else seed  # the sweep's seed: the name has none
            at_seed = report.variant(os.path.basename(folder), seed=suffix)
            run(name, at_seed, **{**kept, "steps": times * cfg.steps, "seed": seed, **changes})


def train_at_best_rates(name, claim, seeds=()):
    """Each of the claim's runs of a model also at the learning rate that the sweep of the claim it
    needs found best for that model, where that is not the default; and with each of seeds."""
    for model, lr in report.best_rates(claim.needs, MODELS).items():
        for run_name, task, overrides in claim.runs:
            if lr and overrides == MODELS[model] and lr != looped.make_config(task).lr:
                run(name, report.variant(run_name, lr), task, **overrides, lr=lr)
                for seed in seeds:
                    at_seed = report.variant(run_name, lr, seed)
                    run(name, at_seed, task, **overrides, lr=lr, seed=seed)


def solve_the_test_prompts(name, claim):
    """Gradient descent and Newton's iteration on the default run's test prompts, for the report."""
    cfg = looped.make_config("linreg")
    solvers = solver_errors(looped.eval_prompts(cfg, torch.device("cpu")), cfg.eval_loops)
    record, path = {**bench.provenance(), **solvers}, os.path.join(RESULTS, name, "solvers.json")
    harness.write_json(path, record, default=torch.Tensor.tolist)


def evaluate_shifts(name, claim):
    """Garg et al.'s suite on the checkpoints of each model's best run in the claim it needs."""
    runs = [report.best_run(claim.needs, model) for model in MODELS]
    if not all(r and os.path.isfile(os.path.join(r, "ckpt.pt")) for r in runs):
        raise harness.UserError(
            f"{name} evaluates {claim.needs}'s trained runs: run python experiments.py "
            f"{claim.needs} first"
        )
    for shift in GARG_SHIFTS:
        named, _ = compare(runs, os.path.join(RESULTS, name, "figures"), shift=shift)
        errors = {label: {"config": dataclasses.asdict(c), **e} for label, c, e in named}
        record = {"shift": shift, **bench.provenance(), "runs": errors}
        path = os.path.join(RESULTS, name, f"{shift}.json")
        harness.write_json(path, record, default=torch.Tensor.tolist)  # tensors as lists


# ---------------------------------------------------------------------------- the verdicts
# The rules that read each claim's numbers into its verdict; report.py renders what they find.

WITHIN = 0.25  # the paper's criterion: two errors match when the larger is within 25% of the other
MATCH = f"the two matching (within {WITHIN:.0%})"
LOOPED_AHEAD, STANDARD_AHEAD = "the looped model ahead", "the standard model ahead"
SETTLED = 1.5  # claim4: how far the error may rise past b for the loop to count as settled
GOOD = 0.05  # seeds: the report counts the seeds whose error at k = 2d is at most this


def finding(looped_error, standard_error):
    """The paper's finding for a looped error against a standard one: MATCH, or who is ahead."""
    L, S = looped_error, standard_error
    if max(L, S) <= (1 + WITHIN) * min(L, S):
        return MATCH
    return LOOPED_AHEAD if L < S else STANDARD_AHEAD


def converged(looped_error, standard_error, fall, spread, expected):
    """converge's (finding, verdict) on each model's error, mean over seeds. A finding not the
    paper's waits ("Not settled") while the model behind still improves: its validation curve fell
    over the last eighth of its steps at the peak rate by more than the seeds' spread at the end."""
    found = finding(looped_error, standard_error)
    if found == expected:
        return found, "Reproduced"
    return found, "Not settled" if fall > spread else "Not reproduced"


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims: what its command trains, and what the report says of it."""

    help: str  # the command's line in --help
    heading: str  # its section's heading in docs/results.md
    place: int  # its section's place there: seeds first, their spread says how far to trust a run
    section: Callable  # report's writer of that section: (lines, name, claims, models)
    # [(run name, task, overrides)]: what the command trains, in results/NAME/; the runs of a task
    # whose two models the report compares come in the order of MODELS.
    runs: list = ()
    then: Callable = None  # what the command does next, (name, claim): more runs, or evaluations
    needs: str = ""  # the claim whose runs this one builds on: its best rates, its trained models
    paper: str = ""  # the paper's finding, as the report quotes it
    # [(task, the paper's finding or None, its numbers)]: whether it reproduced, looped vs standard
    verdicts: list = ()
    verdict: Callable = None  # the rule that reads the section's numbers into its verdict
    rule: str = ""  # that rule, as the report states it
    at_end: bool = False  # the verdict read at the prompt's last position, not at k = 2d
    made: str = ""  # how the committed runs were made, where the report says so
    # A remark after the comparison; {steps}, {share} of the paper's 500k and {d} are its runs'.
    caveat: str = ""


# The paper's numbers come from [LT]'s notebooks, at full scale (d = 20, 500k steps); those of the
# classical baselines appear in two claims and in the report's baselines section.
LEAST_SQUARES, LASSO = "0.515", ("0.0498", "0.00013")  # at k = 10; at k = 10 and 40
PAPER_LINREG = {  # linear regression, d = 20: the error at k = 10, 20, 40 after b loops
    "standard": {10: 0.519, 20: 0.0204, 40: 0.00048},
    "looped": {10: 0.519, 20: 0.0242, 40: 0.00078},
}


def paper_errors(model):
    return ", ".join(f"{e:g}" for e in PAPER_LINREG[model].values())


BASELINES_NOTE = (
    f"The paper (d = 20, 1280 prompts): least squares {LEAST_SQUARES} at k = 10; at k = 40 3-NN "
    f"~0.71, averaging ~0.53; sparse regression: Lasso {LASSO[0]} at k = 10, {LASSO[1]} at k = 40."
)
CLAIMS = {
    "claim1": Claim(
        help="linear regression: the looped model against the 12-layer one, each over 6 learning "
        "rates",
        heading="claim1: Linear regression: the looped model against the 12-layer transformer",
        place=1,
        section=functools.partial(report.pairs_section, sweep=True),
        runs=[
            (report.variant(model, lr), "linreg", dict(overrides, lr=lr, **CURVES))
            for lr in SWEEP
            for model, overrides in MODELS.items()
        ],
        then=train_best_again,
        paper=f"at k = 10, 20, 40 (d = 20): standard {paper_errors('standard')}; looped "
        f"{paper_errors('looped')}; least squares {LEAST_SQUARES}, ~0, ~0",
        verdicts=[("linreg", MATCH, "0.00078 against 0.00048 at k = 40, d = 20")],
        verdict=finding,
        caveat="Each model is compared at its own best learning rate, picked on validation "
        "prompts, with one seed per learning rate; {steps} steps are {share:.2%} of the paper's "
        "500k, at d = {d} rather than 20.",
    ),
    "claim2": Claim(
        help="sparse linear regression: the same",
        heading="claim2: Sparse linear regression",
        place=2,
        section=report.pairs_section,
        runs=[("looped", "sparse_linreg", {}), ("standard", "sparse_linreg", STANDARD)],
        then=train_at_best_rates,
        needs="claim1",
        paper="at k = 10, 40 (d = 20, s = 3): standard 0.0848, 0.0017; looped 0.0213, 0.00061; "
        f"Lasso {LASSO[0]}, {LASSO[1]}",
        verdicts=[("sparse_linreg", LOOPED_AHEAD, "0.00061 against 0.0017 at k = 40, d = 20")],
        verdict=finding,
        caveat="At d = 5 with s = 3 the weights are barely sparse, so Lasso has little to gain "
        "over least squares here.",
    ),
    "claim3": Claim(
        help="decision trees and 2-layer ReLU networks: the same",
        heading="claim3: Decision trees and ReLU networks",
        place=3,
        section=report.pairs_section,
        runs=[
            ("tree_looped", "decision_tree", {}),
            ("tree_standard", "decision_tree", STANDARD),
            ("relu_looped", "relu_2nn", {}),
            ("relu_standard", "relu_2nn", STANDARD),
        ],
        # The ReLU network's verdict turned on the learning rate: another seed there.
        then=functools.partial(train_at_best_rates, seeds=[SECOND_SEED]),
        needs="claim1",
        paper="ReLU network at k = 100: standard 0.170, looped 0.180; decision tree: no number in "
        "the paper",
        verdicts=[
            ("decision_tree", None, "for the decision tree"),
            ("relu_2nn", MATCH, "0.180 against 0.170 at k = 100, d = 20"),
        ],
        verdict=finding,
        at_end=True,  # the paper reads trees and networks at the prompt's end
    ),
    "claim4": Claim(
        help="the loop settles on a fixed point past b; windows T = 10, 5, 3, 1",
        heading="claim4: the loop settles past b; the window T",
        place=5,
        # T = 10, the default window, is claim1's looped run at the default rate.
        section=functools.partial(
            report.window_section, base=report.variant("looped", looped.make_config("linreg").lr)
        ),
        runs=[(f"T{t}", "linreg", dict(loop_window=t)) for t in (5, 3, 1)],
        then=solve_the_test_prompts,
        needs="claim1",
        paper="the looped model's error stays flat when run far past b (to 500 loops); a "
        "too-small T diverges there",
        verdict=lambda ratio: ratio <= SETTLED,  # the error at the last loop against that at b
        rule=f"within {SETTLED:g}x of the error at b",
    ),
    "claim5": Claim(
        help="out of distribution: Garg et al.'s shifts, on claim1's best runs",
        heading="claim5: out of distribution",
        place=6,
        section=functools.partial(report.shift_section, shifts=GARG_SHIFTS),
        then=evaluate_shifts,
        needs="claim1",
        paper="no number for Garg et al.'s shifts; Garg et al. find that a trained transformer "
        "degrades under them much as least squares does",
        verdict=lambda looped_error, standard_error: looped_error < standard_error,  # at k = 2d
        rule="a NaN, where no query exists, counts as not ahead",
    ),
    "seeds": Claim(
        help="the default command (laptop preset, linear regression) with seeds "
        f"{SEEDS[0]} to {SEEDS[-1]}",
        heading=f"The default command over {report.in_words(len(SEEDS))} seeds",
        place=0,
        section=report.seeds_section,
        runs=[(f"seed{seed}", "linreg", dict(seed=seed)) for seed in SEEDS],
        verdict=lambda error: error <= GOOD,  # at k = 2d
        rule=f"at most {GOOD:g}",
        made="two runs side by side: one alone with two threads is faster",
    ),
    "converge": Claim(
        help=f"claim1's two models at their best rates for {CONVERGE}x the steps, two seeds: "
        "hours on a CPU; an interrupted run continues",
        heading=f"claim1 to convergence: both models for {CONVERGE} times the steps",
        place=4,
        section=functools.partial(report.converge_section, times=CONVERGE),
        # A run may take several sessions: it continues from its last checkpoint.
        then=functools.partial(train_best_again, seeds=TWO_SEEDS, times=CONVERGE, ckpt_every=500),
        needs="claim1",
        verdicts=[("linreg", MATCH, "")],
        verdict=converged,
        caveat="The training times come from each log's ms per step, so they move with whatever "
        "else ran on the machine (each run's threads are in the runs table) and compare the two "
        "models loosely. The FLOP counts compare them fairly.",
    ),
    "paper": Claim(
        help=f"linear regression at the paper's scale (d 20, D 256) in {PAPER_SCALE:,} steps, the "
        "curriculum's pace scaled: minutes on a GPU",
        heading=f"The paper's scale in {PAPER_SCALE:,} steps: linear regression at d = 20",
        place=7,
        section=functools.partial(report.paper_section, numbers=PAPER_LINREG["looped"]),
        runs=[("looped", "linreg", paper_scale())],
        paper=f"after b = 20 loops at k = 10, 20, 40, 500k steps: looped {paper_errors('looped')}; "
        f"least squares {LEAST_SQUARES}, ~0, ~0",
        verdict=lambda ours, paper: ours <= (1 + WITHIN) * paper,  # at the last of the paper's k
        rule=f"at most {WITHIN:.0%} above the paper's",
    ),
}


def claim(name):
    """Train a claim's runs, then whatever else its record asks for."""
    record = CLAIMS[name]
    for run_name, task, overrides in record.runs:
        run(name, run_name, task, **overrides)
    if record.then:
        record.then(name, record)


def write_report():
    """docs/results.md and its figures, from results/ alone."""
    report.write(CLAIMS, MODELS, BASELINES_NOTE)


# ---------------------------------------------------------------------- probes of the loop state
# Does the loop compute an iterative solver? After each iteration t, a linear probe (closed-form
# ridge) reads a quantity of the in-context data from the loop state Y_t, fitted on half of fresh
# prompts and scored on the other half. [LT]'s `scripts/model_probe.py` probes the loop state too.


def probe_r2(fit_x, fit_y, test_x, test_y, alpha=1e-3):
    """R^2 on (test_x, test_y), all (P, features), of a ridge map with intercept fitted on (fit_x,
    fit_y): 1 for a target linear in the state, about 0 (or below) for one that is not."""
    mean_x, mean_y = fit_x.mean(0), fit_y.mean(0)
    X, Y = (fit_x - mean_x).double(), (fit_y - mean_y).double()
    # The ridge is relative to the states' scale, so that alpha means the same at any scale.
    ridge = alpha * X.pow(2).sum(0).mean() * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(X.T @ X + ridge, X.T @ Y)
    pred = (test_x - mean_x).double() @ W + mean_y.double()
    return 1 - ((pred - test_y).pow(2).sum() / (test_y - test_y.mean(0)).pow(2).sum()).item()


def solver_weights(xs, ys, steps):
    """For the last query, from the n - 1 pairs before it: {name: (steps, P, d)} the least-squares
    solution, X^T y / k (one gradient step from 0, up to scale), and the iterates of gradient
    descent and Newton's iteration, w_t after t steps as baselines.py runs them."""
    X, y = xs[:, :-1].double(), ys[:, :-1].double()
    G, c = X.transpose(1, 2) @ X, (X.transpose(1, 2) @ y[..., None])[..., 0]  # (P, d, d), (P, d)
    ols = torch.linalg.lstsq(G, c[..., None], driver="gelsd").solution[..., 0]
    return {
        "least squares": ols.expand(steps, *ols.shape),
        "X^T y / k": (c / X.shape[1]).expand(steps, *c.shape),
        "gradient descent iterate t": torch.stack([*baselines.gradient_descent_steps(G, c, steps)]),
        "Newton iterate t": torch.stack([*baselines.newton_steps(G, c, steps)]),
    }


@torch.no_grad()
def probe(run_dir, prompts=2048, loops=None):
    """Probe a linear-regression run's loop state after each iteration, on fresh prompts (seed
    eval_seed + 2), half to fit the probes, half to score them: results/probe/RUN.json, a figure."""
    model, cfg = export.load_model(run_dir)
    if cfg.task not in ("linreg", "noisy_linreg") or cfg.n_loops == 1:
        raise harness.UserError(
            f"{run_dir}: probes need a looped linear-regression run (this one: "
            f"{looped.describe(cfg)}, {cfg.task})"
        )
    loops = min(2 * cfg.n_loops, looped.MAX_LOOPS) if loops is None else loops
    LOOPS.check("--loops", loops)
    cli.Count(4).check("--prompts", prompts)
    n, d, D, cpu = cfg.n_points, cfg.n_dims, cfg.n_embd, torch.device("cpu")
    # Per prompt: two states (D), a prediction and the four solvers' weights (d) per iteration, in
    # float32 and float64; the iterate baselines' predictions (n); the forward pass (2n tokens).
    need = prompts * (loops * (8 * D + 4 + 32 * d + 16 * n) + 80 * n * D)
    harness.fits({"--prompts or --loops": need}, cpu, "probing")
    study_files("probe", run_dir)
    gen = torch.Generator().manual_seed(cfg.eval_seed + 2)
    xs, ys = looped.TASKS[cfg.task](prompts, n, d, d, gen)
    states, preds = loop_states(model, xs, ys, loops)
    targets, half = solver_weights(xs, ys, loops), prompts // 2

    def fit(states, target):  # one probe per iteration, fitted on half the prompts
        return [probe_r2(s[:half], y[:half], s[half:], y[half:]) for s, y in zip(states, target)]

    r2 = {where: {name: fit(s, y) for name, y in targets.items()} for where, s in states.items()}
    norm = looped.error_normaliser(cfg.task, cfg.n_dims)
    gap = {
        name: ((iterates(xs, ys, loops)[:, :, -1] - preds).pow(2).mean(0) / norm).tolist()
        for name, iterates in baselines.ITERATES.items()
    }
    found = {"run": run_dir, "prompts": prompts, "loops": loops, "r2": r2, "prediction gap": gap}
    found["error"] = ((preds - ys[:, -1:]).pow(2).mean(0) / norm).tolist()
    return save_study("probe", run_dir, cfg, found, report.plot_probe, report.probe_table)


def loop_states(model, xs, ys, loops):
    """What the probes read after each iteration: {where: [state (P, D) per iteration]} at the
    last x token and averaged over tokens, and the last position's prediction (P, loops)."""
    P = model.embed(xs, ys)
    Y, states, preds = torch.zeros_like(P), {"last x token": [], "mean over tokens": []}, []
    for _ in range(loops):
        Y = model.iterate(Y, P)
        states["last x token"].append(Y[:, -2])  # the token whose read-out predicts the last y
        states["mean over tokens"].append(Y.mean(1))
        preds.append(model.read(Y)[:, -1])
    return states, torch.stack(preds, 1)


def study_files(kind, run_dir):
    """results/KIND/RUN.json and figures/KIND_RUN.png, both checked writable (before any work)."""
    name = os.path.basename(os.path.normpath(run_dir))
    files = os.path.join(RESULTS, kind, f"{name}.json"), os.path.join(FIGURES, f"{kind}_{name}.png")
    harness.check_outputs(*files)
    return files


def save_study(kind, run_dir, cfg, found, plot, table):
    """Write a study's record (command, config, machine, what it found), draw it, print a table."""
    command = f"python experiments.py {kind} {run_dir}"
    record = {"command": command, "config": dataclasses.asdict(cfg), **bench.provenance(), **found}
    record_file, figure = study_files(kind, run_dir)
    harness.write_json(record_file, record, indent=1)
    plot(record, figure)
    print(table(record))
    return record


# ---------------------------------------------------------------------------- adaptive depth
# The paper's users pick the loop count; export.adaptive_depth lets the model decide: a
# prompt stops when its predictions (or its loop state) change by less than a tolerance.

TOLERANCES = [0.1, 0.03, 0.01, 0.003, 0.001]


@torch.no_grad()
def adaptive(run_dir, tolerances=TOLERANCES, max_loops=None):
    """Error against loops of adaptive depth on a run's test prompts, both stopping signals at every
    tolerance against the fixed b: results/adaptive/RUN.json and a figure."""
    model, cfg = export.load_model(run_dir)
    if cfg.n_loops == 1:
        raise harness.UserError(f"{run_dir} is not a looped model: there is no loop to stop")
    max_loops = cfg.eval_loops if max_loops is None else max_loops
    LOOPS.check("--max_loops", max_loops)
    real = [isinstance(t, numbers.Real) and not isinstance(t, bool) for t in tolerances]
    if not tolerances or not all(r and 0 < t < math.inf for r, t in zip(real, tolerances)):
        raise harness.UserError(f"--tolerances must be finite numbers above 0, got {tolerances}")
    study_files("adaptive", run_dir)
    xs, ys, norm = looped.eval_prompts(cfg, torch.device("cpu"))
    fixed = looped.model_errors(model, cfg, (xs, ys, norm))["loops"][cfg.n_loops - 1]
    b = cfg.n_loops
    rows = {f"fixed b = {b}": {"error": fixed.tolist(), "mean loops": b, "max loops": b}}
    for signal in ("prediction", "state"):
        for tol in tolerances:
            preds, loops = export.adaptive_depth(model, xs, ys, tol, max_loops, signal)
            error = ((preds - ys).pow(2).mean(0) / norm).tolist()
            row = rows[f"{signal}, tol {tol:g}"] = {"signal": signal, "tol": tol, "error": error}
            row.update({"mean loops": loops.float().mean().item(), "max loops": loops.max().item()})
    found = {"max_loops": max_loops, "rows": rows}
    return save_study("adaptive", run_dir, cfg, found, report.plot_adaptive, report.adaptive_table)


# ---------------------------------------------------------------------------- baselines alone


def baseline_table(task, n_dims, n_points, prompts, ks, seed, names, save=False):
    """The baselines command: each of names' (None: the task's) normalised squared error at
    in-context example counts ks (None: the paper's and n - 1), n_points 0 meaning the paper's."""
    n, d = n_points or looped.PAPER_TASKS[task]["n_points"], n_dims
    # The paper's k and the prompt's last position; none at all for a prompt of one point.
    ks = ks or [k for k in report.shown_ks(d=d, n=n, last=True) if k > 0]
    if any(not 0 <= k < n for k in ks):
        raise harness.UserError(f"--k must be in 0 .. n-1 = {n - 1}")
    if not ks:
        raise harness.UserError(f"--n_points {n} leaves no in-context example to score")
    sizes = zip(("--prompts", "--n_points or --n_dims"), baselines.memory_needed(prompts, n, d))
    harness.fits(dict(sizes), torch.device("cpu"), "fitting the baselines")
    path = os.path.join(RESULTS, f"baselines_{task}.json")
    if save:
        harness.check_outputs(path)
    title = f"normalised squared error, {task}, d = {d}, n = {n}, {prompts} prompts"
    with harness.memory_guard("--prompts, --n_points or --n_dims"):
        xs, ys = looped.TASKS[task](prompts, n, d, d, torch.Generator().manual_seed(seed))
        norm = looped.error_normaliser(task, d)
        columns = ["k (in-context examples)", *map(str, ks), "seconds"]
        table = bench.Table(title, columns, [26] + [9] * len(ks) + [10], digits=4)
        for name in names or baselines.TASK_BASELINES[task]:
            t0 = time.perf_counter()
            err = (baselines.BASELINES[name](xs, ys) - ys).pow(2).mean(0) / norm
            table.add(name, *(err[k].item() for k in ks), time.perf_counter() - t0)
    if save:
        table.save(path, "python experiments.py " + shlex.join(sys.argv[1:]))


# ---------------------------------------------------------------------------- command line


def tool_commands(sub):
    """compare, probe, adaptive and baselines: the tools for any runs, and their flags."""
    text = "evaluate several runs on the same prompts: one table, one plot"
    add = sub.add_parser("compare", help=text).add_argument
    add("runs", nargs="+", metavar="RUN_DIR", help="looped.py run folders of one task, d and n")
    add("--out", help="folder for the figures (default runs/compare_TASK)")
    add("--eval_loops", type=LOOPS, help=f"loop iterations to run, {LOOPS} (default: each run's)")
    add("--device", help="auto, cuda, mps or cpu for every run (default: each run's own)")
    add("--shift", help=f"Garg et al.'s shifted prompts for linear regression: {', '.join(SHIFTS)}")
    text = "linear probes of a looped run's loop state, iteration by iteration"
    add = sub.add_parser("probe", help=text).add_argument
    add("run", metavar="RUN_DIR", help="a looped linear-regression run folder (with ckpt.pt)")
    text = "fresh prompts, half to fit the probes, half to score them; at least 4, as memory allows"
    add("--prompts", type=cli.Count(4), default=2048, help=text + " [2048]")
    add("--loops", type=LOOPS, help=f"iterations to probe, {LOOPS} (default 2b)")
    text = "adaptive depth: error and loops used for several tolerances, against fixed b"
    add = sub.add_parser("adaptive", help=text).add_argument
    add("run", metavar="RUN_DIR", help="a looped.py run folder (with ckpt.pt)")
    text = "relative changes to stop at, finite numbers above 0"
    add("--tolerances", type=cli.positive, nargs="+", default=TOLERANCES, help=text)
    text = f"the most loops per prompt, {LOOPS} (default the run's --eval_loops)"
    add("--max_loops", type=LOOPS, help=text)
    text = "every baseline's error at chosen k, no model (paper scale by default)"
    add = sub.add_parser("baselines", help=text).add_argument
    add("--task", default="linreg", choices=list(looped.TASKS), help="function class")
    add("--n_dims", type=cli.Count(1), default=20, help="d (paper: 20)")
    text = "n; 0: the paper's (41, or 101 for trees and networks)"
    add("--n_points", type=cli.Count(0), default=0, help=text)
    add("--prompts", type=cli.Count(1), default=1280, help="test prompts (paper: 1280)")
    text = "in-context examples to show, 0 to n - 1; default d/2, d, 2d, n-1"
    add("--k", type=cli.Count(0), nargs="+", help=text)
    add("--seed", type=looped.SEED, default=1234, help=f"seed of the prompts, {looped.SEED}")
    text = f"baselines to run (default: the task's): {', '.join(baselines.BASELINES)}"
    add("--only", nargs="+", metavar="NAME", choices=list(baselines.BASELINES), help=text)
    add("--save", action="store_true", help="also write the table to results/baselines_TASK.json")


def main(argv=None):
    parser = cli.doc_parser("experiments.py", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, record in CLAIMS.items():
        sub.add_parser(name, help=record.help)
    sub.add_parser("all", help="claim1 ... claim5 and seeds in turn (not converge or paper)")
    text = "write docs/results.md and its figures from results/, no training"
    sub.add_parser("report", help=text)
    tool_commands(sub)
    args = parser.parse_args(argv)
    baselines.keep_freed_memory()
    if args.command == "compare":
        given = {k: v for k, v in [("eval_loops", args.eval_loops), ("device", args.device)] if v}
        compare(args.runs, args.out, given, args.shift)
    elif args.command == "baselines":
        sizes = args.task, args.n_dims, args.n_points, args.prompts, args.k, args.seed
        baseline_table(*sizes, args.only, args.save)
    elif args.command == "probe":
        probe(args.run, args.prompts, args.loops)
    elif args.command == "adaptive":
        adaptive(args.run, args.tolerances, args.max_loops)
    elif args.command == "report":
        write_report()
    else:
        everything = [name for name in CLAIMS if name not in ("converge", "paper")]
        for name in everything if args.command == "all" else [args.command]:
            claim(name)


if __name__ == "__main__":
    cli.cli(main)
