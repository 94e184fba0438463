"""Fixtures shared by the test files."""

import pytest
import torch
from common import tiny_config

import looped


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained for a few steps: the weights only need to be non-trivial."""
    out = tmp_path_factory.mktemp("run")
    looped.train(tiny_config(out, steps=20, ckpt_every=20), quiet=True)
    return str(out)


@pytest.fixture(autouse=True)
def subnormals_back():
    """torch 2.4 and 2.5's inductor builds its CPU kernels with -ffast-math, and loading one turns
    subnormal floats off for the whole process: after a --compile test, Hypothesis could no longer
    draw floats. Each test starts with them on."""
    torch.set_flush_denormal(False)
