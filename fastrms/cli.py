"""The ``fastrms`` command line: ``fastrms demo`` (and ``python -m fastrms``)."""

import argparse
import sys

from . import __version__


def _demo(args):
    from . import demo

    result = demo.run(args.iterations, args.learning_rate)
    theta, seed = result["theta_fastrms"].ravel(), result["theta_seed"].ravel()
    print(f"fastrms {__version__}: the seed article's linear regression (y = 2x + 1 + noise, 100 points)")
    print(f"  {result['num_iterations']} iterations, learning rate {result['learning_rate']} x0.95 every 500")
    print(f"  theta (fastrms):       [{theta[0]:.12f}, {theta[1]:.12f}]  in {result['seconds_fastrms'] * 1e3:.1f} ms")
    print(f"  theta (seed's NumPy):  [{seed[0]:.12f}, {seed[1]:.12f}]  in {result['seconds_seed'] * 1e3:.1f} ms")
    print(f"  largest relative difference: {result['max_rel_diff']:.2e}")
    print(f"  mean squared error: {result['mse_init']:.4f} at the start, {result['mse_final']:.4f} at the end")
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


def main(argv=None):
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="fastrms", description="Fused in-place RMSprop with Numba.")
    parser.add_argument("--version", action="version", version=f"fastrms {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="the seed article's linear-regression example, with its plot")
    p.add_argument("--iterations", type=int, default=1000, help="RMSprop iterations (default 1000, as the seed)")
    p.add_argument("--learning-rate", type=float, default=0.001, help="initial learning rate (default 0.001)")
    p.add_argument("--output", type=Path, default=Path("fastrms-output"), help="folder for the plot")
    p.add_argument("--no-plot", action="store_true", help="print the numbers only")
    p.set_defaults(func=_demo)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices and argv[0] not in ("-h", "--help", "--version"):
        argv = ["demo", *argv]  # the demo is the default command
    args = parser.parse_args(argv)
    return args.func(args)
