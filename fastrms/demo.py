"""The seed article's linear-regression example, run through fastrms (``fastrms demo``)."""

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

    Returns a dict with both thetas, their largest relative difference, the wall times and
    the mean squared errors; and ``theta_fitted``, the same run at ``fitted_learning_rate``:
    RMSprop moves each parameter by about the learning rate per step, so the seed's 1000
    steps of 0.001 stop far from theta = (1, 2), while 0.01 reaches the noise floor.
    """
    X, y, X_b, theta_init = make_data()

    def grad(theta):
        return compute_gradient(theta, X_b, y)

    rmsprop(theta_init, 1, grad, learning_rate)  # compile (or load from cache) before timing
    t0 = time.perf_counter()
    theta_fast = rmsprop(theta_init, num_iterations, grad, learning_rate)
    t1 = time.perf_counter()
    theta_seed = reference.seed_rmsprop(theta_init, num_iterations, grad, learning_rate)
    t2 = time.perf_counter()
    theta_fitted = rmsprop(theta_init, num_iterations, grad, fitted_learning_rate)

    def mse(theta):
        return float(np.mean((X_b.dot(theta) - y) ** 2))

    return dict(
        X=X,
        y=y,
        X_b=X_b,
        theta_init=theta_init,
        theta_fastrms=theta_fast,
        theta_seed=theta_seed,
        max_rel_diff=float(np.max(np.abs(theta_fast - theta_seed) / np.abs(theta_seed))),
        seconds_fastrms=t1 - t0,
        seconds_seed=t2 - t1,
        mse_init=mse(theta_init),
        mse_final=mse(theta_fast),
        theta_fitted=theta_fitted,
        mse_fitted=mse(theta_fitted),
        fitted_learning_rate=fitted_learning_rate,
        num_iterations=num_iterations,
        learning_rate=learning_rate,
    )


def plot(result, path):
    """The seed's figure: the data points and the fitted line, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y, X_b = result["X"], result["y"], result["X_b"]
    order = np.argsort(X[:, 0])
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(X, y, color="blue", label="Data points")
    ax.plot(
        X[order],
        X_b[order].dot(result["theta_fastrms"]),
        color="red",
        label=f"Linear model (the seed's settings: learning rate {result['learning_rate']:g})",
    )
    ax.plot(
        X[order],
        X_b[order].dot(result["theta_fitted"]),
        color="green",
        ls="--",
        label=f"Linear model, learning rate {result['fitted_learning_rate']:g}",
    )
    ax.set_xlabel("X")
    ax.set_ylabel("y")
    ax.set_title("Linear Regression with RMSprop")
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
