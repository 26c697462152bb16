"""How the loop shells read and write the optimizer state: a codec, chosen at compile time.

The element function computes in the params' dtype `T`. Each state array (`square_avg`,
`grad_avg`, `momentum_buffer`) is read through the codec's `load(a, i) -> T` and written
through its `store(a, i, x)`, both `inline="always"`, so the native codec compiles to the
plain `a[i]` / `a[i] = x` it replaces (the same machine code, the same bits) and a state of
another storage is a new codec here, not a new shell:

- `NATIVE`: the state in the params' own dtype (float32 or float64), the default;
- `BFLOAT16`: the state as bfloat16 bit patterns in uint16 arrays (half the bytes of
  float32), for float32 params: `load` widens exactly (`bits << 16`), `store` rounds to
  nearest, ties to even, and keeps a NaN a (quiet) NaN, as `ml_dtypes.bfloat16` and torch
  round:

      bits(x) = float32 bits of x
      store   = (bits(x) + 0x7fff + ((bits(x) >> 16) & 1)) >> 16    (x not NaN)
              = (bits(x) >> 16) | 0x0040                            (x NaN)

`fastrms.reference.bfloat16_round` writes the same rounding in NumPy.
"""

from typing import Any, NamedTuple

import numpy as np
from numba import njit


class Codec(NamedTuple):
    """One state storage: `tag` (in the compiled functions' names; `""` for the native
    one), the storage `dtype` (None: the params' own), the params' dtypes it serves (None:
    any float), its inline `load` / `store`, and `witness(params_witness)`: an empty array
    of the storage dtype, which types the pointer-table shells' state arrays."""

    tag: str
    dtype: Any
    params: Any
    load: Any
    store: Any
    witness: Any


@njit(inline="always")
def _native_load(a, i):
    return a[i]


@njit(inline="always")
def _native_store(a, i, x):
    a[i] = x


@njit(inline="always")
def _native_witness(witness):
    return witness


_BF16_WITNESS = np.empty(0, np.uint16)


@njit(inline="always")
def _bf16_witness(witness):
    return _BF16_WITNESS


@njit(inline="always")
def _bf16_load(a, i):
    return np.uint32(np.uint32(a[i]) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _bf16_store(a, i, x):
    u = np.float32(x).view(np.uint32)
    if x != x:  # NaN: truncate, and keep it a NaN (a quiet bit), whatever its payload
        a[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x0040))
    else:
        a[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


NATIVE = Codec("", None, None, _native_load, _native_store, _native_witness)
BFLOAT16 = Codec("bf16", np.dtype(np.uint16), (np.dtype(np.float32),), _bf16_load, _bf16_store, _bf16_witness)

#: Every codec by name (the `state_storage` a front end names).
CODECS = {"native": NATIVE, "bfloat16": BFLOAT16}


def state_dtype(codec, param_dtype):
    """The dtype of the state arrays `codec` keeps for params of `param_dtype`."""
    return np.dtype(param_dtype) if codec.dtype is None else codec.dtype


def suffix(codec):
    """What `codec` adds to a compiled function's name (nothing for the native one)."""
    return f"_{codec.tag}" if codec.tag else ""
