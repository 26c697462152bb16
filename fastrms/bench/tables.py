"""The figures and tables of a `fastrms bench` run: each result row's derived ratios
(`summarize`), the markdown table (full, or compact for the README and the docs) with its
footnote, and the rich table in the terminal (every column whole). What each column means
is in `fastrms.bench.report`'s docstring.
"""

import sys

from . import timing


def summarize(row):
    """The derived figures of one result row (None where an implementation did not run)."""
    s = row["seconds"]
    f = s["fastrms"]

    def ratio(name):
        return s[name] / f if name in s else None

    bounds = [s[k] for k in ("traffic", "bespoke") if k in s]
    own = row.get("samples", {}).get("fastrms")
    low, _, iqr = timing.spread(own) if own else (f, f, 0.0)
    floor = row.get("samples", {}).get("traffic")  # the limit kernel does the same work every round
    floor_iqr = timing.spread(floor)[2] / s["traffic"] if floor else 0.0
    pct_of_limit = 100.0 * max(bounds) / f if bounds else None
    return {
        "us_per_step": f * 1e6,
        "min_us": low * 1e6,
        "iqr_pct": 100.0 * iqr / f,
        "unstable": iqr > UNSTABLE * f,
        "gb_per_s": row["bytes_per_step"] / f / 1e9,
        "pct_of_traffic": 100.0 * s["traffic"] / f if "traffic" in s else None,
        "pct_of_bespoke": 100.0 * s["bespoke"] / f if "bespoke" in s else None,
        "pct_of_limit": pct_of_limit,
        "limit_iqr_pct": 100.0 * floor_iqr,
        # the machine's noise: fastrms's rounds or the limit kernel's spread apart, or a step
        # faster than the same bytes with no arithmetic
        "noisy": iqr > UNSTABLE * f or floor_iqr > UNSTABLE or (pct_of_limit or 0.0) > 100.0 * BEYOND_LIMIT,
        "x_seed": ratio("numpy_seed"),
        "x_out": ratio("numpy_out"),
        "x_torch": ratio("torch_foreach"),
        "x_jax": ratio("jax_optax"),
    }


#: A cell whose fastrms samples have an IQR above this share of their median is flagged (!).
UNSTABLE = 0.2
#: A step measured this much faster than its limit (the same bytes, no arithmetic) is noise.
BEYOND_LIMIT = 1.05
#: The ratio columns a noisy cell does not report ("?").
RATIOS = ("pct_of_traffic", "pct_of_bespoke", "pct_of_limit", "x_seed", "x_out", "x_torch", "x_jax")


def noise(result):
    """`(noisy cells, cells, load)`: how many cells of a run its own noise spoiled (see
    `summarize`) and the machine's 1-minute load average over its cores when it started
    (None where unknown)."""
    noisy = sum(summarize(row)["noisy"] for row in result["rows"])
    return noisy, len(result["rows"]), result["machine"].get("load")


def warning(result):
    """The line printed on top of a noisy run's table, or None."""
    noisy, cells, load = noise(result)
    busy = load is not None and load > 0.5
    if not noisy and not busy:
        return None
    why = []
    if busy:
        why.append(f"the machine was busy when it started (load {load:.0%} of its cores)")
    if noisy:
        why.append(
            f"{noisy} of {cells} cells are noisy (their rounds or the limit kernel's spread more than {UNSTABLE:.0%}, "
            f"or fastrms measured faster than the same bytes with no arithmetic): their ratios show as ?"
        )
    return "WARNING: " + "; ".join(why) + ". Run it again on a quiet machine before trusting the ratios."


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
        if fig["noisy"]:  # ratios this run cannot stand behind
            cells = [("?" if key in RATIOS and cell != "-" else cell) for (_, key, _), cell in zip(COLUMNS, cells)]
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
    top = warning(result)
    return "\n".join([*([top, ""] if top else []), *lines, "", footnote(result, compact)])


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
            f"measure it again; `?` a ratio a noisy cell cannot stand behind). {limits}; `x ...` are speed-ups of "
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
    top = warning(result)
    if top:
        print(top, file=file)
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
