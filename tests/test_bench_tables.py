"""`fastrms.bench.tables`: each row's derived figures and its table cells."""

import pytest

from fastrms.bench import tables


def test_summary_figures_are_ratios_of_the_medians():
    row = dict(n=10, bytes_per_step=200, seconds=dict(fastrms=1e-6, traffic=5e-7, numpy_seed=4e-6, numpy_out=2e-6))
    fig = tables.summarize(row)
    assert fig["gb_per_s"] == pytest.approx(0.2) and fig["pct_of_limit"] == pytest.approx(50.0)
    assert fig["x_seed"] == pytest.approx(4.0) and fig["x_out"] == pytest.approx(2.0) and fig["x_torch"] is None


def test_each_cell_reports_its_spread_and_a_noisy_cell_is_flagged():
    calm = dict(n=10, bytes_per_step=200, seconds=dict(fastrms=1e-6), samples=dict(fastrms=[1e-6] * 4 + [1.1e-6]))
    noisy = dict(calm, samples=dict(fastrms=[0.5e-6, 0.8e-6, 1e-6, 1.5e-6, 8e-6]))
    a, b = tables.summarize(calm), tables.summarize(noisy)
    assert a["min_us"] == pytest.approx(1.0) and a["iqr_pct"] == pytest.approx(0.0) and not a["unstable"]
    assert b["min_us"] == pytest.approx(0.5) and b["iqr_pct"] == pytest.approx(70.0) and b["unstable"]
    row = {**noisy, "variant": "plain", "dtype": "float32"}
    cells = dict(zip([h for h, _, _ in tables.COLUMNS], tables.table_rows([row])[0]))
    assert cells["IQR"] == "70% !" and cells["min"] == "0.5" and cells["x seed NumPy"] == "-"


def test_the_rich_table_keeps_the_full_variant_names():
    pytest.importorskip("rich")
    import io

    row = dict(variant="centered_momentum", dtype="float32", n=1000, bytes_per_step=100,
               seconds=dict(fastrms=1e-6, traffic=5e-7, numpy_seed=4e-6, numpy_out=2e-6))  # fmt: skip
    result = dict(version="x", rounds=1, date="d", command="c", rows=[row],
                  machine=dict(cpu="cpu", cores=2, threads=2, python="3"))  # fmt: skip
    out = io.StringIO()
    tables.print_table(result, file=out)
    text = out.getvalue()
    assert "centered_momentum" in text and "…" not in text
    drawn = [line.rstrip() for line in text.splitlines() if line.strip()[:1] in "┏┃┡│└"]
    assert drawn and all(line[-1] in "┓┃┩│┘" for line in drawn)  # no column cropped at the right
    assert "x JAX" in text and "optax" in text


def _result(rows, load=0.1):
    return dict(version="x", rounds=3, date="d", command="c", rows=rows,
                machine=dict(cpu="cpu", cores=2, threads=2, python="3", load=load))  # fmt: skip


def _row(fastrms, traffic, traffic_samples=None):
    seconds = dict(fastrms=fastrms, traffic=traffic, numpy_seed=4e-6)
    samples = dict(fastrms=[fastrms] * 5, traffic=traffic_samples or [traffic] * 5)
    return dict(variant="plain", dtype="float32", n=10, bytes_per_step=200, seconds=seconds, samples=samples)


def test_a_step_faster_than_its_limit_or_a_wobbling_limit_is_noise_and_its_ratios_are_not_reported():
    quiet, beyond = _row(1e-6, 9e-7), _row(1e-6, 1.2e-6)  # 120% of the limit: impossible, so noise
    wobbly = _row(1e-6, 9e-7, [5e-7, 7e-7, 9e-7, 1.2e-6, 2e-6])
    assert [tables.summarize(r)["noisy"] for r in (quiet, beyond, wobbly)] == [False, True, True]
    cells = dict(zip([h for h, _, _ in tables.COLUMNS], tables.table_rows([beyond])[0]))
    assert cells["% limit"] == "?" and cells["x seed NumPy"] == "?" and cells["x torch foreach"] == "-"
    assert cells["us/step"] == "1.0"  # the measurement itself stays
    assert tables.warning(_result([quiet])) is None
    top = tables.warning(_result([quiet, beyond, wobbly]))
    assert top.startswith("WARNING: 2 of 3 cells are noisy") and "their ratios show as ?" in top
    assert "the machine was busy when it started (load 90% of its cores)" in tables.warning(_result([quiet], 0.9))
    assert tables.markdown(_result([beyond])).startswith("WARNING:")
