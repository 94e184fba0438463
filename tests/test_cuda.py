"""Tests that need a CUDA GPU: CUDA-graph capture and compiled training; they skip without one.
.ci/gpu runs this file alone on a GPU machine whose Python has pytest but not Hypothesis."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import torch
from common import ROOT, draw, needs_cuda, run_cli, state, tiny_config

import harness
import looped


@needs_cuda
def test_captured_steps_give_the_uncaptured_steps_through_curriculum_stages(monkeypatch):
    """harness.CapturedSteps over 15 steps whose shapes change as the curriculum changes them (n 5
    -> 9, then b 3 -> 6), 5 steps a stage: 3 eager warm-up steps, a capture whose step is its first
    replay, one more replay. Each step trains on its own batch, so the losses and weights are those
    of the same steps uncaptured (fp32 without TF32), for the eager model and for the compiled
    backbone (what --compile runs), with one graph captured per stage."""
    device = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = tiny_config(device="cuda")
    stages = [(5, 3)] * 5 + [(9, 3)] * 5 + [(9, 6)] * 5  # (n, b) of each step
    batches = [
        tuple(t.to(device) for t in draw("linreg", B=8, n=n, d=4, active=4, seed=i))
        + (b, max(b - 3, 0))
        for i, (n, b) in enumerate(stages)
    ]
    runs = {}
    for compiled, captured in [(False, False), (False, True), (True, False), (True, True)]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = looped.LoopedTransformer(cfg).to(device)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=captured)
        if compiled:
            looped.compile_backbone(model)
        step, ctx = (
            harness.CapturedSteps(looped.train_step) if captured else looped.train_step,
            contextlib.nullcontext(),
        )
        losses = torch.tensor([step(model, opt, ctx, *batch).item() for batch in batches])
        assert not captured or (step.captures == 3 and not step.failed)
        runs[compiled, captured] = losses, model.state_dict()
    assert len(set(runs[False, False][0].tolist())) == 15  # fifteen batches, fifteen losses
    # It trained.
    assert all((runs[True, True][1][k] - initial[k]).abs().max() > 1e-3 for k in initial)
    for compiled in (False, True):
        (plain, w_plain), (graph, w_graph) = runs[compiled, False], runs[compiled, True]
        torch.testing.assert_close(graph, plain, rtol=1e-4, atol=1e-6)
        for name in w_plain:
            torch.testing.assert_close(w_graph[name], w_plain[name], rtol=1e-3, atol=1e-5)


@needs_cuda
def test_compiled_training_on_a_gpu_captures_each_stage_without_recompiling(tmp_path, monkeypatch):
    """--compile on one GPU: through four curriculum stages (b 3 -> 5 -> 6, n 5 -> 7 -> 9) and the
    evaluation, two compiled graphs serve every shape, each stage's step is captured once, and the
    logged losses follow eager training's (TF32 on); resuming the run without --compile works."""
    from torch._dynamo.utils import counters

    made = []

    class Recorded(harness.CapturedSteps):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(harness, "CapturedSteps", Recorded)
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config(
        tmp_path / "graphs",
        device="cuda",
        steps=24,
        loops_every=4,
        curriculum_every=8,
        log_every=1,
        ckpt_every=12,
        compile=True,
    )
    errors = looped.train(cfg, quiet=True)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert len(made) == 1 and made[0].captures == 4 and not made[0].failed
    assert errors["loops"].isfinite().all()
    looped.train(dataclasses.replace(cfg, compile=False, out=str(tmp_path / "eager")), quiet=True)
    losses = [
        [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
        for run in ("graphs", "eager")
    ]
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-2, atol=1e-4
    )
    # Its checkpoint resumes uncaptured.
    r = run_cli(looped.main, "--resume", cfg.out, "--steps", "26", "--no-compile")
    assert r.returncode == 0 and state(cfg.out)["step"] == 26, r.stderr


def test_this_file_loads_where_hypothesis_is_not_installed(tmp_path):
    """Collected with every import of Hypothesis failing, as on the GPU machine: neither this file
    nor the helpers it shares (common.py, conftest.py) may need it (fuzzing.py holds its uses)."""
    (tmp_path / "hypothesis").mkdir()
    (tmp_path / "hypothesis" / "__init__.py").write_text('raise ImportError("no Hypothesis")')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_cuda.py"]
    r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "3 tests collected" in r.stdout, r.stdout + r.stderr
