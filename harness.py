"""The run around the method, so that looped.py shows the method and nothing a user does loses work.

`TrainingRun` holds a training loop's plumbing: the run folder (a used one refused, one process
at a time), torchrun and DDP, an exact resume, CUDA graphs, the NaN check, the log and the
learning curve, checkpoints, and SIGINT / SIGTERM turned into a request to save and stop. Around
it: one-line errors and exit codes (`UserError`: exit 2; a signal: 130 for SIGINT, 143 for
SIGTERM), a training command line from a config dataclass's field docstrings, files written
whole or not at all (`atomic`), checkpoints loaded only when safe and consistent, the device and
its precision, memory estimates checked before work starts, and a run's table and figures. It
imports nothing of the project; looped.py, export.py, bench.py, report.py and experiments.py
build on it.
"""

import argparse
import ast
import dataclasses
import errno
import inspect
import io
import json
import math
import numbers
import os
import pickle
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext, suppress

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

RUN_FILES = ("ckpt.pt", "log.jsonl", "eval.json", "error_vs_examples.png", "error_vs_loops.png")


class UserError(ValueError):
    """A mistake in the user's input, or a machine that cannot do what was asked (a full disk, too
    little memory): every command line reports it as one line and exit code 2; to a Python caller
    it is a ValueError."""


class Diverged(UserError):
    """Training reached a loss or a weight that is not finite (a sweep records it and goes on)."""


class Interrupted(BaseException):
    """A command stopped by SIGINT or SIGTERM: one line (empty on the processes of a torchrun job
    other than rank 0) and the signal's conventional exit code, 128 + its number. A BaseException,
    as KeyboardInterrupt is, so that no `except Exception` (torch.onnx.export retries a failed
    trace that way) can swallow it."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.message, self.signum, self.code = message, signum, 128 + signum


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Count:
    """An argparse type, and a check for values given in code: a whole number from low to high
    (high None: no bound here, the memory estimates bound it). `str(Count(1, 100))` is the range
    that --help shows, so the help and the check are one definition."""

    def __init__(self, low, high=None):
        self.low, self.high = low, high

    def __str__(self):
        return f"{self.low:,} to {self.high:,}" if self.high is not None else f"at least {self.low}"

    def __call__(self, text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {self}")
        return value

    def holds(self, value):
        return self.low <= value and (self.high is None or value <= self.high)

    def check(self, name, value):
        """UserError naming the flag unless value is a whole number in range."""
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not whole or not self.holds(value):
            raise UserError(f"{name} must be a whole number {self}, got {value!r}")


def positive(text):
    """An argparse type: a finite number above 0 (a tolerance, a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number above 0")
    return value


def doc_parser(prog, doc):
    """A command line's Parser: its description doc's first paragraph, its epilog the rest."""
    first, rest = doc.split("\n\n", 1)
    formatter = argparse.RawDescriptionHelpFormatter
    return Parser(prog=prog, description=first, epilog=rest, formatter_class=formatter)


def field_docs(cls):
    """{field name: the docstring under it} for a dataclass written as cleanrl writes its Args."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:])
        if isinstance(field, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def add_dataclass_flags(parser, cls, aliases=None, limits=None):
    """One flag per field of dataclass cls (and its alias, if any), its help the field's docstring
    with its range (limits: {field: Count}, where it has a top) and the default; a flag not given
    parses to None, so that a preset can tell it apart."""
    aliases, docs, limits = aliases or {}, field_docs(cls), limits or {}
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"] + ([aliases[f.name]] if f.name in aliases else [])
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
        limit = limits.get(f.name)
        shown = f" ({limit})" if limit is not None and limit.high is not None else ""
        default = repr(f.default) if f.default == "" else f.default
        help = f"{docs[f.name]}{shown} [{default}]"
        if kind is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=None, help=help
            )
        else:
            metavar = kind.__name__.upper()
            parser.add_argument(*flags, type=kind, dest=f.name, metavar=metavar, help=help)


def run_flags(argv, cls, aliases, limits, **parser_kw):
    """A training command line: one flag per field of dataclass cls, then --resume, --eval and
    --overwrite. Returns ({field: value} for the flags given, the parsed arguments)."""
    parser = Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **parser_kw)
    add_dataclass_flags(parser, cls, aliases, limits)
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its checkpoint (--steps may grow)"
    )
    parser.add_argument(
        "--eval",
        metavar="RUN_DIR",
        help="re-evaluate a saved run, no training (several runs, shifted prompts: experiments.py)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a run folder that holds a run, "
        "replacing it (without this, a used folder is refused)",
    )
    args = parser.parse_args(argv)
    for name in ("eval", "resume"):
        if getattr(args, name) == "":
            raise UserError(f"--{name} must name a run folder")
    if args.eval and args.resume:
        raise UserError("--eval re-evaluates a run and --resume trains it on: give one of them")
    if args.overwrite and (args.eval or args.resume):
        raise UserError("--overwrite starts a new run: it does not go with --eval or --resume")
    names = [f.name for f in dataclasses.fields(cls)]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}, args


def stop_now(signum, frame):
    """Outside the training loop a signal stops the command at once: nothing there is lost."""
    raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)


def cli(main):
    """Run a command line: a UserError is one line on stderr and exit code 2, never a traceback; a
    signal stops it with one line and the signal's code (130, 143). A training run saves first."""
    prog, code = os.path.basename(sys.argv[0]), 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_now)  # Ctrl-C raises KeyboardInterrupt, handled below
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    # Under torchrun rank 0 alone says so (torchrun also stops the others this way).
    except Interrupted as e:
        if e.message and rank() == 0:
            print(f"\n{prog}: {e.message}", file=sys.stderr)
        code = e.code
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as `cat` does
        with suppress(OSError, ValueError):  # no more writes to the closed pipe at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C outside the training loop
        if rank() == 0:
            print(f"\n{prog}: stopped by SIGINT", file=sys.stderr)
        code = 130
    if world_size() > 1:
        # Under torchrun all is saved and the group is gone: skip the teardown, where gloo's
        # threads can still abort (1 run in 20).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ---------------------------------------------------------------------------- files


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
        raise UserError(
            f"cannot write {path} ({why}): the file there before, if any, is intact"
        ) from None
    finally:
        with suppress(FileNotFoundError):
            os.remove(path + ".tmp")


def special(path):
    """Whether something other than a regular file is at path: a folder, link, FIFO or device."""
    return os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode)


def check_tmp(path):
    """UserError if path.tmp, where atomic writes, is not a regular file: a link would be written
    through, a FIFO would block, a folder would fail after the work."""
    tmp = path + ".tmp"
    if special(tmp):
        raise UserError(f"cannot write {path}: {tmp} is in the way (not a regular file)")


def check_outputs(*paths):
    """Before any work: each path's folder made (or UserError), and neither the path nor its .tmp
    anything but a regular file."""
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
        raise UserError(
            f"cannot write {log.name} ({e.strerror}); the last checkpoint is intact"
        ) from None


def duration(seconds):
    """45s, 3m05s or 2h07m: a time as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


class Progress:
    """Each report: the milliseconds per step since the previous report, and the time since
    training started with an estimate of the time left. work(i) is the cost of steps 0 .. i - 1 in
    any unit (the curriculum makes later steps dearer), total the last step; the seconds per unit
    are measured over the steps since the previous report, so the estimate follows the machine's
    actual speed. work is a function, not a table, so that a long run costs no memory up front."""

    def __init__(self, work, step, total):
        self.work, self.total = work, work(total)
        self.start = self.last = (time.perf_counter(), step, work(step))

    def __call__(self, step):
        now, done = time.perf_counter(), self.work(step)
        then, before, done_before = self.last
        per_unit = (now - then) / max(done - done_before, 1e-12)
        left = per_unit * (self.total - done)
        self.last = (now, step, done)
        ms = 1000 * (now - then) / max(step - before, 1)
        return ms, f"{duration(now - self.start[0])}, ~{duration(left)} left"


def check_folder(out, reuse=False, overwrite=False, create=True):
    """Before any work: refuse a file, an unwritable folder, or one that holds a run, unless it is
    reused (--resume, --eval of the run there) or to be overwritten."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"cannot use {out} as a run folder: it is a file")
    for name in [*RUN_FILES, *(f"{f}.tmp" for f in RUN_FILES)]:  # else they fail mid-run
        path = os.path.join(out, name)
        if special(path):
            raise UserError(f"cannot use {out} as a run folder: its {name} is not a regular file")
    used = [name for name in RUN_FILES[:2] if os.path.exists(os.path.join(out, name))]
    if used and not reuse and not overwrite:
        ways = f"continue it with --resume {out}, " if "ckpt.pt" in used else ""
        raise UserError(
            f"{out} already holds a run ({' and '.join(used)}): {ways}train into another --out, "
            f"or replace it with --overwrite"
        )
    if not create and not os.path.exists(out):  # made, and tried, where the work starts
        return
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"cannot write in the run folder {out} ({e.strerror})") from None


@contextmanager
def hold_folder(out, enabled=True):
    """Hold the run folder for this process: a second training run, --resume or --eval in the same
    folder at the same time is refused, where both would write its files (POSIX; elsewhere no lock).
    """
    try:
        import fcntl
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    # Opened without following a link or waiting on a FIFO, and never truncated: a .lock that is not
    # a plain file is refused, whatever it points to left alone.
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
            raise UserError(
                f"another process is using the run folder {out}; wait for it, or use another --out"
            ) from None
        yield


def remove_run(out):
    """Delete a run's files, for --overwrite, once every check has passed."""
    for name in RUN_FILES:
        with suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def load_tensors(path):
    """torch.load of tensors and plain data only (weights_only): a file whose pickle names other
    objects, and so could run code, is refused with one line and its code never runs; a file that
    is no torch checkpoint at all (truncated, empty, random) is one line too."""
    try:
        with warnings.catch_warnings():  # torch warns about some plain pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # "Trying to load unsupported GLOBAL os.system ..."
            raise UserError(
                f"{path} holds more than tensors and plain data: refused, as loading it "
                "could run code"
            ) from None
        raise UserError(f"{path} is corrupt or not a torch checkpoint") from None
    except Exception as e:
        raise UserError(
            f"{path} is corrupt or not a torch checkpoint ({type(e).__name__})"
        ) from None


def trim_log(path, step):
    """Keep the JSON lines of a log up to a checkpoint's step: a run resumed there logs each step
    once, whatever a crash left past it (a line cut short, or garbage, goes too)."""
    kept = []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                with suppress(ValueError, KeyError, TypeError):
                    if line.endswith("\n") and json.loads(line)["step"] <= step:
                        kept.append(line)
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


# ---------------------------------------------------------------- hardware, memory and signals


def join_torchrun(batch_size, device):
    """(rank, world size, a gloo group to agree on stopping without a device sync): under torchrun
    (WORLD_SIZE > 1) join the process group, NCCL on CUDA, gloo on CPU; (0, 1, None) outside it."""
    world = world_size()
    if world == 1:
        return 0, 1, None
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} does not split over {world} processes")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, dist.new_group(backend="gloo") if device.type == "cuda" else None


def cpu_has_bf16():
    """Whether this CPU computes in bf16 natively (x86: AVX512-BF16 or AMX; Arm: BF16), where bf16
    autocast pays. Elsewhere oneDNN emulates bf16, several times slower than fp32: a step of the
    authors' model took 541 ms with bf16 autocast against 72 ms in fp32 on an AVX2 AMD EPYC."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:  # not Linux: oneDNN's own test
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


class CapturedSteps:
    """fn, a training step, run as CUDA graphs: recorded once per shape of its arguments (forward,
    backward and optimizer step, thousands of kernels) and replayed with one launch per step. fn
    must read its tensors only from its arguments, sync nothing with the host and draw no random
    numbers; its optimizer must be capturable. Every call is a real step on its own arguments: the
    first `warmup` calls of a new shape run eagerly on a side stream (as capture requires), the next
    one is captured on that stream, and from then on a call copies its tensors into the graph's
    static inputs and replays it, returning the graph's output (overwritten by the next replay). A
    new shape frees the old graph (a curriculum never returns to one); a capture that fails is said
    once, then fn runs eagerly (what the failed capture allocated may stay reserved). Tensors must
    be on the current device.
    https://docs.pytorch.org/docs/stable/notes/cuda.html#whole-network-capture"""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup, self.stream = fn, warmup, torch.cuda.Stream()
        self.key, self.graph, self.failed, self.captures = None, None, False, 0

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        # Tensors are keyed by shape and dtype; other objects are kept, compared by identity.
        key = tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args)
        if key != self.key:
            # A new curriculum stage: the old graph, its memory pool and static inputs go.
            self.key, self.calls, self.graph, self.inputs, self.out = key, 0, None, None, None
        self.calls += 1
        if self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            # Uncaptured on purpose: no advice wanted.
            with torch.cuda.stream(self.stream), warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", "This instance was constructed with capturable=True"
                )
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.stream)
            out.record_stream(torch.cuda.current_stream())  # made on the side stream, used here
            return out
        if self.graph is None:
            self.inputs, graph = (
                [a.clone() if torch.is_tensor(a) else a for a in args],
                torch.cuda.CUDAGraph(),
            )
            try:
                # Capture records and runs nothing: this call's step is the first replay. The
                # outer stream context restores the stream if the capture fails.
                with (
                    torch.cuda.stream(self.stream),
                    torch.cuda.graph(graph, stream=self.stream),
                ):
                    self.out = self.fn(*self.inputs)
            except Interrupted:
                raise
            except Exception as e:  # RuntimeError from CUDA, others from a compiler
                # The capture's own error, not capture_end's that follows it.
                cause = e.__context__ or e
                print(
                    f"CUDA graph capture failed ({str(cause).splitlines()[0][:200]}): the steps "
                    "run without CUDA graphs"
                )
                self.failed, self.inputs, self.out = True, None, None
                return self.fn(*args)
            self.graph, self.captures = graph, self.captures + 1
        for static, a in zip(self.inputs, args):
            if torch.is_tensor(a):
                static.copy_(a)
        self.graph.replay()
        return self.out


def device_memory(device):
    """Bytes of memory the device has: a GPU's, or for a CPU the machine's (or the container's
    cgroup limit, where lower); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if not hasattr(os, "sysconf"):
        return None
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with suppress(OSError, ValueError):  # cgroup v2; "max" means no limit
        have = min(have, int(open("/sys/fs/cgroup/memory.max").read()))
    return have


def fits(needs, device, what):
    """UserError, before any work, where the estimate for `what`, {flags that set a term: its
    bytes}, exceeds the device's memory; the message names the flags of the largest term."""
    need, have = sum(needs.values()), device_memory(device)
    if have and need > have:
        raise UserError(
            f"{what} needs about {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
            f"this {device.type} device: lower {max(needs, key=needs.get)}"
        )


@contextmanager
def memory_guard(flags):
    """An out-of-memory error that the estimate missed: one line naming the flags to lower."""
    try:
        yield
    except RuntimeError as e:  # CUDA and MPS say "out of memory", a CPU "can't allocate memory"
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory on this device: lower {flags}") from None


def agreed_signal(received, world, group=None):
    """The signal to stop on, 0 for none: under torchrun the largest that any process received, by a
    host-side all-reduce over gloo (no device sync), so that every process stops at the same step.
    """
    if world == 1:  # called every step: no tensor, no collective
        return received[0] if received else 0
    signum = torch.tensor(received[0] if received else 0)
    dist.all_reduce(signum, dist.ReduceOp.MAX, group=group)
    return int(signum)


@contextmanager
def stop_signals(world):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to save and stop after
    the current step: yields the signals received. A second one stops at once, except under
    torchrun, which forwards the signal it got to every process and kills them 30 s later."""

    def handle(signum, frame):
        if received and world == 1:
            raise Interrupted(
                f"stopped by a second {signal.Signals(signum).name}: nothing saved since the last "
                f"checkpoint",
                signum,
            )
        received.append(signum)

    received = []
    main = threading.current_thread() is threading.main_thread()  # only it gets signals
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- a training run


def save_checkpoint(path, model, opt, cfg, step, data_states):
    """One dict, written atomically (a failed write keeps the previous one). data_states: every
    process's prompt generator, so that a resumed run draws the prompts an uninterrupted one would.
    """
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": dataclasses.asdict(cfg),
        "step": step,
        "rng": {"data": data_states, "torch": torch.get_rng_state()},
    }
    # Serialised first, so that a failed write is an OSError, caught by atomic.
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load_checkpoint(run_dir, make_config, weight_sizes):
    """A run's checkpoint and its config, made by make_config from the saved values; UserError if
    the file is missing or corrupt, or if the sizes its weights imply (weight_sizes, from the state
    dict: {config field: size}) disagree with its config."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    ckpt = load_tensors(path)  # a pickle that would run code is refused, unrun
    try:
        cfg, found = make_config(**ckpt["config"]), weight_sizes(ckpt["model"])
        if not (
            type(ckpt["step"]) is int
            and ckpt["step"] >= 0
            and "state" in ckpt["optimizer"]
            and ckpt["rng"]["data"]
        ):
            raise TypeError("step, optimizer or random states")
    except UserError as e:
        raise UserError(f"{path} was made with an incompatible config: {e}") from None
    except Exception as e:
        raise UserError(
            f"{path} is corrupt or not a looped checkpoint ({type(e).__name__})"
        ) from None
    wrong = [name for name, value in found.items() if value != getattr(cfg, name)]
    if wrong:
        raise UserError(
            f"{path}: its weights have {wrong[0]} {found[wrong[0]]}, its config "
            f"{getattr(cfg, wrong[0])}"
        )
    bad = [k for k, w in ckpt["model"].items() if torch.is_tensor(w) and not w.isfinite().all()]
    if bad:  # training never saves such weights; a file changed since, or another program's
        raise UserError(
            f"{path} (step {ckpt['step']}) has weights that are not finite ({bad[0]}): the model "
            "diverged; train it again, with a lower --lr"
        )
    return ckpt, cfg


def load_weights(model, state):
    """model.load_state_dict(state), with one line where the two do not match."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint weights do not match its config: {str(e).splitlines()[-1].strip()[:200]}"
        ) from None
    return model


def rank():
    """This process's rank under torchrun (its RANK), 0 outside it: known before the group is
    joined, so that each process can seed its own prompt generator."""
    return int(os.environ.get("RANK", 0)) if world_size() > 1 else 0


def world_size():
    """The processes of this torchrun job (its WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def captures_steps(cfg, device):
    """Whether the training step is replayed as CUDA graphs (CapturedSteps): under --compile on one
    GPU. Its Adam must then be capturable, its rate a tensor changed in place, read by a replay."""
    return cfg.compile and device.type == "cuda" and world_size() == 1


class TrainingRun:
    """What a training loop needs around the method, so that the loop itself shows only the method:

        with TrainingRun(cfg, model, device, optimizer=opt, prompts=gen, ...) as run:
            for step in run.steps():
                loss = run.step(train_step, *batch, lr=...)
                run.log(loss, d=d, n=n, b=b)

    Entering it checks and holds the run folder (a used one is refused unless resumed or
    overwritten), joins torchrun and, with `resume` (a checkpoint), restores the weights, the
    optimizer, the prompt generator (one per process) and the log, so that the run continues
    exactly. `run.step` runs the step function on the model (wrapped in DDP under torchrun) and the
    optimizer, as CUDA graphs under --compile on one GPU, at the given rate. `run.log` counts the
    step, checks for NaN, writes the log line and the learning-curve point (`learning_curve`, a
    function of no arguments), and saves a checkpoint every cfg.ckpt_every steps. SIGINT and
    SIGTERM end `run.steps()` after a saved step, which then raises Interrupted; under torchrun
    every process stops at the same step. Only rank 0 writes and talks (`run.say`)."""

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
        learning_curve=None,
    ):
        self.cfg, self.model, self.device, self.resume = cfg, model, device, resume
        self.opt, self.prompts, self.work = optimizer, prompts, work
        self.overwrite, self.quiet, self.learning_curve = overwrite, quiet, learning_curve
        self.log_file, self.loop = None, None
        self.ckpt_path = os.path.join(cfg.out, "ckpt.pt")
        self.log_path = os.path.join(cfg.out, "log.jsonl")

    def __enter__(self):
        cfg, device, resume = self.cfg, self.device, self.resume
        check_folder(cfg.out, reuse=resume is not None, overwrite=self.overwrite)  # every process
        self.held = hold_folder(cfg.out, rank() == 0)  # before any joins
        self.held.__enter__()
        try:
            self.rank, self.world, self.group = join_torchrun(cfg.batch_size, device)
            if self.overwrite and resume is None and self.rank == 0:  # every check has passed
                remove_run(cfg.out)
            self.say = (lambda *a: None) if self.quiet or self.rank else print
            self.batch_size = cfg.batch_size // self.world  # each process its share of the batch
            self.captured = captures_steps(cfg, device)
            self.taken = self.restore() if resume is not None else 0
            self.graphs = None  # under --compile on one GPU, the step as CUDA graphs (step())
            # DDP: each process's half-batch gradient, averaged, is the whole batch's gradient.
            self.forward = DistributedDataParallel(self.model) if self.world > 1 else self.model
            if self.rank == 0:
                self.log_file = open(self.log_path, "a" if resume else "w")
        except BaseException:
            self.held.__exit__(None, None, None)
            raise
        return self

    def restore(self):
        """Continue exactly where the checkpoint left off; returns its step."""
        resume, gen = self.resume, self.prompts
        data = resume["rng"]["data"]  # a CUDA generator's state is not a CPU one's
        if len(data) != self.world or data[self.rank].numel() != gen.get_state().numel():
            raise UserError(
                f"resume on the kind of device (GPU or CPU) and with the processes "
                f"({len(data)}) that wrote the checkpoint"
            )
        self.model.load_state_dict(resume["model"])
        # Adam's saved values, stepped as this run steps (fused, capturable), not as the saver did.
        saved = resume["optimizer"]
        groups = [{**g, **self.opt.defaults} for g in saved["param_groups"]]
        self.opt.load_state_dict({**saved, "param_groups": groups})
        gen.set_state(data[self.rank])
        torch.set_rng_state(resume["rng"]["torch"])
        self.say(f"resuming from step {resume['step']}")
        if self.rank == 0:  # each step logged once, whatever a crash left past the checkpoint
            trim_log(self.log_path, resume["step"])
        return resume["step"]

    def steps(self):
        """The steps to take, from 0 or the checkpoint's, until cfg.steps or a signal."""
        self.loop = self._steps()
        return self.loop

    def _steps(self):
        self.running, self.last = torch.zeros((), device=self.device), self.taken
        self.clock = Progress(self.work or (lambda step: step), self.taken, self.cfg.steps)
        self.signum = 0
        with stop_signals(self.world) as self.received:
            while self.taken < self.cfg.steps and not self.signum:
                yield self.taken
            # a signal in the last step or its save
            self.signum = self.signum or agreed_signal(self.received, self.world, self.group)
        del self.forward, self.graphs  # DDP's reducer holds the process group, a graph its memory
        if self.world > 1:  # leave together: a group still referenced at exit can abort gloo
            dist.barrier()
            dist.destroy_process_group()
        if self.signum:  # saved in log()
            out, name = self.cfg.out, signal.Signals(self.signum).name
            message = (
                f"stopped by {name} at step {self.taken}, checkpoint saved; continue with "
                f"--resume {out}"
            )
            raise Interrupted(
                message if self.rank == 0 else "", self.signum
            )  # rank 0 alone says so

    def step(self, fn, *args, lr):
        """fn(forward, opt, *args) at Adam's rate lr: one training step, its loss left on the
        device."""
        if self.captured:  # on a GPU, launches bound a small model's step, not arithmetic
            self.graphs = self.graphs or CapturedSteps(fn)
            self.opt.param_groups[0]["lr"].fill_(lr)
        else:
            self.opt.param_groups[0]["lr"] = lr
        return (self.graphs or fn)(self.forward, self.opt, *args)

    def log(self, loss, **fields):
        """After a step: count it, agree on a signal, and every log_every steps (the only
        host-device syncs) check the loss and weights for NaN and log the mean loss since the last
        line with fields; then the learning-curve point and the checkpoint, when due."""
        cfg, world = self.cfg, self.world
        self.running += loss  # on the device: no sync
        self.taken += 1
        step = self.taken
        self.signum = agreed_signal(self.received, world, self.group)  # all stop at one step
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or self.signum
        if step % cfg.log_every == 0 or is_ckpt:
            if world > 1:  # the mean over the processes too, so that all of them agree on a NaN
                dist.all_reduce(self.running)
                self.running /= world
            mean = self.running.item() / (step - self.last)
            if not math.isfinite(mean) or not all(
                p.isfinite().all() for p in self.model.parameters()
            ):
                kept = (
                    f"the last good checkpoint is kept in {self.ckpt_path}"
                    if os.path.exists(self.ckpt_path)
                    else "no checkpoint was written"
                )
                raise Diverged(
                    f"training diverged at step {step} (loss {mean}); lower --lr; {kept}"
                )
            ms, times = self.clock(step)
            self.last, self.running = step, torch.zeros((), device=self.device)
            shown = " ".join(f"{k} {v}" for k, v in fields.items())
            self.say(f"step {step:6d} | loss {mean:.4f} | {shown} | {ms:.1f} ms/step | {times}")
            if self.log_file:
                append_line(self.log_file, dict(step=step, loss=mean, **fields, ms_per_step=ms))
        due = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
        if self.learning_curve and due and self.rank == 0:  # before the checkpoint, which keeps it
            append_line(self.log_file, dict(step=step, val_error=self.learning_curve()))
        if is_ckpt:
            states = [self.prompts.get_state()]
            if world > 1:  # every process's prompt generator, for an exact resume
                states = [None] * world
                dist.all_gather_object(states, self.prompts.get_state())
            if self.rank == 0:
                save_checkpoint(self.ckpt_path, self.model, self.opt, cfg, step, states)

    def __exit__(self, *exc):
        if self.loop is not None:
            self.loop.close()  # on an error in the loop: the signal handlers go back
        if self.log_file:
            self.log_file.close()
        self.held.__exit__(*exc)


def setup_device(cfg):
    """Device and precision, decided once from cfg.device, cfg.amp and cfg.compile: (device,
    autocast context or a null one). Under torchrun each process takes its LOCAL_RANK's GPU."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
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
        print(
            "--amp: this CPU has no native bf16, where bf16 autocast is several times slower; "
            "training in fp32"
        )
    if not amp:
        return device, nullcontext()
    # Under --compile without autocast's cache of cast weights, which a CUDA graph cannot hold.
    return device, torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cfg.compile)


# ---------------------------------------------------------------- a run's table and figures


def figure(*args, **kw):
    """A new figure and its axes (plt.subplots' arguments), drawn off screen by the Agg backend so
    that a run or the report draws where no display is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def save_figure(fig, path):
    """Lay the figure out and write it as a PNG, whole or not at all (atomic), then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def table(runs, title, baseline_names):
    """Error at a few k for runs [(name, cfg, errors)] on the same prompts, and the first run's
    baselines (baseline_names, keys of its errors)."""
    _, cfg, errors = runs[0]
    ks = sorted(
        {
            k
            for k in (1, cfg.n_dims // 2, cfg.n_dims, 2 * cfg.n_dims, cfg.n_points - 1)
            if 0 < k < cfg.n_points
        }
    )
    rows = {}
    for name, c, e in runs:
        rows[name] = e["loops"][c.n_loops - 1]
        if c.eval_loops != c.n_loops:
            rows[f"{name}: {c.eval_loops} loops"] = e["loops"][-1]
    rows.update({name: errors[name] for name in baseline_names})
    width = max(26, *map(len, rows)) + 2
    lines = [
        f"normalised squared error, {title}, d = {cfg.n_dims}, {cfg.eval_prompts} prompts",
        f"{'k (in-context examples)':<{width}}" + "".join(f"{k:>9}" for k in ks),
    ]
    lines += [
        f"{name:<{width}}" + "".join(f"{err[k].item():>9.4f}" for k in ks)
        for name, err in rows.items()
    ]
    return "\n".join(lines)


def plot(runs, out, title, baseline_names, suffix="", solvers=None, loops=True):
    """Figures in folder out for runs [(name, cfg, errors)] evaluated on the same prompts: error
    against in-context examples (every run, and the first run's baselines, baseline_names) and,
    with loops, error at the last position against loop iterations (every looped run; solvers:
    name -> error after each of its iterations, drawn one iteration per loop)."""
    _, cfg, errors = runs[0]
    fig, ax = figure(figsize=(6.5, 4.5))
    curves = [(name, e["loops"][c.n_loops - 1], e["band looped"], 2.5) for name, c, e in runs]
    curves += [(name, errors[name], errors[f"band {name}"], 1.5) for name in baseline_names]
    for i, (name, err, band, lw) in enumerate(curves):
        ax.plot(err, lw=lw, color=f"C{i}", label=name)
        ax.fill_between(range(cfg.n_points), *band, color=f"C{i}", alpha=0.2, lw=0)
    ax.set(
        xlabel="in-context examples k",
        ylabel="normalised squared error",
        ylim=(-0.05, 1.5),
        title=f"{title}, d = {cfg.n_dims} (90% bootstrap bands)",
    )
    figures = [(fig, ax, "examples")]
    if loops and any(c.eval_loops > 1 for _, c, _ in runs):
        fig, ax = figure(figsize=(6.5, 4.5))
        last = cfg.n_points - 1
        curves = [
            (name, e["loops"][:, last], 2.5, c.n_loops) for name, c, e in runs if c.eval_loops > 1
        ]
        # A solver's iterations are drawn as loops, one iteration per loop.
        curves += [(f"{n} iterations", err, 1.5, None) for n, err in (solvers or {}).items()]
        for i, (name, err, lw, b) in enumerate(curves):
            ax.semilogy(
                range(1, len(err) + 1), err.clamp(min=1e-12), lw=lw, color=f"C{i}", label=name
            )
            if b:
                ax.axvline(b, color=f"C{i}", ls="--", lw=1)
        floor = min(err.min().item() for _, err, _, _ in curves)
        solver = " (or solver iteration)" if solvers else ""
        ax.set(
            xlabel=f"loop iteration{solver}; dashed: trained b",
            ylabel=f"normalised squared error at k = {last}",
            title=f"{title}: error against iterations",
            ylim=(max(floor / 3, 1e-8), None),  # the exact solvers reach 1e-14
        )
        figures.append((fig, ax, "loops"))
    for fig, ax, name in figures:
        ax.legend(fontsize=8)
        save_figure(fig, os.path.join(out, f"error_vs_{name}{suffix}.png"))
