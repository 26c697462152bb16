"""The spec of a step, computed once from the options and frozen: what every front end and the
backend read instead of re-deriving it (the rules themselves are `fastrms.options`').

    Spec(variant, state, compute, rounding)

    variant   the compiled kernel variant (`fastrms.kernels.Variant`): centring, the momentum
              mode, Nesterov, the weight-decay mode
    state     the state slots, in order, each `StateSlot(name, storage, shape)`:
                name     PyTorch's: square_avg, grad_avg (centered), momentum_buffer (momentum > 0)
                storage  the codec it is kept in (`fastrms.kernels.storage.CODECS`):
                         "native", the params' own dtype
                shape    "param": one element per element of the param
    compute   "param": the arithmetic runs in the params' dtype
    rounding  "once": every scalar is rounded once to the compute dtype (`1 - beta` and
              `lr * weight_decay` formed in float64 first)
"""

import functools
from dataclasses import dataclass

import numpy as np

from . import options as O
from .kernels import Variant, storage

__all__ = ["Spec", "StateSlot", "of"]


@dataclass(frozen=True)
class StateSlot:
    """One state array of each param: its name, the codec it is stored in, its shape rule."""

    name: str
    storage: str = "native"
    shape: str = "param"

    def dtype(self, param_dtype):
        """The dtype of this state array for a param of `param_dtype`."""
        return storage.state_dtype(storage.CODECS[self.storage], param_dtype)


@dataclass(frozen=True)
class Spec:
    """A step's frozen spec (see the module)."""

    variant: Variant
    state: "tuple[StateSlot, ...]"
    compute: str = "param"
    rounding: str = "once"

    @property
    def names(self):
        """The state arrays' names, in order."""
        return tuple(s.name for s in self.state)

    def allocate(self, size, param_dtype, initial_scale=0.0):
        """Zeroed state arrays of `size` elements (`square_avg` filled with
        `initial_scale`), by name."""
        out = {s.name: np.zeros(size, s.dtype(param_dtype)) for s in self.state}
        out["square_avg"][...] = initial_scale
        return out


def of(hyper):
    """The spec of the options `hyper` (resolved, or a part of them: the defaults fill in)."""
    return _of(O.variant_key({**O.DEFAULTS, **hyper}))


@functools.lru_cache(maxsize=None)
def _of(variant):
    names = (
        ("square_avg",)
        + (("grad_avg",) if variant.uses_grad_avg else ())
        + (("momentum_buffer",) if variant.uses_momentum_buffer else ())
    )
    return Spec(variant, tuple(StateSlot(n) for n in names))
