"""Argument checks shared by the optimizer, the schedules and the functional API.

Each raises TypeError or ValueError naming the argument and what was expected."""

import math
from numbers import Real

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def number(name, value, *, low=None, low_open=False, high=None, high_open=False):
    """``value`` as a finite float within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
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


def count(name, value, *, minimum=1):
    """``value`` as an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def flag(name, value):
    """``value`` as a bool; 0/1 and numpy bools are refused like any non-bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def float_array(name, value, *, writeable):
    """A native-endian, C-contiguous float32/float64 ndarray, or a clear error."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32 or float64, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        kind = "byte-swapped " if value.dtype.byteorder not in "=|" and value.dtype.kind == "f" else ""
        raise TypeError(f"{name} must have dtype float32 or float64 (native byte order), got {kind}{value.dtype}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray), got strides {value.strides}")
    if writeable and not value.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is updated in place")
    return value
