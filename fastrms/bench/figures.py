"""The two figures of a `fastrms bench` run for the docs: GB/s against n per dtype (the
plain variant, fastrms, each peer and the limit the tables use), and each variant's % of
that limit against n. matplotlib draws them (headless, Agg)."""

from pathlib import Path

from .tables import summarize


def plot(result, path):
    """Two figures for the docs, sized for a page's width: `path` (GB/s against n, log
    axes, per dtype, for the plain variant: fastrms, each peer, and the limit the tables
    use, the slower of the same-traffic kernel and the bespoke loop) and `path` with
    `-limit` before its suffix (each variant's % of that limit against n). Returns both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dtypes = sorted({r["dtype"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shown = "plain" if "plain" in variants else variants[0]
    styles = {
        "fastrms": dict(color="C3", marker="o", lw=2.2, label="fastrms RMSprop.step"),
        "numpy_seed": dict(color="C0", marker="s", label="seed's NumPy"),
        "numpy_out": dict(color="C2", marker="^", label="NumPy with out="),
        "torch_foreach": dict(color="C4", marker="D", label="torch foreach"),
        "jax_optax": dict(color="C1", marker="v", label="optax under jax.jit"),
        "limit": dict(color="k", ls="--", lw=1.5, label="limit: slower of same-traffic and bespoke"),
    }
    title = f"fastrms {result['version']}, {result['machine']['cpu']}, {result['machine']['threads']} threads"
    with plt.rc_context({"font.size": 14}):  # readable at a docs page's width (about 750 px)
        fig, axes = plt.subplots(1, len(dtypes), figsize=(4.8 * len(dtypes), 5.2), squeeze=False, sharey=True)
        for ax, dtype in zip(axes[0], dtypes):
            cells = [r for r in rows if r["variant"] == shown and r["dtype"] == dtype]
            for name, style in styles.items():
                pts = []
                for r in cells:
                    s = r["seconds"]
                    t = max(s[k] for k in ("traffic", "bespoke") if k in s) if name == "limit" else s.get(name)
                    if t:
                        pts.append((r["n"], r["bytes_per_step"] / t / 1e9))
                if pts:
                    ax.plot(*zip(*pts), **style)
            ax.set(xscale="log", yscale="log", title=f"{shown}, {dtype}", xlabel="elements n")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("GB/s (bytes the step moves / time)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        path = Path(path)
        fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend below whole, however narrow the figure
        plt.close(fig)

        fig, axes = plt.subplots(1, len(dtypes), figsize=(4.8 * len(dtypes), 4.6), squeeze=False, sharey=True)
        top = max([130.0, *(10 + (summarize(r)["pct_of_limit"] or 0) for r in rows)])
        for ax, dtype in zip(axes[0], dtypes):
            for k, variant in enumerate(variants):
                cells = [r for r in rows if r["variant"] == variant and r["dtype"] == dtype]
                pts = [(r["n"], summarize(r)["pct_of_limit"]) for r in cells]
                pts = [(n, pct) for n, pct in pts if pct is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{k}", label=variant)
            ax.axhline(100, color="k", ls="--", lw=1)
            ax.set(xscale="log", title=f"% of the limit, {dtype}", xlabel="elements n", ylim=(0, top))
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("% of the limit (100% = at it)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(variants), 2), frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.16, 1, 1))
        limit_path = path.with_name(f"{path.stem}-limit{path.suffix}")
        fig.savefig(limit_path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return path, limit_path
