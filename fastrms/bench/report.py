"""`fastrms bench`: sweep sizes, print the table, write JSON, a plot and the README block.

Every figure is a ratio measured in one process (see `fastrms.bench.peers` and `fastrms.bench.timing`):

- `us/step`: median microseconds of `RMSprop.step` (validation included);
- `GB/s`: bytes a fused step must move divided by that time;
- `% traffic`: the same-traffic kernel's time over fastrms's (100 % = at the bandwidth limit);
- `% bespoke`: the bespoke loop's time over fastrms's (100 % = as fast as a loop hand-written
  for that one variant, constants folded);
- `% limit`: the slower of those two kernels over fastrms's: the limit of an exact step;
- `x seed` / `x out=` / `x torch` / `x JAX`: how many times faster than the seed's
  NumPy step, NumPy with `out=` buffers, `torch.optim.RMSprop(foreach=True)` and optax's
  rmsprop under `jax.jit` with donated buffers.
"""

import json
import sys
import time
from pathlib import Path

from .. import __version__, runtime
from . import peers, timing
from .cases import ALL, MAIN

FULL_SIZES = (100, 1_000, 10_000, 100_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000)
QUICK_SIZES = (100, 10_000, 1_000_000, 10_000_000)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def sweep(variants, dtypes, sizes, rounds, target, progress=True):
    """Measure every implementation on every (variant, dtype, size); returns result rows."""
    cases = [(v, d, n) for v in variants for d in dtypes for n in sizes]
    rows = []
    bar = _progress(len(cases)) if progress else None
    try:
        for variant, dtype, n in cases:
            if bar:
                bar.update(f"{variant} {dtype} n={n:.0e}")
            problem = peers.Problem(n, dtype, ALL[variant])
            samples = {}
            times = timing.measure(problem, list(peers.IMPLEMENTATIONS), rounds=rounds, target=target, samples=samples)
            rows.append(
                dict(
                    variant=variant,
                    dtype=dtype,
                    n=n,
                    bytes_per_step=problem.bytes_per_step,
                    seconds=times,
                    samples=samples,
                )  # fmt: skip
            )
            del problem
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.close()
    return rows


class _progress:
    """A rich progress bar (elapsed time and an estimate of the time left) when rich is
    installed, plain lines on stderr otherwise (with the same estimate: the mean time of the
    cases done so far, times the cases left)."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            self.rich = None
            return
        self.rich = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.rich.start()
        self.task = self.rich.add_task("", total=total)

    def eta(self):
        """Seconds left, from the mean time of the cases done (None before the first)."""
        if not self.done:
            return None
        return (time.perf_counter() - self.start) / self.done * (self.total - self.done)

    def update(self, text):
        if self.rich:
            self.rich.update(self.task, description=text)
        else:
            left = self.eta()
            eta = "" if left is None else f" (about {left:.0f} s left)"
            print(f"[{self.done + 1}/{self.total}] {text}{eta}", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self.rich:
            self.rich.advance(self.task)

    def close(self):
        if self.rich:
            self.rich.stop()


def summarize(row):
    """The derived figures of one result row (None where an implementation did not run)."""
    s = row["seconds"]
    f = s["fastrms"]

    def ratio(name):
        return s[name] / f if name in s else None

    bounds = [s[k] for k in ("traffic", "bespoke") if k in s]
    own = row.get("samples", {}).get("fastrms")
    low, _, iqr = timing.spread(own) if own else (f, f, 0.0)
    return {
        "us_per_step": f * 1e6,
        "min_us": low * 1e6,
        "iqr_pct": 100.0 * iqr / f,
        "unstable": iqr > UNSTABLE * f,
        "gb_per_s": row["bytes_per_step"] / f / 1e9,
        "pct_of_traffic": 100.0 * s["traffic"] / f if "traffic" in s else None,
        "pct_of_bespoke": 100.0 * s["bespoke"] / f if "bespoke" in s else None,
        "pct_of_limit": 100.0 * max(bounds) / f if bounds else None,
        "x_seed": ratio("numpy_seed"),
        "x_out": ratio("numpy_out"),
        "x_torch": ratio("torch_foreach"),
        "x_jax": ratio("jax_optax"),
    }


#: A cell whose fastrms samples have an IQR above this share of their median is flagged (!).
UNSTABLE = 0.2

COLUMNS = [
    ("variant", "variant", "{}"),
    ("dtype", "dtype", "{}"),
    ("n", "n", "{:.0e}"),
    ("us/step", "us_per_step", "{:.1f}"),
    ("min", "min_us", "{:.1f}"),
    ("IQR", "iqr_pct", "{:.0f}%"),
    ("GB/s", "gb_per_s", "{:.1f}"),
    ("% traffic", "pct_of_traffic", "{:.0f}%"),
    ("% bespoke", "pct_of_bespoke", "{:.0f}%"),
    ("% limit", "pct_of_limit", "{:.0f}%"),
    ("x seed NumPy", "x_seed", "{:.1f}x"),
    ("x NumPy out=", "x_out", "{:.1f}x"),
    ("x torch foreach", "x_torch", "{:.1f}x"),
    ("x JAX optax", "x_jax", "{:.1f}x"),
]


def table_rows(rows):
    out = []
    for row in rows:
        fig = {**row, **summarize(row)}
        cells = [("-" if fig[key] is None else fmt.format(fig[key])) for _, key, fmt in COLUMNS]
        if fig["unstable"]:
            cells[[k for _, k, _ in COLUMNS].index("iqr_pct")] += " !"
        out.append(cells)
    return out


#: The columns of the table written into the README and the docs (the full table, with
#: `min`, GB/s and each limit's share, goes into the output folder's bench.md).
COMPACT = ("variant", "dtype", "n", "us/step", "IQR", "% limit", "x seed NumPy", "x NumPy out=", "x torch foreach",
           "x JAX optax")  # fmt: skip


def markdown(result, compact=False):
    """The table (only the `COMPACT` columns when `compact`) and a footnote naming
    machine, versions and command."""
    keep = [i for i, (h, _, _) in enumerate(COLUMNS) if not compact or h in COMPACT]
    lines = ["| " + " | ".join(COLUMNS[i][0] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in table_rows(result["rows"])]
    return "\n".join([*lines, "", footnote(result, compact)])


def footnote(result, compact=False):
    """What the table's figures are, and where and how they were measured."""
    m = result["machine"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "numba", "torch", "jax", "optax") if k in m)
    limits = (
        "`% limit` is the limit's time over fastrms's: the slower of the same-traffic kernel (the step's bytes, no "
        "arithmetic) and the bespoke loop (the variant's formula, constants folded); the full table (`min`, GB/s, "
        "each limit's share) is in the run's bench.md"
        if compact
        else "`% traffic` and `% bespoke` are the same-traffic kernel's and the bespoke loop's time over fastrms's, "
        "`% limit` the slower of the two over fastrms's"
    )
    return "".join(
        [
            f"Medians of {result['rounds']} interleaved rounds on {m['cpu']} ({m['cores']} cores, "
            f"{m['threads']} Numba threads, threading layer {m.get('threading_layer', '?')}); {versions}; "
            f"fastrms {result['version']}. Generated {result['date']} by `{result['command']}`. "
            "`us/step` is fastrms's median"
            + ("" if compact else ", `min` its fastest round")
            + ", `IQR` the spread of its rounds "
            f"(the interquartile range over the median; `!` marks a cell above {UNSTABLE:.0%}: a noisy run, "
            f"measure it again). {limits}; `x ...` are speed-ups of "
            "`RMSprop.step` (validation included) over each peer; `-` marks a peer not installed here "
            "(or a dtype it does not run).",
        ]
    )


def print_table(result, file=sys.stdout):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(result), file=file)
        return
    table = Table(title=f"fastrms {result['version']} on {result['machine']['cpu']}")
    rows = table_rows(result["rows"])
    for i, (header, key, _) in enumerate(COLUMNS):
        # nothing is cut ("centered_…", "us/st…"): each column is as wide as its longest cell or
        # header word, headers wrap at spaces, and the console is as wide as the table needs
        label = key in ("variant", "dtype", "n")
        width = max([len(r[i]) for r in rows] + [len(word) for word in header.split()])
        table.add_column(header, justify="left" if label else "right", no_wrap=label, min_width=width)
    for r in rows:
        table.add_row(*r)
    console = Console(file=file, width=max(_uncut_width(table), Console(file=file).width))
    console.print(table)
    console.print(footnote(result), soft_wrap=True, highlight=False, markup=False)


def _uncut_width(table):
    """The narrowest console width at which rich draws `table` whole (its own minimum
    measurement can be a few columns short, and then it crops the last column)."""
    import io

    from rich.console import Console

    narrowest = Console(width=1000).measure(table).minimum
    for width in range(narrowest, narrowest + 64):
        out = io.StringIO()
        Console(file=out, width=width).print(table)
        top = next(line for line in out.getvalue().splitlines() if line.strip().startswith("┏"))
        if top.rstrip().endswith("┓"):
            return width
    return Console(width=1000).measure(table).maximum


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
        fig.savefig(path, dpi=110)
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
        fig.savefig(limit_path, dpi=110)
        plt.close(fig)
    return path, limit_path


def update_readme(path, block):
    """Replace the text between the bench markers of `path` with `block`."""
    path = Path(path)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} block to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}")


def run_threshold(variants=None, dtypes=None, rounds=None):
    """`fastrms bench --threshold`: where the parallel shell starts to win."""
    from .. import kernels

    variants = variants or ["plain", "centered_momentum"]
    dtypes = dtypes or ["float32", "float64"]
    print(f"PARALLEL_MIN_BYTES = {kernels.PARALLEL_MIN_BYTES} bytes moved per step")
    for variant in variants:
        for dtype in dtypes:
            rows, first = timing.crossover(ALL[variant], dtype, rounds=7 if rounds is None else rounds)
            cells = "  ".join(f"{n}:{s * 1e6:.1f}/{p * 1e6:.1f}us" for n, _, s, p in rows)
            won = "never" if first is None else f"n={first} ({next(b for n, b, _, _ in rows if n == first)} bytes)"
            print(f"{variant} {dtype}: serial/parallel {cells}\n  parallel first faster at {won}")
    return 0


def run_many(dtypes=None, rounds=None):
    """`fastrms bench --many`: a whole model (many arrays) against one array of its size."""
    for dtype in dtypes or ["float32"]:
        times = timing.many_arrays(dtype, rounds=7 if rounds is None else rounds)
        base = times["one array"]
        print(f"{dtype}, 1e6 elements in all, RMSprop.step (plain), medians:")
        for label, seconds in times.items():
            print(f"  {label:34s} {seconds * 1e6:9.1f} us  {seconds / base:5.2f}x one array")
    return 0


def run_dask(rounds=None, total=None):
    """`fastrms bench --dask`: the fused step over dask arrays on a LocalCluster."""
    n = int(total or 200_000_000)
    chunk = min(10_000_000, n)
    r = timing.dask_step(total=n, chunk=chunk, rounds=7 if rounds is None else rounds)
    single = r["fastrms.RMSprop, one process"]
    print(f"float32, {n} elements in chunks of {chunk}, 2 single-threaded workers, medians:")
    for label in (
        "fastrms.dask, fused map",
        "fastrms.dask, fused map, donate=True",
        "dask.array NumPy expressions",
        "fastrms.RMSprop, one process",
        "out-of-place fused step, one process",
    ):
        print(f"  {label:39s} {r[label] * 1e3:9.1f} ms  throughput {single / r[label]:6.1%} of one process")
    fused = r["fastrms.dask, fused map"]
    print(f"  fused map vs NumPy expressions: {r['dask.array NumPy expressions'] / fused:.2f}x faster")
    for label in ("fastrms.dask, fused map", "fastrms.dask, fused map, donate=True"):
        print(
            f"  {label}: {r['tasks']} tasks a step, kernel {r['kernel, ' + label] * 1e3:.1f} ms a task (task stream "
            f"median); the workers compute {r['busy, ' + label]:.0%} of a step's time (the rest: Dask's messages "
            "and scheduling)"
        )
    return 0


def run_sparse(rounds=None):
    """`fastrms bench --sparse`: step_rows on a (1e6, 64) float32 table against dense steps."""
    times = timing.sparse_rows(rounds=7 if rounds is None else rounds)
    print("float32 (1000000, 64) table, medians:")
    for label, seconds in times.items():
        print(f"  {label:44s} {seconds * 1e3:9.3f} ms")
    t = list(times.values())
    print(f"  step_rows / dense step over the same rows: {t[0] / t[3]:.2f}x (lazy), {t[1] / t[3]:.2f}x (dense_rows)")
    print(f"  with duplicates / dense step over the distinct rows: {t[2] / t[4]:.2f}x")
    print(f"  the whole-table dense step / step_rows: {t[5] / t[0]:.0f}x (lazy), {t[5] / t[1]:.0f}x (dense_rows)")
    print(f"  step_rows / the traffic limit of its rows: {t[0] / t[6]:.2f}x (lazy), {t[1] / t[6]:.2f}x (dense_rows)")
    print(
        f"  with duplicates / their traffic limit: {t[2] / t[7]:.2f}x; that limit alone is {t[7] / t[4]:.2f}x "
        "the dense step over the distinct rows (which sit in cache; the table's rows do not)"
    )
    numpy = f"{t[8] / t[0]:.1f}x, {t[9] / t[2]:.1f}x with duplicates"
    print(f"  NumPy (np.unique, np.add.at, fastrms.reference) / step_rows: {numpy}")
    print(f"  a small batch (one thread) / dense step over the same rows: {t[10] / t[11]:.2f}x")
    return 0


def run_cold(rounds=None):
    """`fastrms bench --cold`: import and first steps in fresh processes, against Numba's
    own start-up; the first-ever compile of each shell."""
    from . import cold

    cold.report(cold.measure(rounds=5 if rounds is None else rounds))
    return 0


def run_torch(rounds=None, widths=(100,)):
    """`fastrms bench --torch`: the fused torch optimizer against torch's, and the
    optimizer's share of a training step, for 100 layers of each width."""
    rounds = 7 if rounds is None else rounds
    for width in widths:
        _run_torch(timing.torch_steps(width=width, rounds=rounds))
    n, width, k = 200_000, 64, 4096
    steps = timing.torch_embedding(n, width, k, rounds=rounds)
    ours = steps["fastrms.torch, dense grad"]
    print(f"nn.Embedding({n}, {width}), float32, a batch of {k} random indices, optimizer step, medians:")
    for name, seconds in steps.items():
        print(f"  {name:40s} {seconds * 1e3:8.3f} ms  {seconds / ours:6.3f}x fastrms.torch's dense step")
    return 0


def _run_torch(r):
    ours = r["step"]["fastrms.torch.RMSprop"]
    print(f"float32, {r['tensors']} tensors, {r['params']} params, optimizer step, medians:")
    for name, seconds in r["step"].items():
        print(f"  {name:36s} {seconds * 1e3:8.3f} ms  {seconds / ours:5.2f}x fastrms.torch")
    for name, seconds in r.get("compile", {}).items():
        print(f"  {name}: compiling took {seconds:.1f} s (its first call), the price of each new process")
    print("whole training step (zero_grad, forward, backward, step), medians:")
    for name, seconds in r["train"].items():
        share = r["step"][name] / seconds
        print(f"  {name:36s} {seconds * 1e3:8.3f} ms  optimizer {share:6.1%} of it")


def run_clipped(dtypes=None, rounds=None, sizes=None, variants=None):
    """`fastrms bench --clipped`: clipping's cost against the unclipped step."""
    for dtype in dtypes or ["float32"]:
        rows = timing.clipped(
            dtype, sizes=sizes or (10_000_000, 1_000_000), variants=variants, rounds=7 if rounds is None else rounds
        )
        print(f"{dtype}, RMSprop.step, medians (x: against the unclipped step of the same variant and size):")
        for row in rows:
            base = row["unclipped"]
            cases = [k for k in timing.CLIP_CASES if k != "unclipped"]
            shown = "  ".join(f"{k} {row[k] / base:4.2f}x" for k in cases)
            floor = (base + row["read pass"]) / base
            print(
                f"  {row['variant']:18s} n={row['size']:<9.0e} unclipped {base * 1e3:7.3f} ms  {shown}"
                f"  | floor (step + one read pass of g) {floor:4.2f}x"
            )
    return 0


def run(
    *,
    output,
    command,
    quick=False,
    sizes=None,
    variants=None,
    dtypes=None,
    rounds=None,
    readme=(),
    progress=True,
):
    """Sweep, print the table, and write `bench.json`, `bench.md` and `bench.png` into
    `output` (and the table into each `readme`). `command` is how it was invoked, for
    the footnote. Arguments are already checked (see `fastrms.cli`)."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    variants = variants or (["plain", "centered_momentum"] if quick else list(MAIN))
    dtypes = dtypes or (["float32"] if quick else ["float32", "float64"])
    rounds = rounds if rounds is not None else (3 if quick else 7)
    target = 0.005 if quick else 0.03
    rows = sweep(variants, dtypes, sizes, rounds, target, progress=progress)
    machine = timing.machine()
    machine["threading_layer"] = runtime.active_layer() or "unused"
    result = dict(
        version=__version__,
        date=time.strftime("%Y-%m-%d"),
        command=command,
        rounds=rounds,
        machine=machine,
        rows=rows,
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result) + "\n")
    print_table(result)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    try:
        print("wrote " + " and ".join(str(p) for p in plot(result, out / "bench.png")))
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'fastrms[bench]')", file=sys.stderr)
    for path in readme or ():
        update_readme(path, markdown(result, compact=True))
        print(f"updated the benchmark table in {path}")
    return 0


def compare(old_path, new_path, file=None):
    """`fastrms bench --compare OLD.json NEW.json`: fastrms's median per cell in two saved
    runs, their ratio, and whether the change is larger than the two runs' spreads."""
    file = sys.stdout if file is None else file
    old, new = from_json(old_path), from_json(new_path)
    before = {(r["variant"], r["dtype"], r["n"]): r for r in old["rows"]}
    print(f"fastrms's step, {old_path} ({old['date']}) -> {new_path} ({new['date']}), medians:", file=file)
    shared = 0
    for row in new["rows"]:
        key = (row["variant"], row["dtype"], row["n"])
        if key not in before:
            continue
        shared += 1
        a, b = summarize(before[key]), summarize(row)
        change = b["us_per_step"] / a["us_per_step"]
        noise = (a["iqr_pct"] + b["iqr_pct"]) / 100.0
        verdict = "within the runs' spread" if abs(change - 1.0) <= noise else ("slower" if change > 1 else "faster")
        print(
            f"  {key[0]:24s} {key[1]:8s} n={key[2]:<9.0e} {a['us_per_step']:10.1f} -> {b['us_per_step']:10.1f} us"
            f"  {change:5.2f}x  ({verdict})",
            file=file,
        )
    if not shared:
        raise ValueError(f"{old_path} and {new_path} share no (variant, dtype, size) cell")
    return 0


def from_json(path):
    """Reload a result written by `fastrms bench` (for re-rendering)."""
    result = json.loads(Path(path).read_text())
    for row in result["rows"]:
        row["n"] = int(row["n"])
    return result
