"""docs/results.md and its figures, written from the files under results/CLAIM/RUN alone, so that a
clean checkout rewrites the report byte for byte. It renders; it decides nothing: each claim's
record (experiments.Claim) holds its runs, the paper's numbers, its place in the report, the rule
that reads its verdict, and the function here that writes its section. experiments.py imports this
module (and uses its readers to pick the runs it trains next), so `write` takes the records and
the models as arguments."""

import collections
import contextlib
import dataclasses
import glob
import json
import math
import os
import statistics

import torch

import baselines
import harness
import looped
import plots

RESULTS, FIGURES, REPORT = "results", "figures", os.path.join("docs", "results.md")
THRESHOLDS = [0.2, 0.1, 0.05]  # validation errors at k = 2d whose first step converge reports
WORDS = "zero one two three four five six seven eight nine ten".split()


def in_words(n):
    return WORDS[n] if n < len(WORDS) else str(n)


# ---------------------------------------------------------------------------- reading the runs
Run = collections.namedtuple("Run", "cfg errors record folder curve")  # what read_run reads


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_config(record):
    """The config of a run.json record. Runs made before the learning-rate schedule trained at a
    constant rate (warm-up and decay 0); before embed_init and attn_init, at GPT-2's 0.02."""
    before = {"warmup": 0, "decay": 0, **looped.BEFORE_INIT}
    return looped.make_config(**{**before, **record["config"]})


def read_run(folder, curve=False):
    """A finished run folder's config, test errors (tensors; None where training diverged), run.json
    record, and with curve its validation curve from the log, [(step, error at each position)]."""
    record = read_json(os.path.join(folder, "run.json"))
    errors = None
    if "diverged" not in record:
        errors = {k: torch.tensor(v) for k, v in read_json(f"{folder}/eval.json").items()}
    curve = [(r["step"], r["val_error"]) for r in read_log(folder, "val_error")] if curve else None
    return Run(run_config(record), errors, record, folder, curve)


def read_log(folder, key):  # the lines of a run's log.jsonl that hold key
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def step_times(folder):
    """[(step, ms the steps since the log's line before took)]: each line holds their mean."""
    log = read_log(folder, "ms_per_step")
    ends = [r["step"] for r in log]
    return [(b, (b - a) * r["ms_per_step"]) for a, b, r in zip([0] + ends, ends, log)]


def at_b(run, k):
    """A run's test error at position k after its trained b loops (the standard model: one pass)."""
    return run.errors["loops"][run.cfg.n_loops - 1][k].item()


def done(folder):  # whether a run folder holds a finished run: its run.json, written last
    return os.path.isfile(os.path.join(folder, "run.json"))


def variant(name, lr=None, seed=None):
    """NAME_lrLR_seedS: run NAME trained again at another rate or seed, as the claims name them."""
    return name + (f"_lr{lr:g}" if lr else "") + (f"_seed{seed}" if seed else "")


def claim_runs(claim, curves=False):
    """{run name: Run} of a claim's finished runs, by name; with curves, their validation curves."""
    folders = sorted(os.path.dirname(p) for p in glob.glob(f"{RESULTS}/{claim}/*/run.json"))
    return {os.path.basename(folder): read_run(folder, curves) for folder in folders}


def sweep_runs(claim, model):
    """{lr: Run, with its curve} of a model's learning-rate sweep: a claim's runs MODEL_lrLR."""
    runs = claim_runs(claim, curves=True).items()
    runs = {r.cfg.lr: r for n, r in runs if n.startswith(f"{model}_lr") and "_seed" not in n}
    return dict(sorted(runs.items()))


def validation(run):  # the validation error at k = 2d at the last step
    return run.curve[-1][1][shown_ks(run.cfg)[-1]]


def best_run(claim, model, runs=None):
    """The folder of a model's best learning rate, or None before its sweep. The best has the lowest
    validation error at k = 2d at the last step: those prompts are drawn apart from the test
    prompts, so that the test stays fair to both models. runs: the sweep, if already read."""
    runs = (runs or sweep_runs(claim, model)).values()
    found = [r for r in runs if r.errors is not None and r.curve and math.isfinite(validation(r))]
    return min(found, key=lambda r: (validation(r), r.folder)).folder if found else None


def best_rates(claim, models):
    """The best learning rate (best_run) of each model in a claim's sweep, or None before it."""
    return {model: (best := best_run(claim, model)) and read_run(best).cfg.lr for model in models}


def labels(cfgs):
    """A legend name per run: the model, and the run folder where models repeat."""
    names = [looped.describe(c) for c in cfgs]
    folders = [f" ({os.path.basename(os.path.normpath(c.out))})" for c in cfgs]
    return [name + folder * (names.count(name) > 1) for name, folder in zip(names, folders)]


# ---------------------------------------------------------------------------- tables and figures


def fmt(x):
    """Four digits; ~0 below 1e-8, where exact solvers leave round-off that changes with the CPU."""
    if x != x:
        return "-"
    return "~0" if abs(x) < 1e-8 else f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.1e}"


def markdown(columns, rows):
    cells = [columns] + [[fmt(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])


def shown_ks(cfg=None, last=False, d=None, n=None):
    """The k a table shows: the paper's d/2, d and 2d (10, 20 and 40 at d = 20) where they fit in
    the prompt, with last (or where none fit) the last position n - 1 too; d, n: the config's."""
    d = cfg.n_dims if d is None else d
    n = cfg.n_points if n is None else n
    ks = [k for k in (d // 2, d, 2 * d) if 0 < k < n]
    return ks + [n - 1] if (last or not ks) and n - 1 not in ks else ks


def save(fig, path, *axes, **legend):  # each of axes with its legend, then the figure
    for ax in axes:
        ax.legend(**legend)
    plots.save_figure(fig, path)


# ---------------------------------------------------------------------------- studies of one run
# The tables and figures of `python experiments.py probe` and `adaptive`: the command prints and
# draws them when it runs, and the report again from the record it saved.


def probe_table(record):
    """The probes' R^2 at a few iterations, and the prediction's distance from the solvers'."""
    b, loops = record["config"]["n_loops"], record["loops"]
    ts = sorted({1, 2, 5, b // 2, b, loops} & set(range(1, loops + 1)))
    named = [(f"R^2, {t}, {where}", c) for where, by in record["r2"].items() for t, c in by.items()]
    gaps = record["prediction gap"].items()
    named += [(f"gap to the {name} prediction after t steps", curve) for name, curve in gaps]
    named += [("the model's error at the last position", record["error"])]
    rows = [[name, *(curve[t - 1] for t in ts)] for name, curve in named]
    return markdown(["after loop iteration t", *map(str, ts)], rows)


def plot_probe(record, path):
    t = range(1, record["loops"] + 1)
    fig, (a, b) = plots.figure(1, 2, figsize=(11, 4.2))
    for i, target in enumerate(record["r2"]["last x token"]):
        for where, ls in (("last x token", "-"), ("mean over tokens", "--")):
            a.plot(t, record["r2"][where][target], ls, color=f"C{i}", label=f"{target}, {where}")
    a.set(xlabel="loop iteration t", ylabel="probe R^2 (held-out prompts)", ylim=(-0.1, 1.02))
    a.set(title="what a linear probe reads from the loop state")
    for i, (name, curve) in enumerate(record["prediction gap"].items()):
        b.semilogy(t, curve, color=f"C{i}", label=f"model vs {name} after t steps")
    b.semilogy(t, record["error"], "k", label="model's error")
    b.axvline(record["config"]["n_loops"], color="gray", ls=":", lw=1)
    b.set(xlabel="loop iteration t (dotted: trained b)", title="the read-out against the solvers")
    b.set(ylabel="normalised squared difference, last position")
    save(fig, path, a, b, fontsize=7)


def adaptive_table(record):
    ks = shown_ks(run_config(record))
    rows = [
        [name, *(r["error"][k] for k in ks), f"{r['mean loops']:.1f}", r["max loops"]]
        for name, r in record["rows"].items()
    ]
    return markdown(["stopping rule", *(f"k = {k}" for k in ks), "mean loops", "max loops"], rows)


def plot_adaptive(record, path):
    cfg = run_config(record)
    k = shown_ks(cfg)[-1]
    fig, ax = plots.figure(figsize=(6.5, 4.5))
    for i, signal in enumerate(("prediction", "state")):
        rows = [r for r in record["rows"].values() if r.get("signal") == signal]
        points = [(r["mean loops"], r["error"][k]) for r in rows]
        ax.plot(*zip(*points), "o-", color=f"C{i}", label=f"stop on the {signal}")
        for r, xy in zip(rows, points):
            ax.annotate(f"{r['tol']:g}", xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    fixed = next(iter(record["rows"].values()))
    label = f"fixed b = {cfg.n_loops}"
    ax.plot([fixed["mean loops"]], [fixed["error"][k]], "k*", ms=14, label=label)
    ax.set(xscale="log", yscale="log", xlabel="mean loops per prompt")
    ax.set(ylabel=f"normalised squared error at k = {k}")
    ax.set(title=f"adaptive depth (labels: tolerance; at most {record['max_loops']} loops)")
    save(fig, path, ax, fontsize=8)


# ---------------------------------------------------------------------------- the report


def write(claims, models, baselines_note=""):
    """docs/results.md and its figures. claims: {name: experiments.Claim}, each section at its
    record's place; models: {model: its overrides}, as experiments.MODELS; baselines_note: the
    paper's numbers for the baselines' section."""
    os.makedirs(FIGURES, exist_ok=True)
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    lines = []
    add(
        lines,
        "# Results at laptop scale",
        "Written by `python experiments.py report` from the files under `results/`; do not edit by"
        " hand.\nEach claim's runs come from `python experiments.py CLAIM` (see the README); every"
        " number\nbelow is read from a file there, which also records the machine and the torch"
        " version.",
    )
    runs_section(lines, claims)
    for name, claim in sorted(claims.items(), key=lambda item: item[1].place):
        add(lines, f"## {claim.heading}", claim.paper and f"The paper: {claim.paper}.")
        claim.section(lines, name, claims, models)
    for kind, study in STUDIES.items():
        study_section(lines, kind, *study)
    tables_section(lines, "Classical baselines at the paper's scale", "baselines_", baselines_note)
    tables_section(lines, "Speed", "bench_")
    with harness.atomic(REPORT) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT} and its figures in {FIGURES}/")


def add(lines, *paragraphs):
    """Paragraphs, each with a blank line after it; an empty one is left out."""
    lines += [line for text in paragraphs if text for line in (text, "")]


def image(alt, name):
    return f"![{alt}](../{FIGURES}/{name}.png)"


def not_run(lines, *names, why="", after=""):
    commands = " && ".join(f"python experiments.py {name}" for name in names)
    add(lines, f"Not run yet{why}: `{commands}`{after}.")


def runs_section(lines, claims):
    """Every claim's runs in one table, with their wall times and machines; not the seeds'."""
    shown = [name for name, claim in claims.items() if claim.section is not seeds_section]
    paths = sorted(p for name in shown for p in glob.glob(f"{RESULTS}/{name}/*/run.json"))
    if not paths:
        return
    rows = []
    for path, r in zip(paths, map(read_json, paths)):
        c, wall = run_config(r), f"{r['seconds'] / 60:.1f} min" + " (diverged)" * ("diverged" in r)
        init = f"{c.embed_init:g} / {c.attn_init:g}"
        rows.append([os.path.dirname(path), c.task, looped.describe(c), f"{c.lr:g}", init, c.steps])
        rows[-1] += [wall, r["machine"], r["threads"], r["torch"]]
    add(
        lines,
        "## Runs",
        "Wall time: training and evaluation, as `run` measured it; runs made side by side "
        "with one thread each took longer than one alone would. Init: the std of the prompt's "
        "embedding and of the attention's q, k, v weights at initialisation (GPT-2's and the "
        f"paper's: 0.02 / 0.02; the laptop preset's: {looped.Config.embed_init:g} / "
        f"{looped.Config.attn_init:g}).",
        markdown("run,task,model,lr,init,steps,wall time,machine,threads,torch".split(","), rows),
    )


def pairs_section(lines, name, claims, models, sweep=False):
    """The looped model against the standard one on each task of the claim's verdicts: with sweep,
    each at its best rate in the claim's own sweep, shown first; else at the default rates and
    again at the best rates of the needed claim's sweep, where those runs exist."""
    claim, runs = claims[name], claim_runs(name)
    trained = {run_name for run_name, r in runs.items() if r.errors is not None}
    pairs, rates = [], best_rates(claim.needs, models) if claim.needs else {}
    best = sweep_section(name, models, lines) if sweep else None
    for task, expected, numbers in claim.verdicts:
        if sweep:
            pairs += [(task, *best, expected, numbers)] if best else []
        else:  # the same pair at the default rates, then at the sweep's, once if they are the same
            at_default = [run_name for run_name, t, _ in claim.runs if t == task]  # models' order
            at_best = [variant(n, rates.get(m)) for m, n in zip(models, at_default)]
            at_best = [b if b in trained else n for b, n in zip(at_best, at_default)]
            for a, b in dict.fromkeys([tuple(at_default), tuple(at_best)]):
                pairs.append((task, a, b, expected, numbers))
    if not pairs or not all(r in runs for _, a, b, *_ in pairs for r in (a, b)):
        return not_run(lines, name)
    compare_section(name, claim, pairs, runs, lines)
    c = runs[pairs[0][1]].cfg
    share = c.steps / looped.PAPER["steps"]
    add(lines, claim.caveat.format(steps=c.steps, share=share, d=c.n_dims))
    if sweep or not all(rates.values()):  # else: did they train at the needed sweep's best rates?
        return
    used = [{runs[pair[i]].cfg.lr for pair in pairs} for i in (1, 2)]  # each model's rates
    off = [
        f"the {model} model trained at lr {', '.join(f'{lr:g}' for lr in sorted(lrs))}, where "
        f"{claim.needs}'s sweep found {rates[model]:g} best on linear regression"
        for model, lrs in zip(models, used)
        if rates[model] not in lrs
    ]
    at = ", ".join(f"{m} {rates[m]:g}" for m in models)
    same = (
        f"a task's second pair has each model at the learning rate {claim.needs}'s sweep found "
        f"best for it on linear regression ({at}); which rate is best on this task is not measured"
    )
    add(lines, f"Not swept here: {'; '.join(off) or same}.")


def compare_section(name, claim, pairs, runs, lines):
    """For each (task, looped run, standard run, the paper's finding, its numbers): a table, a
    figure, and the verdict by the claim's rule."""
    seen = set()
    for task, a, b, expected, paper in pairs:
        (ca, ea, *_), (cb, eb, *_) = runs[a], runs[b]
        names = labels([ca, cb])
        # A task's second pair (at other learning rates) gets figures of its own.
        suffix = f"_{name}_{task}" + (f"_{b}" if task in seen else "")
        seen.add(task)
        named = [(names[0], ca, ea), (names[1], cb, eb)]  # the baselines: the first run's
        plots.plot(named, FIGURES, task, baselines.TASK_BASELINES[task], suffix)
        shown = [n for n in baselines.TASK_BASELINES[task] if n != "zero"][:4]
        L, S = ea["loops"][ca.n_loops - 1].tolist(), eb["loops"][0].tolist()
        ks = shown_ks(ca, last=True)
        rows = [[k, L[k], S[k], *(ea[n][k].item() for n in shown)] for k in ks]
        params = [looped.count_parameters(looped.LoopedTransformer(c))[0] for c in (ca, cb)]
        k = ca.n_points - 1 if claim.at_end else shown_ks(ca)[-1]
        found = claim.verdict(L[k], S[k])
        verdict = "Reproduced" if found == expected else "Not reproduced"
        said = f"**{verdict} at this scale.** The paper has {expected}: {paper}"
        said = said if expected else f"The paper gives no number ({paper})"
        add(
            lines,
            f"**{task}**, d = {ca.n_dims}, n = {ca.n_points}, {ca.eval_prompts} test prompts: "
            f"{names[0]} ({params[0]:,} parameters by the paper's count) against {names[1]} "
            f"({params[1]:,}), {ca.steps} steps each, at learning rates {ca.lr:g} and {cb.lr:g}.",
            markdown(["k", "looped", "standard", *shown], rows),
            image(f"{task}: error against in-context examples", f"error_vs_examples{suffix}"),
            f"{said}; here at k = {k} the looped model has {fmt(L[k])} and the standard one "
            f"{fmt(S[k])}: {found}.",
        )
        seed_spread(lines, k, [(a, runs[a]), (b, runs[b])], runs)


def seed_spread(lines, k, named, runs):
    """The runs named [(name, Run)] at their other seeds, where runs, {name: Run}, holds them."""
    for run_name, run in named:
        c, seeds = run.cfg, [r for n, r in runs.items() if n.startswith(f"{run_name}_seed")]
        loops = [c.n_loops - 1] + ([-1] if c.eval_loops > c.n_loops else [])  # b, and all loops
        spread = []
        for s in [run, *seeds]:
            at_k = [fmt(s.errors["loops"][t][k].item()) for t in loops] if s.errors else []
            spread.append(f"seed {s.cfg.seed}: {', '.join(at_k) or 'diverged'}")
        at = f"at b = {c.n_loops} loops, and at {c.eval_loops}" if loops[1:] else "at its one pass"
        text = f"The {looped.describe(c)} at k = {k} over seeds ({at}): {'; '.join(spread)}."
        add(lines, seeds and text)


def sweep_section(claim, models, lines):
    """The sweep's table and figures; each model's best run name, or None before the sweep."""
    sweeps = {model: sweep_runs(claim, model) for model in models}
    best = {model: best_run(claim, model, sweeps[model]) for model in models}
    if not all(best.values()):
        return None
    cfg = next(r.cfg for runs in sweeps.values() for r in runs.values())
    ks, k = shown_ks(cfg), shown_ks(cfg)[-1]
    rows = []
    for model, runs in sweeps.items():
        for lr, r in runs.items():
            name = model + " (best)" * (r.folder == best[model])
            if r.errors is None:
                rows.append([f"{lr:g}", name, "diverged", *["-"] * len(ks)])
            else:
                rows.append([f"{lr:g}", name, validation(r), *(at_b(r, j) for j in ks)])
    counts = " and ".join(sorted({str(len(r)) for r in sweeps.values()}))
    add(
        lines,
        f"Both models trained at each of {counts} learning rates, with everything else the same "
        f"({cfg.steps} steps, batch {cfg.batch_size}, the same prompts and curriculum). Each "
        f"model's best learning rate is the one with the lowest error at k = {k} on 256 validation "
        f"prompts at the last step, drawn apart from the {cfg.eval_prompts} test prompts that the "
        f"table's other columns and the comparison below use.",
        markdown(["lr", "model", f"validation, k = {k}", *(f"test, k = {j}" for j in ks)], rows),
        image("test error against learning rate", f"lr_sweep_{claim}"),
        image("validation error against training step", f"learning_curves_{claim}"),
    )
    plot_sweep(sweeps, best, k, claim)
    return [os.path.basename(best[model]) for model in models]


def plot_sweep(sweeps, best, k, claim):
    """Test error at k against learning rate; validation error at k against step, by model."""
    names = {m: looped.describe(next(iter(runs.values())).cfg) for m, runs in sweeps.items()}
    fig, ax = plots.figure(figsize=(6.5, 4.5))
    for i, (model, runs) in enumerate(sweeps.items()):
        trained = [(lr, at_b(r, k)) for lr, r in runs.items() if r.errors is not None]
        ax.loglog(*zip(*trained), "o-", color=f"C{i}", label=names[model])
        star = [(lr, e) for lr, e in trained if runs[lr].folder == best[model]]
        ax.plot(*zip(*star), "*", ms=16, color=f"C{i}")
        for lr in [lr for lr, r in runs.items() if r.errors is None]:
            ax.axvline(lr, color=f"C{i}", ls=":", label=f"{model} diverged at lr {lr:g}")
    ax.set(xlabel="Adam learning rate", ylabel=f"normalised squared error at k = {k} (test)")
    ax.set(title="learning-rate sweep (star: best by validation prompts)")
    save(fig, f"{FIGURES}/lr_sweep_{claim}.png", ax, fontsize=8)
    fig, axes = plots.figure(1, len(sweeps), figsize=(11, 4.2), sharey=True)
    for ax, (model, runs) in zip(axes, sweeps.items()):
        for i, (lr, r) in enumerate(runs.items()):
            is_best = r.folder == best[model]
            label = f"lr {lr:g}" + " (best)" * is_best + " (diverged)" * (r.errors is None)
            steps, errors_at_k = [s for s, _ in r.curve], [e[k] for _, e in r.curve]
            ax.semilogy(steps, errors_at_k, color=f"C{i}", lw=2.5 if is_best else 1.2, label=label)
        ax.set(title=names[model], xlabel="training step", ylabel=f"validation error at k = {k}")
    save(fig, f"{FIGURES}/learning_curves_{claim}.png", *axes, fontsize=8)


def seeds_section(lines, name, claims, models):
    """The default command over each seed: its error at the paper's k, the spread at k = 2d, and a
    figure of their training losses (where a seed sits on the plateau, and for how long)."""
    claim, runs = claims[name], claim_runs(name)
    seeds = [overrides["seed"] for _, _, overrides in claim.runs]
    runs = [runs[run_name] for run_name, _, _ in claim.runs if run_name in runs]
    if not runs:
        return not_run(lines, name)
    cfg, record = runs[0].cfg, runs[0].record
    ks, k2d = shown_ks(cfg), 2 * cfg.n_dims
    rows = [
        [r.cfg.seed, *(at_b(r, k) for k in ks), r.errors["loops"][-1][k2d].item()]
        + [f"{r.record['seconds'] / 60:.1f} min"]
        for r in runs
    ]
    ends = sorted(at_b(r, k2d) for r in runs)
    columns = ["seed", *[f"k = {k}" for k in ks], f"k = {k2d}, {cfg.eval_loops} loops", "wall time"]
    add(
        lines,
        f"`python looped.py --task linreg --loops 20 --seed S` for S = {seeds[0]} to {seeds[-1]} "
        f"({cfg.steps} steps; Adam's rate up to {cfg.lr:g} over {cfg.warmup} steps, down to 0 over "
        f"the last {cfg.decay}; the prompt's embedding and the attention initialised at std "
        f"{cfg.embed_init:g} and {cfg.attn_init:g}), made by `python experiments.py {name}` on "
        f"{record['machine']} with {record['threads']} thread per run, {claim.made}.",
        markdown(columns, rows),
        f"At k = 2d = {k2d} after b = {cfg.n_loops} loops, over {len(ends)} seeds: median "
        f"{fmt(statistics.median(ends))}, from {fmt(ends[0])} to {fmt(ends[-1])}; "
        f"{sum(map(claim.verdict, ends))} of {len(ends)} {claim.rule}.",
        image("training loss of each seed", name),
    )
    plot_seeds(runs, name, claim.heading)


def plot_seeds(runs, name, title):
    """Each seed's training loss against step, beside two estimators' loss at the last stage."""
    d, n = runs[0].cfg.n_dims, runs[0].cfg.n_points
    fig, ax = plots.figure(figsize=(7, 4.5))
    for i, r in enumerate(runs):
        steps, losses = zip(*[(line["step"], line["loss"]) for line in read_log(r.folder, "loss")])
        label = f"seed {r.cfg.seed}: {fmt(at_b(r, 2 * d))} at k = {2 * d}"
        ax.semilogy(steps, losses, color=f"C{i % 10}", lw=1.2, label=label)
    # Two estimators' loss at the last stage's d and n, averaged over the n positions k = 0 .. n-1:
    # least squares, (d - k) / d for k < d; and one step of gradient descent from 0 with the best
    # step for each k, w = X^T y / (k + d + 1), whose error is (d + 1) / (k + d + 1), a moment of
    # the Wishart distribution.
    for level, estimator, style in [
        (sum(max(d - k, 0) / d for k in range(n)) / n, "least squares", ":"),
        (sum((d + 1) / (k + d + 1) for k in range(n)) / n, "one step of gradient descent", "--"),
    ]:
        ax.axhline(level, color="k", ls=style, lw=1, label=f"{estimator} (d = {d}, n = {n})")
    ax.set(xlabel="training step", ylabel="training loss / d (d grows by the curriculum)")
    ax.set(title=title[0].lower() + title[1:])
    save(fig, f"{FIGURES}/{name}.png", ax, fontsize=7, ncol=2)


def step_flops(cfg):
    """FLOPs of one training step at the last curriculum stage (full d, n, b), as FlopCounterMode
    counts them: b block passes forward and T backward (looped), 12 of each (standard)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = looped.LoopedTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    xs, ys = looped.TASKS[cfg.task](cfg.batch_size, cfg.n_points, cfg.n_dims, cfg.n_dims, gen)
    with FlopCounterMode(display=False) as counter:
        b, no_grad = cfg.n_loops, cfg.n_loops - cfg.loop_window
        looped.train_step(model, opt, contextlib.nullcontext(), xs, ys, b, no_grad)
    return counter.get_total_flops()


def converge_section(lines, name, claims, models, times):
    """A sweep's best runs trained for `times` their steps: their errors, learning curves, the steps
    (and FLOPs) each takes to reach given errors, and the verdict by the claim's rule."""
    claim, runs = claims[name], list(claim_runs(name, curves=True).values())
    by_model = {m: [r for r in runs if (r.cfg.n_layer > 1) == (m == "standard")] for m in models}
    if not all(by_model.values()) or any(r.errors is None for r in runs):
        return not_run(lines, name, why=" (or a run diverged)", after=f", after {claim.needs}")
    cfg, seeds = by_model["looped"][0].cfg, sorted({r.cfg.seed for r in runs})
    ks, k = shown_ks(cfg), shown_ks(cfg)[-1]
    L, S = (statistics.mean(at_b(r, k) for r in by_model[m]) for m in ("looped", "standard"))
    rows, reach = result_rows(runs, ks, k, L)
    # Runs not trained from the sweep's best run as it is now: from an earlier sweep, or preset.
    best = {m: (folder := best_run(claim.needs, m)) and read_run(folder).cfg for m in models}
    stale = [m for m, rs in by_model.items() if not all(longer(r.cfg, best[m]) for r in rs)]
    add(
        lines,
        stale
        and f"These {' and '.join(stale)} runs were made from an earlier {claim.needs} sweep: "
        f"their learning rate or initialisation is not that of {claim.needs}'s best run now "
        f"(see the runs table). `rm -r results/{name}` and `python experiments.py {name}` train "
        "them again.",
    )
    reached = [*(f"to {fmt(x)}" for x in THRESHOLDS), f"to {fmt(L)} (looped's final)"]
    flat_end = cfg.steps - cfg.decay  # the last step at the peak rate
    add(
        lines,
        f"Each model at the learning rate {claim.needs}'s sweep found best for it"
        f"{' when they were made' if stale else ''}, for {cfg.steps:,} steps ({times} times the "
        f"preset's; Adam's rate warmed up over {cfg.warmup} steps and decayed to 0 over the last "
        f"{cfg.decay}), seeds {' and '.join(map(str, seeds))}, a validation point (256 prompts) "
        f"every {cfg.eval_every} steps; made by `python experiments.py {name}` on "
        f"{by_model['looped'][0].record['machine']}.",
        markdown(["run", "model", "seed", "lr", *(f"test, k = {j}" for j in ks)], rows),
        image("validation error of both models against training step", name),
        f"The first step whose validation error at k = {k} is at most each level (in brackets: the "
        f"training TFLOP to get there, at the full-size step's count; the curriculum's early steps "
        f"cost less), the GFLOP of one step at full size (batch {cfg.batch_size}), and the "
        f"training time from the log:",
        markdown(["run", *reached, "GFLOP per step", "training time"], reach),
        claim.caveat,
        converge_verdict(claim, by_model, seeds, k, L, S, flat_end),
    )
    plot_converge(by_model, seeds, k, flat_end, claim, name)


def longer(cfg, best):
    """Whether a run is the sweep's best run trained again, with only its steps and seed changed."""
    keep = ("steps", "seed", "ckpt_every", "out")
    return bool(best) and dataclasses.replace(cfg, **{k: getattr(best, k) for k in keep}) == best


def result_rows(runs, ks, k, target):
    """converge's two tables: each run's test error at ks; and the steps (and TFLOP) it took to
    reach each level of validation error at k, with its training time from the log."""
    rows, reach, flops = [], [], {}
    for r in runs:
        c, run_name = r.cfg, os.path.basename(r.folder)
        f = flops[c.n_layer] = flops.get(c.n_layer) or step_flops(c)  # one count per model
        rows.append([run_name, looped.describe(c), c.seed, f"{c.lr:g}", *(at_b(r, j) for j in ks)])
        # The first step whose validation error at k is at most each level, None if none is.
        steps = [next((s for s, e in r.curve if e[k] <= x), None) for x in THRESHOLDS + [target]]
        reached = ["-" if s is None else f"{s:,} ({s * f / 1e12:.3g})" for s in steps]
        # The training time: the log's ms per step, over all the run's sessions.
        seconds = sum(ms for _, ms in step_times(r.folder)) / 1000
        reach.append([run_name, *reached, f"{f / 1e9:.2f}", f"{seconds / 60:.0f} min"])
    least_squares = runs[0].errors["least squares"]  # the same test prompts
    rows.append(["least squares", "", "", "", *(least_squares[j].item() for j in ks)])
    return rows, reach


def converge_verdict(claim, by_model, seeds, k, L, S, flat_end):
    """The verdict by the claim's rule: the mean test errors at k, and how far the model behind fell
    (first seed) over the last eighth of its peak-rate steps against its spread over seeds."""
    behind = "standard" if S > L else "looped"

    def at(run, step):  # the validation error at k at the run's curve point nearest the step
        return min(run.curve, key=lambda p: abs(p[0] - step))[1][k]

    first = next(r for r in by_model[behind] if r.cfg.seed == seeds[0])
    fall = at(first, flat_end * 7 / 8) - at(first, flat_end)
    ends = [at(r, flat_end) for r in by_model[behind]]
    spread = max(ends) - min(ends)
    _, expected, _ = claim.verdicts[0]  # converge's one task: linear regression
    found, verdict = claim.verdict(L, S, fall, spread, expected)
    outcome = (
        f"at k = {k}, the mean over {in_words(len(seeds))} seeds of the test error is {fmt(L)} for "
        f"the looped model and {fmt(S)} for the standard one: {found}"
    )
    if verdict == "Not settled":
        return (
            f"**Not settled: the {behind} model is still improving at {first.cfg.steps:,} steps.** "
            f"{outcome[0].upper()}{outcome[1:]}; over the last eighth of the steps at the peak "
            f"rate (to step {flat_end:,}) its validation error (seed {seeds[0]}) fell by "
            f"{fmt(fall)}, more than the spread over seeds ({fmt(spread)})."
        )
    why = f"; the {behind} model's curve fell by less than the spread over seeds over the last "
    why = "" if verdict == "Reproduced" else why + "eighth of its peak-rate steps"
    return f"**{verdict} at this scale.** The paper has {expected}; {outcome}{why}."


def plot_converge(by_model, seeds, k, flat_end, claim, name):
    """Both models' validation curves at k, the first seed's solid, against the thresholds."""
    fig, ax = plots.figure(figsize=(7, 4.5))
    for i, rs in enumerate(by_model.values()):
        for r in rs:
            label = f"{looped.describe(r.cfg)}, lr {r.cfg.lr:g}, seed {r.cfg.seed}"
            ls = "-" if r.cfg.seed == seeds[0] else "--"
            ax.semilogy(*zip(*[(s, e[k]) for s, e in r.curve]), color=f"C{i}", ls=ls, label=label)
    for level in THRESHOLDS:
        ax.axhline(level, color="gray", lw=0.6, ls=":")
    ax.axvline(flat_end, color="k", lw=0.8, ls=":", label="the learning rate's decay starts")
    ax.set(xlabel="training step", ylabel=f"validation error at k = {k}")
    ax.set(title=f"{claim.needs} to convergence")
    save(fig, f"{FIGURES}/{name}.png", ax, fontsize=7)


def window_section(lines, name, claims, models, base):
    """The loop past b for each window T (`base`: the needed claim's run at the default window)."""
    claim = claims[name]
    names = [f"{claim.needs}/{base}"] + [f"{name}/{n}" for n, *_ in claim.runs]
    folders = [f"{RESULTS}/{n}" for n in names]
    if not all(map(done, folders)):
        return not_run(lines, claim.needs, name)
    named = [(f"T = {r.cfg.loop_window}", r.cfg, r.errors) for r in map(read_run, folders)]
    solvers = read_json(os.path.join(RESULTS, name, "solvers.json"))  # lists, beside the metadata
    solvers = {k: torch.tensor(v) for k, v in solvers.items() if isinstance(v, list)}
    linreg = baselines.TASK_BASELINES["linreg"]
    plots.plot(named, FIGURES, "linreg, windows", linreg, f"_{name}", solvers)
    cfg = named[0][1]
    last, b, loops = cfg.n_points - 1, cfg.n_loops, cfg.eval_loops
    rows, settled = [], []
    for window, _, errors in named:  # the error at the last k after b, best (where), 2b, all
        curve = errors["loops"][:, last].tolist()
        best = f"{fmt(min(curve))} ({curve.index(min(curve)) + 1})"
        ratio = f"{curve[-1] / curve[b - 1]:.2f}"
        rows.append([window, curve[b - 1], best, curve[2 * b - 1], curve[-1], ratio])
        settled += [window] if claim.verdict(float(ratio)) else []
    columns = ["window", "at b", "best (at loop)", "at 2b", f"at {loops}", f"{loops} / b"]
    drifted = [window for window, *_ in rows if window not in settled]
    settles = "diverges past b did not reproduce**: the small windows settle, at a higher error."
    warning = settles if rows[-1][0] in settled else "diverges past b: reproduced**."  # T = 1
    add(
        lines,
        f"Error at k = {last} against loop iterations, to {loops} = {loops // b} b (b = {b}); "
        f"gradient descent and Newton's iteration on the same prompts in the figure.",
        markdown(columns, rows),
        image("error against loop iterations, four windows", f"error_vs_loops_{name}"),
        f"**The fixed point: reproduced for {', '.join(settled) or 'no window'}"
        + (f", not for {', '.join(drifted)}" if drifted else "")
        + f"**, taking 'settled' as an error at {loops} loops {claim.rule}. "
        f"**The paper's warning that a too-small window {warning}",
    )


def shift_section(lines, name, claims, models, shifts):
    """The needed claim's best runs under each shift; under how many the looped model is ahead."""
    claim = claims[name]
    files = [os.path.join(RESULTS, name, f"{s}.json") for s in shifts]
    if not all(map(os.path.isfile, files)):
        return not_run(lines, claim.needs, name)
    rows, behind = [], []
    for record in map(read_json, files):
        ra, rb = record["runs"].values()
        cfg = run_config(ra)
        ks = shown_ks(cfg)
        L = [ra["loops"][cfg.n_loops - 1][k] for k in ks]
        S = [rb["loops"][0][k] for k in ks]
        rows.append([record["shift"], *L, *S, *(ra["least squares"][k] for k in ks)])
        behind += [] if claim.verdict(L[-1], S[-1]) else [record["shift"]]
    head = [f"{who}, k = {k}" for who in ("looped", "standard", "least squares") for k in ks]
    lrs = " and ".join(f"{run_config(r).lr:g}" for r in record["runs"].values())
    add(
        lines,
        f"Normalised by E[y^2] under the shift; {cfg.eval_prompts} prompts; {claim.needs}'s runs "
        f"at learning rates {lrs} (looped, standard), each model's best.",
        markdown(["shift", *head], rows),
        f"With no number in the paper to reproduce: the looped model is ahead of the standard one "
        f"at k = {ks[-1]} under {len(rows) - len(behind)} of the {len(rows)} shifts"
        + (f"; not under {', '.join(behind)} ({claim.rule})." if behind else "."),
    )


def paper_section(lines, name, claims, models, numbers):
    """A run at the paper's scale: its test errors at the paper's k after b and 5 b loops beside the
    paper's (numbers, {k: error after b loops}) and least squares', its learning curve, the verdict
    by the claim's rule at the last k."""
    claim = claims[name]
    r = claim_runs(name, curves=True).get(claim.runs[0][0])
    if r is None:
        return not_run(lines, name, after=": minutes on a GPU")
    if r.errors is None:
        return add(lines, f"The run in {r.folder} diverged: {r.record['diverged']}.")
    ks, paper = list(numbers), looped.make_config("linreg", "paper")
    c, record, k = r.cfg, r.record, ks[-1]
    resumed = record.get("resumed_at_step")
    took = f"{record['seconds'] / 60:.1f} min" + (f" from step {resumed:,}" if resumed else "")
    loops = sorted({c.n_loops, min(5 * c.n_loops, c.eval_loops)})
    rows = [[f"looped, {t} loops", *r.errors["loops"][t - 1][ks].tolist()] for t in loops]
    rows.append(["least squares", *r.errors["least squares"][ks].tolist()])
    rows.append(
        [f"the paper's looped, {c.n_loops} loops, {paper.steps:,} steps", *numbers.values()]
    )
    ours, share = at_b(r, k), c.steps / paper.steps
    verdict = "Reproduced" if claim.verdict(ours, numbers[k]) else "Not reproduced"
    add(
        lines,
        f"`python experiments.py {name}` on {record['machine']}, {took} (training and "
        f"evaluation): {looped.describe(c)}, d = {c.n_dims}, n = {c.n_points}, D = {c.n_embd}, "
        f"{c.n_head} heads, batch {c.batch_size}, for {c.steps:,} steps ({share:.1%} of the "
        f"paper's {paper.steps:,}). Adam's rate rises to {c.lr:g} over "
        f"{c.warmup} steps and falls to 0 over the last {c.decay:,} (the paper: {paper.lr:g} "
        f"throughout); d and n grow every {c.curriculum_every} steps and b by 2 every "
        f"{c.loops_every}, the paper's pace scaled to the steps; the prompt's embedding and the "
        f"attention start at std {c.embed_init:g} and {c.attn_init:g}. {c.eval_prompts} test "
        "prompts.",
        markdown(["", *(f"k = {j}" for j in ks)], rows),
        image("validation error against training step, at the paper's scale", name),
        f"**{verdict} in {c.steps:,} steps**, taking 'reproduced' as an error {claim.rule}: at k = "
        f"{k} after b loops the looped model has {fmt(ours)}, the paper {fmt(numbers[k])}.",
    )
    fig, ax = plots.figure(figsize=(7, 4.5))
    for i, j in enumerate(ks):
        ax.semilogy(*zip(*[(s, e[j]) for s, e in r.curve]), color=f"C{i}", label=f"k = {j}")
        ax.axhline(numbers[j], color=f"C{i}", ls=":", lw=1, label=f"the paper's, k = {j}")
    ax.set(xlabel="training step", ylabel="validation error after b loops (256 prompts)")
    ax.set(title=f"linear regression, d = {c.n_dims}, D = {c.n_embd}: the learning curve")
    save(fig, f"{FIGURES}/{name}.png", ax, fontsize=7, ncol=2)


STUDIES = {  # the studies of single runs: their section's title and introduction, table, figure
    "probe": (
        "What the loop computes: linear probes of the loop state",
        "After each loop iteration t, a ridge probe (fitted on half of the fresh prompts, R^2 on"
        " the other half) reads a quantity of the in-context data for the last query from the loop"
        " state: at the token whose read-out predicts the last y, or averaged over all tokens. The"
        " gaps compare the model's prediction after t loops with gradient descent's and Newton's"
        " after t steps, normalised like the error.",
        probe_table,
        plot_probe,
    ),
    "adaptive": (
        "Adaptive depth: a loop that stops when it has converged",
        "Each test prompt runs until the relative change of its predictions (or of its loop state)"
        " between two iterations falls below the tolerance, then freezes; the same rule as"
        " `export.py --until-converged`.",
        adaptive_table,
        plot_adaptive,
    ),
}


def study_section(lines, kind, title, intro, table, plot):
    """The studies (experiments.save_study) of one kind: each one's command, table and figure."""
    files = sorted(glob.glob(os.path.join(RESULTS, kind, "*.json")))
    if files:
        add(lines, f"## {title}", intro)
    for path in files:
        record, name = read_json(path), os.path.splitext(os.path.basename(path))[0]
        made = f"`{record['command']}` on {record['machine']}, torch {record['torch']}:"
        add(lines, made, table(record), image(f"{kind} of {name}", f"{kind}_{name}"))
        plot(record, f"{FIGURES}/{kind}_{name}.png")


def tables_section(lines, title, prefix, note=""):
    """Saved tables (bench.Table.save), results/PREFIX*.json, under a heading."""
    files = sorted(glob.glob(os.path.join(RESULTS, f"{prefix}*.json")))
    if files:
        add(lines, f"## {title}", note)
    for r in map(read_json, files):
        made = f"`{r['command']}` on {r['machine']}, torch {r['torch']}, {r['threads']} threads"
        add(lines, f"{made}, {r['date']}:", r["title"], markdown(r["columns"], r["text"]))
