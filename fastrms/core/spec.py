"""The spec of a step, computed once from the options and frozen: what every front end and the
backend read instead of re-deriving it (the rules themselves are `fastrms.core.options`').

    Spec(variant, state, compute, rounding)

    variant   the compiled kernel variant (`fastrms.kernels.Variant`): centring, the momentum
              mode, Nesterov, the weight-decay mode
    state     the state slots, in order, each `StateSlot(name, storage, shape)`:
                name     PyTorch's: square_avg, grad_avg (centered), momentum_buffer (momentum > 0)
                storage  the codec it is kept in (`fastrms.kernels.storage.CODECS`), the
                         option `state_storage`: "native", the params' own dtype,
                         "bfloat16", bit patterns in uint16 arrays, or "8bit", blocks of
                         256 one-byte codes and a float32 scale in uint8 arrays
                shape    "param": one value per element of the param (`extent(n)` storage
                         elements hold n values: n, or the 8-bit blocks' bytes); "row":
                         one value per row (the first axis; `state_layout="rowwise"`,
                         `square_avg` only)
    compute   "param": the arithmetic runs in the params' dtype
    rounding  "once": every scalar is rounded once to the compute dtype (`1 - beta` and
              `lr * weight_decay` formed in float64 first)
"""

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..kernels import Variant, storage
from . import options as O

__all__ = ["Spec", "StateSlot", "of", "view_dtype"]


@dataclass(frozen=True)
class StateSlot:
    """One state array of each param: its name, the codec it is stored in, its shape rule."""

    name: str
    storage: str = "native"
    shape: str = "param"

    def dtype(self, param_dtype):
        """The dtype of this state array for a param of `param_dtype`."""
        return storage.state_dtype(storage.CODECS[self.storage], param_dtype)

    def values(self, shape):
        """The shape of the values this state array holds for a param of `shape`."""
        if self.shape == "row":
            return tuple(shape[:1]) if len(shape) else ()
        return tuple(shape)

    def size(self, shape):
        """The storage elements of this state array for a param of `shape`."""
        return storage.extent(storage.CODECS[self.storage], math.prod(self.values(shape)))


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

    @property
    def rowwise(self):
        """Whether `square_avg` holds one value a row (`state_layout="rowwise"`)."""
        return self.state[0].shape == "row"

    @property
    def codec(self):
        """The storage codec of the state (`fastrms.kernels.storage.Codec`; one a spec)."""
        return storage.CODECS[self.state[0].storage]

    def extent(self, n):
        """The storage elements of a state array holding `n` values (whole 8-bit blocks)."""
        return storage.extent(self.codec, n)

    def allocate(self, sizes, param_dtype, initial_scale=0.0):
        """Zeroed state arrays of `sizes[name]` storage elements each (sums of `size`s; an
        int: that many each), `square_avg` filled with `initial_scale`, as its storage holds
        it, by name."""
        size_of = sizes if isinstance(sizes, dict) else dict.fromkeys(self.names, sizes)
        out = {s.name: np.zeros(size_of[s.name], s.dtype(param_dtype)) for s in self.state}
        for name, a in out.items():
            storage.fill(self.codec, a, param_dtype, initial_scale if name == "square_avg" else 0.0)
        return out

    def decode(self, name, stored, n):
        """The `n` values state array `name` holds as the float values they stand for (a
        view for the native storage, else a float32 copy)."""
        return storage.decode(self.codec, stored, n, signed=name != "square_avg")


def view_dtype(codec, param_dtype):
    """The dtype a user sees a state of `codec` as: the params' own (native), float32 (a
    decoded copy) for 8-bit blocks, or `ml_dtypes.bfloat16` (a view of the same bits) for
    `BFLOAT16`; ImportError naming the extra when ml_dtypes is not installed."""
    if codec is storage.NATIVE:
        return np.dtype(param_dtype)
    if codec.block:
        return np.dtype(np.float32)
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(
            "state_storage='bfloat16' shows the state as ml_dtypes.bfloat16 arrays; install it with: "
            "pip install ml_dtypes"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def of(hyper):
    """The spec of the options `hyper` (resolved, or a part of them: the defaults fill in)."""
    full = {**O.DEFAULTS, **hyper}
    return _of(O.variant_key(full), full["state_storage"], full["state_layout"])


@functools.lru_cache(maxsize=None)
def _of(variant, state_storage, state_layout="elementwise"):
    names = (
        ("square_avg",)
        + (("grad_avg",) if variant.uses_grad_avg else ())
        + (("momentum_buffer",) if variant.uses_momentum_buffer else ())
    )
    row = state_layout == "rowwise"
    return Spec(
        variant, tuple(StateSlot(n, state_storage, "row" if row and i == 0 else "param") for i, n in enumerate(names))
    )
