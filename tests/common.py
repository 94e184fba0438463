"""What several test files share: the command-line runner, tiny configs and prompts, markers."""

import contextlib
import io
import os
import types

import pytest
import torch

import harness
import looped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
slow = pytest.mark.skipif(
    not os.environ.get("LOOPED_SLOW"), reason="slow on a CPU; LOOPED_SLOW=1 runs it"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def run_cli(main, *args):
    """A command line run in this process as its __main__ runs it (harness.cli): exit code and
    output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            harness.cli(lambda: main(list(args)))
            code = 0
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def tiny_config(tmp_path=None, **overrides):
    values = dict(
        n_dims=4,
        n_points=9,
        n_embd=32,
        n_head=2,
        n_loops=6,
        loop_window=3,
        dims_start=2,
        points_start=5,
        curriculum_every=2,
        loops_every=2,
        steps=6,
        batch_size=8,
        log_every=2,
        ckpt_every=3,
        eval_prompts=16,
        eval_loops=8,
        warmup=0,
        decay=0,
        device="cpu",
        out=str(tmp_path or ""),
    )
    values.update(overrides)
    return looped.make_config(**values)


def draw(task, B=64, n=30, d=6, active=4, seed=0):
    return looped.TASKS[task](B, n, d, active, torch.Generator().manual_seed(seed))


def reference(make, xs, ys, at=None, sign=False):
    """preds[b, i] of a scikit-learn model fitted on prefix i of prompt b, at x_i (or at x_at)."""
    X = torch.sign(xs).numpy() if sign else xs.numpy()
    out = torch.zeros(ys.shape, dtype=torch.float64)
    for b in range(len(X)):
        for i in range(1, X.shape[1]):
            j = i if at is None else at
            out[b, i] = float(make(i).fit(X[b, :i], ys[b, :i].numpy()).predict(X[b, j : j + 1])[0])
    return out


def state(run_dir):
    return torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)


TINY_FLAGS = (
    "--n_dims 4 --n_points 9 --n_embd 32 --n_head 2 --loops 6 --window 3 "
    "--batch_size 8 --eval_prompts 16 --device cpu"
).split()
