"""Tests of harness.py: nothing lost (run folders, locks, signals, atomic writes, memory checks,
safe checkpoint loading), torchrun and DDP on gloo, and CUDA-graph bookkeeping."""

import ast
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from common import ROOT, TINY_FLAGS, draw, refused, run_cli, slow, state, tiny_config

import experiments
import export
import harness
import looped


def test_project_imports_form_the_designed_stack():
    """Every import of a project file, lazy ones included: baselines.py and harness.py are leaves,
    cli.py and plots.py need only harness.py, looped.py only these, export.py nothing but looped.py
    and these, and nothing imports in a circle. Every .py file in the repository root is a project
    file."""
    files = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    imports = {}
    for name in files:
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        found = {
            a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
        }
        found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imports[name] = found & set(files)
    assert imports["baselines"] == imports["harness"] == set()
    assert imports["cli"] == imports["plots"] == {"harness"}
    leaves = {"baselines", "harness", "cli", "plots"}
    assert imports["looped"] == leaves
    assert imports["export"] <= leaves | {"looped"}
    assert "experiments" not in imports["bench"]
    order = []  # a topological order exists only where there is no circle
    while len(order) < len(files):
        ready = [f for f in files if f not in order and imports[f] <= set(order)]
        assert ready, f"a circle among {sorted(set(files) - set(order))}"
        order += ready


def test_progress_estimates_the_time_left_from_each_steps_cost(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    # The second half three times as dear: work(i) is the cost of the steps before i.
    clock = harness.Progress(lambda i: min(i, 10) + 3 * max(i - 10, 0), 0, 20)
    now[0] += 10  # 10 steps in 10 s: 1 s per unit, 30 units left
    assert clock(10) == (1000, "10s, ~30s left")
    now[0] += 30  # 5 steps in 30 s: the machine slowed to 2 s per unit, 15 units left
    assert clock(15) == (6000, "40s, ~30s left")
    resumed = harness.Progress(lambda i: 2 * i, 1000, 4000)  # counted from its own start
    now[0] += 400  # 100 steps, 200 units in 400 s
    assert resumed(1100) == (4000, "6m40s, ~3h13m left")  # 2900 steps, 5800 units at 2 s
    assert [harness.duration(s) for s in (0, 44.6, 59.6, 185, 3599.4, 7626)] == [
        "0s",
        "45s",
        "1m00s",
        "3m05s",
        "59m59s",
        "2h07m",
    ]


def hashes(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in os.listdir(folder)
    }


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "log.jsonl"))]


def logged_steps_tolerant(path):
    for line in open(path, errors="replace"):
        with contextlib.suppress(ValueError):
            yield json.loads(line)["step"]


def test_a_used_run_folder_is_refused_and_keeps_its_files(tmp_path):
    out, other = str(tmp_path / "run"), str(tmp_path / "other")
    assert run_cli(looped.main, *TINY_FLAGS, "--steps", "4", "--out", out).returncode == 0
    before = hashes(out)
    assert {
        "ckpt.pt",
        "log.jsonl",
        "eval.json",
        "error_vs_examples.png",
        "error_vs_loops.png",
    } <= set(before)
    r = run_cli(looped.main, *TINY_FLAGS, "--steps", "4", "--seed", "7", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (
        out in r.stderr
        and f"--resume {out}" in r.stderr
        and "--overwrite" in r.stderr
        and "--out" in r.stderr
    )
    with pytest.raises(harness.UserError, match="already holds a run"):  # the API refuses too
        looped.train(tiny_config(out), quiet=True)
    # --overwrite with a size that is then refused: the old run stays
    r = run_cli(
        looped.main,
        *TINY_FLAGS,
        "--steps",
        "4",
        "--out",
        out,
        "--overwrite",
        "--batch_size",
        "1000000000",
    )
    assert r.returncode == 2 and "needs about" in r.stderr
    # --resume or --eval of another run with --out naming this one: refused too
    assert (
        run_cli(looped.main, *TINY_FLAGS, "--steps", "2", "--seed", "3", "--out", other).returncode
        == 0
    )
    for flag in ("--resume", "--eval"):
        longer = ["--steps", "3"] if flag == "--resume" else []  # past the run's step 2
        r = run_cli(looped.main, flag, other, "--out", out, *longer)
        assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr
    assert hashes(out) == before  # nothing written, nothing replaced, nothing deleted
    assert (
        run_cli(
            looped.main, *TINY_FLAGS, "--steps", "4", "--seed", "7", "--out", out, "--overwrite"
        ).returncode
        == 0
    )
    assert hashes(out)["ckpt.pt"] != before["ckpt.pt"] and logged_steps(out) == [4]
    r = run_cli(looped.main, "--resume", out, "--overwrite")
    assert r.returncode == 2 and "does not go with" in r.stderr


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    with harness.hold_folder(str(tmp_path)):
        with pytest.raises(harness.UserError, match="another process is using"):
            with harness.hold_folder(str(tmp_path)):
                pass
    with harness.hold_folder(str(tmp_path)):  # released on leaving
        pass


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_the_run_resumes(tmp_path, signum, code):
    """A real training process, no periodic checkpoint before the signal: it saves where it is, says
    how to go on in one line, exits with the signal's code; --resume continues, each step logged
    once."""
    out = str(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "looped.py"),
            *TINY_FLAGS,
            *"--steps 100000 --log_every 5 --ckpt_every 100000 --out".split(),
            out,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while (
        not (os.path.exists(log) and open(log).read().count("\n") >= 2) and time.time() < deadline
    ):
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    step = state(out)["step"]
    assert step >= 10 and f"at step {step}" in stderr and f"--resume {out}" in stderr
    assert logged_steps(out)[-1] == step  # the partial interval is logged up to the saved step
    r = run_cli(looped.main, "--resume", out, "--steps", str(step + 3), "--log_every", "1")
    assert r.returncode == 0 and f"resuming from step {step}" in r.stdout
    steps = logged_steps(out)
    assert steps == sorted(set(steps)) and steps[-3:] == [step + 1, step + 2, step + 3]


def test_a_signal_in_the_last_step_stops_before_the_evaluation(tmp_path, monkeypatch):
    cfg, step = tiny_config(tmp_path, steps=4, ckpt_every=100), looped.train_step
    calls = []

    def last_step_signalled(*args):
        calls.append(1)
        if len(calls) == cfg.steps:
            signal.raise_signal(signal.SIGTERM)
        return step(*args)

    monkeypatch.setattr(looped, "train_step", last_step_signalled)
    with pytest.raises(harness.Interrupted, match="SIGTERM at step 4") as e:
        looped.train(cfg, quiet=True)
    assert (
        e.value.code == 143
        and state(cfg.out)["step"] == 4
        and not os.path.exists(tmp_path / "eval.json")
    )


def test_kill_9_loses_at_most_one_checkpoint_interval_and_the_log_stays_consistent(tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "looped.py"),
            *TINY_FLAGS,
            "--steps",
            "100000",
            "--log_every",
            "5",
            "--ckpt_every",
            "20",
            "--out",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120

    def past_a_checkpoint():  # the last line logged is at least 5 steps past a checkpoint
        steps = list(logged_steps_tolerant(log)) if os.path.exists(log) else []
        return steps and steps[-1] > 20 and steps[-1] % 20 >= 5

    while not past_a_checkpoint() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    with open(log, "ab") as f:
        # Garbage, and a line cut short by the kill.
        f.write(b'{"step": 99999, "lo\xff\xfe\n{"step": 5')
    step, last = state(out)["step"], max(s for s in logged_steps_tolerant(log) if s != 99999)
    # At most one checkpoint interval (and one log line) is lost.
    assert 0 < step <= last < step + 20 + 5
    r = run_cli(looped.main, "--resume", out, "--steps", str(step + 10))
    assert r.returncode == 0 and f"resuming from step {step}" in r.stdout
    steps = logged_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == step + 10


def test_stop_signals_asks_once_and_stops_on_a_second_signal():
    previous = signal.getsignal(signal.SIGINT)
    with harness.stop_signals(world=1) as received:
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM]
        with pytest.raises(harness.Interrupted, match="second SIGINT") as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers are put back
    with harness.stop_signals(world=2) as received:  # torchrun forwards the signal again: no abort
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert received == [signal.SIGINT, signal.SIGINT]


def test_a_failed_or_interrupted_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "eval.json")
    harness.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with harness.atomic(path) as tmp, open(tmp, "w") as f:
            f.write("{half")
            raise RuntimeError("a crash mid-write")
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["eval.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch):
    """A full disk: the next checkpoint's write ends in ENOSPC (its fsync says so, as a full disk's
    does), and the log's next line goes to /dev/full, which says ENOSPC for real. (A .tmp that is a
    link, such as one to /dev/full, is refused before any work: see test_looped.)"""
    cfg = tiny_config(tmp_path / "run", steps=2, ckpt_every=2)
    looped.train(cfg, quiet=True)
    before = hashes(cfg.out)["ckpt.pt"]

    fsync = os.fsync

    def full(fd):  # the checkpoint's file alone: the log is trimmed first, and must succeed
        if os.readlink(f"/proc/self/fd/{fd}").endswith("ckpt.pt.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    with (
        monkeypatch.context() as m,
        pytest.raises(
            harness.UserError,
            match="cannot write .*ckpt.pt .No space left on device.*MB free.*intact",
        ),
    ):
        m.setattr(harness.os, "fsync", full)
        looped.train(tiny_config(cfg.out, steps=4, ckpt_every=2), resume=state(cfg.out), quiet=True)
    assert hashes(cfg.out)["ckpt.pt"] == before
    assert not os.path.lexists(os.path.join(cfg.out, "ckpt.pt.tmp"))
    log = open("/dev/full", "w")
    with pytest.raises(harness.UserError, match="cannot write /dev/full .No space left on device"):
        harness.append_line(log, {"step": 1})
    with contextlib.suppress(OSError):
        log.close()


@pytest.mark.parametrize(
    "out, words",
    [
        ("FILE", "it is a file"),
        ("FILE/sub", "cannot write in the run folder"),
        ("/proc/looped_test", "cannot write in the run folder"),
    ],
)
def test_an_unwritable_run_folder_is_refused_before_training(tmp_path, out, words):
    (tmp_path / "FILE").write_text("a file")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    r = run_cli(looped.main, *TINY_FLAGS, "--steps", "100000", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (
        r.stderr
    )
    assert r.stdout == ""  # refused before any training


@pytest.mark.parametrize(
    "flags, words",
    [
        (
            ["--batch_size", "1000000000"],
            "a training step needs about .* lower --batch_size, --n_points or --window",
        ),
        (
            ["--n_embd", "20000", "--n_head", "1", "--n_layer", "50"],
            "a training step needs .* lower --n_embd, --n_layer",
        ),
        (["--n_points", "100000"], "the evaluation needs about .* lower --n_points or --n_dims"),
        (["--eval_prompts", "1000000000"], "the evaluation needs about .* lower --eval_prompts"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_before_work(tmp_path, flags, words):
    r = run_cli(looped.main, *TINY_FLAGS, "--steps", "100000", "--out", str(tmp_path), *flags)
    assert (
        r.returncode == 2 and re.search(words, r.stderr) and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr
    assert r.stdout == "" and not os.path.exists(tmp_path / "ckpt.pt")


def test_sizes_that_cannot_fit_are_refused_by_eval_and_baselines(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    looped.train(cfg, quiet=True)
    r = run_cli(looped.main, "--eval", cfg.out, "--eval_prompts", "1000000000")
    assert r.returncode == 2 and "lower --eval_prompts" in r.stderr, r.stderr
    r = run_cli(experiments.main, "baselines", "--prompts", "1000000000")
    assert r.returncode == 2 and "lower --prompts" in r.stderr
    r = run_cli(experiments.main, "baselines", "--n_dims", "100000", "--prompts", "100")
    assert r.returncode == 2 and "lower --n_points or --n_dims" in r.stderr


def test_an_out_of_memory_error_becomes_one_line_naming_the_flags(tmp_path, monkeypatch):
    with pytest.raises(harness.UserError, match="out of memory .*lower --prompts"):
        with harness.memory_guard("--prompts"):
            torch.empty(2**62, dtype=torch.uint8)  # a CPU allocation that cannot succeed
    with pytest.raises(RuntimeError, match="shape"):  # any other error is not hidden
        with harness.memory_guard("--batch_size"):
            torch.zeros(2, 3) @ torch.zeros(2, 3)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # It raises what training says when a step runs out of memory.
    monkeypatch.setattr(looped, "train_step", out_of_memory)
    r = run_cli(looped.main, *TINY_FLAGS, "--steps", "4", "--out", str(tmp_path))
    assert (
        r.returncode == 2
        and "out of memory on this device: lower --batch_size, --n_points or --window" in r.stderr
    )


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs os.makedirs(marker)
        return os.makedirs, (self.marker,)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_unrun(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=2)
    looped.train(cfg, quiet=True)
    ckpt, marker = state(cfg.out), str(tmp_path / "payload_ran")
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, os.path.join(cfg.out, "ckpt.pt"))
    for main, args in [
        (looped.main, ["--eval", cfg.out]),
        (looped.main, ["--resume", cfg.out, "--steps", "4"]),
        (export.main, [cfg.out, "-o", str(tmp_path / "m.onnx")]),
    ]:
        r = run_cli(main, *args)
        assert (
            r.returncode == 2 and "refused" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
    assert not os.path.exists(marker)  # the payload never ran
    # The test's payload is real: unsafe loading runs it.
    torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)
    assert os.path.isdir(marker)


def test_files_that_are_not_checkpoints_are_called_corrupt_not_dangerous(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=2)
    looped.train(cfg, quiet=True)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    good = state(cfg.out)
    for content in [
        open(tmp_path / "run" / "error_vs_loops.png", "rb").read(),
        b'{"a": 1}',
        __import__("pickle").dumps({"a": 1}),
    ]:
        open(ckpt_path, "wb").write(content)
        r = run_cli(looped.main, "--eval", cfg.out)
        assert (
            r.returncode == 2 and "corrupt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        ), r.stderr
    # Each is a checkpoint edited by hand.
    for broken in [{k: v for k, v in good.items() if k != "rng"}, {**good, "step": "4"}]:
        torch.save(broken, ckpt_path)
        r = run_cli(looped.main, "--resume", cfg.out, "--steps", "4")
        assert r.returncode == 2 and "corrupt" in r.stderr, r.stderr


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_step(rank, world, port, xs, ys, path):
    """One DDP training step of a tiny model on this process's slice of the batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, opt = tiny_model_and_optimiser()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    part = slice(rank * len(xs) // world, (rank + 1) * len(xs) // world)
    looped.windowed_loss(ddp(xs[part], ys[part], 6, 3), ys[part]).backward()
    opt.step()
    if rank == 0:
        torch.save(model.state_dict(), path)
    del ddp  # its reducer holds the process group: drop it first, then leave together
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # All is saved: skip the interpreter's teardown, as cli.cli does under torchrun, since
    # gloo's threads can still abort there ("terminate called without an active exception").
    os._exit(0)


def tiny_model_and_optimiser():
    torch.manual_seed(0)
    model = looped.LoopedTransformer(tiny_config())
    # SGD is linear in the gradient: Adam's first step, g / (|g| + eps), would blow a 1e-12
    # round-off of a near-zero gradient up to 1e-4 lr.
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_ddp_step_over_half_batches_equals_one_step_over_the_batch(tmp_path):
    """Two gloo processes, each with half of 8 prompts, against one process with all 8: the
    weights after one SGD step agree to 1e-6 (float32 round-off of the gradient average)."""
    xs, ys = draw("linreg", B=8, n=9, d=4, active=4, seed=12)
    torch.multiprocessing.spawn(
        ddp_step, args=(2, free_port(), xs, ys, str(tmp_path / "ddp.pt")), nprocs=2
    )
    model, opt = tiny_model_and_optimiser()
    looped.windowed_loss(model(xs, ys, 6, 3), ys).backward()
    opt.step()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, rtol=0, atol=1e-6, msg=name)
    start = tiny_model_and_optimiser()[0].state_dict()
    assert any(not torch.equal(start[k], ddp[k]) for k in start)  # the step did move the weights


def torchrun():
    """looped.py under torchrun, two processes on this machine, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        os.path.join(ROOT, "looped.py"),
    ]


def one_process_reference(cfg, world):
    """What DDP over `world` processes should compute, in one process and without DDP: each step,
    the prompts of every process (each drawn from its own generator, seed + rank) in one batch,
    and one Adam step on their mean loss."""
    torch.manual_seed(cfg.seed)
    model = looped.LoopedTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gens = [torch.Generator().manual_seed(cfg.seed + rank) for rank in range(world)]
    for step in range(cfg.steps):
        d, n, b = looped.curriculum(cfg, step)
        parts = [looped.TASKS[cfg.task](cfg.batch_size // world, n, cfg.n_dims, d, g) for g in gens]
        xs, ys = (torch.cat(tensors) for tensors in zip(*parts))
        opt.param_groups[0]["lr"] = looped.learning_rate(cfg, step)
        looped.train_step(model, opt, contextlib.nullcontext(), xs, ys, b, b - cfg.loop_window)
    return model.state_dict()


def test_torchrun_trains_as_one_process_on_both_batches_and_resumes(tmp_path):
    """Two processes under torchrun: one checkpoint and one log, the weights of one process
    stepping on both processes' prompts (DDP averages their gradients), and an exact resume."""
    flags = (
        "--n_dims 4 --n_points 9 --n_embd 32 --n_head 2 --loops 6 --window 3 --dims_start 2 "
        "--points_start 5 --curriculum_every 2 --loops_every 2 --batch_size 8 --log_every 2 "
        "--ckpt_every 3 --eval_prompts 16 --eval_loops 8 --device cpu"
    ).split()
    r = subprocess.run(
        [*torchrun(), *flags, "--steps", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [
        ".lock",
        "ckpt.pt",
        "error_vs_examples.png",
        "error_vs_loops.png",
        "eval.json",
        "log.jsonl",
    ]
    assert r.stdout.count("step      4 |") == 1  # rank 0 alone logs
    ckpt = state(str(tmp_path))
    assert ckpt["step"] == 4 and len(ckpt["rng"]["data"]) == 2
    assert not torch.equal(ckpt["rng"]["data"][0], ckpt["rng"]["data"][1])  # their own prompts
    reference = one_process_reference(looped.make_config(**ckpt["config"]), world=2)
    for name, tensor in ckpt["model"].items():
        expected = reference[name]
        if name.endswith("c_attn.bias"):
            # The key bias (the middle third) moves no prediction, as softmax ignores a constant
            # per query: its gradient is rounding noise, which Adam scales up to steps. Left out.
            q, _, v = tensor.chunk(3)
            tensor, expected = (
                torch.cat([q, v]),
                torch.cat([expected.chunk(3)[0], expected.chunk(3)[2]]),
            )
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7, msg=name)
    r = subprocess.run(
        [*torchrun(), "--resume", str(tmp_path), "--steps", "6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert state(str(tmp_path))["step"] == 6
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 3, 4, 6]


@slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_the_run_resumes(tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen(
        [
            *torchrun(),
            *TINY_FLAGS,
            *"--steps 100000 --log_every 5 --ckpt_every 100000 --out".split(),
            out,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    log, deadline = os.path.join(out, "log.jsonl"), time.time() + 180
    while (
        not (os.path.exists(log) and open(log).read().count("\n") >= 2) and time.time() < deadline
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
    stdout, stderr = proc.communicate(timeout=120)
    ckpt = state(out)
    assert ckpt["step"] >= 10 and len(ckpt["rng"]["data"]) == 2, stderr[-2000:]
    assert f"stopped by SIGTERM at step {ckpt['step']}, checkpoint saved" in stderr
    r = subprocess.run(
        [*torchrun(), "--resume", out, "--steps", str(ckpt["step"] + 2)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    steps = logged_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == ckpt["step"] + 2


def test_captured_steps_bookkeeping_with_stand_ins_for_cuda(monkeypatch, capsys):
    """CapturedSteps on a CPU, CUDA's streams and graphs replaced by stand-ins (the CUDA tests above
    run the real ones): each stage, a new shape or a new non-tensor argument, runs 3 calls eagerly,
    captures the 4th and replays it, then replays on each call's own tensors; a failed capture is
    said in one line and every call from then on runs eagerly."""
    log, mode = [], ["eager"]

    def fn(x, k):  # a "step": logs how it was run
        if fail and mode[0] == "capture":
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        log.append(mode[0])
        return x * k

    class Graph:  # replays the captured call: fn on the static inputs, into the captured output
        def replay(self):
            mode[0] = "replay"
            step.out.copy_(fn(*step.inputs))
            mode[0] = "eager"

    @contextlib.contextmanager
    def capture(graph, stream):
        mode[0] = "capture"
        try:
            yield
        except RuntimeError as e:  # as torch.cuda.graph's exit: capture_end fails in turn
            raise RuntimeError("capture_end: invalidated") from e
        finally:
            mode[0] = "eager"

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in dict(
        Stream=lambda: stream,
        current_stream=lambda: stream,
        stream=lambda s: contextlib.nullcontext(),
        graph=capture,
        CUDAGraph=Graph,
    ).items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    step, fail = harness.CapturedSteps(fn), False
    for shape, k in [(2, 3), (3, 3), (3, 5)]:  # three stages of 5 calls
        for i in range(5):
            x = torch.arange(shape, dtype=torch.float32) + i
            assert torch.equal(step(x, k), x * k)  # each call's own tensors
    assert (
        log == (["eager"] * 3 + ["capture", "replay", "replay"]) * 3
        and step.captures == 3
        and not step.failed
    )
    log.clear()
    fail = True
    for i in range(6):  # a fourth stage whose capture fails
        x = torch.arange(4, dtype=torch.float32) + i
        assert torch.equal(step(x, 3), x * 3)
    assert log == ["eager"] * 6 and step.failed and step.captures == 3
    said = capsys.readouterr().out.splitlines()
    assert said == [
        "CUDA graph capture failed (operation not permitted when stream is capturing): "
        "the steps run without CUDA graphs"
    ]


def test_a_lock_that_is_not_a_plain_file_is_refused_and_left_alone(trained_run, tmp_path):
    """A FIFO .lock would block the open, a link would have its target truncated: both refused."""
    run, precious = tmp_path / "run", tmp_path / "precious.txt"
    shutil.copytree(trained_run, run)
    precious.write_text("kept")
    os.remove(run / ".lock")
    os.mkfifo(run / ".lock")
    assert "its .lock is not a regular file" in refused(looped.main, "--eval", str(run))
    os.remove(run / ".lock")
    os.symlink(precious, run / ".lock")
    assert "its .lock" in refused(looped.main, "--eval", str(run), folders=[tmp_path])
    assert precious.read_text() == "kept"
