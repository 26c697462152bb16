"""One decorator for every kernel: Numba's options, and the on-disk cache where Numba can."""

from numba import njit

#: Numba options of every kernel: NumPy's division semantics (no ZeroDivisionError branch in
#: the loop), the GIL released, no fastmath (its no-NaN/no-Inf flags break the non-finite
#: check and change results).
JIT_OPTIONS = dict(error_model="numpy", nogil=True)

#: "on" when compiled kernels are cached on disk, else why not. Caching is on by default:
#: without it every new process compiles each variant it uses again (0.15 s serial, 0.4 s
#: parallel). Numba looks for a writable place (next to the package, then the user-wide
#: cache, or NUMBA_CACHE_DIR, which fastrms never overrides); where there is none (a
#: read-only install with no writable home), the kernels are compiled in memory instead.
CACHE_STATUS = "on"


def jit(parallel=False):
    """``njit`` with :data:`JIT_OPTIONS`, cached on disk where Numba can."""

    def wrap(fn):
        global CACHE_STATUS
        if CACHE_STATUS == "on":
            try:
                return njit(parallel=parallel, cache=True, **JIT_OPTIONS)(fn)
            except RuntimeError as exc:  # Numba found no writable cache location
                if "cannot cache" not in str(exc):
                    raise
                CACHE_STATUS = f"off: {exc}"
        return njit(parallel=parallel, **JIT_OPTIONS)(fn)

    return wrap


def name(fn, text):
    """Give ``fn`` its own name: Numba derives both the cache file and the machine-code
    symbol from the qualified name, and closures sharing one name would let a cached caller
    link against another variant's code in a later process."""
    fn.__name__ = fn.__qualname__ = text
    return fn
