"""Tests of bench.py: each table times what it names."""

import importlib.util
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
from common import refused
from fuzzing import FUZZ, NUMBERS, fuzz_args, fuzz_cli
from hypothesis import given
from hypothesis import strategies as st

import baselines
import bench
import export
import harness
import looped


def test_seconds_is_the_median_of_the_timed_calls_after_the_warm_up(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    durations = iter([100.0, 5.0, 1.0, 2.0])  # the warm-up call, then the three timed ones

    def call():  # a fifth call would raise StopIteration
        clock.now += next(durations)

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    assert bench.seconds(call, repeats=3, warmup=1) == 2.0


def test_bench_train_times_the_modes_asked_for_captured_last_and_cudas_only_on_cuda(monkeypatch):
    """--modes: the modes given, once each, the captured ones after the rest (a failed capture can
    leave CUDA unusable), each in fp32 and bf16; a CPU runs eager and compiled, and refuses the
    others before any work."""
    timed = []

    def time_step(preset, mode, amp, device, peak):
        timed.append((mode, amp))
        return [preset, mode, "bf16" if amp else "fp32", 1.0, 64.0, 1.0, 1.0, 1.0, "-"]

    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 1e12)
    monkeypatch.setattr(bench, "time_step", time_step)
    modes = ["captured", "reduce-overhead", "eager"]
    bench.bench_train(torch.device("cuda"), ["paper"], modes)
    order = ["reduce-overhead", "eager", "captured"]
    assert timed == [(mode, amp) for mode in order for amp in (False, True)]
    timed.clear()
    table = bench.bench_train(torch.device("cpu"), ["paper"], ["eager", "eager"])
    assert timed == [("eager", False), ("eager", True)] and len(table.rows) == 2
    timed.clear()
    bench.bench_train(torch.device("cpu"), ["laptop"])  # default: all the device runs
    assert timed == [(mode, amp) for mode in ("eager", "compiled") for amp in (False, True)]
    with pytest.raises(
        harness.UserError, match="--modes captured eager: cpu runs only eager, comp"
    ):
        bench.bench_train(torch.device("cpu"), ["paper"], ["captured", "eager"])


def test_bench_baselines_times_each_solver_beside_the_same_fits_in_sklearn():
    table = bench.bench_baselines(4, 2, ["least squares", "averaging"])
    n = str(looped.PAPER_TASKS["linreg"]["n_points"])
    assert [row[:3] for row in table.rows] == [
        ["least squares", "linreg", n],
        ["averaging", "linreg", n],
    ]
    ours, ref, speed_up = table.rows[0][3:]
    assert speed_up == pytest.approx(ref / ours)
    assert table.rows[1][4:] == ["-", "-"]  # averaging: no scikit-learn model
    # The timed scikit-learn fits compute what the batched solvers compute.
    xs, ys = looped.TASKS["noisy_linreg"](2, 12, 5, 5, torch.Generator().manual_seed(1))
    xs, ys = xs.double(), ys.double()
    for name in ("least squares", "ridge", "3-NN"):
        expected = baselines.BASELINES[name](xs, ys).numpy()
        np.testing.assert_allclose(bench.sklearn_reference(name, xs, ys), expected, atol=1e-8)
    assert bench.sklearn_reference("averaging", xs, ys) is None


def test_bench_export_reports_each_graph_on_its_own_prompts(trained_run, tmp_path):
    # At this tolerance the tiny model's prompts stop after 4 to 22 loops, so that a mean of the
    # loops differs from their maximum or minimum.
    table = bench.bench_export(trained_run, n_loops=2, repeats=2, tols=(0.01, 0.5))
    assert [row[:2] for row in table.rows] == [
        ["2 loops", "1"],
        ["2 loops", "64"],
        ["2 loops, Loop", "1"],
        ["2 loops, Loop", "64"],
        ["until 0.01", "1"],
        ["until 0.01", "64"],
        ["until 0.5", "1"],
        ["until 0.5", "64"],
    ]
    # The loops and errors again, from PyTorch on the same prompts: bench_export draws those of
    # batch 1, then those of batch 64, from one generator seeded 0, for every graph.
    model, cfg = export.load_model(trained_run)
    norm = looped.error_normaliser(cfg.task, cfg.n_dims)
    gen = torch.Generator().manual_seed(0)
    prompts = {
        b: looped.TASKS[cfg.task](b, cfg.n_points, cfg.n_dims, cfg.n_dims, gen) for b in (1, 64)
    }
    for name, batch, eager, ort, speed_up, alone, ratio, mean_loops, error in table.rows:
        xs, ys = prompts[int(batch)]
        with torch.no_grad():
            if name.startswith("2 loops"):
                preds, loops = model(xs, ys, 2)[:, -1], torch.tensor([2])
            else:
                tol = float(name.split()[1])
                preds, loops = export.adaptive_depth(model, xs, ys, tol, 5 * cfg.n_loops)
                assert batch == "1" or tol == 0.5 or len(set(loops.tolist())) > 2
        assert speed_up == pytest.approx(eager / ort)
        # The floor at the loops the graph ran: the matrix products of 2 loops, scaled.
        assert ratio == pytest.approx(ort / (alone * mean_loops / 2))
        assert mean_loops == pytest.approx(loops.float().mean().item()), name
        expected = ((preds[:, -1] - ys[:, -1]) ** 2).mean().item() / norm
        assert error == pytest.approx(expected, rel=1e-3), name
    # The floor's graph: the model's with each iteration cut to its four matrix products.
    floor = export.onnx_graph(model, cfg, 2, step=bench.matmuls_alone)
    full = export.onnx_graph(model, cfg, 2)
    ops = [node.op_type for node in floor.graph.node]
    assert ops.count("Gemm") == 2 * 4 * cfg.n_layer + 1  # and the read-out's
    assert len(full.graph.node) - len(ops) == (16 - 4) + (17 - 4)  # the first has no injection
    path = tmp_path / "results" / "bench_export.json"
    table.save(str(path), "python bench.py export RUN")
    saved = json.loads(path.read_text())
    assert saved["machine"] == bench.machine() and saved["command"] == "python bench.py export RUN"
    assert saved["rows"] == table.rows and saved["text"] == table.text


def test_bench_web_without_the_pages_packages_is_one_line(monkeypatch, tmp_path):
    """Without onnxruntime-web (npm ci --prefix web), bench.py web says so before any work."""
    model = os.path.join(bench.WEB, "linreg.onnx")
    monkeypatch.setattr(bench, "WEB", str(tmp_path))
    with pytest.raises(
        harness.UserError, match=r"it needs onnxruntime-web \(npm ci --prefix web\)"
    ):
        bench.bench_web(model)


def test_bench_web_times_the_page_beside_python(trained_run, monkeypatch, tmp_path):
    web = os.path.join(bench.WEB, bench.ORT_WEB)
    if not (
        shutil.which("chromium") and os.path.isdir(web) and importlib.util.find_spec("playwright")
    ):
        pytest.skip("bench.py web needs chromium, onnxruntime-web and playwright")
    table = bench.bench_web(repeats=2)
    assert [row[:2] for row in table.rows] == [
        ["1", "20"],
        ["1", "100"],
        ["64", "20"],
        ["64", "100"],
    ]
    for _, _, browser, python, ratio in table.rows:
        assert browser > 0 and python > 0 and ratio == pytest.approx(browser / python)
    assert table.rows[3][2] > table.rows[0][2]  # 64 prompts of 100 loops take longer than one of 20
    (page,) = bench.bench_page(loads=1).rows  # load, first chart, longest tasks: a busy CI's margin
    assert page[0] == "index" and 0 < page[1] < page[2] and max(page[3], page[5]) < 250, page
    # The page chooses the loop count and draws every loop: other graphs are refused up front.
    for name, kind in (("b2", dict(n_loops=2)), ("dynamic", dict(dynamic_loops=True))):
        export.export(trained_run, str(tmp_path / f"{name}.onnx"), **kind, say=lambda *a: None)
        line = refused(bench.main, "web", "--model", str(tmp_path / f"{name}.onnx"))
        assert "the page runs --dynamic-loops --every-loop exports" in line, line
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "needs Debian's chromium" in refused(bench.main, "web")


@pytest.mark.parametrize(
    "args, words",
    [
        (["baselines", "--only", "ridge regression"], "invalid choice"),
        (["baselines", "--prompts", "0"], "at least 1"),
        (["baselines", "--prompts", "99999999999999999999"], "lower --prompts"),
        (["baselines", "--prompts", "10", "--ref_prompts", "20"], "exceeds --prompts 10"),
        (["baselines", "--save", "--device", "x"], "unrecognized arguments"),
        (["loop", "--steps", "99999999999999999999"], "out of range: 1 to 1,000,000,000"),
        (["export", "RUN", "--loops", "1e9"], "not a whole number"),
        (["export", "RUN", "--loops", "1000000000"], "out of range: 1 to 10,000"),
        (["export", "RUN", "--loops", "31"], "1 to 30 for this run"),
        (["export", "/nonexistent/run"], "no checkpoint"),
        (["web", "--model", "/nonexistent.onnx"], "no ONNX model at /nonexistent.onnx"),
        (["train", "--device", "tpu"], "unknown device"),
        (["train", "--device", "cpu", "--modes", "captured"], "cpu runs only eager, compiled"),
        (["fly"], "invalid choice"),
    ],
)
def test_bench_cli_errors(trained_run, args, words):
    line = refused(bench.main, *[trained_run if a == "RUN" else a for a in args])
    assert words in line, line


@given(data=st.data())
@FUZZ
def test_fuzz_the_command_line(trained_run, data):
    """bench.py loop, baselines and export under any flags: each gets to its work or refuses in
    one line, the run untouched (train's matmul peak comes before any check worth fuzzing)."""
    devices = st.sampled_from(["cpu", "cuda", "tpu"])
    presets = st.sampled_from(["paper", "laptop", "huge"])
    names = st.lists(st.sampled_from(["least squares", "3-NN", "ridge"]), min_size=1, max_size=2)
    command = st.one_of(
        fuzz_args({"--steps": NUMBERS, "--device": devices, "--preset": presets}).map(
            lambda a: ["loop", *a]
        ),
        fuzz_args({"--prompts": NUMBERS, "--ref_prompts": NUMBERS, "--only": names}).map(
            lambda a: ["baselines", *a]
        ),
        fuzz_args({"--loops": NUMBERS}).map(lambda a: ["export", trained_run, *a]),
    )
    fuzz_cli(bench.main, data.draw(command), [trained_run])
