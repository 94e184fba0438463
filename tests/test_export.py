"""Tests of export.py: the ONNX graphs against PyTorch, the metadata, the Predictor and the
command line."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from common import ROOT, Ran, diverged_copies, draw, refused, run_cli, snapshot, stop_at_work
from fuzzing import FUZZ, NUMBERS, fuzz_args, fuzz_cli
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import export
import harness
import looped


def test_unrolled_and_dynamic_exports_match_pytorch(trained_run, tmp_path):
    model, cfg = export.load_model(trained_run)
    unrolled, dynamic = str(tmp_path / "b4.onnx"), str(tmp_path / "dyn.onnx")
    report = export.export(trained_run, unrolled, n_loops=4, say=lambda *a: None)
    assert report["checker"] == "passed"
    # The report names the provider that a session really gets: onnxruntime-gpu lists CUDA even
    # where it cannot use it, and a session there falls back to the CPU.
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    wanted = [p for p in both if p in ort.get_available_providers()]
    assert report["provider"] == ort.InferenceSession(unrolled, providers=wanted).get_providers()[0]
    # Where onnxruntime lists CUDA, "auto" asks for it first and "cpu" keeps it out.
    asked, session = [], ort.InferenceSession

    def recording(*args, providers, **kwargs):
        asked.append(providers)
        return session(*args, providers=["CPUExecutionProvider"], **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ort, "get_available_providers", lambda: both)
        m.setattr(ort, "InferenceSession", recording)
        export.Predictor(unrolled, device="cpu")
        export.Predictor(unrolled, device="auto")
    assert asked == [["CPUExecutionProvider"], both]
    # An explicit "cuda" where the session falls back to the CPU is refused, not run on the CPU.
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="onnxruntime cannot run on CUDA here"):
            export.Predictor(unrolled, device="cuda")
    # A block is ONNX's fused operators, and the --dynamic-loops graph's Loop body one iteration:
    # 17 nodes and the condition's, none of them recomputing what the prompt alone fixes.
    ops = [node.op_type for node in onnx.load(unrolled).graph.node]
    assert {"Attention", "LayerNormalization", "Gelu", "Gemm"} <= set(ops) and "Softmax" not in ops
    export.export(trained_run, dynamic, dynamic_loops=True, say=lambda *a: None)
    (loop,) = [node for node in onnx.load(dynamic).graph.node if node.op_type == "Loop"]
    body = [node.op_type for node in loop.attribute[0].g.node]
    assert len(body) == 18 and body.count("Attention") == 1 and "Shape" not in body
    xs, ys = draw("linreg", B=7, n=5, d=4, active=4, seed=11)  # a shape unlike the export example's
    with torch.no_grad():
        expected = model(xs, ys, 4)[:, -1].numpy()
    got = export.Predictor(unrolled, device="cpu")(xs.numpy(), ys.numpy())
    assert got.shape == (7, 5) and abs(got - expected).max() < 1e-4
    on_any = export.Predictor(unrolled)(xs.numpy(), ys.numpy())  # CUDA where there is one
    assert abs(on_any - expected).max() < 1e-4
    for cores in (1, 3, 16):  # the CPU splits a batch into one shard per core: same numbers
        predictor = export.Predictor(unrolled, device="cpu")
        predictor.cores = cores
        assert abs(predictor(xs.numpy(), ys.numpy()) - got).max() < 1e-6
    # A wide model's batches smaller than the cores run on the multi-threaded session.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(export, "WIDE", 0)
        predictor = export.Predictor(unrolled, device="cpu")
    predictor.cores = 16
    assert predictor.wide is not None and abs(predictor(xs.numpy(), ys.numpy()) - got).max() < 1e-6
    at_b = export.Predictor(dynamic, device="cpu")(xs.numpy(), ys.numpy(), n_loops=4)
    assert abs(at_b - got).max() < 1e-5  # the ONNX Loop at b loops equals the unrolled graph
    assert abs(export.Predictor(dynamic)(xs.numpy(), ys.numpy(), n_loops=9) - at_b).max() > 1e-6


@pytest.mark.parametrize("signal", ["prediction", "state"])
def test_until_converged_stops_each_prompt_at_its_first_settled_iteration(trained_run, signal):
    """The stopping rule against a plain reading of it: the loop state and predictions after
    every iteration, and each prompt's first t whose relative change is below the tolerance:
    ||p_t - p_{t-1}|| / ||p_t|| (p_0 the read-out of Y_0 = 0), or ||Y_t - Y_{t-1}|| / ||Y_t||."""
    model, cfg = export.load_model(trained_run)
    xs, ys = draw("linreg", B=32, n=9, d=4, active=4, seed=5)
    with torch.no_grad():
        every = model(xs, ys, 40)  # (B, 40, n)
        P = model.embed(xs, ys)
        states = [torch.zeros_like(P)]  # Y_0 .. Y_40
        for _ in range(40):
            states.append(model.iterate(states[-1], P))
        if signal == "state":
            seq = torch.stack(states, 1).flatten(2)  # (B, 41, L D)
        else:
            seq = torch.cat([model.read(states[0])[:, None], every], 1)  # (B, 41, n)
        change = (seq[:, 1:] - seq[:, :-1]).norm(dim=2) / seq[:, 1:].norm(dim=2)  # (B, 40)
        # A tolerance far from every change, so that round-off cannot move a stop, and in the
        # middle of them, so that prompts stop at different loops: the widest gap of the middle
        # half of the changes, from iteration 6 on.
        changes = change[:, 5:].flatten().sort().values
        middle = changes[len(changes) // 4 : len(changes) * 3 // 4]
        gap = (middle[1:] / middle[:-1]).argmax()
        tol = (middle[gap] * middle[gap + 1]).sqrt().item()
        settled = change < tol
        first = torch.where(settled.any(1), settled.float().argmax(1) + 1, 40)  # 1-based
        preds, loops = export.adaptive_depth(model, xs, ys, tol, 40, signal)
    assert torch.equal(loops, first)
    assert 1 < len(set(first.tolist()))  # prompts stop at different loops
    torch.testing.assert_close(preds, every[torch.arange(32), first - 1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        _, never = export.adaptive_depth(model, xs, ys, 1e-9, 12, signal)
    assert (never == 12).all()  # a tolerance never met: every prompt runs the maximum


def test_verify_refuses_an_adaptive_graph_whose_loop_counts_are_off_by_one(trained_run, tmp_path):
    """Counts may differ from PyTorch's by one (round-off at the tolerance), but each prompt's
    prediction must be the model's at the count the graph reports: a graph that reports one loop
    too few everywhere fails, though no count is two apart."""
    path = str(tmp_path / "adaptive.onnx")
    export.export(trained_run, path, until_converged=0.02, max_loops=30, say=lambda *a: None)
    graph = onnx.load(path)
    (loop,) = [node for node in graph.graph.node if node.op_type == "Loop"]
    (expand,) = [node for node in loop.attribute[0].g.node if node.op_type == "Expand"]
    expand.input[0] = "t"  # the iteration's index, 0-based: every count one too low
    onnx.save(graph, path)
    model, cfg = export.load_model(trained_run)
    reference = functools.partial(export.adaptive_depth, model, tolerance=0.02, max_loops=30)
    with pytest.raises(export.VerificationError, match="max .onnxruntime - torch."):
        export.verify(path, model, cfg, "adaptive", adaptive=reference)


def test_a_graph_of_several_blocks_matches_pytorch_at_one_point_and_at_all():
    """The 12-layer standard model's path, every block in each iteration: two blocks, random
    weights and norms, one loop and three, a prompt of one point and one of all."""
    cfg = looped.make_config(
        "linreg",
        n_dims=3,
        n_points=6,
        n_embd=16,
        n_head=2,
        n_layer=2,
        n_loops=3,
        loop_window=1,
        eval_loops=3,
    )
    torch.manual_seed(0)
    model = looped.LoopedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and norms away from 0 and 1
    xs, ys = draw("linreg", B=1, n=6, d=3, active=3, seed=8)
    for loops in (1, 3):
        session = ort.InferenceSession(export.onnx_graph(model, cfg, loops).SerializeToString())
        for n in (1, 6):
            with torch.no_grad():
                expected = model(xs[:, :n], ys[:, :n], loops)[:, -1].numpy()
            feeds = {"xs": xs[:, :n].numpy(), "ys": ys[:, :n].numpy()}
            assert abs(session.run(None, feeds)[0] - expected).max() < 1e-5, (loops, n)


def test_every_loop_export_returns_every_iterations_predictions(trained_run, tmp_path):
    path = str(tmp_path / "every.onnx")
    export.export(trained_run, path, dynamic_loops=True, every_loop=True, say=lambda *a: None)
    model, _ = export.load_model(trained_run)
    xs, ys = draw("linreg", B=5, n=7, d=4, active=4, seed=4)
    with torch.no_grad():
        expected = model(xs, ys, 13).numpy()  # (B, 13, n): after each of 13 loops
    predictor = export.Predictor(path, device="cpu")
    preds, every = predictor(xs.numpy(), ys.numpy(), 13, return_every=True)
    assert every.shape == (5, 13, 7) and abs(every - expected).max() < 1e-4
    assert np.array_equal(preds, every[:, -1])
    predictor.cores = 3  # shards of the batch, put back together along the batch axis
    assert abs(predictor(xs.numpy(), ys.numpy(), 13, return_every=True)[1] - every).max() < 1e-6
    with pytest.raises(ValueError, match="only an --every-loop model"):
        export.Predictor(dynamic_export(trained_run, tmp_path), device="cpu")(
            xs.numpy(), ys.numpy(), 2, return_every=True
        )
    r = run_cli(export.main, trained_run, "--every-loop", "-o", str(tmp_path / "u.onnx"))
    assert r.returncode == 2 and "--every-loop goes with --dynamic-loops" in r.stderr


def dynamic_export(run, folder):
    path = str(folder / "plain.onnx")
    export.export(run, path, dynamic_loops=True, say=lambda *a: None)
    return path


def test_adaptive_export_returns_its_loop_counts_and_matches_pytorch(trained_run, tmp_path):
    path = str(tmp_path / "adaptive.onnx")
    model, cfg = export.load_model(trained_run)
    report = export.export(
        trained_run, path, until_converged=0.02, max_loops=30, say=lambda *a: None
    )
    assert "until converged" in report["parity"]
    xs, ys = draw("linreg", B=9, n=7, d=4, active=4, seed=3)
    with torch.no_grad():
        expected, used = export.adaptive_depth(model, xs, ys, 0.02, 30)
    predictor = export.Predictor(path, device="cpu")
    preds, loops = predictor(xs.numpy(), ys.numpy(), return_loops=True)
    assert loops.dtype == np.int64 and np.array_equal(loops, used.numpy())
    assert abs(preds - expected.numpy()).max() < 1e-4
    assert 1 <= loops.min() and loops.max() <= 30 and predictor.meta["n_loops"] == "adaptive"
    predictor.cores = 3  # shards of the batch: each prompt freezes on its own, so the same numbers
    sharded, sharded_loops = predictor(xs.numpy(), ys.numpy(), return_loops=True)
    assert np.array_equal(sharded_loops, loops) and abs(sharded - preds).max() < 1e-6
    # Without return_loops, the call returns the predictions alone.
    assert abs(predictor(xs.numpy(), ys.numpy()) - preds).max() == 0
    with pytest.raises(ValueError, match="chooses its own loop count"):
        predictor(xs.numpy(), ys.numpy(), n_loops=4)
    r = run_cli(export.main, trained_run, "--until-converged", "0.01", "--loops", "3")
    assert r.returncode == 2 and "excludes --loops" in r.stderr


def test_metadata_round_trip_and_input_validation(trained_run, tmp_path):
    path = str(tmp_path / "m.onnx")
    export.export(trained_run, path, n_loops=3, say=lambda *a: None)
    p = export.Predictor(path)
    cfg = looped.make_config(**json.loads(p.meta["config"]))
    assert (p.meta["task"], p.n_dims, p.max_points, p.meta["n_loops"]) == ("linreg", 4, 9, "3")
    assert cfg == export.load_model(trained_run)[1] and p.meta["version"] == export.VERSION
    assert float(p.meta["error_normaliser"]) == 4.0
    xs, ys = torch.randn(2, 5, 4).numpy(), torch.randn(2, 5).numpy()
    bad = {
        "rank": (xs[0], ys),
        "floating": (xs.astype("int64"), ys),
        "d = 3": (xs[..., :3], ys),
        "points": (torch.randn(2, 10, 4).numpy(), torch.randn(2, 10).numpy()),
        "NaN": (xs * float("nan"), ys),
        "expected (batch, n)": (xs, ys[:, :4]),
    }
    for words, (x, y) in bad.items():
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            p(x, y)
    assert p(xs.astype("float64"), ys).dtype == "float32"  # float64 inputs are cast, not refused
    assert (p(xs, ys, n_loops=3) == p(xs, ys)).all()  # its own loop count, as verify() passes it
    with pytest.raises(ValueError, match="exported at 3 loops"):
        p(xs, ys, n_loops=4)
    huge = xs.astype("float64")
    huge[0, 0, 0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="float32's range"):
        p(huge, ys)
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        export.Predictor(str(tmp_path / "corrupt.onnx"))


def test_failed_verification_deletes_the_file(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOL", -1.0)  # no graph can pass: the check must fail
    path = tmp_path / "bad.onnx"
    with pytest.raises(export.VerificationError, match="onnxruntime - torch"):
        export.export(trained_run, str(path), n_loops=2, say=lambda *a: None)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"an earlier model")  # a failed export leaves what was there
    with pytest.raises(export.VerificationError):
        export.export(trained_run, str(path), n_loops=2, say=lambda *a: None)
    assert path.read_bytes() == b"an earlier model" and os.listdir(tmp_path) == ["bad.onnx"]


def test_verification_catches_a_graph_that_computes_something_else(trained_run, tmp_path):
    """verify() at its real tolerance: the graph passes against its own model and fails against
    one whose read-out moved by 1e-3, a difference far below the predictions' size."""
    path = str(tmp_path / "m.onnx")
    export.export(trained_run, path, n_loops=2, say=lambda *a: None)
    model, cfg = export.load_model(trained_run)
    assert "parity" in export.verify(path, model, cfg, 2)
    with torch.no_grad():
        model.read_out.bias += 1e-3
    with pytest.raises(export.VerificationError, match="onnxruntime - torch"):
        export.verify(path, model, cfg, 2)


def test_predictor_needs_no_torch(trained_run, tmp_path):
    path = str(tmp_path / "m.onnx")
    export.export(trained_run, path, n_loops=2, say=lambda *a: None)
    code = (
        "import sys, numpy as np, export; p = export.Predictor(sys.argv[1]); "
        "print(p(np.zeros((2, 3, 4)), np.zeros((2, 3))).shape); assert 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "(2, 3)" in r.stdout, r.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["/nonexistent/run"], "no checkpoint"),
        (["RUN", "--loops", "0"], "argument --loops: 0 is out of range: 1 to 10,000"),
        (["RUN", "-o", "/nonexistent/folder/m.onnx"], "does not exist"),
        (["RUN", "-o", "/tmp"], "ends in .onnx"),
        (["RUN", "--loops", "3", "--dynamic-loops"], "exclude each other"),
        (["RUN", "--until-converged", "0.01", "--fp16"], "does not go with --fp16"),
        (["RUN", "--until-converged", "0.01", "--max-loops", "0"], "out of range: 1 to 10,000"),
        (["RUN", "--max-loops", "9"], "go with --until-converged"),
        (["RUN", "--stop-on", "state"], "go with --until-converged"),
    ],
)
def test_export_cli_errors(trained_run, args, words):
    args = [trained_run if a == "RUN" else a for a in args]
    r = run_cli(export.main, *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (
        r.stderr
    )


def test_export_never_writes_over_a_run_or_a_file_that_is_not_an_onnx_file(trained_run, tmp_path):
    """Each output that would lose a file, or that cannot be written, is refused before any work
    (stop_at_work: no graph is traced), every file as it was."""
    os.mkfifo(tmp_path / "fifo.onnx")
    os.symlink(os.path.join(trained_run, "ckpt.pt"), tmp_path / "link.onnx")
    os.mkdir(tmp_path / "folder.onnx")
    (tmp_path / "kept.onnx").write_bytes(b"a model")
    os.chmod(tmp_path / "kept.onnx", 0o444)
    (tmp_path / "taken.onnx.tmp").write_bytes(b"someone's")
    cases = {
        os.path.join(trained_run, "ckpt.pt"): "ends in .onnx",
        os.path.join(trained_run, "eval.json"): "ends in .onnx",
        os.path.join(trained_run, "model.onnx"): "is a run folder",
        str(tmp_path / "fifo.onnx"): "not a regular file",
        str(tmp_path / "link.onnx"): "not a regular file",
        str(tmp_path / "folder.onnx"): "not a regular file",
        "/dev/null": "ends in .onnx",
        "-": "ends in .onnx",
        str(tmp_path / ("a" * 300 + ".onnx")): "File name too long",
        str(tmp_path / "taken.onnx"): "in the way",
        "/nonexistent/folder/m.onnx": "does not exist",
    }
    if os.geteuid() != 0:  # root writes where it likes
        cases[str(tmp_path / "kept.onnx")] = "read-only"
    for out, words in cases.items():
        line = refused(export.main, trained_run, "-o", out, folders=[trained_run, tmp_path])
        assert words in line, line
    # /proc takes no new files: said as the system says it, not as a full disk
    assert "MB free" not in refused(export.main, trained_run, "-o", "/proc/x.onnx")
    assert not os.path.exists(trained_run + ".onnx")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--loops", "1000000000"], "argument --loops: 1000000000 is out of range: 1 to 10,000"),
        (["--loops", "31"], "--loops must be 1 to 30 for this run (5 b, b = 6)"),
        (["--until-converged", "1e-30", "--max-loops", "1000000000"], "1 to 10,000"),
        (["--until-converged", "0.1", "--max-loops", "99999999999999999999"], "1 to 10,000"),
        (["--until-converged", "nan"], "not a finite number above 0"),
        (["--until-converged", "inf"], "not a finite number above 0"),
        (["--until-converged", "9e-6"], "below 1e-05: float32 round-off"),
        (["--loops", "1e9"], "not a whole number"),
    ],
)
def test_export_refuses_sizes_before_any_work(trained_run, tmp_path, args, words):
    line = refused(export.main, trained_run, "-o", str(tmp_path / "m.onnx"), *args)
    assert words in line and os.listdir(tmp_path) == [], line
    with pytest.raises(harness.UserError, match="--max-loops must be a whole number 1 to 10,000"):
        export.export(trained_run, str(tmp_path / "m.onnx"), until_converged=0.1, max_loops=10**9)


def test_a_diverged_model_is_not_exported(trained_run, tmp_path):
    """Weights that are not finite are refused at loading; finite weights whose predictions
    overflow are refused before anything is written; and a NaN never passes verification."""
    for name, run in diverged_copies(trained_run, tmp_path).items():
        before = snapshot(tmp_path)
        r = run_cli(export.main, str(run), "-o", str(tmp_path / "m.onnx"))
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert (
            "(step 20) has weights that are not finite" if name == "nan" else "not finite; nothing"
        ) in r.stderr
        assert snapshot(tmp_path) == before
    nan = np.array([0.0, np.nan])
    assert export.gap(nan, np.zeros(2)) == export.gap(np.zeros(2), nan) == float("inf")
    assert export.gap(np.ones(2), np.zeros(2)) == 1.0


def test_fp16_dynamic_loops_exports_and_verifies(trained_run, tmp_path):
    path = str(tmp_path / "half.onnx")
    report = export.export(trained_run, path, dynamic_loops=True, fp16=True, say=lambda *a: None)
    assert report["checker"] == "passed"
    model, _ = export.load_model(trained_run)
    xs, ys = draw("linreg", B=5, n=6, d=4, active=4, seed=2)
    with torch.no_grad():
        expected = model(xs, ys, 9)[:, -1].numpy()
    got = export.Predictor(path, device="cpu")(xs.numpy(), ys.numpy(), n_loops=9)
    assert abs(got - expected).max() < export.PARITY_TOL_FP16


def test_sigterm_stops_an_export_at_once(trained_run, tmp_path, monkeypatch):
    """A signal that lands while the graph is written stops the command with 143, nothing left."""
    calls = []
    iteration = export.iteration

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # cli.cli's handler raises Interrupted
        return iteration(*args, **kwargs)

    monkeypatch.setattr(export, "iteration", signalled)
    r = run_cli(export.main, trained_run, "--loops", "2", "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 143 and "stopped by SIGTERM" in r.stderr, r.stderr
    assert len(calls) == 1 and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def dynamic_graph(trained_run, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dyn") / "dyn.onnx")
    export.export(trained_run, path, dynamic_loops=True, say=lambda *a: None)
    return path


def test_predictor_refuses_bad_loop_counts_metadata_and_ragged_inputs(dynamic_graph, tmp_path):
    path = dynamic_graph
    p = export.Predictor(path, device="cpu")
    xs, ys = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.float32)
    for n_loops in (True, 0, -1, 2**63, 10_001, 2.0, "3", None):
        with pytest.raises(ValueError, match="n_loops"):
            p(xs, ys, n_loops=n_loops)
    assert p(xs, ys, n_loops=np.int64(10)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"xs must be a \(batch, n, d\) array"):
        p([[[0.0] * 4, [0.0] * 3]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"ys must be a \(batch, n\) array"):
        p(xs, [[0.0, 0.0, 0.0], [0.0]])
    proto = onnx.load(path)
    kept = [p for p in proto.metadata_props if p.key != "max_points"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "no_max.onnx"))
    with pytest.raises(ValueError, match="incomplete or corrupt looped metadata"):
        export.Predictor(str(tmp_path / "no_max.onnx"))


@given(data=st.data())
@FUZZ
def test_fuzz_the_command_line(trained_run, tmp_path, data):
    """Any flags and outputs: export.py gets to its work or refuses in one line, before any work,
    and no file changes (the run, a bystander .onnx file, a FIFO)."""
    run, files = tmp_path / "run", tmp_path / "files"
    if not run.exists():
        shutil.copytree(trained_run, run)
        files.mkdir()
        (files / "kept.onnx").write_bytes(b"a model")
        os.mkfifo(files / "fifo.onnx")
        os.mkdir(files / "folder.onnx")
    outs = [run / "ckpt.pt", run / "m.onnx", files / "kept.onnx", files / "fifo.onnx"]
    outs += [files / "folder.onnx", files / ("a" * 300 + ".onnx"), files / "new.onnx"]
    outs = [str(o) for o in outs] + ["-", "", "/dev/null", "/nonexistent/m.onnx"]
    options = {f: NUMBERS for f in ("--loops", "--max-loops", "--until-converged")}
    options["-o"] = st.sampled_from(outs)
    options["--stop-on"] = st.sampled_from(["state", "prediction", "loss"])
    runs = st.sampled_from([str(run), str(run / "ckpt.pt"), "/nonexistent", ""])
    switches = st.lists(st.sampled_from(["--dynamic-loops", "--fp16", "--every-loop"]), unique=True)
    argv = [data.draw(runs), *data.draw(fuzz_args(options)), *data.draw(switches)]
    fuzz_cli(export.main, argv, [run, files])


ARRAYS = hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64]),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=10),
)
RAGGED = st.lists(st.lists(st.floats(-3, 3), max_size=4), max_size=3)
LOOPS = st.one_of(
    st.none(),
    st.integers(-2, 30),
    st.sampled_from([10_001, 2**63, -(2**63), True, False, 2.0, "3", np.int64(4), np.int8(-1)]),
)


@st.composite
def prompts(draw):
    """(xs, ys): mostly of the model's shapes (d = 4, up to 9 points), any values; or anything."""
    if draw(st.booleans()):
        return draw(st.one_of(ARRAYS, RAGGED)), draw(st.one_of(ARRAYS, RAGGED))
    B, n = draw(st.integers(0, 4)), draw(st.integers(0, 10))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return draw(hnp.arrays(dtype, (B, n, 4))), draw(hnp.arrays(dtype, (B, n)))


@given(inputs=prompts(), n_loops=LOOPS, return_loops=st.booleans())
@FUZZ
def test_fuzz_the_predictor(dynamic_graph, inputs, n_loops, return_loops):
    """Any arrays, lists and loop counts: predictions of the batch's shape, or a ValueError in one
    line; never another exception."""
    try:
        preds = export.Predictor(dynamic_graph, device="cpu")(
            *inputs, n_loops=n_loops, return_loops=return_loops
        )
    except ValueError as e:
        assert len(str(e).splitlines()) == 1 and str(e), repr(e)
        return
    assert preds.shape == np.shape(inputs[1]) and preds.dtype == np.float32


def test_the_python_api_refuses_what_the_command_line_does(trained_run, dynamic_graph, tmp_path):
    """export.export and Predictor: a bad argument is a ValueError naming it, before any work."""
    out = str(tmp_path / "m.onnx")
    bad = [
        (dict(n_loops=0), "--loops must be 1 to 30"),
        (dict(n_loops=2.0), "--loops must be 1 to 30"),
        (dict(dynamic_loops=True, until_converged=0.1), "excludes --loops and --dynamic-loops"),
        (dict(n_loops=3, dynamic_loops=True), "exclude each other"),
        (dict(until_converged="0.1"), "--until-converged must be a finite number"),
        (dict(until_converged=0.1, signal="loss"), "--stop-on must be prediction or state"),
    ]
    with stop_at_work():
        for kwargs, words in bad:
            with pytest.raises(ValueError, match=words):
                export.export(trained_run, out, say=lambda *a: None, **kwargs)
        with pytest.raises(ValueError, match="-o must be a file name"):
            export.export(trained_run, None)
        with pytest.raises(Ran):  # a numpy integer is a loop count: on to the work
            export.export(trained_run, out, n_loops=np.int64(3))
        with pytest.raises(Ran):  # a path-like output, as Predictor takes
            export.export(trained_run, tmp_path / "p.onnx")
    assert refused(export.main, trained_run, "-o", "").endswith("ends in .onnx")
    with pytest.raises(ValueError, match="path must be a file name"):
        export.Predictor(None)
    proto = onnx.load(dynamic_graph)  # metadata that says unrolled on a graph that takes n_loops
    for prop in proto.metadata_props:
        if prop.key == "n_loops":
            prop.value = "3"
    onnx.save(proto, str(tmp_path / "lying.onnx"))
    with pytest.raises(ValueError, match="not what its metadata"):
        export.Predictor(str(tmp_path / "lying.onnx"))
