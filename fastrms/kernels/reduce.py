"""Read-only passes over flat arrays."""

from numba import prange

from ._jit import jit, name


def _make_nonfinite(parallel):
    """Whether a float array holds a NaN or an infinity: ``x - x`` is 0 exactly when ``x`` is
    finite (no fastmath, so LLVM may not fold it), counted with an integer sum that
    vectorises. The array is only read."""

    def nonfinite(a):
        zero = a.dtype.type(0.0)
        count = 0
        for i in prange(a.size):
            x = a[i]
            count += 1 if x - x != zero else 0
        return count > 0

    name(nonfinite, f"nonfinite_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(nonfinite)


#: ``nonfinite_serial(a)`` / ``nonfinite_parallel(a)``: True if the 1-D float array ``a``
#: holds a NaN or +-Inf.
nonfinite_serial, nonfinite_parallel = _make_nonfinite(False), _make_nonfinite(True)
