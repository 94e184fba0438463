"""Tests of plots.py: a run's table reads the errors at b loops (and at the evaluation's last loop)
at the paper's k, and the figures are written for the runs that have them."""

import os

import torch
from common import tiny_config

import plots


def errors(cfg, scale):
    """Made-up errors of a run, (eval_loops, n): distinct at every loop and position."""
    n, t = cfg.n_points, cfg.eval_loops
    loops = scale * (torch.arange(t * n).view(t, n) + 1.0) / (t * n)
    band = torch.stack([loops[cfg.n_loops - 1] * 0.9, loops[cfg.n_loops - 1] * 1.1])
    return {"loops": loops, "band looped": band, "zero": torch.ones(n), "band zero": band}


def test_a_runs_table_shows_b_loops_the_last_loop_and_the_baselines(tmp_path):
    looped_cfg = tiny_config(tmp_path)  # d 4, n 9, b 6, evaluated to 8 loops
    standard = tiny_config(tmp_path, n_layer=2, n_loops=1, loop_window=1, eval_loops=1)
    a, b = errors(looped_cfg, 1.0), errors(standard, 0.5)
    lines = plots.table([("L", looped_cfg, a), ("S", standard, b)], "linreg", ["zero"]).split("\n")
    assert lines[0] == "normalised squared error, linreg, d = 4, 16 prompts"
    assert lines[1].split()[-4:] == ["1", "2", "4", "8"]  # k = 1, d/2, d, n - 1 (2d is past n)
    rows = {line[:28].strip(): [float(x) for x in line[28:].split()] for line in lines[2:]}
    assert list(rows) == ["L", "L: 8 loops", "S", "zero"]
    assert rows["L"] == [round(a["loops"][5][k].item(), 4) for k in (1, 2, 4, 8)]
    assert rows["L: 8 loops"] == [round(a["loops"][7][k].item(), 4) for k in (1, 2, 4, 8)]
    assert rows["S"] == [round(b["loops"][0][k].item(), 4) for k in (1, 2, 4, 8)]
    assert rows["zero"] == [1.0] * 4


def test_figures_are_written_for_the_runs_that_loop(tmp_path):
    cfg = tiny_config(tmp_path)
    standard = tiny_config(tmp_path, n_layer=2, n_loops=1, loop_window=1, eval_loops=1)
    solvers = {"Newton": torch.logspace(0, -14, 8)}
    plots.plot([("L", cfg, errors(cfg, 1.0))], tmp_path / "a", "linreg", ["zero"], "_x", solvers)
    assert sorted(os.listdir(tmp_path / "a")) == ["error_vs_examples_x.png", "error_vs_loops_x.png"]
    plots.plot([("S", standard, errors(standard, 1.0))], tmp_path / "b", "linreg", ["zero"])
    assert os.listdir(tmp_path / "b") == ["error_vs_examples.png"]  # one pass: no loop to draw
    plots.plot([("L", cfg, errors(cfg, 1.0))], tmp_path / "c", "linreg", [], loops=False)
    assert os.listdir(tmp_path / "c") == ["error_vs_examples.png"]
