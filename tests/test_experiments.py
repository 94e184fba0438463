"""Tests of experiments.py (with report.py where a claim is run and reported): shifted prompts,
several runs compared, the claims, the probes, and the report written from their results."""

import contextlib
import dataclasses
import json
import os
import shutil

import pytest
import torch
from common import draw, refused, run_cli, slow, tiny_config
from fuzzing import FUZZ, NUMBERS, fuzz_args, fuzz_cli
from hypothesis import given
from hypothesis import strategies as st

import baselines
import bench
import experiments
import export
import harness
import looped
import report


def shifted(name, B=4, n=11, d=6, seed=0):
    return experiments.sample_shifted(name, B, n, d, torch.Generator().manual_seed(seed))


def test_skewed_and_half_subspace_covariances():
    """Covariance eigenvalues, from 20,000 points of one prompt (sampling error ~1%): 1/i^2 scaled
    to trace d for skewed; d/2 eigenvalues of 2 and d/2 exact zeros for the half subspace."""
    d = 6
    for name, expected in [
        ("skewed", 1 / torch.arange(1, d + 1.0) ** 2),
        ("half_subspace", torch.tensor([1.0] * 3 + [0.0] * 3)),
    ]:
        xs, ys, norm = shifted(name, B=2, n=20_000, d=d)
        assert xs.shape == (2, 20_000, d) and norm == d
        expected = expected * d / expected.sum()
        for x in xs.double():
            eig = torch.linalg.eigvalsh(x.T @ x / len(x)).flip(0)
            torch.testing.assert_close(eig, expected.double(), rtol=0.05, atol=1e-9)
        # Each prompt has a rotation of its own, so the two covariances differ.
        assert not torch.allclose(xs[0].T @ xs[0], xs[1].T @ xs[1], rtol=0.1)


def test_scaled_and_noisy_prompts():
    d, n = 5, 4000
    for name, x_std, norm in [
        ("scale_x=3", 3.0, 45.0),
        ("scale_y=0.5", 1.0, 1.25),
        ("noisy_y", 1.0, 6.0),
    ]:
        xs, ys, normaliser = shifted(name, B=64, n=n, d=d)
        assert xs.shape == (64, n, d) and normaliser == norm
        assert abs(xs.std().item() - x_std) < 0.02 * x_std
        assert abs(ys.pow(2).mean().item() / norm - 1) < 0.2  # E[y^2] is the normaliser (64 w's)
        w = torch.linalg.lstsq(xs.double(), ys.double()[..., None]).solution
        residual = (ys.double() - (xs.double() @ w)[..., 0]).std().item()
        assert abs(residual - (1.0 if name == "noisy_y" else 0.0)) < 0.03, name


def test_query_prompts_geometry():
    """Query prompt i of a test prompt holds x_1 .. x_i, then queries; only position i counts."""
    n, d = 9, 5
    for name in ["random_quadrants", "orthogonal", "overlapping"]:
        rows, ys, norm = shifted(name, B=8, n=n, d=d)
        m = d if name == "orthogonal" else n
        assert rows.shape == (8, m, n, d) and ys.shape == (8, m, n)
        for i in range(1, m):
            context, query = rows[:, i, :i], rows[:, i, i]  # (B, i, d), (B, d)
            # Every row holds the same in-context points.
            torch.testing.assert_close(context, rows[:, -1, :i])
            if name == "random_quadrants":  # in-context points share one orthant; queries need not
                assert (context.sign() == context[:, :1].sign()).all()
            if name == "orthogonal":
                assert (context @ query[..., None]).abs().max() < 1e-4
                torch.testing.assert_close(query.norm(dim=1), rows[:, -1, i].norm(dim=1))
            if name == "overlapping":
                assert ((context - query[:, None]).abs().sum(2) == 0).any(1).all()
        if name == "random_quadrants":
            queries = rows[:, 0]  # row 0 is all queries: any orthant
            assert not (queries.sign() == queries[:, :1].sign()).all()
        w = torch.linalg.lstsq(rows.reshape(8, m * n, d), ys.reshape(8, m * n, 1)).solution
        torch.testing.assert_close(
            (rows.reshape(8, m * n, d) @ w)[..., 0], ys.reshape(8, m * n), atol=1e-4, rtol=1e-4
        )


def test_query_prompts_are_scored_at_their_query_position_only():
    """Column i of the errors under a query shift is the error at position i of the prompts that
    ask their query at i, computed here directly for the model and for least squares."""
    cfg = tiny_config(eval_prompts=12)
    torch.manual_seed(0)
    model = looped.LoopedTransformer(cfg).eval()
    xs, ys, norm = experiments.sample_shifted(
        "orthogonal", 12, 9, 4, torch.Generator().manual_seed(cfg.eval_seed)
    )
    errors, classical = experiments.errors_on(
        [(cfg, model, contextlib.nullcontext())], cfg, (xs, ys, norm)
    )
    assert xs.shape == (12, 4, 9, 4)  # orthogonal queries exist for i < d = 4
    with torch.no_grad():
        predict = [model(xs[:, i], ys[:, i], cfg.eval_loops)[:, :, i] for i in range(4)]
        preds = torch.stack(predict, -1)  # (B, t, m)
    torch.testing.assert_close(
        errors["loops"][:, :4], ((preds - ys.diagonal(0, 1, 2)[:, None]) ** 2).mean(0) / norm
    )
    lsq = torch.stack([baselines.least_squares(xs[:, i], ys[:, i])[:, i] for i in range(4)], -1)
    torch.testing.assert_close(
        classical["least squares"][:4], ((lsq - ys.diagonal(0, 1, 2)) ** 2).mean(0) / norm
    )
    assert errors["loops"][:, 4:].isnan().all() and classical["least squares"][4:].isnan().all()


def test_compare_runs_the_baselines_once_and_the_solvers_to_the_longest_run(tmp_path, monkeypatch):
    """compare A B C on the same prompts: one set of baselines, gradient descent and Newton once,
    as far as the run with the most evaluation loops; each run's errors equal its own evaluation."""
    runs = [tmp_path / name for name in "abc"]
    for run, loops in zip(runs, [6, 10, 8]):
        looped.train(tiny_config(run, steps=2, eval_loops=loops), quiet=True)
    calls = []
    for name, fn in list(baselines.ITERATES.items()):
        monkeypatch.setitem(
            baselines.ITERATES, name, lambda *a, fn=fn: calls.append(a[2]) or fn(*a)
        )
    monkeypatch.setitem(
        baselines.BASELINES,
        "3-NN",
        lambda *a, fn=baselines.BASELINES["3-NN"]: calls.append("3-NN") or fn(*a),
    )
    named, solvers = experiments.compare([str(run) for run in runs], str(tmp_path / "cmp"))
    assert calls == ["3-NN", 10, 10] and len(solvers["gradient descent"]) == 10
    saved = json.load(open(runs[1] / "eval.json"))
    torch.testing.assert_close(
        named[1][2]["loops"], torch.tensor(saved["loops"]), rtol=1e-5, atol=1e-6
    )
    assert os.path.isfile(tmp_path / "cmp" / "error_vs_loops.png")


def test_compare_of_two_runs_under_a_shift_draws_one_comparison(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    looped.train(tiny_config(a, steps=2), quiet=True)
    looped.train(
        tiny_config(b, steps=2, n_layer=2, n_loops=1, loop_window=1, eval_loops=1), quiet=True
    )
    r = run_cli(
        experiments.main,
        "compare",
        str(a),
        str(b),
        "--shift",
        "orthogonal",
        "--out",
        str(tmp_path / "cmp"),
    )
    assert r.returncode == 0, r.stderr
    assert "transformer, 2 layers" in r.stdout and "looped, b = 6, T = 3" in r.stdout
    assert os.path.isfile(tmp_path / "cmp" / "error_vs_examples_orthogonal.png")
    # The shifted prompts are the test prompts' draw (eval_seed), shifted: the same for every run.
    named, _ = experiments.compare([str(a), str(b)], str(tmp_path / "cmp2"), shift="orthogonal")
    runs = experiments.load_runs([str(a), str(b)], {})
    cfg = runs[0][0]
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    test = experiments.sample_shifted("orthogonal", cfg.eval_prompts, 9, 4, gen)
    for (_, _, got), expected in zip(named, experiments.errors_on(runs, cfg, test)):
        assert torch.allclose(got["loops"], expected["loops"], equal_nan=True)
    for args, words in [
        (["compare", str(a), "--shift", "tilted"], "unknown shift"),
        (["compare", str(a), "/nonexistent/run"], "no checkpoint"),
        (["baselines", "--task", "quadratic"], "invalid choice"),
        (["claim9"], "invalid choice"),
        (["baselines", "--k", "50"], "--k must be in 0 .. n-1 = 40"),
    ]:
        r = run_cli(experiments.main, *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    # A run saved with --device cuda (a GPU's) compares here with --device cpu, and only so.
    ckpt = torch.load(a / "ckpt.pt", weights_only=False)
    ckpt["config"]["device"] = "cuda"
    torch.save(ckpt, a / "ckpt.pt")
    if not torch.cuda.is_available():
        line = refused(experiments.main, "compare", str(a), "--out", str(tmp_path / "cmp3"))
        assert "was trained with --device cuda, not available here: give --device" in line
    r = run_cli(
        experiments.main, "compare", str(a), "--device", "cpu", "--out", str(tmp_path / "c")
    )
    assert r.returncode == 0 and os.path.isfile(tmp_path / "c" / "error_vs_examples.png"), r.stderr


def test_baselines_table_at_paper_scale_agrees_with_the_paper(capsys):
    """Least squares at k = d/2 has error (d - k) / d = 0.5 in expectation; the paper's 0.515."""
    experiments.baseline_table(
        "linreg", 20, 41, 256, [10, 40], 1234, ["least squares", "averaging"]
    )
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("least squares")
    )
    assert abs(float(row.split()[2]) - 0.5) < 0.06 and float(row.split()[3]) < 1e-6


def test_claim_runs_are_recorded_kept_and_reported(tmp_path, monkeypatch):
    """A claim trains its runs once (a second call keeps them), records run.json with the machine,
    and report writes the same results.md twice from those files alone. claim1 is a learning-rate
    sweep of both models: each model's best by the validation prompts, then trained with another
    seed."""
    monkeypatch.chdir(tmp_path)
    small = dict(
        n_dims=4,
        n_points=9,
        n_embd=32,
        n_head=2,
        steps=4,
        log_every=2,
        ckpt_every=4,
        eval_prompts=16,
        eval_every=2,
    )
    models = {
        "looped": dict(small, n_loops=6, loop_window=3),
        "standard": dict(small, n_layer=2, n_loops=1, eval_loops=1),
    }
    monkeypatch.setattr(experiments, "MODELS", models)
    sweep = [
        (f"{m}_lr{lr:g}", "linreg", dict(o, lr=lr))
        for lr in (1e-3, 3e-3)
        for m, o in models.items()
    ]
    claim1 = dataclasses.replace(experiments.CLAIMS["claim1"], runs=sweep)
    monkeypatch.setitem(experiments.CLAIMS, "claim1", claim1)
    experiments.claim("claim1")
    record = json.load(open("results/claim1/looped_lr0.001/run.json"))
    assert (
        record["machine"] == bench.machine()
        and record["config"]["steps"] == 4
        and record["seconds"] > 0
    )
    before = os.path.getmtime("results/claim1/looped_lr0.001/eval.json")
    experiments.claim("claim1")
    # Kept, not trained again.
    assert os.path.getmtime("results/claim1/looped_lr0.001/eval.json") == before
    # Not kept when made by another config, as by an earlier preset.
    with pytest.raises(harness.UserError, match="holds a run of another config"):
        experiments.run(
            "claim1", "looped_lr0.001", "linreg", **dict(models["looped"], lr=1e-3, steps=5)
        )
    # As if interrupted after its last checkpoint:
    os.remove("results/claim1/standard_lr0.001/run.json")
    experiments.claim("claim1")  # continues from the checkpoint: nothing to train, evaluated again
    assert json.load(open("results/claim1/standard_lr0.001/run.json"))["resumed_at_step"] == 4
    for model in models:  # the best: the lowest validation error at k = 2d = 8 at the last step
        val = {}
        for lr in (1e-3, 3e-3):
            log = open(f"results/claim1/{model}_lr{lr:g}/log.jsonl")
            val[lr] = [json.loads(line) for line in log][-1]["val_error"][8]
        best = f"results/claim1/{model}_lr{min(val, key=val.get):g}"
        assert report.best_run("claim1", model) == best
        assert json.load(open(f"{best}_seed43/run.json"))["config"]["seed"] == 43
    claim3 = [
        (f"{name}_{m}", task, models[m])
        for name, task in (("tree", "decision_tree"), ("relu", "relu_2nn"))
        for m in models
    ]
    monkeypatch.setitem(
        experiments.CLAIMS, "claim3", dataclasses.replace(experiments.CLAIMS["claim3"], runs=claim3)
    )
    # Each run at the default 6e-4, then again at claim1's best rate for its model.
    experiments.claim("claim3")
    lrs = {
        m: json.load(open(f"{report.best_run('claim1', m)}/run.json"))["config"]["lr"]
        for m in models
    }
    assert sorted(os.listdir("results/claim3")) == sorted(
        f"{name}_{m}{suffix}"
        for name in ("tree", "relu")
        for m in models
        for suffix in ("", f"_lr{lrs[m]:g}", f"_lr{lrs[m]:g}_seed43")
    )
    lr = lrs["standard"]
    experiments.write_report()
    first = open("docs/results.md").read()
    experiments.write_report()
    assert open("docs/results.md").read() == first
    assert "## claim1" in first and "Not run yet: `python experiments.py claim2`" in first
    claim3 = first.split("## claim3")[1].split("## claim4")[0]
    assert (
        claim3.count("**decision_tree**") == 2
        and f"at learning rates {lrs['looped']:g} and {lr:g}" in claim3
    )
    assert claim3.count("over seeds") == 4  # each best-rate run of each task, with its seed-43 run
    assert os.path.isfile(f"figures/error_vs_examples_claim3_relu_2nn_relu_standard_lr{lr:g}.png")
    assert "| 0.003 | standard" in first and "over seeds" in first
    for figure in ("error_vs_examples_claim1_linreg", "lr_sweep_claim1", "learning_curves_claim1"):
        assert os.path.isfile(f"figures/{figure}.png")


def test_converge_trains_claim1s_best_runs_longer_and_reads_the_verdict_from_the_curves(
    tmp_path, monkeypatch
):
    """converge trains each model at claim1's best rate for CONVERGE times its steps, two seeds; the
    report's verdict follows the paper's 25% criterion, unless the model behind still improves (its
    curve falls over the last eighth by more than the seed spread)."""
    monkeypatch.chdir(tmp_path)
    small = dict(
        n_dims=4,
        n_points=9,
        n_embd=32,
        n_head=2,
        steps=4,
        log_every=2,
        ckpt_every=4,
        eval_prompts=16,
        eval_every=2,
        warmup=0,
        decay=0,
    )
    models = {
        "looped": dict(small, n_loops=6, loop_window=3),
        "standard": dict(small, n_layer=2, n_loops=1, eval_loops=1),
    }
    monkeypatch.setattr(experiments, "MODELS", models)
    sweep = [
        (f"{m}_lr{lr:g}", "linreg", dict(o, lr=lr))
        for lr in (1e-3, 3e-3)
        for m, o in models.items()
    ]
    claim1 = dataclasses.replace(experiments.CLAIMS["claim1"], runs=sweep)
    monkeypatch.setitem(experiments.CLAIMS, "claim1", claim1)
    with pytest.raises(harness.UserError, match="run python experiments.py claim1 first"):
        experiments.claim("converge")
    # The sweep alone: no seed-43 runs.
    for name, task, overrides in experiments.CLAIMS["claim1"].runs:
        experiments.run("claim1", name, task, **overrides)
    experiments.claim("converge")
    lrs = {
        m: json.load(open(f"{report.best_run('claim1', m)}/run.json"))["config"]["lr"]
        for m in models
    }
    names = [f"{m}_lr{lrs[m]:g}{seed}" for m in models for seed in ("", "_seed43")]
    assert sorted(os.listdir("results/converge")) == sorted(names)
    configs = {n: json.load(open(f"results/converge/{n}/run.json"))["config"] for n in names}
    assert {
        (c["steps"], c["seed"], c["lr"]) for n, c in configs.items() if n.startswith("looped")
    } == {
        (4 * experiments.CONVERGE, 42, lrs["looped"]),
        (4 * experiments.CONVERGE, 43, lrs["looped"]),
    }

    def verdict(looped_end, standard_ends, standard_fall):
        """The report's verdict with the test errors at k = 8 and the standard model's curves
        set."""
        for n in names:
            folder, standard = f"results/converge/{n}", n.startswith("standard")
            end = standard_ends[n.endswith("seed43")] if standard else looped_end
            errors = json.load(open(f"{folder}/eval.json"))
            errors["loops"] = [[end] * 9 for _ in errors["loops"]]
            json.dump(errors, open(f"{folder}/eval.json", "w"))
            log = [json.loads(line) for line in open(f"{folder}/log.jsonl")]
            # The curve falls linearly by standard_fall to its end at the last step.
            for r in log:
                if "val_error" in r:
                    fall = standard_fall * (1 - r["step"] / configs[n]["steps"]) if standard else 0
                    r["val_error"] = [end + fall] * 9
            open(f"{folder}/log.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in log))
        lines = []
        experiments.CLAIMS["converge"].section(lines, "converge", experiments.CLAIMS, models)
        return next(line for line in lines if line.startswith("**"))

    assert verdict(0.02, (0.021, 0.023), 0.5).startswith("**Reproduced")  # within 25%
    # Flat, at 10 times the error:
    assert verdict(0.02, (0.2, 0.21), 0.0).startswith("**Not reproduced")
    assert verdict(0.02, (0.2, 0.21), 0.5).startswith(
        "**Not settled: the standard model is still improving"
    )
    # Falling, but by less than its spread over seeds:
    assert verdict(0.02, (0.2, 0.4), 0.05).startswith("**Not reproduced")
    lines = []
    experiments.CLAIMS["converge"].section(lines, "converge", experiments.CLAIMS, models)
    text = "\n".join(lines)
    # Each run's row twice: in the errors, then in the steps to reach each level.
    assert text.count("\n| looped_lr") == text.count("\n| standard_lr") == 4
    assert "to 0.0200 (looped's final)" in text and os.path.isfile("figures/converge.png")
    assert "earlier claim1 sweep" not in text
    # The sweep run again, its best looped run now another: the converge runs say they are older.
    shutil.rmtree(report.best_run("claim1", "looped"))
    lines = []
    experiments.CLAIMS["converge"].section(lines, "converge", experiments.CLAIMS, models)
    assert "These looped runs were made from an earlier claim1 sweep" in "\n".join(lines)


def test_the_verdict_rules_are_in_the_claims_records():
    """The rules that the report renders: the paper's match within 25%, converge waiting on a model
    still improving, claim4's settled window, claim5's lead (a NaN is no lead), the seeds' good
    runs; and the report's order of sections, from the records."""
    e, claims = experiments, experiments.CLAIMS
    assert e.finding(1.0, 1.25) == e.MATCH == "the two matching (within 25%)"
    assert (e.finding(1.0, 1.26), e.finding(1.26, 1.0)) == (e.LOOPED_AHEAD, e.STANDARD_AHEAD)
    assert e.converged(1.0, 2.0, 0.1, 0.05, e.MATCH) == (e.LOOPED_AHEAD, "Not settled")
    assert e.converged(1.0, 2.0, 0.01, 0.05, e.MATCH) == (e.LOOPED_AHEAD, "Not reproduced")
    assert e.converged(1.0, 1.1, 1.0, 0.0, e.MATCH) == (e.MATCH, "Reproduced")
    assert claims["claim4"].verdict(1.5) and not claims["claim4"].verdict(1.51)
    assert claims["claim5"].verdict(0.1, 0.2) and not claims["claim5"].verdict(float("nan"), 0.2)
    assert claims["seeds"].verdict(0.05) and not claims["seeds"].verdict(0.051)
    assert claims["paper"].verdict(1.25, 1.0) and not claims["paper"].verdict(1.26, 1.0)
    order = sorted(claims, key=lambda name: claims[name].place)
    assert order == ["seeds", "claim1", "claim2", "claim3", "converge", "claim4", "claim5", "paper"]


def test_the_paper_scale_run_is_the_papers_model_on_a_schedule_scaled_to_its_steps():
    """paper: --preset paper's linear regression (d 20, n 41, D 256, 8 heads, b 20, T 15, batch 64);
    d, n and b grow over the same 15% of the steps as over the paper's 500k, the learning rate
    warms up as the laptop preset's and decays over the same share of the run."""
    steps = experiments.PAPER_SCALE
    cfg = looped.make_config("linreg", **experiments.paper_scale())
    sizes = (cfg.n_dims, cfg.n_points, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.batch_size)
    assert sizes == (20, 41, 256, 8, 1, 64) and (cfg.n_loops, cfg.loop_window) == (20, 15)
    assert cfg.steps == steps and cfg.compile and cfg.eval_every == steps // 40
    paper = looped.make_config("linreg", "paper")
    for c in (cfg, paper):  # the step at which the curriculum is complete, as a share of the run
        full = looped.curriculum(c, c.steps)
        first = next(s for s in range(0, c.steps, 10) if looped.curriculum(c, s) == full)
        assert first / c.steps == pytest.approx(0.15, abs=0.002)
    assert looped.curriculum(cfg, 24)[2] == 17 and looped.curriculum(cfg, 23)[2] == 15  # b: 2 more
    laptop = looped.Config()
    assert (cfg.lr, cfg.warmup) == (laptop.lr, laptop.warmup)
    assert cfg.decay / cfg.steps == pytest.approx(laptop.decay / laptop.steps, abs=1e-4)
    assert looped.learning_rate(cfg, steps - 1) < looped.learning_rate(cfg, steps - cfg.decay)


def test_the_paper_scale_section_says_when_its_run_is_missing_or_diverged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiments.write_report()
    section = open("docs/results.md").read().split("## The paper's scale")[1].split("\n## ")[0]
    assert "Not run yet: `python experiments.py paper`: minutes on a GPU." in section
    os.makedirs("results/paper/looped")
    cfg = looped.make_config("linreg", **experiments.paper_scale(), out="results/paper/looped")
    record = {
        "diverged": "the loss is NaN at step 700",
        "config": dataclasses.asdict(cfg),
        "seconds": 60,
    }
    harness.write_json("results/paper/looped/run.json", record | bench.provenance())
    open("results/paper/looped/log.jsonl", "w").close()
    experiments.write_report()
    section = open("docs/results.md").read().split("## The paper's scale")[1].split("\n## ")[0]
    assert "The run in results/paper/looped diverged: the loss is NaN at step 700." in section


@slow
def test_the_paper_scale_command_trains_evaluates_and_reports_its_run(tmp_path, monkeypatch):
    """`python experiments.py paper` as the GPU runs it, on a CPU with few steps and test prompts:
    its run folder, learning curve and evaluation, and its section of the report beside the
    paper's numbers."""
    monkeypatch.chdir(tmp_path)
    few = dict(experiments.paper_scale(6), eval_prompts=16, eval_loops=100, eval_every=3)
    claim = dataclasses.replace(experiments.CLAIMS["paper"], runs=[("looped", "linreg", few)])
    monkeypatch.setitem(experiments.CLAIMS, "paper", claim)
    experiments.main(["paper"])
    run = report.read_run("results/paper/looped", curve=True)
    assert (run.cfg.n_dims, run.cfg.n_embd, run.cfg.steps) == (20, 256, 6)
    assert [s for s, _ in run.curve] == [3, 6] and run.errors["loops"].shape == (100, 41)
    experiments.write_report()
    section = open("docs/results.md").read().split("## The paper's scale")[1].split("\n## ")[0]
    at = {t: run.errors["loops"][t - 1] for t in (20, 100)}
    for t, errors in at.items():
        row = f"| looped, {t} loops | " + " | ".join(
            report.fmt(errors[k].item()) for k in (10, 20, 40)
        )
        assert row in section
    assert "| the paper's looped, 20 loops, 500,000 steps | 0.5190 | 0.0242 | 7.8e-04 |" in section
    assert "**Not reproduced in 6 steps**" in section and os.path.isfile("figures/paper.png")


def test_the_seeds_claim_reports_each_seed_and_the_spread(tmp_path, monkeypatch):
    """seeds trains one run per seed; the report gives each seed's row and the median and range at
    k = 2d after b loops, read from the runs' eval.json."""
    monkeypatch.chdir(tmp_path)
    small = dict(
        n_dims=4,
        n_points=9,
        n_embd=32,
        n_head=2,
        n_loops=6,
        loop_window=3,
        steps=4,
        log_every=2,
        ckpt_every=4,
        eval_prompts=16,
    )
    seeds = [(f"seed{s}", "linreg", dict(small, seed=s)) for s in range(7, 10)]
    monkeypatch.setitem(
        experiments.CLAIMS, "seeds", dataclasses.replace(experiments.CLAIMS["seeds"], runs=seeds)
    )
    experiments.claim("seeds")
    ends = sorted(
        json.load(open(f"results/seeds/seed{s}/eval.json"))["loops"][5][8] for s in range(7, 10)
    )
    experiments.write_report()
    section = (
        open("docs/results.md")
        .read()
        .split("## The default command over ten seeds")[1]
        .split("## ")[0]
    )
    assert section.count("\n| 8 |") == 1 and section.count("min |") == 3
    assert "for S = 7 to 9 " in section  # the seeds of the claim's runs
    fmt = report.fmt
    good = sum(e <= 0.05 for e in ends)
    assert f"median {fmt(ends[1])}, from {fmt(ends[0])} to {fmt(ends[2])}; {good} of 3" in section
    assert os.path.isfile("figures/seeds.png")


def test_a_probe_reads_a_linear_function_of_the_state_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 5, generator=gen)
    mix = torch.randn(5, 32, generator=gen)
    # A known linear map of w, offset, with a little noise.
    states = w @ mix + 0.01 * torch.randn(2000, 32, generator=gen) + 3.0
    assert experiments.probe_r2(states[:1000], w[:1000], states[1000:], w[1000:]) > 0.99
    noise = torch.randn(2000, 32, generator=gen)
    assert abs(experiments.probe_r2(noise[:1000], w[:1000], noise[1000:], w[1000:])) < 0.1


def test_solver_weights_follow_gradient_descent_and_newton_to_least_squares():
    xs, ys = draw("linreg", B=16, n=12, d=4, active=4)
    targets = experiments.solver_weights(xs, ys, 300)
    ols = targets["least squares"][0]
    torch.testing.assert_close(targets["Newton iterate t"][-1], ols, rtol=1e-6, atol=1e-8)
    assert (
        (targets["gradient descent iterate t"][-1] - ols).abs().max()
        < 1e-3
        < (targets["gradient descent iterate t"][0] - ols).abs().max()
    )
    # The predictions of the first 100 iterates, (B, 100), as baselines.py computes them.
    pred = (targets["gradient descent iterate t"][:100].float() * xs[None, :, -1]).sum(-1).T
    torch.testing.assert_close(
        pred, baselines.gradient_descent_iterates(xs, ys, 100)[:, :, -1], rtol=1e-4, atol=1e-4
    )


def test_probe_command_writes_its_record_and_the_report_shows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "run")
    looped.train(cfg, quiet=True)
    record = experiments.probe(cfg.out, prompts=64, loops=4)
    assert len(record["r2"]["last x token"]["least squares"]) == 4 and len(record["error"]) == 4
    assert os.path.isfile("results/probe/run.json") and os.path.isfile("figures/probe_run.png")
    experiments.write_report()
    assert "linear probes of the loop state" in open("docs/results.md").read()
    record = experiments.adaptive(cfg.out, tolerances=[0.1, 1e-9], max_loops=5)
    # A tolerance never met runs to the maximum.
    assert record["rows"]["prediction, tol 1e-09"]["mean loops"] == 5
    model, c = export.load_model(cfg.out)
    fixed = looped.model_errors(model, c, looped.eval_prompts(c, torch.device("cpu")))["loops"][
        c.n_loops - 1
    ]
    assert record["rows"]["fixed b = 6"]["error"] == fixed.tolist()
    experiments.write_report()
    assert "Adaptive depth" in open("docs/results.md").read() and os.path.isfile(
        "figures/adaptive_run.png"
    )
    bad = tiny_config(tmp_path / "tree", task="decision_tree")
    looped.train(bad, quiet=True)
    r = run_cli(experiments.main, "probe", bad.out)
    assert r.returncode == 2 and "probes need a looped linear-regression run" in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_an_interrupted_claim_says_how_to_continue_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(cfg, **kw):
        raise harness.Interrupted(
            f"stopped by SIGINT at step 3, checkpoint saved; continue with --resume {cfg.out}", 2
        )

    monkeypatch.setattr(looped, "train", interrupted)
    with pytest.raises(
        harness.Interrupted,
        match="step 3, checkpoint saved; python experiments.py claim2 continues",
    ) as e:
        experiments.run("claim2", "looped", "sparse_linreg")
    assert e.value.code == 130


def test_a_diverged_run_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def diverges(cfg, **kw):
        os.makedirs(cfg.out)
        raise harness.Diverged(
            "training diverged at step 300 (loss nan); lower --lr; no checkpoint was written"
        )

    monkeypatch.setattr(looped, "train", diverges)
    out = experiments.run("claim1", "standard_lr0.002", "linreg", lr=2e-3)
    with open(os.path.join(out, "run.json")) as f:
        record = json.load(f)
    assert (
        record["diverged"] == "training diverged at step 300 (loss nan)"
        and record["config"]["lr"] == 2e-3
    )
    assert not os.path.exists(os.path.join(out, "eval.json"))
    # A real divergence raises Diverged, which the command line reports as one line, exit 2.
    monkeypatch.undo()
    with pytest.raises(harness.Diverged, match="training diverged at step 2"):
        looped.train(tiny_config(tmp_path / "real", lr=1e6), quiet=True)
    assert issubclass(harness.Diverged, harness.UserError)


@pytest.mark.parametrize(
    "args, words",
    [
        (["compare", "RUN", "--eval_loops", "1000000000"], "out of range: 1 to 10,000"),
        (["probe", "RUN", "--loops", "1000000000"], "out of range: 1 to 10,000"),
        (["probe", "RUN", "--prompts", "1000000000000"], "lower --prompts or --loops"),
        (["probe", "RUN", "--prompts", "3"], "out of range: at least 4"),
        (["adaptive", "RUN", "--max_loops", "1000000000"], "out of range: 1 to 10,000"),
        (["adaptive", "RUN", "--tolerances", "0.1", "nan"], "not a finite number above 0"),
        (["baselines", "--seed", "99999999999999999999"], "0 to 9,223,372,036,854,775,807"),
        (["baselines", "--seed", "-1"], "out of range: 0 to"),
        (["baselines", "--prompts", "99999999999999999999"], "lower --prompts"),
    ],
)
def test_experiments_refuse_sizes_before_any_work(trained_run, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    args = [trained_run if a == "RUN" else a for a in args]
    line = refused(experiments.main, *args, folders=[trained_run, tmp_path])
    assert words in line and os.listdir(tmp_path) == [], line
    with pytest.raises(harness.UserError, match="--tolerances must be finite numbers above 0"):
        experiments.adaptive(trained_run, [float("nan")])


@given(data=st.data())
@FUZZ
def test_fuzz_the_command_line(trained_run, tmp_path, monkeypatch, data):
    """compare, probe, adaptive and baselines under any flags: each gets to its work or refuses in
    one line, and no file changes (the run, a folder of someone's files)."""
    monkeypatch.chdir(tmp_path)  # the default --out, runs/compare_TASK, lands here
    run, files = tmp_path / "run", tmp_path / "files"
    if not run.exists():
        shutil.copytree(trained_run, run)
        files.mkdir()
        (files / "notes.txt").write_text("kept")
    runs = st.sampled_from([str(run), str(run / "ckpt.pt"), "/nonexistent", str(files)])
    lists = st.lists(NUMBERS, min_size=1, max_size=3)
    outs = st.sampled_from([str(run), str(files), str(files / "notes.txt"), str(tmp_path / "o")])
    shifts = st.sampled_from(["skewed", "scale=2", "scale=-1", "scale=nan", "scale=inf", "nope"])
    tasks = st.sampled_from(["linreg", "decision_tree", "quadratic"])
    names = st.lists(st.sampled_from(["least squares", "3-NN", "ridge"]), min_size=1, max_size=2)
    command = st.one_of(
        st.tuples(
            st.just(["compare"]),
            st.lists(runs, min_size=1, max_size=2),
            fuzz_args({"--eval_loops": NUMBERS, "--out": outs, "--shift": shifts}),
        ),
        st.tuples(
            st.just(["probe"]),
            runs.map(lambda r: [r]),
            fuzz_args({"--prompts": NUMBERS, "--loops": NUMBERS}),
        ),
        st.tuples(
            st.just(["adaptive"]),
            runs.map(lambda r: [r]),
            fuzz_args({"--tolerances": lists, "--max_loops": NUMBERS}),
        ),
        st.tuples(
            st.just(["baselines"]),
            st.just([]),
            fuzz_args(
                {"--task": tasks, "--n_dims": NUMBERS, "--n_points": NUMBERS, "--prompts": NUMBERS}
                | {"--k": lists, "--seed": NUMBERS, "--only": names}
            ),
        ),
    )
    fuzz_cli(experiments.main, [a for part in data.draw(command) for a in part], [run, files])


def test_the_tools_refuse_bad_values_from_python_and_empty_answers(
    trained_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for prompts in (2, -1):
        with pytest.raises(ValueError, match="--prompts must be a whole number at least 4"):
            experiments.probe(trained_run, prompts=prompts)
    for tolerances in ([], ["a"], [0.1, True]):
        with pytest.raises(ValueError, match="--tolerances must be finite numbers above 0"):
            experiments.adaptive(trained_run, tolerances)
    assert "--out must name a folder" in refused(
        experiments.main, "compare", trained_run, "--out", ""
    )
    line = refused(experiments.main, "baselines", "--n_points", "1")
    assert "leaves no in-context example" in line and os.listdir(tmp_path) == [], line


def test_shift_scales_and_study_outputs_are_checked_before_any_work(
    trained_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for shift in ("scale_x=\u00b2", "scale_x=1" + "0" * 40, "scale_y=0", "scale_x=nan"):
        line = refused(experiments.main, "compare", trained_run, "--shift", shift)
        assert "give a scale above 0, at most 1e6" in line, line
    (tmp_path / "results").write_text("not a folder")
    for command in ("probe", "adaptive"):
        line = refused(experiments.main, command, trained_run, folders=[tmp_path])
        assert "cannot write results/" in line, line
    assert "cannot write" in refused(experiments.main, "baselines", "--save", "--prompts", "4")
