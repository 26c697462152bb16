"""fastrms.report and ``fastrms bench``: the sweep, its JSON, table, plot and README block."""

import json

import pytest

from fastrms import cli
from fastrms.bench import report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme, page = out / "README.md", out / "performance.md"
    for path in (readme, page):
        path.write_text(f"# x\n\nbefore\n{report.README_START}\nold table\n{report.README_END}\nafter\n")
    argv = [
        "bench",
        "--quick",
        "--sizes",
        "100",
        "2e3",
        "--variants",
        "plain",
        "--rounds",
        "1",
        "--output",
        str(out),
        "--no-progress",
        "--readme",
        str(readme),
        str(page),
    ]
    assert cli.main(argv) == 0
    return out, readme


def test_bench_writes_json_markdown_and_plot(quick_run):
    out, _ = quick_run
    result = json.loads((out / "bench.json").read_text())
    assert [r["n"] for r in result["rows"]] == [100, 2000]
    assert {"fastrms", "numpy_seed", "numpy_out", "traffic"} <= result["rows"][0]["seconds"].keys()
    assert result["machine"]["numba"] and result["command"].startswith("fastrms bench --quick")
    assert "| plain | float32 | 1e+02 |" in (out / "bench.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bench-limit.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_block_is_replaced_and_the_rest_kept(quick_run):
    out, readme = quick_run
    assert readme.read_text() == (out / "performance.md").read_text()
    text = readme.read_text()
    assert "old table" not in text and "before" in text and "after" in text
    assert "| variant | dtype |" in text and "by `fastrms bench --quick" in text
    # the docs get the compact table: the limit's share, no per-limit or GB/s columns
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert header.split(" | ")[1:4] == ["dtype", "n", "us/step"] and "% limit" in header
    assert "GB/s" not in header and "% traffic" not in header and "min" not in header
    assert "GB/s" in (out / "bench.md").read_text()


def test_readme_without_markers_is_refused(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- bench:start -->"):
        report.update_readme(path, "table")
    assert path.read_text() == "no markers"


def test_unknown_variant_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--variants", "adam", "--output", str(tmp_path), "--no-progress"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_bench_threshold_reports_the_crossover(capsys):
    argv = ["bench", "--threshold", "--variants", "plain", "--dtypes", "float32", "--rounds", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "PARALLEL_MIN_BYTES = 786432" in out and "parallel first faster at" in out


def test_bench_many_prints_the_ratio_to_one_array(capsys, monkeypatch):
    from fastrms.bench import timing

    monkeypatch.setattr(timing, "many_arrays", lambda dtype, rounds: {"one array": 1e-4, "200 arrays": 3e-4})
    fixed = {1000: {"RMSprop.step": 2.1e-6, "kernels.rmsprop_update": 0.84e-6}}
    monkeypatch.setattr(timing, "fixed_cost", lambda rounds: fixed)
    assert cli.main(["bench", "--many", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "3.00x one array" in out and "1.00x one array" in out
    assert "one array of 1000, medians: RMSprop.step 2.10 us" in out and "0.84 us: 2.50x" in out


def test_bench_clipped_prints_each_case_against_the_unclipped_step(capsys, monkeypatch):
    from fastrms.bench import timing

    row = {"variant": "plain", "size": 10**7, "read pass": 1e-4, **{k: 1e-3 for k in timing.CLIP_CASES}}
    row["clip_global_norm"] = 1.25e-3
    monkeypatch.setattr(timing, "clipped", lambda dtype, **kw: [row])
    assert cli.main(["bench", "--clipped", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "clip_global_norm 1.25x" in out and "clip_value 1.00x" in out and "read pass of g) 1.10x" in out


def test_two_saved_runs_are_compared_cell_by_cell(quick_run, tmp_path, capsys):
    out, _ = quick_run
    result = json.loads((out / "bench.json").read_text())
    for row in result["rows"]:
        row["seconds"]["fastrms"] *= 3
        row["samples"]["fastrms"] = [row["seconds"]["fastrms"]] * 3
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(result))
    capsys.readouterr()
    assert cli.main(["bench", "--compare", str(out / "bench.json"), str(slower)]) == 0
    text = capsys.readouterr().out
    assert text.count("(slower)") == 2 and "3.00x" in text
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    assert cli.main(["bench", "--compare", str(junk), str(slower)]) == 2
    assert "is not a bench.json" in capsys.readouterr().err


def test_the_progress_lines_estimate_the_time_left(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def without_rich(name, *args, **kwargs):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_rich)
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    bar = report._progress(4)  # starts at t = 100
    bar.update("first")
    bar.advance()
    bar.update("second")  # t = 110: 10 s for one case, 3 left
    bar.advance()
    bar.update("third")  # t = 130: 15 s a case, 2 left
    err = capsys.readouterr().err.splitlines()
    assert err == ["[1/4] first", "[2/4] second (about 30 s left)", "[3/4] third (about 30 s left)"]


def _run_json(**row):
    cell = {"variant": "plain", "dtype": "float32", "n": 1000, "seconds": {"fastrms": 1e-5}}
    cell["samples"] = {"fastrms": [1e-5, 1.1e-5, 0.9e-5]}
    return {"date": "2026-12-07", "rows": [{**cell, **row}]}


MALFORMED = {
    "not JSON": b"{",
    "not UTF-8": b"\xff\xfe{}",
    "a list": b"[1, 2]",
    "no rows": json.dumps({"date": "x"}).encode(),
    "empty rows": json.dumps({"date": "x", "rows": []}).encode(),
    "no date": json.dumps({"rows": _run_json()["rows"]}).encode(),
    "a row missing n": json.dumps(_run_json(n=None)).encode(),
    "n Infinity": json.dumps(_run_json(n=1000)).replace("1000", "Infinity").encode(),
    "n NaN": json.dumps(_run_json(n=1000)).replace("1000", "NaN").encode(),
    "n 2.5": json.dumps(_run_json(n=2.5)).encode(),
    "n true": json.dumps(_run_json(n=True)).encode(),
    "zero seconds": json.dumps(_run_json(seconds={"fastrms": 0})).encode(),
    "string seconds": json.dumps(_run_json(seconds={"fastrms": "1e-5"})).encode(),
    "no fastrms seconds": json.dumps(_run_json(seconds={"numpy_seed": 1e-5})).encode(),
    "samples not a list": json.dumps(_run_json(samples={"fastrms": 1e-5})).encode(),
    "a zero sample": json.dumps(_run_json(samples={"fastrms": [1e-5, 0.0]})).encode(),
    "a row that is a string": json.dumps({"date": "x", "rows": ["plain"]}).encode(),
}


@pytest.mark.parametrize("kind", [*MALFORMED, "a FIFO", "/dev/zero", "a folder", "a huge file", "no shared cell"])
def test_compare_refuses_malformed_or_foreign_runs_in_one_line(kind, tmp_path, capsys):
    import os

    good = tmp_path / "good.json"
    good.write_text(json.dumps(_run_json()))
    bad = tmp_path / "bad.json"
    if kind in MALFORMED:
        bad.write_bytes(MALFORMED[kind])
    elif kind == "a FIFO":
        os.mkfifo(bad)  # reading it would wait for a writer forever
    elif kind == "/dev/zero":
        bad = "/dev/zero"  # endless: reading it to the end would exhaust memory
    elif kind == "a folder":
        bad.mkdir()
    elif kind == "a huge file":
        with open(bad, "wb") as f:
            f.truncate(report.MAX_RUN_BYTES + 1)  # sparse: no disk used
    else:
        bad.write_text(json.dumps(_run_json(n=2000)))
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["bench", "--compare", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("fastrms: error: --compare"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing created


def test_compare_reads_a_minimal_run_and_says_which_cells_moved(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_run_json()))
    new.write_text(json.dumps(_run_json(seconds={"fastrms": 2e-5}, samples={"fastrms": [2e-5] * 3})))
    assert cli.main(["bench", "--compare", str(old), str(new)]) == 0
    text = capsys.readouterr().out
    assert "2.00x" in text and "(slower)" in text
