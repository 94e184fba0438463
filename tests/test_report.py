"""Tests of report.py: labels, and the committed report is what the committed results render to."""

import os

from common import ROOT, slow, tiny_config

import experiments
import report


def test_runs_of_the_same_model_get_distinct_labels():
    a, b = tiny_config(out="runs/a"), tiny_config(out="runs/b", steps=60)
    assert report.labels([a, b]) == ["looped, b = 6, T = 3 (a)", "looped, b = 6, T = 3 (b)"]
    standard = tiny_config(n_layer=2, n_loops=1, loop_window=1)
    assert report.labels([a, standard]) == ["looped, b = 6, T = 3", "transformer, 2 layers"]


@slow
def test_the_committed_report_is_what_the_committed_results_render_to(tmp_path, monkeypatch):
    """`python experiments.py report`, run on results/ into a scratch folder, writes
    docs/results.md byte for byte: the report's numbers come from the result files, and a change
    to the code that renders them shows here."""
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "results"), "results")
    experiments.write_report()
    with open(os.path.join(ROOT, "docs", "results.md")) as f, open(report.REPORT) as g:
        assert g.read() == f.read()
