"""The optimizer's options: names, checks, what they select, and their fit to the arrays' dtype.

Compile-time options choose a kernel variant (and so the state arrays kept): ``centered``,
``momentum > 0`` with ``lr_in_momentum`` and ``nesterov``, ``weight_decay > 0`` with
``decoupled_weight_decay``. Runtime options are scalars handed to the kernel: the learning
rate, ``beta``, ``epsilon`` (placed by ``eps_in_sqrt``), ``weight_decay``, ``momentum``,
``maximize`` (a sign) and ``bias_correction`` (a divisor ``1 - beta^t``). ``initial_scale``
fills ``square_avg`` once; ``skip_nonfinite`` is checked in Python before the kernel runs.
"""

import numpy as np

from ._checks import fits, flag, number

BOOL_OPTIONS = (
    "centered",
    "nesterov",
    "lr_in_momentum",
    "decoupled_weight_decay",
    "maximize",
    "bias_correction",
    "eps_in_sqrt",
    "skip_nonfinite",
)
FLOAT_OPTIONS = ("beta", "epsilon", "momentum", "weight_decay", "initial_scale")


def check_hyperparameters(h, dtypes=()):
    """Validate and normalise a dict of every constructor option; returns a new dict.

    With ``dtypes`` (the params' dtypes), every number must also survive rounding to each of
    them (see :func:`check_fit`)."""
    out = {}
    lr = h["learning_rate"]
    out["learning_rate"] = lr if callable(lr) else number("learning_rate", lr, low=0.0)
    out["beta"] = number("beta", h["beta"], low=0.0, high=1.0, high_open=True)
    out["epsilon"] = number("epsilon", h["epsilon"], low=0.0, low_open=True)
    out["momentum"] = number("momentum", h["momentum"], low=0.0)
    out["weight_decay"] = number("weight_decay", h["weight_decay"], low=0.0)
    out["initial_scale"] = number("initial_scale", h["initial_scale"], low=0.0)
    for name in BOOL_OPTIONS:
        out[name] = flag(name, h[name])
    if out["nesterov"] and out["momentum"] == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")
    check_fit(out, dtypes)
    return out


def check_fit(hyper, dtypes):
    """Refuse options that the kernels, which round every scalar once to the arrays' dtype,
    would turn into 0, 1 or infinity: e.g. ``epsilon=1e-46`` is 0 in float32 (0/0 on a zero
    grad) and ``learning_rate=1e39`` is infinite there. Products the kernel forms
    (``1 - beta``, ``learning_rate * weight_decay``) are checked too."""
    dtypes = tuple(dict.fromkeys(np.dtype(d) for d in dtypes))
    if not dtypes:
        return
    fits("beta", hyper["beta"], dtypes, below_one=True)
    fits("1 - beta", 1.0 - hyper["beta"], dtypes, nonzero=True)
    fits("epsilon", hyper["epsilon"], dtypes, nonzero=True)
    for name in ("momentum", "weight_decay", "initial_scale"):
        fits(name, hyper[name], dtypes)
    if not callable(hyper["learning_rate"]):
        check_learning_rate_fit("learning_rate", hyper["learning_rate"], hyper["weight_decay"], dtypes)


def check_learning_rate_fit(name, lr, weight_decay, dtypes):
    """``lr`` (and ``lr * weight_decay``) must be finite in every dtype of ``dtypes``."""
    fits(name, lr, dtypes)
    if weight_decay:
        fits(f"{name} * weight_decay", lr * weight_decay, dtypes)


def variant(hyper):
    """The options that choose the update's formula (and so the state it keeps)."""
    return {
        "centered": hyper["centered"],
        "momentum > 0": hyper["momentum"] > 0,
        "nesterov": hyper["nesterov"],
        "lr_in_momentum": hyper["lr_in_momentum"],
        "weight_decay > 0": hyper["weight_decay"] > 0,
        "decoupled_weight_decay": hyper["decoupled_weight_decay"],
        "maximize": hyper["maximize"],
        "bias_correction": hyper["bias_correction"],
        "eps_in_sqrt": hyper["eps_in_sqrt"],
    }


def state_names(hyper):
    """The state arrays a variant keeps, in PyTorch's names."""
    return (
        ("square_avg",)
        + (("grad_avg",) if hyper["centered"] else ())
        + (("momentum_buffer",) if hyper["momentum"] else ())
    )


#: Every state array any variant keeps.
ALL_STATE_NAMES = ("square_avg", "grad_avg", "momentum_buffer")
