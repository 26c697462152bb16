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
import math
import os
import stat
import sys
import time
from pathlib import Path

from .. import __version__
from ..core import runtime
from . import peers, row_timing, timing
from .cases import ALL, MAIN
from .figures import plot
from .tables import markdown, print_table

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
    for n, times in timing.fixed_cost(rounds=7 if rounds is None else rounds).items():
        step, raw = times["RMSprop.step"], times["kernels.rmsprop_update"]
        print(
            f"float32, one array of {n}, medians: RMSprop.step {step * 1e6:.2f} us, the raw kernel call "
            f"(kernels.rmsprop_update) {raw * 1e6:.2f} us: {step / raw:.2f}x (the optimizer's fixed cost)"
        )
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


def run_precision(rounds=None, sizes=None):
    """`fastrms bench --precision`: each `state_storage` of a float32 step against its own
    limit (the slower of its traffic kernel and its bespoke loop), plain variant."""
    from . import precision

    rows = precision.measure(sizes or (1_000_000, 10_000_000), rounds=7 if rounds is None else rounds)
    print("float32 params, plain variant, medians (limit: the slower of the mode's traffic kernel and bespoke loop):")
    print(
        f"  {'n':>10}  {'mode':11} {'us/step':>9} {'GB/s':>6} {'% limit':>8} {'x native':>8}  bytes/param: step, state"
    )
    for row in rows:
        for mode, f in precision.summarize(row).items():
            print(
                f"  {row['n']:>10}  {mode:11} {f['us']:9.1f} {f['gb_per_s']:6.1f} {f['pct_of_limit']:7.0f}% "
                f"{f['x_native']:8.2f}  {f['bytes_per_param_step']:.4g}, {f['state_bytes_per_param']:.4g}"
            )
            if "x_bitsandbytes" in f:
                bnb = row["seconds"][("8bit", "bitsandbytes")]
                print(
                    f"  {'':>10}  {'':11} bitsandbytes RMSprop8bit (CPU): {bnb * 1e6:.1f} us/step, "
                    f"{f['x_bitsandbytes']:.1f}x slower than fastrms's 8bit"
                )
    return 0


def run_master(rounds=None, no_compile=False):
    """`fastrms bench --master`: a bfloat16 model's step, fastrms.torch over float32 masters
    against torch's RMSprop over float32 masters with the copies by hand (`fastrms.bench.master`)."""
    from . import master

    rows = master.measure(rounds=7 if rounds is None else rounds, compiled=not no_compile)
    print("bfloat16 params and grads, float32 masters, lr 1e-3, torch's defaults, optimizer step, medians:")
    for row in rows:
        s = row["seconds"]
        print(f"  {row['model']} ({row['params']} params):")
        for name, seconds in s.items():
            print(f"    {name:20s} {seconds * 1e3:9.3f} ms  {seconds / s['fastrms']:6.2f}x fastrms")
        if row["compile_s"] is not None:
            print(f"    torch.compile's first call (the compile): {row['compile_s']:.1f} s")
    return 0


def run_accuracy(output, steps=None, beta=None):
    """`fastrms bench --accuracy`: a small network trained in each precision mode
    (`fastrms.bench.accuracy`): its final loss and bytes per parameter, how far the lean
    states' `square_avg` ends from float32's, and the loss curves in `output/accuracy.png`
    (where matplotlib is installed)."""
    from . import accuracy

    steps = 600 if steps is None else steps
    beta = 0.9 if beta is None else beta
    states: dict = {}
    losses = accuracy.study(steps=steps, beta=beta, kept=states)
    print(f"a 64-128-1 tanh network, 8449 parameters, {steps} full-batch steps of RMSprop, lr 1e-4, beta {beta:g}:")
    print(f"  {'mode':22s} {'bytes/param':>11} {'loss at start':>14} {'final loss':>11} {'x float32':>10}")
    base = losses["float32"][-1]
    for mode, curve in losses.items():
        kept = accuracy.MODES[mode]
        print(f"  {mode:22s} {kept:11g} {curve[0]:14.4f} {curve[-1]:11.5f} {curve[-1] / base:10.2f}")
    for mode in ("bfloat16 state", "8-bit state"):
        median, p90 = accuracy.state_error(states, mode)
        print(
            f"  {mode}: square_avg against float32's at the end, |v / v32 - 1|: median {median:.3f}, 90th pct {p90:.3f}"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  no plot: matplotlib is not installed (pip install matplotlib)")
        return 0
    print(f"  plot: {accuracy.plot(losses, output / 'accuracy.png')}")
    return 0


def run_sparse(rounds=None):
    """`fastrms bench --sparse`: step_rows on a (1e6, 64) float32 table against dense steps."""
    times = row_timing.sparse_rows(rounds=7 if rounds is None else rounds)
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
    k, n = 1000, 1000
    steps = timing.torch_tensors(k, n, rounds=rounds)
    base = steps["fastrms.RMSprop, a list of arrays"]
    print(f"{k} float32 tensors of {n}, optimizer step, medians (the per-tensor step's fixed cost):")
    for name, seconds in steps.items():
        print(f"  {name:40s} {seconds * 1e3:8.3f} ms  {seconds / base:5.2f}x the NumPy front end's list")
    steps = timing.torch_dtensors(rounds=rounds)
    if steps is None:
        print("DTensor params: skipped (torch.distributed is not available, or a process group is running)")
    else:
        ours = steps["fastrms.torch.RMSprop"]
        print("100 float32 DTensors of 301x150 on a mesh of 1 rank (FSDP2's params), optimizer step, medians:")
        for name, seconds in steps.items():
            print(f"  {name:40s} {seconds * 1e3:8.3f} ms  {seconds / ours:5.2f}x fastrms.torch")
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
    for name, seconds in r["train"].items():  # the limit has no training step
        share = r["step"][name] / seconds
        print(f"  {name:36s} {seconds * 1e3:8.3f} ms  optimizer {share:6.1%} of it")


def run_cuda(rounds=None):
    """`fastrms bench --cuda`: the step on a GPU (`fastrms.bench.gpu`)."""
    from ..backend import cuda_target
    from . import gpu

    print(f"CUDA device: {cuda_target()['device']}; medians of interleaved rounds, float32:")
    for case, row in gpu.cuda_steps(rounds=7 if rounds is None else rounds).items():
        rate = "" if row["GB/s"] is None else f"  {row['GB/s']:8.1f} GB/s"
        print(f"  {case:52s} {row['seconds'] * 1e3:10.3f} ms{rate}")
    return 0


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
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    for path in readme or ():
        update_readme(path, markdown(result, compact=True))
        print(f"updated the benchmark table in {path}")
    return 0


def compare(old_path, new_path, file=None):
    """`fastrms bench --compare OLD.json NEW.json`: fastrms's median per cell in two saved
    runs, their ratio, and whether the change is larger than the two runs' spreads. ValueError
    (naming the file and what is wrong) for anything but two runs `read_run` accepts that
    share a cell, before anything is printed."""
    file = sys.stdout if file is None else file
    old, new = read_run(old_path), read_run(new_path)
    if not shared_cells(old, new):
        raise ValueError(f"{old_path} and {new_path} share no (variant, dtype, size) cell")
    before = {(r["variant"], r["dtype"], r["n"]): r for r in old["rows"]}
    print(f"fastrms's step, {old_path} ({old['date']}) -> {new_path} ({new['date']}), medians:", file=file)
    for row in new["rows"]:
        key = (row["variant"], row["dtype"], row["n"])
        if key not in before:
            continue
        a, b = _median_and_spread(before[key]), _median_and_spread(row)
        change = b["us_per_step"] / a["us_per_step"]
        noise = (a["iqr_pct"] + b["iqr_pct"]) / 100.0
        verdict = "within the runs' spread" if abs(change - 1.0) <= noise else ("slower" if change > 1 else "faster")
        print(
            f"  {key[0]:24s} {key[1]:8s} n={key[2]:<9.0e} {a['us_per_step']:10.1f} -> {b['us_per_step']:10.1f} us"
            f"  {change:5.2f}x  ({verdict})",
            file=file,
        )
    return 0


#: The largest bench.json `read_run` reads (a full sweep writes well under 1 MiB).
MAX_RUN_BYTES = 64 * 2**20


def read_run(path):
    """A run saved by `fastrms bench` (its bench.json), checked for what `compare` reads: a
    regular file (never a FIFO or a device) of at most `MAX_RUN_BYTES`, UTF-8 JSON without
    NaN or Infinity, holding a `date` and a non-empty list of `rows`, each with a `variant`
    and `dtype` (strings), a size `n` (an integer >= 1), `seconds` whose `fastrms` entry is a
    finite number > 0, and `samples` (if present) whose `fastrms` entry is a list of such
    numbers. ValueError naming what is wrong; OSError when it cannot be opened."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("is not a regular file")
    if st.st_size > MAX_RUN_BYTES:
        raise ValueError(f"is {st.st_size} bytes, more than a bench.json holds ({MAX_RUN_BYTES})")
    with open(path, "rb") as f:
        raw = f.read(MAX_RUN_BYTES + 1)
    if len(raw) > MAX_RUN_BYTES:
        raise ValueError(f"is more than {MAX_RUN_BYTES} bytes")

    def constant(name):
        raise ValueError(f"holds {name}, which no bench.json does")

    try:
        result = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not result["rows"]:
        raise ValueError("has no 'rows' list of results")
    if not isinstance(result.get("date"), str):
        raise ValueError("has no 'date' string")
    for i, row in enumerate(result["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not an object")
        for key in ("variant", "dtype"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where} has no {key!r} string")
        n = row.get("n")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 1:
            raise ValueError(f"{where}['n'] must be an integer >= 1, got {n!r}")
        row["n"] = int(n)
        seconds = row.get("seconds")
        if not isinstance(seconds, dict) or not _positive(seconds.get("fastrms")):
            raise ValueError(f"{where}['seconds']['fastrms'] must be a number > 0")
        samples = row.get("samples", {})
        own = samples.get("fastrms", [seconds["fastrms"]]) if isinstance(samples, dict) else None
        if not isinstance(own, list) or not own or not all(_positive(x) for x in own):
            raise ValueError(f"{where}['samples']['fastrms'] must be a list of numbers > 0")
    return result


def shared_cells(old, new):
    """The (variant, dtype, size) cells two runs (`read_run`) both hold."""
    return {(r["variant"], r["dtype"], r["n"]) for r in old["rows"]} & {
        (r["variant"], r["dtype"], r["n"]) for r in new["rows"]
    }


def _median_and_spread(row):
    """fastrms's median time of a checked row (us) and its samples' spread (% of it)."""
    f = row["seconds"]["fastrms"]
    own = row.get("samples", {}).get("fastrms") or [f]
    return {"us_per_step": f * 1e6, "iqr_pct": 100.0 * timing.spread(own)[2] / f}


def _positive(x):
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def from_json(path):
    """Reload a result written by `fastrms bench` (for re-rendering)."""
    result = json.loads(Path(path).read_text())
    for row in result["rows"]:
        row["n"] = int(row["n"])
    return result
