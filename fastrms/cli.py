"""The ``fastrms`` command line: ``fastrms demo`` (and ``python -m fastrms``)."""

import argparse
import sys

from . import __version__


def _demo(args):
    from . import demo

    result = demo.run(args.iterations, args.learning_rate, args.fitted_learning_rate)
    theta, seed = result["theta_fastrms"].ravel(), result["theta_seed"].ravel()
    print(f"fastrms {__version__}: the seed article's linear regression (y = 2x + 1 + noise, 100 points)")
    print(f"  {result['num_iterations']} iterations, learning rate {result['learning_rate']} x0.95 every 500")
    print(f"  theta (fastrms):       [{theta[0]:.12f}, {theta[1]:.12f}]  in {result['seconds_fastrms'] * 1e3:.1f} ms")
    print(f"  theta (seed's NumPy):  [{seed[0]:.12f}, {seed[1]:.12f}]  in {result['seconds_seed'] * 1e3:.1f} ms")
    print(f"  largest relative difference: {result['max_rel_diff']:.2e}")
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
        print("  no plot: matplotlib is not installed (pip install 'fastrms[plot]')", file=sys.stderr)
        return 0
    path = demo.plot(result, args.output / "linear_regression.png")
    print(f"  plot: {path}")
    return 0


def _info(args):
    from .runtime import info

    for key, value in info().items():
        print(f"{key:>22}: {value}")
    return 0


def _bench(args):
    from . import report

    return report.run(args)


def main(argv=None):
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="fastrms", description="Fused in-place RMSprop with Numba.")
    parser.add_argument("--version", action="version", version=f"fastrms {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="the seed article's linear-regression example, with its plot")
    p.add_argument("--iterations", type=int, default=1000, help="RMSprop iterations (default 1000, as the seed)")
    p.add_argument("--learning-rate", type=float, default=0.001, help="initial learning rate (default 0.001)")
    p.add_argument("--fitted-learning-rate", type=float, default=0.01, help="the second, fitted run's rate (0.01)")
    p.add_argument("--output", type=Path, default=Path("fastrms-output"), help="folder for the plot")
    p.add_argument("--no-plot", action="store_true", help="print the numbers only")
    p.set_defaults(func=_demo)
    b = sub.add_parser("bench", help="time a step against the NumPy reference, NumPy out=, torch and the traffic limit")
    b.add_argument("--quick", action="store_true", help="a short sweep (float32, two variants, four sizes)")
    b.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for bench.json/.md/.png")
    b.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", help="array sizes (e.g. 1e2 1e6)")
    b.add_argument("--variants", nargs="+", help="variants from fastrms.cases.ALL (default: MAIN)")
    b.add_argument("--dtypes", nargs="+", choices=["float32", "float64"])
    b.add_argument("--rounds", type=int, help="interleaved rounds per case (median taken)")
    b.add_argument("--readme", type=Path, nargs="+", help="rewrite the benchmark block of these Markdown files")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--threshold", action="store_true", help="time serial vs parallel drivers (the threshold)")
    b.set_defaults(func=_bench)
    i = sub.add_parser("info", help="threading layer, thread count, parallel mode and why; caching")
    i.set_defaults(func=_info)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices and argv[0] not in ("-h", "--help", "--version"):
        argv = ["demo", *argv]  # the demo is the default command
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return args.func(args)
