"""Tests of cli.py: flags with their help and ranges, and commands that end in one line and the
conventional exit code (2 for a mistake, 130/143 for a signal, 141 for a closed pipe)."""

import argparse
import dataclasses
import signal
import subprocess
import sys
import time

import pytest
from common import ROOT, run_cli

import bench
import cli
import experiments
import export
import harness
import looped


def test_count_and_positive_are_the_ranges_they_print():
    """argparse types: a whole number in range, or a finite number above 0; each refusal names the
    range that --help shows (str(Count)); Count.check refuses what a Python caller passes."""
    steps = cli.Count(1, 10**9)
    assert str(steps) == "1 to 1,000,000,000" and str(cli.Count(0)) == "at least 0"
    assert steps("1") == 1 and steps("1000000000") == 10**9 and cli.Count(0)("7") == 7
    for text, words in [
        ("0", "out of range: 1 to"),
        ("1000000001", "out of range"),
        ("2.5", "not a whole number"),
        ("x", "not a whole number"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            steps(text)
    assert cli.positive("0.03") == 0.03
    for text in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive(text)
    steps.check("--steps", 5)
    for value in (0, 10**9 + 1, 2.0, True, "5"):
        with pytest.raises(harness.UserError, match="--steps must be a whole number 1 to"):
            steps.check("--steps", value)


def test_a_signal_outside_training_stops_the_command_with_its_code():
    def evaluating(argv):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)  # not reached

    r = run_cli(evaluating)
    assert r.returncode == 143 and r.stderr.strip().endswith(": stopped by SIGTERM"), r.stderr


def test_every_command_line_explains_its_flags():
    for main in (looped.main, export.main, bench.main, experiments.main):
        r = run_cli(main, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout
    help = " ".join(run_cli(looped.main, "--help").stdout.split())
    # Every flag carries its Config comment and default.
    for field in dataclasses.fields(looped.Config):
        assert f"--{field.name}" in help
    assert "loop iterations at the end of the loop curriculum (1 to 10,000) [20]" in help
    assert (
        "--seed INT model initialisation" in help
        and "(0 to 9,223,372,036,854,775,807) [42]" in help
    )
    assert "Adam's peak learning rate" in help
    assert "falls linearly to 0 (paper: none, 0) [1000]" in help
    help = run_cli(experiments.main, "--help").stdout
    assert all(
        name in help for name in ["claim1", "claim2", "claim3", "claim4", "claim5", "all", "report"]
    )


def test_a_closed_stdout_ends_a_command_quietly():
    """`python export.py ... | head -1`: once head has gone, a print raises BrokenPipeError; the
    command ends with SIGPIPE's code and no traceback."""
    code = "import cli; cli.cli(lambda: print('x' * 10**6))"
    r = subprocess.run(
        f'{sys.executable} -c "{code}" | head -c 10', shell=True, cwd=ROOT, capture_output=True
    )
    assert r.stdout == b"x" * 10 and r.stderr == b"", r.stderr
    code = "import cli; cli.cli(lambda: (_ for _ in ()).throw(BrokenPipeError()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert r.returncode == 141 and r.stderr == b"", r.stderr
