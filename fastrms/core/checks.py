"""Argument checks shared by the optimizer, the options, the schedules and the seed function.

Each raises TypeError or ValueError naming the argument and what was expected."""

import math
from numbers import Real

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: dtype -> (the smallest float64 that rounds to infinity in dtype, the smallest normal value):
#: float32's largest finite value plus half its last step rounds (to even) up to infinity.
_LIMITS = {
    np.dtype(np.float32): (float(np.finfo(np.float32).max) + 2.0 ** (127 - 24), float(np.finfo(np.float32).tiny)),
    np.dtype(np.float64): (math.inf, float(np.finfo(np.float64).tiny)),
}


def number(name, value, *, low=None, low_open=False, high=None, high_open=False):
    """`value` as a finite float within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        bits = int(value).bit_length()
        raise ValueError(f"{name} must be finite, got an integer too large for a float ({bits} bits)") from None
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rule = " and ".join(r for r in (lo, hi) if r) or "finite"
        raise ValueError(f"{name} must be finite and {rule}, got {value!r}")
    return value


#: The largest step count fastrms accepts: the largest integer a float64 holds exactly (the
#: bias correction computes `beta ** t` in float64, the row counters are int64).
STEP_MAX = 2**53


def count(name, value, *, minimum=1, maximum=None):
    """`value` as an int in `[minimum, maximum]`: a Python or NumPy integer, nothing else
    (no bool, no float however whole, no string, no 0-d array)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        shown = value if value < 10**30 else f"an integer of {len(str(value))} digits"
        raise ValueError(f"{name} must be an integer <= {maximum}, got {shown}")
    return value


def flag(name, value):
    """`value` as a bool; 0/1 and numpy bools are refused like any non-bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def float_array(name, value, *, writeable):
    """A plain ndarray view of `value` (native-endian, C-contiguous, aligned float32/float64)
    whose `reshape(-1)` is a true 1-D view of exactly its own elements, or a clear error.

    ndarray subclasses are viewed as plain ndarrays (same memory): `np.matrix.reshape(-1)`
    stays 2-D and would let a kernel run past the array. Masked arrays are refused: the
    kernels cannot honour a mask.
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32 or float64, got {type(value).__name__}")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a plain numpy.ndarray, got a masked array: its mask would be ignored "
            "(pass .filled(...) or .data)"
        )
    if type(value) is not np.ndarray:
        value = value.view(np.ndarray)
    if value.dtype not in FLOAT_DTYPES:
        kind = "byte-swapped " if value.dtype.byteorder not in "=|" and value.dtype.kind == "f" else ""
        raise TypeError(f"{name} must have dtype float32 or float64 (native byte order), got {kind}{value.dtype}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray), got strides {value.strides}")
    if not value.flags.aligned:
        raise ValueError(f"{name} must be aligned to its dtype's size (np.require(x, requirements='A') copies)")
    if writeable and not value.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is updated in place")
    return value


def flat_view(a):
    """`a` (a plain C-contiguous ndarray) as a 1-D view of exactly its elements; asserts the
    invariant the kernels rely on, whatever produced `a`."""
    flat = a.reshape(-1)
    if type(flat) is not np.ndarray or flat.ndim != 1 or flat.size != a.size or flat.nbytes != a.nbytes:
        raise TypeError(f"cannot view {type(a).__name__} of shape {a.shape} as a 1-D array of its own elements")
    return flat


def fits(name, value, dtypes, *, nonzero=False, below_one=False):
    """Refuse `value` (a float already checked in float64) if rounding it to one of
    `dtypes` makes it infinite, 0 or subnormal when it must be > 0 (`nonzero`), or 1
    when it must be < 1 (`below_one`): the kernels compute in the arrays' dtype."""
    for dtype in dtypes:
        largest, tiny = _LIMITS[dtype]
        if not math.isfinite(value) or abs(value) >= largest:
            problem = "overflows to infinity"
        elif nonzero and abs(value) < tiny and value != 0:
            problem = (
                "rounds to 0" if dtype.type(value) == 0 else f"is subnormal (below {tiny:.3g}) and loses precision"
            )
        elif below_one and dtype.type(value) >= 1:
            problem = "rounds to 1"
        else:
            continue
        raise ValueError(
            f"{name}={value!r} {problem} in {dtype.name}, the params' dtype; choose a value {dtype.name} can hold"
        )
