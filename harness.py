"""The run's plumbing, so that looped.py shows the method and nothing a user does loses work:
`TrainingRun` (run folder and lock, torchrun and DDP, exact resume, CUDA graphs, NaN check, log,
checkpoints, SIGINT / SIGTERM as save-and-stop), one-line errors, files written whole, safe
checkpoint loads, the device, and memory checked up front. It imports nothing of the project."""

import dataclasses
import errno
import io
import json
import math
import os
import pickle
import shutil
import signal
import stat
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext, suppress

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

RUN_FILES = ("ckpt.pt", "log.jsonl", "eval.json", "error_vs_examples.png", "error_vs_loops.png")


class UserError(ValueError):
    """A mistake in the user's input, or a machine that cannot do what was asked (a full disk, too
    little memory): one line and exit code 2 on a command line (cli.cli), a ValueError in Python."""


class Diverged(UserError):
    """Training reached a loss or a weight that is not finite (a sweep records it and goes on)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: one line (empty but on rank 0) and exit code 128 + the signal's number.
    A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.message, self.signum, self.code = message, signum, 128 + signum


# ---------------------------------------------------------- files, run folders and checkpoints


@contextmanager
def atomic(path):
    """Write to path.tmp, fsync, rename, fsync the folder: a crash mid-write leaves the previous
    file whole, and a failed write (a full disk) is one line that says why."""
    folder = os.path.dirname(os.path.abspath(path))
    check_tmp(path)
    try:
        yield path + ".tmp"
        with open(path + ".tmp", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        with suppress(OSError):  # the rename itself survives a power cut (POSIX; not on Windows)
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: how full
            with suppress(OSError):
                why += f"; {shutil.disk_usage(folder).free / 1e6:,.0f} MB free on its disk"
        why = f"cannot write {path} ({why}): the file there before, if any, is intact"
        raise UserError(why) from None
    finally:
        with suppress(FileNotFoundError):
            os.remove(path + ".tmp")


def special(path):
    """Whether something other than a regular file is at path: a folder, link, FIFO or device."""
    return os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode)


def check_tmp(path):
    """UserError if path.tmp, where atomic writes, is a link (written through), FIFO or folder."""
    if special(path + ".tmp"):
        raise UserError(f"cannot write {path}: {path}.tmp is in the way (not a regular file)")


def check_outputs(*paths):
    """Before any work: each path's folder made, and the path and its .tmp regular files or none."""
    for path in paths:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror})") from None
        if special(path):
            raise UserError(f"cannot write {path}: it is not a regular file")
        check_tmp(path)


def write_json(path, obj, **kw):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **kw)


def append_line(log, record):
    """One JSON line to an open log, flushed; a failed write (a full disk) is one line."""
    try:
        print(json.dumps(record), file=log, flush=True)
    except OSError as e:
        why = f"cannot write {log.name} ({e.strerror}); the last checkpoint is intact"
        raise UserError(why) from None


def check_folder(out, reuse=False, overwrite=False, create=True):
    """Up front: refuse a file, an unwritable folder, or a run's, unless reused or overwritten."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"cannot use {out} as a run folder: it is a file")
    for name in [*RUN_FILES, *(f"{f}.tmp" for f in RUN_FILES)]:  # else they fail mid-run
        if special(os.path.join(out, name)):
            raise UserError(f"cannot use {out} as a run folder: its {name} is not a regular file")
    used = [name for name in RUN_FILES[:2] if os.path.exists(os.path.join(out, name))]
    if used and not reuse and not overwrite:
        ways = f"continue it with --resume {out}, " if "ckpt.pt" in used else ""
        ways += "train into another --out, or replace it with --overwrite"
        raise UserError(f"{out} already holds a run ({' and '.join(used)}): {ways}")
    if not create and not os.path.exists(out):  # made, and tried, where the work starts
        return
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"cannot write in the run folder {out} ({e.strerror})") from None


@contextmanager
def hold_folder(out, enabled=True):
    """Lock the run folder against a second run, --resume or --eval in it at once (POSIX only)."""
    if not enabled or os.name != "posix":
        yield
        return
    import fcntl

    # Never through a link, blocked on a FIFO or truncated: what a .lock points to is left alone.
    path = os.path.join(out, ".lock")
    if special(path):
        raise UserError(f"cannot use the run folder {out}: its .lock is not a regular file")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        lock = os.fdopen(os.open(path, flags, 0o644), "w")
    except OSError as e:
        raise UserError(f"cannot write in the run folder {out} ({e.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            why = f"another process is using the run folder {out}"
            raise UserError(f"{why}; wait for it, or use another --out") from None
        yield


def save_checkpoint(path, model, opt, cfg, step, data_states):
    """One dict, written atomically; data_states: every process's prompt generator's state."""
    rng = {"data": data_states, "torch": torch.get_rng_state()}
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    ckpt.update(config=dataclasses.asdict(cfg), step=step, rng=rng)
    buffer = io.BytesIO()  # serialised first: a failed write is then an OSError, caught by atomic
    torch.save(ckpt, buffer)
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load_checkpoint(run_dir, make_config, weight_sizes):
    """A run's (checkpoint, config made by make_config); UserError if the file is corrupt or if the
    sizes its weights imply, weight_sizes(state dict) -> {config field: size}, disagree with it.
    Tensors and plain data only (weights_only): a pickle that could run code is refused unrun."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about some plain pickles before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unpickling = isinstance(e, pickle.UnpicklingError)
        if unpickling and "GLOBAL" in str(e):  # "Trying to load unsupported GLOBAL os.system ..."
            why = "holds more than tensors and plain data: refused, as loading it could run code"
            raise UserError(f"{path} {why}") from None
        why = "" if unpickling else f" ({type(e).__name__})"
        raise UserError(f"{path} is corrupt or not a torch checkpoint{why}") from None
    try:
        cfg, found = make_config(**ckpt["config"]), weight_sizes(ckpt["model"])
        sound = type(ckpt["step"]) is int and ckpt["step"] >= 0 and "state" in ckpt["optimizer"]
        if not (sound and ckpt["rng"]["data"]):
            raise TypeError("step, optimizer or random states")
    except UserError as e:
        raise UserError(f"{path} was made with an incompatible config: {e}") from None
    except Exception as e:
        why = type(e).__name__
        raise UserError(f"{path} is corrupt or not a looped checkpoint ({why})") from None
    for name, size in found.items():
        if size != getattr(cfg, name):
            why = f"its weights have {name} {size}, its config {getattr(cfg, name)}"
            raise UserError(f"{path}: {why}")
    bad = [k for k, w in ckpt["model"].items() if torch.is_tensor(w) and not w.isfinite().all()]
    if bad:  # training never saves such weights; a file changed since, or another program's
        why = f"has weights that are not finite ({bad[0]}): the model diverged"
        raise UserError(f"{path} (step {ckpt['step']}) {why}; train it again, with a lower --lr")
    return ckpt, cfg


def load_weights(model, state):
    """model.load_state_dict(state), with one line where the two do not match."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = str(e).splitlines()[-1].strip()[:200]
        raise UserError(f"checkpoint weights do not match its config: {why}") from None
    return model


# ----------------------------------------------------- torchrun, signals, device and memory


def world_size():
    """The processes of this torchrun job (its WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank():
    """This process's rank under torchrun (0 outside), known before the group is joined."""
    return int(os.environ.get("RANK", 0)) if world_size() > 1 else 0


@contextmanager
def stop_signals(world):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to save and stop after
    the current step: yields the signals received. A second one stops at once, except under
    torchrun, which forwards the signal it got to every process and kills them 30 s later."""

    def handle(signum, frame):
        if received and world == 1:
            name = signal.Signals(signum).name
            why = f"stopped by a second {name}: nothing saved since the last checkpoint"
            raise Interrupted(why, signum)
        received.append(signum)

    received = []
    main = threading.current_thread() is threading.main_thread()  # only it gets signals
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def setup_device(cfg):
    """Device and precision, decided once from cfg.device, cfg.amp and cfg.compile: (device,
    autocast context or a null one). Under torchrun each process takes its LOCAL_RANK's GPU."""
    mps = torch.backends.mps.is_available()
    available = {"cuda": torch.cuda.is_available(), "mps": mps, "cpu": True}
    name = next(k for k, v in available.items() if v) if cfg.device == "auto" else cfg.device
    if not available[name.split(":")[0]]:
        raise UserError(f"--device {name} asked for, but it is not available here")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(name)
    if device.type == "cuda":  # TF32 matmuls: about fp32's accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device.index or 0)  # cuda:N the current device, for its streams
    amp = cfg.amp and (device.type != "cpu" or cpu_has_bf16())
    if cfg.amp and not amp:
        slow = "bf16 autocast is several times slower"
        print(f"--amp: this CPU has no native bf16, where {slow}; training in fp32")
    if not amp:
        return device, nullcontext()
    # Under --compile without autocast's cache of cast weights, which a CUDA graph cannot hold.
    return device, torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cfg.compile)


def cpu_has_bf16():
    """Whether this CPU computes in bf16 natively (x86: AVX512-BF16 or AMX; Arm: BF16), where bf16
    autocast pays. Elsewhere oneDNN emulates bf16, several times slower than fp32: a step of the
    authors' model took 541 ms with bf16 autocast against 72 ms in fp32 on an AVX2 AMD EPYC."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:  # not Linux: oneDNN's own test
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fits(needs, device, what):
    """UserError where the estimate for `what`, {flags setting a term: its bytes}, exceeds the
    device's memory (a GPU's, or the machine's or its cgroup's limit), naming the largest term's."""
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf"):
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with suppress(OSError, ValueError):  # cgroup v2; "max" means no limit
            have = min(have, int(open("/sys/fs/cgroup/memory.max").read()))
    else:  # the memory cannot be read: no check
        return
    need, flags = sum(needs.values()), max(needs, key=needs.get)
    if need > have:
        why = f"more than the {have / 2**30:,.1f} GiB of this {device.type} device"
        raise UserError(f"{what} needs about {need / 2**30:,.1f} GiB, {why}: lower {flags}")


@contextmanager
def memory_guard(flags):
    """An out-of-memory error that the estimate missed: one line naming the flags to lower."""
    try:
        yield
    except RuntimeError as e:  # CUDA and MPS say "out of memory", a CPU "can't allocate memory"
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory on this device: lower {flags}") from None


def captures_steps(cfg, device):
    """Whether steps replay as CUDA graphs (CapturedSteps, capturable Adam): --compile, one GPU."""
    return cfg.compile and device.type == "cuda" and world_size() == 1


class CapturedSteps:
    """fn, a training step, as CUDA graphs: captured once per shape of its arguments, then replayed
    in one launch. fn must read tensors only from its arguments (on the current device), sync
    nothing with the host, draw no random numbers, and step a capturable optimizer. Every call is
    a real step, its output overwritten by the next replay; a failed capture is said once, then fn
    runs eagerly. https://docs.pytorch.org/docs/stable/notes/cuda.html#whole-network-capture"""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup, self.stream = fn, warmup, torch.cuda.Stream()
        self.key, self.graph, self.failed, self.captures = None, None, False, 0

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        key = tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args)
        if key != self.key:  # a new curriculum stage: the old graph and its memory go
            self.key, self.calls, self.graph, self.inputs, self.out = key, 0, None, None, None
        self.calls += 1
        if self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream), warnings.catch_warnings():  # uncaptured on purpose
                warnings.filterwarnings("ignore", "This instance was constructed with capturable")
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.stream)
            out.record_stream(torch.cuda.current_stream())  # made on the side stream, used here
            return out
        if self.graph is None:
            self.inputs = [a.clone() if torch.is_tensor(a) else a for a in args]
            graph = torch.cuda.CUDAGraph()
            try:
                # Capture records and runs nothing: this call's step is the first replay. The
                # outer stream context restores the stream if the capture fails.
                with torch.cuda.stream(self.stream), torch.cuda.graph(graph, stream=self.stream):
                    self.out = self.fn(*self.inputs)
            except Exception as e:  # from CUDA or a compiler (Interrupted is no Exception)
                why = str(e.__context__ or e).splitlines()[0][:200]  # the cause, not capture_end's
                print(f"CUDA graph capture failed ({why}): the steps run without CUDA graphs")
                self.failed, self.inputs, self.out = True, None, None
                return self.fn(*args)
            self.graph, self.captures = graph, self.captures + 1
        for static, a in zip(self.inputs, args):
            if torch.is_tensor(a):
                static.copy_(a)
        self.graph.replay()
        return self.out


# ---------------------------------------------------------------------------- a training run


def duration(seconds):
    """45s, 3m05s or 2h07m: a time as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


class Progress:
    """Each call: the ms per step since the last call, and the time since the start and left.
    work(i): the cost of steps 0 .. i - 1 in any unit (a curriculum makes later steps dearer)."""

    def __init__(self, work, step, total):
        self.work, self.total = work, work(total)
        self.start = self.last = (time.perf_counter(), step, work(step))

    def __call__(self, step):
        now, done = time.perf_counter(), self.work(step)
        then, before, done_before = self.last
        left = (now - then) / max(done - done_before, 1e-12) * (self.total - done)
        self.last = (now, step, done)
        ms = 1000 * (now - then) / max(step - before, 1)
        return ms, f"{duration(now - self.start[0])}, ~{duration(left)} left"


class TrainingRun(ExitStack):
    """What a training loop needs around the method, so that the loop itself shows only the method:

        with TrainingRun(cfg, model, device, optimizer=opt, prompts=gen, ...) as run:
            for step in run.steps():
                loss = run.step(train_step, *batch, lr=...)
                run.log(loss, d=d, n=n, b=b)

    `resume` (a checkpoint) restores weights, optimizer, prompt generators and log exactly. SIGINT
    and SIGTERM end `run.steps()` after a saved step, every process at the same one, which then
    raises Interrupted. Only rank 0 writes and talks (`run.say`). The run holds its folder from its
    making; the `with` lets go of all it holds (an ExitStack: lock, log, signal handlers)."""

    def __init__(
        self,
        cfg,
        model,
        device,
        *,
        optimizer,
        prompts,
        resume=None,
        overwrite=False,
        quiet=False,
        work=None,
        val_error=None,
    ):
        self.cfg, self.model, self.device, self.opt = cfg, model, device, optimizer
        self.prompts, self.work, self.val_error = prompts, work or (lambda step: step), val_error
        self.ckpt_path, self.log_file, self.graphs = os.path.join(cfg.out, "ckpt.pt"), None, None
        self.captured = captures_steps(cfg, device)  # then looped.py's Adam is capturable
        check_folder(cfg.out, reuse=resume is not None, overwrite=overwrite)  # every process
        self.rank, self.world, self.group = rank(), world_size(), None
        self.agreed = torch.zeros((), dtype=torch.int64)  # agreed_signal's, alive past the group
        super().__init__()  # holds the lock (taken before any joins), the log, the signal handlers
        self.enter_context(hold_folder(cfg.out, self.rank == 0))
        try:
            if cfg.batch_size % self.world:
                why = f"does not split over {self.world} processes"
                raise UserError(f"--batch_size {cfg.batch_size} {why}")
            if self.world > 1:  # NCCL on CUDA, gloo on CPU, and gloo to agree on stopping (no sync)
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.group = dist.new_group(backend="gloo") if device.type == "cuda" else None
            if overwrite and resume is None and self.rank == 0:  # every check has passed
                for name in RUN_FILES:
                    with suppress(FileNotFoundError):
                        os.remove(os.path.join(cfg.out, name))
            self.say = (lambda *a: None) if quiet or self.rank else print
            self.batch_size = cfg.batch_size // self.world  # each process its share of the batch
            self.taken = self.restore(resume) if resume is not None else 0
            # DDP: each process's half-batch gradient, averaged, is the whole batch's gradient.
            self.forward = DistributedDataParallel(model) if self.world > 1 else model
            if self.rank == 0:
                log = open(os.path.join(cfg.out, "log.jsonl"), "a" if resume else "w")
                self.log_file = self.enter_context(log)
        except BaseException:
            self.close()
            raise

    def restore(self, resume):
        """Continue exactly where the checkpoint left off; returns its step."""
        data = resume["rng"]["data"]  # a CUDA generator's state is not a CPU one's
        if len(data) != self.world or data[self.rank].numel() != self.prompts.get_state().numel():
            why = f"the processes ({len(data)}) that wrote the checkpoint"
            raise UserError(f"resume on the kind of device (GPU or CPU) and with {why}")
        self.model.load_state_dict(resume["model"])
        # Adam's saved values, stepped as this run steps (fused, capturable), not as the saver did.
        groups = [{**g, **self.opt.defaults} for g in resume["optimizer"]["param_groups"]]
        self.opt.load_state_dict({**resume["optimizer"], "param_groups": groups})
        self.prompts.set_state(data[self.rank])
        torch.set_rng_state(resume["rng"]["torch"])
        self.say(f"resuming from step {resume['step']}")
        if self.rank == 0:  # each step logged once, whatever a crash left past the checkpoint
            path, kept = os.path.join(self.cfg.out, "log.jsonl"), []  # (a line cut short goes too)
            with suppress(FileNotFoundError), open(path, errors="replace") as f:
                for line in f:
                    with suppress(ValueError, KeyError, TypeError):
                        if line.endswith("\n") and json.loads(line)["step"] <= resume["step"]:
                            kept.append(line)
            with atomic(path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)
        return resume["step"]

    def steps(self):
        """The steps to take, from 0 or the checkpoint's, until cfg.steps or a signal."""
        loop = self._steps()
        self.callback(loop.close)  # on an error in the loop: the signal handlers go back
        return loop

    def _steps(self):
        self.running, self.last, self.signum = torch.zeros((), device=self.device), self.taken, 0
        self.clock = Progress(self.work, self.taken, self.cfg.steps)
        with stop_signals(self.world) as self.received:
            while self.taken < self.cfg.steps and not self.signum:
                yield self.taken
            signum = self.agreed_signal()  # every process: the last collective, they leave together
            self.signum = self.signum or signum
        del self.forward, self.graphs  # DDP's reducer holds the process group, a graph its memory
        # A group still referenced at exit can abort gloo. Older torch (2.5.1 here; fixed by
        # pytorch#154976) destroys gloo's group holding the GIL while its threads let go of their
        # last work; one freeing a tensor that Python has dropped waits for the GIL: a hang, one
        # launch in 20 with a dist.barrier() (its work holds those before it). The last is held.
        if self.world > 1:
            dist.destroy_process_group()
        if self.signum:  # saved in log(); rank 0 alone says so
            name, out = signal.Signals(self.signum).name, self.cfg.out
            why = f"stopped by {name} at step {self.taken}, checkpoint saved; continue with "
            raise Interrupted(f"{why}--resume {out}" if self.rank == 0 else "", self.signum)

    def agreed_signal(self):
        """The signal to stop on (0: none); under torchrun the largest any process got, so all
        stop. Its collective uses self.agreed, a tensor held past the group's end (see _steps)."""
        signum = self.received[0] if self.received else 0
        if self.world == 1:  # called every step: no tensor, no collective
            return signum
        dist.all_reduce(self.agreed.fill_(signum), dist.ReduceOp.MAX, group=self.group)
        return int(self.agreed)

    def step(self, fn, *args, lr):
        """fn(forward, opt, *args) at Adam's rate lr: one step, its loss left on the device."""
        group = self.opt.param_groups[0]
        if self.captured:  # the step replayed as CUDA graphs, which read the rate from its tensor
            self.graphs = self.graphs or CapturedSteps(fn)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        return (self.graphs or fn)(self.forward, self.opt, *args)

    def log(self, loss, **fields):
        """After a step: every log_every steps (the only host-device syncs) a NaN check and the mean
        loss since the last line, with fields; the val_error point and checkpoint when due."""
        cfg, world, step = self.cfg, self.world, self.taken + 1
        self.running, self.taken = self.running + loss, step  # the sum on the device: no sync
        self.signum = self.agreed_signal()  # all stop at one step
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or self.signum
        if step % cfg.log_every == 0 or is_ckpt:
            if world > 1:  # the mean over the processes too, so that all of them agree on a NaN
                dist.all_reduce(self.running)
                self.running /= world
            mean = self.running.item() / (step - self.last)
            weights = self.model.parameters()
            if not (math.isfinite(mean) and all(p.isfinite().all() for p in weights)):
                kept = f"the last good checkpoint is kept in {self.ckpt_path}"
                kept = kept if os.path.exists(self.ckpt_path) else "no checkpoint was written"
                why = f"training diverged at step {step} (loss {mean}); lower --lr"
                raise Diverged(f"{why}; {kept}")
            ms, times = self.clock(step)
            self.last, self.running = step, torch.zeros((), device=self.device)
            shown = " ".join(f"{k} {v}" for k, v in fields.items())
            self.say(f"step {step:6d} | loss {mean:.4f} | {shown} | {ms:.1f} ms/step | {times}")
            if self.log_file:
                append_line(self.log_file, dict(step=step, loss=mean, **fields, ms_per_step=ms))
        due = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
        if self.val_error and due and self.rank == 0:  # before the checkpoint, which keeps it
            append_line(self.log_file, dict(step=step, val_error=self.val_error()))
        if is_ckpt:
            states = [self.prompts.get_state()] * world  # every process's, for an exact resume
            if world > 1:
                dist.all_gather_object(states, states[0])
            if self.rank == 0:
                save_checkpoint(self.ckpt_path, self.model, self.opt, cfg, step, states)
