"""Command lines: flags from a config dataclass, argparse types whose range is their help, and
`cli`: one line, no traceback, and exit code 2 on a mistake, 130/143 on a signal, 141 when the
output is closed early (`| head`)."""

import argparse
import ast
import dataclasses
import inspect
import math
import numbers
import os
import signal
import sys
import textwrap
import threading
from contextlib import suppress

from harness import Interrupted, UserError, rank, world_size


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Count:
    """An argparse type, and a check of values given in code: a whole number from low to high (None:
    the memory estimates bound it). Its str is the range --help shows: help and check are one."""

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


def run_flags(argv, cls, aliases, limits, **parser_kw):
    """A training command line: a flag per field of dataclass cls (and its alias), its help the
    docstring under it (cleanrl's Args), range (limits: {field: Count}) and default; then --resume,
    --eval, --overwrite. Returns ({field: value} of flags given, not defaults; the arguments)."""
    parser = Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **parser_kw)
    body, docs = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body, {}
    for field, doc in zip(body, body[1:]):
        text = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
        if isinstance(field, ast.AnnAssign) and text and isinstance(doc.value.value, str):
            docs[field.target.id] = " ".join(doc.value.value.split())
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"] + ([aliases[f.name]] if f.name in aliases else [])
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
        limit = limits.get(f.name)
        shown = f" ({limit})" if limit is not None and limit.high is not None else ""
        default = repr(f.default) if f.default == "" else f.default
        help = f"{docs[f.name]}{shown} [{default}]"
        if kind is bool:  # --flag / --no-flag, None when neither is given
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(*flags, type=kind, metavar=kind.__name__.upper(), help=help)
    resume = "continue a run from its checkpoint (--steps may grow)"
    parser.add_argument("--resume", metavar="RUN_DIR", help=resume)
    again = "re-evaluate a saved run, no training (several runs, shifted prompts: experiments.py)"
    parser.add_argument("--eval", metavar="RUN_DIR", help=again)
    overwrite = "train into a run folder that holds a run, replacing it (without this, a used "
    overwrite += "folder is refused)"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
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


def cli(main):
    """Run a command line: a UserError is one line on stderr and exit code 2, never a traceback; a
    signal stops it with one line and the signal's code (130, 143). A training run saves first."""

    def stop_now(signum, frame):  # outside the training loop nothing is lost: stop at once
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)

    prog, code = os.path.basename(sys.argv[0]), 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_now)  # Ctrl-C raises KeyboardInterrupt, handled below
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C outside the loop
        e = e if isinstance(e, Interrupted) else Interrupted("stopped by SIGINT", signal.SIGINT)
        if e.message and rank() == 0:  # under torchrun, which stops all so, rank 0 alone says so
            print(f"\n{prog}: {e.message}", file=sys.stderr)
        code = e.code
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as `cat` does
        with suppress(OSError, ValueError):  # no more writes to the closed pipe at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    if world_size() > 1:
        # Under torchrun all is saved and the group is gone: skip the teardown, where gloo's
        # threads can still abort (1 run in 20).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
