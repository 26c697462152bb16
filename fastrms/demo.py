"""The seed article's linear-regression example, run through fastrms (`fastrms demo`)."""

import time
from pathlib import Path

import numpy as np

from . import reference
from .seed import rmsprop


def make_data(seed=0):
    """The seed's data: 100 points of y = 2x + 1 + N(0, 0.1), a bias column, and theta_init."""
    np.random.seed(seed)
    X = np.random.rand(100, 1)
    y = 2 * X + 1 + np.random.normal(0, 0.1, (100, 1))
    X_b = np.c_[np.ones((100, 1)), X]
    theta_init = np.random.randn(2, 1)
    return X, y, X_b, theta_init


def compute_gradient(theta, X_b, y):
    """The seed's mean-squared-error gradient."""
    m = X_b.shape[0]
    return 2 / m * X_b.T.dot(X_b.dot(theta) - y)


def run(num_iterations=1000, learning_rate=0.001, fitted_learning_rate=0.01):
    """Fit the seed's example with fastrms and with the seed's own NumPy code.

    Returns a dict with both thetas, their largest relative difference, the mean squared
    error before each step of both runs (`loss`, `loss_fitted`), the first call's time
    (the kernel loaded from the disk cache, or compiled) and the steady-state time per
    step of fastrms and of the seed's NumPy step; and `theta_fitted`, the same run at
    `fitted_learning_rate`: RMSprop moves each parameter by about the learning rate per
    step, so the seed's 1000 steps of 0.001 stop far from theta = (1, 2), while 0.01
    reaches the noise floor.
    """
    X, y, X_b, theta_init = make_data()

    def mse(theta):
        return float(np.mean((X_b.dot(theta) - y) ** 2))

    def grad(theta):
        return compute_gradient(theta, X_b, y)

    def recording(losses):
        def grad_and_loss(theta):
            losses.append(mse(theta))
            return grad(theta)

        return grad_and_loss

    t0 = time.perf_counter()
    rmsprop(theta_init, 1, grad, learning_rate)  # the first call: kernels loaded (or compiled)
    t1 = time.perf_counter()
    theta_fast = rmsprop(theta_init, num_iterations, grad, learning_rate)
    t2 = time.perf_counter()
    theta_seed = reference.seed_rmsprop(theta_init, num_iterations, grad, learning_rate)
    t3 = time.perf_counter()
    loss, loss_fitted = [], []
    rmsprop(theta_init, num_iterations, recording(loss), learning_rate)
    theta_fitted = rmsprop(theta_init, num_iterations, recording(loss_fitted), fitted_learning_rate)
    steps = max(num_iterations, 1)
    return dict(
        X=X,
        y=y,
        X_b=X_b,
        theta_init=theta_init,
        theta_fastrms=theta_fast,
        theta_seed=theta_seed,
        max_rel_diff=float(np.max(np.abs(theta_fast - theta_seed) / np.abs(theta_seed))),
        seconds_first_call=t1 - t0,
        seconds_fastrms=t2 - t1,
        seconds_seed=t3 - t2,
        us_per_step_fastrms=(t2 - t1) / steps * 1e6,
        us_per_step_seed=(t3 - t2) / steps * 1e6,
        mse_init=mse(theta_init),
        mse_final=mse(theta_fast),
        theta_fitted=theta_fitted,
        mse_fitted=mse(theta_fitted),
        loss=loss,
        loss_fitted=loss_fitted,
        fitted_learning_rate=fitted_learning_rate,
        num_iterations=num_iterations,
        learning_rate=learning_rate,
    )


#: The sizes `pull_ahead` times, from the seed's 2 parameters up.
SIZES = (2, 100, 1_000, 10_000, 100_000, 1_000_000)


def pull_ahead(sizes=SIZES, rounds=5, target=0.004):
    """Where fastrms pulls ahead of the seed's NumPy step: one step of `fastrms.RMSprop` and
    of the seed's loop body (`reference.seed_step`) on float64 arrays of each size, timed
    in this process (medians of `rounds` interleaved rounds). Returns `{n: (fastrms
    seconds, seed seconds)}`."""
    from .bench.timing import measure_calls
    from .optimizer import RMSprop

    out = {}
    for n in sizes:
        g = np.full(n, 0.5)
        opt = RMSprop(np.zeros(n), learning_rate=1e-3)
        theta, v = np.zeros(n), np.zeros(n)

        def seed(theta=theta, v=v, g=g):
            reference.seed_step(theta, v, g, 1e-3, 0.9, 1e-8)

        timed = measure_calls({"fastrms": lambda opt=opt, g=g: opt.step(g), "seed": seed}, rounds, target)
        out[n] = (timed["fastrms"], timed["seed"])
    return out


def first_ahead(timings):
    """`(n, ratio, largest)`: the smallest size from which fastrms's step is faster than the
    seed's at every larger size (None if not even at the largest), and the seed's time over
    fastrms's at the largest size."""
    first = None
    for n in sorted(timings, reverse=True):
        fast, seed = timings[n]
        if fast >= seed:
            break
        first = n
    largest = max(timings)
    return first, timings[largest][1] / timings[largest][0], largest


def plot(result, path):
    """The seed's figure (the data points and the fitted lines, the legend below the axes so
    it covers no data) beside the mean squared error per step of both runs, saved to
    `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y, X_b = result["X"], result["y"], result["X_b"]
    order = np.argsort(X[:, 0])
    lr, fitted = result["learning_rate"], result["fitted_learning_rate"]
    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 5.2), layout="constrained")
    ax.scatter(X, y, color="blue", s=14, label="Data points (y = 2x + 1 + noise)")
    ax.plot(
        X[order],
        X_b[order].dot(result["theta_fastrms"]),
        color="red",
        lw=2,
        label=f"Linear model, the seed's settings (learning rate {lr:g}): MSE {result['mse_final']:.3f}",
    )
    ax.plot(
        X[order],
        X_b[order].dot(result["theta_fitted"]),
        color="green",
        ls="--",
        lw=2,
        label=f"Linear model, learning rate {fitted:g}: MSE {result['mse_fitted']:.3f}",
    )
    ax.set_xlabel("X")
    ax.set_ylabel("y")
    ax.set_title("Linear Regression with RMSprop")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=9, frameon=False)
    steps = np.arange(1, len(result["loss"]) + 1)
    loss_ax.plot(steps, result["loss"], color="red", lw=2, label=f"learning rate {lr:g} (the seed's)")
    loss_ax.plot(steps, result["loss_fitted"], color="green", ls="--", lw=2, label=f"learning rate {fitted:g}")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("mean squared error (log scale)")
    loss_ax.set_title("Loss per step (x0.95 every 500 steps)")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
