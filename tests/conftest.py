"""Fixtures shared by the test files."""

import pytest
from common import tiny_config

import looped


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained for a few steps: the weights only need to be non-trivial."""
    out = tmp_path_factory.mktemp("run")
    looped.train(tiny_config(out, steps=20, ckpt_every=20), quiet=True)
    return str(out)
