"""`fastrms.bench.figures`: what the docs' plots draw."""

import pytest

from fastrms.bench import figures


def test_the_plot_draws_the_limit_the_tables_use(tmp_path):
    """The dashed line is the slower of the same-traffic kernel and the bespoke loop: the
    `% limit` of the tables, not the traffic kernel alone."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = [
        dict(variant="plain", dtype="float32", n=n, bytes_per_step=1000 * n,
             seconds=dict(fastrms=2e-6 * n, traffic=1e-6 * n, bespoke=1.5e-6 * n, numpy_seed=4e-6 * n))
        for n in (100, 1000)
    ]  # fmt: skip
    result = dict(version="x", machine=dict(cpu="cpu", threads=2), rows=rows)
    drawn = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, path, **kwargs):
        drawn[str(path)] = {line.get_label(): line.get_ydata() for ax in fig.axes for line in ax.get_lines()}
        return real_savefig(fig, path, **kwargs)

    plt.Figure.savefig = keep
    try:
        gbs, pct = figures.plot(result, tmp_path / "b.png")
    finally:
        plt.Figure.savefig = real_savefig
    lines = drawn[str(gbs)]
    limit = next(v for k, v in lines.items() if k.startswith("limit"))
    assert list(limit) == pytest.approx([1000 / 1.5e-6 / 1e9] * 2)  # the bespoke loop, the slower here
    assert list(drawn[str(pct)]["plain"]) == pytest.approx([75.0, 75.0])


def test_a_one_dtype_plot_keeps_its_legend_whole(tmp_path):
    """--quick plots one dtype: a narrow figure whose legend (every peer) is wider than its
    axes. Nothing drawn may touch the image's left or right edge (a cut legend does)."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    peers = dict(traffic=1e-6, bespoke=1.5e-6, numpy_seed=4e-6, numpy_out=3e-6, torch_foreach=3e-6, jax_optax=3e-6)
    rows = [
        dict(variant=v, dtype="float32", n=n, bytes_per_step=1000 * n,
             seconds={"fastrms": 2e-6 * n, **{k: t * n for k, t in peers.items()}})
        for v in ("plain", "centered_momentum") for n in (100, 1000)
    ]  # fmt: skip
    result = dict(version="x", machine=dict(cpu="cpu", threads=2), rows=rows)
    for path in figures.plot(result, tmp_path / "b.png"):
        image = matplotlib.image.imread(path)[..., :3]
        edges = image[:, [0, 1, -2, -1]]
        assert edges.min() > 0.95, path  # white: the legend's text lies inside the picture
