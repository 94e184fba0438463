"""What several test files share: the command-line runner, tiny configs and prompts, markers."""

import contextlib
import io
import os
import shutil
import signal
import types

import pytest
import torch

import cli
import export
import looped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
slow = pytest.mark.skipif(
    not os.environ.get("LOOPED_SLOW"), reason="slow on a CPU; LOOPED_SLOW=1 runs it"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def run_cli(main, *args):
    """A command line run in this process as its __main__ runs it (cli.cli): exit code and
    output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.cli(lambda: main(list(args)))
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


class Ran(BaseException):
    """Raised where a command's work would start (a prompt drawn, a graph written): it got past
    every check. A BaseException, so that no `except Exception` on the way can take it for an
    error of its own."""


@contextlib.contextmanager
def stop_at_work():
    """Every sampler of looped.TASKS and export.onnx_graph raise Ran: every command's work starts
    with one of them, so a command that gets to its work stops there at once."""

    def ran(*args, **kwargs):
        raise Ran

    with pytest.MonkeyPatch.context() as m:
        for task in looped.TASKS:
            m.setitem(looped.TASKS, task, ran)
        m.setattr(export, "onnx_graph", ran)
        yield


class Hang(BaseException):
    pass


@contextlib.contextmanager
def deadline(seconds):
    """Hang (a BaseException) if the block runs longer than seconds: a hang fails, not blocks."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(*folders):
    """{path: bytes} of every file under folders (a FIFO or device: its kind)."""
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    files[path] = "link to " + os.readlink(path)
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[path] = f.read()
                else:
                    files[path] = "special"
    return files


def diverged_copies(run_dir, folder):
    """Two copies of a run in folder whose read-out went wrong: {"nan": weights not finite,
    "overflow": finite weights (1e38) whose predictions are not}."""
    copies = {}
    for name, value in (("nan", float("nan")), ("overflow", 1e38)):
        copies[name] = os.path.join(folder, name)
        shutil.copytree(run_dir, copies[name])
        ckpt = state(copies[name])
        ckpt["model"]["read_out.weight"][:] = value
        ckpt["model"]["read_out.bias"][:] = value
        torch.save(ckpt, os.path.join(copies[name], "ckpt.pt"))
    return copies


def refused(main, *args, folders=()):
    """A command line with bad input: exit code 2 and one line, before any work (stop_at_work),
    every file under folders as it was. Returns the line."""
    before = snapshot(*folders)
    with stop_at_work(), deadline(60):
        r = run_cli(main, *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert snapshot(*folders) == before, args
    return r.stderr.strip()
