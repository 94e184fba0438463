"""Tests of bench.py: each table times what it names."""

import json

from common import run_cli

import bench


def test_bench_tables_time_what_they_name(trained_run, tmp_path):
    table = bench.bench_baselines(4, 2, ["least squares", "averaging"])
    assert [row[0] for row in table.rows] == ["least squares", "averaging"]
    assert (
        table.rows[0][3] > 0 and table.rows[0][5] > 0 and table.rows[1][4] == "-"
    )  # averaging: no sklearn model
    table = bench.bench_export(trained_run, n_loops=2, repeats=2)
    assert [row[:2] for row in table.rows] == [
        ["2 loops", "1"],
        ["2 loops", "64"],
        ["until 0.03", "1"],
        ["until 0.03", "64"],
    ]
    assert all(
        row[2] > 0 and row[3] > 0 and 1 <= row[5] <= 30 and row[6] >= 0 for row in table.rows
    )
    table.save(str(tmp_path / "results" / "bench_export.json"), "python bench.py export RUN")
    saved = json.load(open(tmp_path / "results" / "bench_export.json"))
    assert saved["machine"] == bench.machine() and saved["rows"] == table.rows
    assert bench.seconds(lambda: None, repeats=3) < 0.01
    for args, words in [
        (["baselines", "--only", "ridge regression"], "unknown baseline"),
        (["baselines", "--prompts", "0"], "at least 1"),
        (["export", "/nonexistent/run"], "no checkpoint"),
        (["train", "--device", "tpu"], "unknown device"),
        (["fly"], "invalid choice"),
    ]:
        r = run_cli(bench.main, *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
