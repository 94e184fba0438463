"""What every command line of this project shares, so that nothing a user does loses work.

One-line errors and exit codes (`UserError`: exit 2; a training run stopped by a signal: 130 or
143), flags generated from a config dataclass, files written whole or not at all (`atomic`), the run-folder check before training, the
log trimmed to a checkpoint on resume, memory checks before work starts, and SIGINT / SIGTERM
turned into a request to save and stop. It imports nothing of the project; looped.py, export.py,
bench.py and experiments.py build on it.
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager, suppress

import torch


class UserError(Exception):
    """A mistake in the user's input: every command line reports it as one line and exit code 2."""


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM, its checkpoint saved: args (message, exit code)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_dataclass_flags(parser, cls, aliases={}):
    """One flag per field of dataclass cls (and its alias, if any), its help the comment after the
    field in the source, with the default; a flag not given parses to None."""
    comments = {name: (default, text) for name, default, text in
                re.findall(r"^    (\w+): \w+ = (.*?)  # (.*)$", inspect.getsource(cls), re.M)}
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"] + ([aliases[f.name]] if f.name in aliases else [])
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
        help = f"{comments[f.name][1]} [{comments[f.name][0]}]"
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(*flags, type=kind, dest=f.name, metavar=kind.__name__.upper(), help=help)


def cli(main):
    """Run a command line: a UserError is one line on stderr and exit code 2, never a traceback; a
    training run stopped by a signal exits with the signal's conventional code (130, 143)."""
    prog, code = os.path.basename(sys.argv[0]), 0
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except Interrupted as e:  # saved; rank 0 alone says so
        if e.args[0]:
            print(f"\n{prog}: {e.args[0]}", file=sys.stderr)
        code = e.args[1]
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"\n{prog}: interrupted; a training run continues from its last checkpoint with --resume RUN_DIR", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: all is saved and the group is gone; skip the
        sys.stdout.flush(), sys.stderr.flush()  # teardown, where gloo's threads can still abort (1 run in 20)
        os._exit(code)
    sys.exit(code)


# ---------------------------------------------------------------------------- files


@contextmanager
def atomic(path):
    """Write to path.tmp, fsync, rename: a crash mid-write leaves the previous file whole, and a
    failed write (a full disk) is one line that says why."""
    try:
        yield path + ".tmp"
        with open(path + ".tmp", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if isinstance(e, RuntimeError) and "write" not in str(e):
            raise
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][-40:]
        with suppress(OSError):
            why += f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:,.0f} MB free on its disk"
        raise UserError(f"cannot write {path} ({why}): the file there before, if any, is intact") from None
    finally:
        with suppress(FileNotFoundError):
            os.remove(path + ".tmp")


def write_json(path, obj, **kw):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **kw)


def prepare_folder(out, reuse=False, overwrite=False):
    """Before any work: refuse a file, an unwritable folder, or one that holds a run unless it is
    reused (--resume, --eval) or overwritten (its checkpoint and log are deleted)."""
    used = [name for name in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out, name))]
    if used and not reuse and not overwrite:
        raise UserError(f"{out} already holds a run ({' and '.join(used)}): continue it with --resume {out}, "
                        f"train into another --out, or replace it with --overwrite")
    try:
        os.makedirs(out, exist_ok=True)  # FileExistsError where out is a file
        tempfile.TemporaryFile(dir=out).close()
        for name in used * (not reuse):
            with suppress(FileNotFoundError):  # under torchrun every process deletes, before any writes
                os.remove(os.path.join(out, name))
    except OSError as e:
        raise UserError(f"cannot write the run folder {out}: {e.strerror}") from None


def trim_log(path, step):
    """Keep the JSON lines of a log up to a checkpoint's step: a run resumed there logs each step
    once, whatever a crash left past it (a line cut short goes too)."""
    kept = []
    for line in open(path) if os.path.exists(path) else []:
        with suppress(ValueError, KeyError, TypeError):
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


# ---------------------------------------------------------------------------- hardware, memory and signals


def cpu_has_bf16():
    """Whether this CPU computes in bf16 natively (x86: AVX512-BF16 or AMX; Arm: BF16), where bf16
    autocast pays. Elsewhere oneDNN emulates bf16, several times slower than fp32: a step of the
    authors' model took 541 ms with bf16 autocast against 72 ms in fp32 on an AVX2 AMD EPYC."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:  # not Linux: oneDNN's own test
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fits(need, device, what, flags):
    """UserError, before any work, where an estimate of `need` bytes for `what` exceeds the device's
    memory (a GPU's, or the machine's for a CPU); the message names the flags that lower it."""
    with suppress(ValueError, OSError, AttributeError):  # where the device's memory cannot be read, no check
        have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > have:
            raise UserError(f"{what} needs about {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
                            f"of this {device.type} device: lower {flags}")


@contextmanager
def memory_guard(flags):
    """An out-of-memory error that the estimate missed becomes one line naming the flags to lower."""
    try:
        yield
    except RuntimeError as e:  # CUDA and MPS say "out of memory", a CPU "can't allocate memory"
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory on this device: lower {flags}") from None


@contextmanager
def stop_signals(world):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to save and stop after the
    current step: yields the signals received. A second one aborts at once, except under torchrun,
    which forwards the signal it got to every process and kills them 30 s later."""
    def handle(signum, frame):
        if received and world == 1:
            raise KeyboardInterrupt
        received.append(signum)

    received, main = [], threading.current_thread() is threading.main_thread()  # only it gets signals
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)
