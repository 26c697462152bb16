"""The pure RMSprop step: new arrays out, inputs never written (optax's and torch.func's sense
of "functional"). It runs the same element function as `fastrms.RMSprop`, so its bits
match `RMSprop.step` and `fastrms.reference`; it is what `fastrms.dask` maps over
blocks."""

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from . import kernels
from .backend import cpu
from .core import guard, spec
from .core import options as O
from .core.checks import STEP_MAX, count, float_array
from .core.memory import address

if TYPE_CHECKING:  # the static types of **options (generated from the options table)
    from typing_extensions import Unpack

    from ._typing import Options

__all__ = ["init_state", "rmsprop_step"]


def init_state(param, **options):
    """The variant's initial state for `param`: `square_avg` filled with
    `initial_scale`, `grad_avg` / `momentum_buffer` zeros where the variant keeps them
    (PyTorch's names), each shaped and typed like `param`."""
    param = float_array("param", param, writeable=False)
    hyper = O.resolve(options, "init_state()")
    O.check_native_storage(hyper, "init_state()")
    state = {name: np.zeros(param.shape, param.dtype) for name in spec.of(hyper).names}
    state["square_avg"][...] = O.BY_NAME["initial_scale"].check(hyper["initial_scale"])
    return state


def rmsprop_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: "Mapping[str, np.ndarray] | None",
    t: int,
    learning_rate: float,
    beta: float = 0.9,
    epsilon: float = 1e-8,
    *,
    out: "tuple[np.ndarray, dict] | None" = None,
    **options: "Unpack[Options]",
) -> "tuple[np.ndarray, dict]":
    """Step `t` (1-based) of RMSprop, out of place: returns `(new_param, new_state)`.

    `state` is a dict of the arrays PyTorch names (`square_avg`, and `grad_avg` /
    `momentum_buffer` when the variant keeps them), or None for the initial state
    (`init_state`). `options` are `fastrms.RMSprop`'s keyword options
    (`fastrms.core.options.OPTIONS`); `learning_rate` is a number here (evaluate a schedule
    at `t - 1` yourself). The update is [docs/algorithm.md](algorithm.md)'s.

    Inputs are never written. With `out=(param_out, state_out)` the results go into the
    arrays given (same shapes and dtypes; `state_out` a dict like `state`): each may be
    its input itself, to go in place, but no output may overlap another output or another
    input. With `skip_nonfinite=True` a grad holding a NaN or an infinity returns the
    inputs' values unchanged (copied into `out` when given). `clip_global_norm` clips by
    this grad's own 2-norm (a model's global norm is the caller's to form: scale the grad,
    or sum `fastrms.kernels.sumsq_serial` over the arrays).

    Every argument is checked before anything is written; bad ones raise TypeError/ValueError
    naming them.
    """
    param = float_array("param", param, writeable=False)
    grad = float_array("grad", grad, writeable=False)
    if grad.dtype != param.dtype or grad.shape != param.shape:
        raise ValueError(f"grad must be {param.dtype} of shape {param.shape} like param, got {grad.dtype} {grad.shape}")
    t = count("t", t, minimum=1, maximum=STEP_MAX)
    if callable(learning_rate):
        raise TypeError("learning_rate must be a number here; evaluate the schedule at t - 1 and pass its value")
    hyper = _hyperparameters(learning_rate, {**options, "beta": beta, "epsilon": epsilon}, param.dtype)
    names = spec.of(hyper).names
    state = init_state(param, **{k: hyper[k] for k in O.NAMES if k != "learning_rate"}) if state is None else state
    state = _state("state", state, names, param, writeable=False)
    if out is None:
        param_out = np.empty_like(param)
        state_out = {name: np.empty_like(param) for name in names}
    else:
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"out must be a tuple (param_out, state_out), got {type(out).__name__}")
        param_out = float_array("out[0]", out[0], writeable=True)
        if param_out.dtype != param.dtype or param_out.shape != param.shape:
            raise ValueError(
                f"out[0] must be {param.dtype} of shape {param.shape}, got {param_out.dtype} {param_out.shape}"
            )
        state_out = _state("out[1]", out[1], names, param, writeable=True)
        _check_aliasing(param, grad, state, param_out, state_out, names)
    flat = {name: a.reshape(-1) for name, a in state.items()}
    flat_out = {name: a.reshape(-1) for name, a in state_out.items()}
    empty = param.reshape(-1)[:0]
    p, g, p_out = param.reshape(-1), grad.reshape(-1), param_out.reshape(-1)
    key = spec.of(hyper).variant
    parallel = cpu.parallel(p.size, p.itemsize, len(names))
    scalars = O.scalars(hyper, hyper["learning_rate"], t)
    verdict = guard.guard(
        lambda: (kernels.sumsq_parallel if parallel else kernels.sumsq_serial)(g),
        lambda: (kernels.nonfinite_parallel if parallel else kernels.nonfinite_serial)(g),
        lambda: [g],
        hyper,
    )
    if not verdict.stepped:
        for src, dst in ((p, p_out), *((flat[n], flat_out[n]) for n in names)):
            if dst is not src:
                np.copyto(dst, src)
        return param_out, state_out
    scalars = verdict.scaled(scalars)
    m, b = flat.get("grad_avg", empty), flat.get("momentum_buffer", empty)
    if out is not None and _same(p, p_out) and all(_same(flat[n], flat_out[n]) for n in names):
        # every output is its input: the in-place shell (same bits; LLVM cannot vectorise a
        # loop whose outputs alias its inputs, so the out-of-place one would run scalar)
        shell = cpu.kernel("dense", key, parallel)
        arrays: tuple = (p_out, g, flat_out["square_avg"], m, b)
    else:
        shell = cpu.kernel("out", key, parallel)
        m_out, b_out = flat_out.get("grad_avg", empty), flat_out.get("momentum_buffer", empty)
        arrays = (p, g, flat["square_avg"], m, b, p_out, flat_out["square_avg"], m_out, b_out)
    shell(tuple(scalars), *arrays)
    return param_out, state_out


def _same(a, b):
    """Whether `a` and `b` (equal-size 1-D views) are the same memory."""
    return address(a) == address(b)


def _hyperparameters(learning_rate, options, dtype):
    """The checked options: all but the learning rate validated once per distinct set (a pure
    step is called once per block and step, with the same options every time)."""
    given = O.resolve(options, "rmsprop_step()")
    del given["learning_rate"]
    try:
        key = tuple(sorted((k, type(v), v) for k, v in given.items()))  # the type too: True == 1
        hash(key)
    except TypeError:  # an unhashable value: validate uncached, which names it
        key = None
    base = (
        _checked(key, dtype) if key is not None else O.check_hyperparameters({**given, "learning_rate": 0.0}, (dtype,))
    )
    O.check_native_storage(base, "rmsprop_step()")
    lr = O.BY_NAME["learning_rate"].check(learning_rate)
    O.check_learning_rate_fit("learning_rate", lr, base["weight_decay"], (dtype,))
    return {**base, "learning_rate": lr}


@lru_cache(maxsize=256)
def _checked(key, dtype):
    return O.check_hyperparameters({**{k: v for k, _, v in key}, "learning_rate": 0.0}, (dtype,))


def _state(label, state, names, param, *, writeable):
    """`state` checked: a mapping holding exactly `names`, each like `param`."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{label} must be a dict of arrays named {list(names)}, got {type(state).__name__}")
    if set(state) != set(names):
        raise ValueError(f"{label} must hold exactly {sorted(names)} for this variant, got {sorted(state)}")
    out = {}
    for name in names:
        a = float_array(f"{label}[{name!r}]", state[name], writeable=writeable)
        if a.dtype != param.dtype or a.shape != param.shape:
            raise ValueError(f"{label}[{name!r}] must be {param.dtype} of shape {param.shape}, got {a.dtype} {a.shape}")
        out[name] = a
    return out


def _check_aliasing(param, grad, state, param_out, state_out, names):
    """Each output may be its own input (in place), nothing else may share memory."""
    inputs = {"param": param, "grad": grad, **{f"state[{n!r}]": state[n] for n in names}}
    outputs = {"out[0]": (param_out, param), **{f"out[1][{n!r}]": (state_out[n], state[n]) for n in names}}
    for out_name, (o, own) in outputs.items():
        for in_name, a in inputs.items():
            if a is own and address(o) == address(a):
                continue  # the same memory as its own input: in place
            if np.may_share_memory(o, a):
                raise ValueError(f"{out_name} shares memory with {in_name}; an output may only be its own input")
    outs = list(outputs.items())
    for i, (name_a, (a, _)) in enumerate(outs):
        for name_b, (b, _) in outs[i + 1 :]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} share memory")
