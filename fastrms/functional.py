"""The seed article's integrated ``rmsprop()`` function, running the fused kernel."""

import numpy as np

from ._checks import count
from .optimizer import RMSprop
from .schedules import constant, step_decay


def rmsprop(
    theta,
    num_iterations,
    calculate_gradient,
    learning_rate=0.001,
    beta=0.9,
    epsilon=1e-8,
    *,
    decay_every=500,
    decay_factor=0.95,
    **options,
):
    """Run ``num_iterations`` RMSprop steps from ``theta`` and return the final parameters.

    The seed article's function and defaults: each iteration computes
    ``g = calculate_gradient(theta)``, then::

        v <- beta * v + (1 - beta) * g^2
        theta <- theta - lr / (sqrt(v) + epsilon) * g

    and the learning rate is multiplied by ``decay_factor`` after every ``decay_every``
    iterations (the seed's x0.95 every 500; ``decay_every=None`` keeps it constant). A
    schedule (callable ``count -> lr``) may be passed as ``learning_rate`` instead.

    ``theta`` (an array or anything ``np.asarray`` turns into a float32/float64 array) is
    copied: the caller's array is never modified. A gradient of another float dtype is cast
    to ``theta``'s. ``options`` are :class:`fastrms.RMSprop`'s keyword options (``momentum``,
    ``centered``, ...).
    """
    work = np.array(theta, copy=True, order="C")
    if work.dtype.kind != "f" or work.dtype.itemsize not in (4, 8):
        raise TypeError(f"theta must hold float32 or float64 values, got {work.dtype}")
    num_iterations = count("num_iterations", num_iterations, minimum=0)
    if not callable(calculate_gradient):
        raise TypeError(f"calculate_gradient must be callable, got {type(calculate_gradient).__name__}")
    if callable(learning_rate):
        schedule = learning_rate
    elif decay_every is None:
        schedule = constant(learning_rate)
    else:
        schedule = step_decay(learning_rate, decay_factor, decay_every)
    opt = RMSprop(work, schedule, beta, epsilon, **options)
    for _ in range(num_iterations):
        g = np.asarray(calculate_gradient(work))
        if g.dtype != work.dtype:
            if g.dtype.kind not in "fiu":
                raise TypeError(f"calculate_gradient must return a real array, got dtype {g.dtype}")
            g = g.astype(work.dtype)
        opt.step(g)
    return work
