"""Fuzzing with Hypothesis: flag values as a careless or hostile user types them, command lines
built from them, and the rule every command line must keep under them. Apart from common.py, whose
helpers the CUDA tests also use on a GPU machine that may have no Hypothesis."""

import os

from common import Ran, deadline, run_cli, snapshot, stop_at_work
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=1000 if os.environ.get("LOOPED_SLOW") else 100,
    deadline=None,  # deadline() bounds each example instead: a hang must fail, not block
    derandomize=True,  # the same examples on every run: CI is not a lottery
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The edges of the documented ranges, and far beyond them, twice as likely as the rest.
EDGES = [-1, 0, 10_000, 10_001, 10**9, 10**9 + 1, 2**63 - 1, 2**63, 10**12, 10**20, -(10**20)]
NUMBERS = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(EDGES).map(str),
    st.sampled_from(EDGES).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "-", "abc", "1e9", "1e-30", "0x10", " 3", "nan", "-inf", "\u0663"]),
)


def fuzz_args(options):
    """Strategy for argv fragments: up to three of options {flag: strategy of its value or of a
    list of values}, each with a drawn value."""

    def pairs(names):
        return st.tuples(
            *(
                options[n].map(lambda v, n=n: [n, *([v] if isinstance(v, str) else v)])
                for n in names
            )
        )

    names = st.lists(st.sampled_from(sorted(options)), unique=True, max_size=3)
    return names.flatmap(pairs).map(lambda parts: [a for part in parts for a in part])


def fuzz_cli(main, argv, folders):
    """The rule for a command line under any input: it reaches its work (Ran, see stop_at_work),
    or exits 0 (--help), or exits 2 with one line; never a traceback or a hang, and every file under
    folders stays as it was."""
    before = snapshot(*folders)
    with stop_at_work(), deadline(30):
        try:
            r = run_cli(main, *argv)
        except Ran:
            r = None
    if r is not None:
        assert r.returncode in (0, 2), (argv, r.stderr[-3000:])
        assert r.returncode == 0 or len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    assert snapshot(*folders) == before, argv
