"""The `fastrms` command line: `fastrms demo`, `bench`, `info` (and `python -m
fastrms`); a bare `fastrms` prints the help.

Every user error (a bad argument, an output path that cannot be written, a README without the
benchmark markers) is one line on stderr and exit code 2, found before any work is done.
"""

import argparse
import math
import os
import sys

from . import __version__


def _demo(args):
    from . import demo

    result = demo.run(args.iterations, args.learning_rate, args.fitted_learning_rate)
    theta, seed = result["theta_fastrms"].ravel(), result["theta_seed"].ravel()
    print(f"fastrms {__version__}: the seed article's linear regression (y = 2x + 1 + noise, 100 points)")
    print(f"  {result['num_iterations']} iterations, learning rate {result['learning_rate']} x0.95 every 500")
    print(f"  theta (fastrms):       [{theta[0]:.12f}, {theta[1]:.12f}]  {result['us_per_step_fastrms']:.1f} us a step")
    print(f"  theta (seed's NumPy):  [{seed[0]:.12f}, {seed[1]:.12f}]  {result['us_per_step_seed']:.1f} us a step")
    print(f"  largest relative difference: {result['max_rel_diff']:.2e}")
    print(
        f"  the first call took {result['seconds_first_call'] * 1e3:.0f} ms: its kernels loaded from the disk cache"
        " (or compiled)"
    )
    first, ratio, largest = demo.first_ahead(demo.pull_ahead())
    where = f"from {first:,} parameters" if first is not None else "at no size timed here"
    print(
        f"  one step timed alone at sizes 2 to {largest:,} (float64): fastrms's is faster than the seed's NumPy step"
        f"\n  {where}, {ratio:.1f}x at {largest:,} (both are bound by the call, not the arithmetic, at 2)"
    )
    print(f"  mean squared error: {result['mse_init']:.4f} at the start, {result['mse_final']:.4f} at the end")
    fitted = result["theta_fitted"].ravel()
    print(
        f"  RMSprop moves each parameter by about the learning rate per step, so the seed's settings stop short of"
        f" theta = (1, 2);\n  at learning rate {result['fitted_learning_rate']:g}: [{fitted[0]:.6f}, {fitted[1]:.6f}],"
        f" mean squared error {result['mse_fitted']:.4f}"
    )
    if args.no_plot:
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 0
    path = demo.plot(result, args.output / "linear_regression.png")
    print(f"  plot: {path}")
    return 0


def _info(args):
    import numpy as np

    from . import RMSprop
    from .backend import info

    # one small float32 step first, so the cache lines say whether its kernels loaded from disk
    w = np.zeros(8, np.float32)
    try:
        RMSprop(w, 1e-3).step(np.ones_like(w))
        details = info()
    except RuntimeError as exc:  # a threading layer that cannot start (NUMBA_THREADING_LAYER): say which, no traceback
        raise UsageError(str(exc)) from None
    for key, value in details.items():
        print(f"{key:>22}: {value}")
    hits, misses = details["cache_hits"], details["cache_misses"]
    verdict = "every kernel loaded from the disk cache" if not misses else f"{misses} compiled (cold cache)"
    print(f"{'cache_check':>22}: one float32 step: {hits} loaded, {misses} compiled: {verdict}")
    return 0


def _bench(args):
    from .bench import report

    if args.compare:
        return report.compare(*args.compare)
    if args.threshold:
        return report.run_threshold(args.variants, args.dtypes, args.rounds)
    if args.many:
        return report.run_many(args.dtypes, args.rounds)
    if args.clipped:
        return report.run_clipped(args.dtypes, args.rounds, args.sizes, args.variants)
    if args.sparse:
        return report.run_sparse(args.rounds)
    if args.dask:
        return report.run_dask(args.rounds, args.sizes[0] if args.sizes else None)
    if args.cold:
        return report.run_cold(args.rounds)
    if args.precision:
        return report.run_precision(args.rounds, args.sizes)
    if args.master:
        return report.run_master(args.rounds, args.no_compile)
    if args.accuracy:
        return report.run_accuracy(args.output, args.steps, args.beta)
    if args.torch:
        return report.run_torch(args.rounds, widths=(100, 300) if args.sizes is None else args.sizes)
    if args.cuda:
        return report.run_cuda(args.rounds)
    return report.run(
        output=args.output,
        command="fastrms bench " + " ".join(args.argv),
        quick=args.quick,
        sizes=args.sizes,
        variants=args.variants,
        dtypes=args.dtypes,
        rounds=args.rounds,
        readme=args.readme,
        progress=not args.no_progress,
    )


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit code 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _count(minimum):
    def parse(text):
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value != int(value) if math.isfinite(value) else True:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if int(value) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(value)

    return parse


def _beta(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    import numpy as np

    if np.float32(value) >= 1.0:  # the bench trains in float32: beta must stay below 1 there
        raise argparse.ArgumentTypeError(f"{text!r} rounds to 1 in float32 (the bench trains in float32)")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _output_folder(path, option):
    """Create the output folder now, so an unwritable path fails before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {str(path)!r} cannot be used as a folder: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is not a folder")


#: The benches other than the default sweep (each an option of `fastrms bench`): one at a time.
_MODES = ("compare", "threshold", "many", "clipped", "sparse", "dask", "cold", "precision", "master", "accuracy",
          "torch", "cuda")  # fmt: skip


def _check(args):
    """Checks that need the file system, before any work."""
    if args.command == "demo" and not args.no_plot:
        _output_folder(args.output, "--output")
    if args.command == "bench":
        import importlib.util

        from .bench.cases import ALL
        from .bench.report import README_END, README_START, read_run, shared_cells

        chosen = [f"--{mode}" for mode in _MODES if getattr(args, mode)]
        if len(chosen) > 1:
            raise UsageError(f"fastrms bench: {' and '.join(chosen)} are separate benches; choose one")
        if args.quick and chosen:
            raise UsageError(f"--quick is a short sweep of the default bench; it does not go with {chosen[0]}")
        unknown = sorted(set(args.variants or ()) - set(ALL))
        if unknown:
            raise UsageError(f"fastrms bench: unknown variant(s) {unknown}; choose from {sorted(ALL)}")
        for path in args.readme or ():
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--readme {str(path)!r} cannot be read: {exc.strerror or exc}") from None
            except UnicodeDecodeError as exc:
                raise UsageError(
                    f"--readme {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            if README_START not in text or README_END not in text:
                raise UsageError(f"--readme {str(path)!r} has no {README_START} ... {README_END} block to replace")
            if not os.access(path, os.W_OK):
                raise UsageError(f"--readme {str(path)!r} is not writable")
        _check_memory(args)  # arithmetic only: the same answer whether torch or dask are installed
        if args.torch and importlib.util.find_spec("torch") is None:
            raise UsageError("fastrms bench --torch needs PyTorch: pip install torch==2.13.0 (the CPU build)")
        if args.cuda:
            from .backend import cuda_target

            target = cuda_target()
            if not target["available"] or "simulator" in (target["device"] or ""):
                why = target["why"] or "numba-cuda's simulator cannot time a GPU"
                raise UsageError(f"fastrms bench --cuda needs a CUDA GPU: {why}")
        if args.master and importlib.util.find_spec("torch") is None:
            raise UsageError("fastrms bench --master needs PyTorch: pip install torch==2.13.0 (the CPU build)")
        if args.no_compile and not args.master:
            raise UsageError("--no-compile goes with --master")
        if args.steps is not None and not args.accuracy:
            raise UsageError("--steps goes with --accuracy")
        if args.beta is not None and not args.accuracy:
            raise UsageError("--beta goes with --accuracy")
        if args.accuracy and importlib.util.find_spec("ml_dtypes") is None:
            raise UsageError("fastrms bench --accuracy needs ml_dtypes: pip install ml_dtypes")
        if args.dask and (importlib.util.find_spec("dask") is None or importlib.util.find_spec("distributed") is None):
            raise UsageError("fastrms bench --dask needs Dask: pip install 'dask[array]' distributed zarr")
        runs = []
        for path in args.compare or ():
            try:
                runs.append(read_run(path))
            except OSError as exc:
                raise UsageError(f"--compare {str(path)!r} cannot be read: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise UsageError(f"--compare {str(path)!r} is not a bench.json of fastrms bench: it {exc}") from None
        if runs and not shared_cells(*runs):
            raise UsageError("--compare: the two runs share no (variant, dtype, size) cell")
        if args.accuracy or not chosen:  # accuracy.png, or the sweep's results: the only benches that write files
            _output_folder(args.output, "--output")


#: Rough bytes a bench case holds per element of its size: the float64 draws, the arrays of
#: each implementation compared (param, grad and state, NumPy's temporaries, torch's copies).
_BYTES_PER_ELEMENT = {"bench": 8 * 16, "torch": 4 * 24, "dask": 4 * 12}


def _available_memory():
    """Bytes of memory available now (MemAvailable), or the physical size, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(args):
    """Refuse, before any work, a bench size whose arrays cannot fit in memory."""
    if not args.sizes:
        return
    largest = max(args.sizes)
    if args.torch:  # --sizes are layer widths: 100 Linear(w, w) layers
        elements, kind, what = 100 * (largest * largest + largest), "torch", f"100 layers of width {largest}"
    elif args.dask:
        elements, kind, what = largest, "dask", f"{largest} elements"
    else:
        elements, kind, what = largest, "bench", f"{largest} elements"
    need = elements * _BYTES_PER_ELEMENT[kind]
    have = _available_memory()
    if have is not None and need > have:
        raise UsageError(
            f"--sizes {largest}: a case of {what} needs about {_human(need)} of memory, "
            f"this machine has {_human(have)} available"
        )


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def main(argv=None):
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    try:
        args = _parse(argv)
        _check(args)
        return args.func(args)
    except UsageError as exc:
        print(f"fastrms: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled while writing results
        print(f"fastrms: error: {exc}", file=sys.stderr)
        return 1


def _parse(argv):
    from pathlib import Path

    parser = _Parser(prog="fastrms", description="Fused in-place RMSprop with Numba.")
    parser.add_argument("--version", action="version", version=f"fastrms {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="the seed article's linear-regression example, with its plot")
    p.add_argument("--iterations", type=_count(0), default=1000, help="RMSprop iterations (default 1000, the seed's)")
    p.add_argument("--learning-rate", type=_positive_float, default=0.001, help="initial learning rate (0.001)")
    p.add_argument("--fitted-learning-rate", type=_positive_float, default=0.01, help="the fitted run's rate (0.01)")
    p.add_argument("--output", type=Path, default=Path("fastrms-output"), help="folder for the plot")
    p.add_argument("--no-plot", action="store_true", help="print the numbers only")
    p.set_defaults(func=_demo)
    b = sub.add_parser("bench", help="time a step against the NumPy reference, NumPy out=, torch and the traffic limit")
    b.add_argument("--quick", action="store_true", help="a short sweep (float32, two variants, four sizes)")
    b.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for bench.json/.md/.png")
    b.add_argument("--sizes", type=_count(1), nargs="+", help="array sizes (e.g. 1e2 1e6)")
    b.add_argument("--variants", nargs="+", help="variants from fastrms.bench.cases.ALL (default: MAIN)")
    b.add_argument("--dtypes", nargs="+", choices=["float32", "float64"])
    b.add_argument("--rounds", type=_count(1), help="interleaved rounds per case (median taken)")
    b.add_argument("--readme", type=Path, nargs="+", help="rewrite the benchmark block of these Markdown files")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--threshold", action="store_true", help="time serial vs parallel drivers (the threshold)")
    b.add_argument("--many", action="store_true", help="a whole model (200 or 1000 arrays) against one array")
    b.add_argument("--clipped", action="store_true", help="clip_global_norm / clip_value against the unclipped step")
    b.add_argument("--sparse", action="store_true", help="step_rows on a (1e6, 64) table against dense steps")
    b.add_argument("--dask", action="store_true", help="the step over dask arrays on a LocalCluster (--sizes: total)")
    b.add_argument(
        "--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two saved bench.json runs, cell by cell"
    )
    b.add_argument("--cold", action="store_true", help="import and first steps in fresh processes (warm disk cache)")
    b.add_argument(
        "--precision",
        action="store_true",
        help="each state storage and 16-bit master mode against its own limit (--sizes)",
    )
    b.add_argument(
        "--master",
        action="store_true",
        help="a bfloat16 model's step: fastrms.torch over float32 masters against torch's recipe and torch.compile",
    )
    b.add_argument("--no-compile", action="store_true", help="with --master: leave torch.compile out")
    b.add_argument(
        "--accuracy",
        action="store_true",
        help="train a small network in each precision mode: losses, bytes per parameter, accuracy.png in --output",
    )
    b.add_argument("--steps", type=_count(1), help="with --accuracy: training steps (default 600)")
    b.add_argument("--beta", type=_beta, help="with --accuracy: RMSprop's beta, in [0, 1) (default 0.9)")
    b.add_argument(
        "--torch", action="store_true", help="fastrms.torch.RMSprop against torch (--sizes: layer widths, 100 300)"
    )
    b.add_argument(
        "--cuda", action="store_true", help="the step on a GPU: GB/s against the same-traffic kernel and torch"
    )
    b.set_defaults(func=_bench)
    i = sub.add_parser(
        "info", help="versions, threading layer, thread count, parallel mode and why; the kernel cache and its hits"
    )
    i.set_defaults(func=_info)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `fastrms`: what it can do
        parser.print_help()
        raise SystemExit(0)
    if argv[0] not in sub.choices and argv[0] not in ("-h", "--help", "--version") and argv[0].startswith("-"):
        argv = ["demo", *argv]  # options without a command are the demo's (`fastrms --no-plot`)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return args
