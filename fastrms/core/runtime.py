"""Keeping parallel kernels safe in their host process: threading layer, threads and forks.

Numba's threading layers differ (Numba's documentation, "Selecting a threading layer"):

=========  ============  ==========================================================
layer      thread-safe   fork-safe
=========  ============  ==========================================================
tbb        yes           yes
omp        yes           no with GNU OpenMP: a forked child that runs parallel code
                         after its parent did is killed or hangs
workqueue  no            yes; two Python threads in parallel code at once abort
                         the whole process
=========  ============  ==========================================================

At import (`setup`), unless the user chose a layer (`NUMBA_THREADING_LAYER` or
`numba.config.THREADING_LAYER`), fastrms makes TBB loadable when the `tbb` package is
installed (its `libtbb.so.12` lands in the environment's `lib/`, where the loader does not
look) and asks Numba for it. Whatever layer ends up active, the optimizer adapts
(`parallel_mode`): under `workqueue` it serialises its parallel kernel calls with a
lock; in a child forked after the parent ran GNU OpenMP, it uses the serial kernels. Nothing
aborts. `info` reports the layer, the thread count and why.
"""

import ctypes
import functools
import os
import sys
import threading

import numba

_LOCK = threading.Lock()
_GENERATION = 0  # changes whenever parallel_mode() may answer differently (after a fork)
_STATE = {
    "reason": "not set up",
    "tbb_library": None,
    "chose_tbb": False,
    "forked_after_omp": False,
    "user_choice": None,
}


def _find_libtbb():
    """Path of the `tbb` package's libtbb.so.12, or None."""
    candidates = [os.path.join(sys.prefix, "lib", "libtbb.so.12")]
    try:
        from importlib.metadata import PackageNotFoundError, files

        try:
            for f in files("tbb") or ():
                if f.name.startswith("libtbb.so.12"):
                    candidates.insert(0, str(f.locate()))
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - Python < 3.8
        pass
    return next((os.path.realpath(c) for c in candidates if os.path.exists(c)), None)


def _load_tbb():
    """Make Numba's TBB layer importable; returns the library path, or None if unavailable."""
    try:
        from numba.np.ufunc import tbbpool

        return "found by the loader"
    except ImportError:
        pass
    path = _find_libtbb()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        from numba.np.ufunc import tbbpool  # noqa: F401
    except (OSError, ImportError):
        return None
    return path


#: Layer names (Numba's layers and its safety categories) that TBB can serve: when the user
#: asks for one of these, fastrms makes the tbb package's library loadable, as it does by default.
_TBB_CHOICES = ("tbb", "safe", "threadsafe", "forksafe")


def setup():
    """Choose the threading layer (once, at import). Respects the user's choice."""
    if _STATE["reason"] != "not set up":
        return
    user = os.environ.get("NUMBA_THREADING_LAYER") or (
        numba.config.THREADING_LAYER if numba.config.THREADING_LAYER != "default" else None
    )
    if user:
        _STATE["user_choice"] = user
        if user.lower() in _TBB_CHOICES and active_layer() is None:
            _STATE["tbb_library"] = _load_tbb()
        _STATE["reason"] = f"threading layer {user!r} chosen by the user (NUMBA_THREADING_LAYER); fastrms adapts to it"
    elif active_layer() is not None:
        _STATE["reason"] = "Numba's threads were already running when fastrms was imported"
    else:
        lib = _load_tbb()
        if lib is not None:
            numba.config.THREADING_LAYER = "tbb"
            _STATE["tbb_library"] = lib
            _STATE["chose_tbb"] = True
            _STATE["reason"] = "TBB is installed: thread- and fork-safe"
        else:
            _STATE["reason"] = (
                "TBB is not installed (pip install tbb): Numba picks omp or workqueue; "
                "fastrms serialises workqueue calls and uses serial kernels in children forked after omp ran"
            )
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _user_layer_error(user, cause):
    """The error for a threading layer the user chose that Numba cannot start."""
    name = user.lower()
    if name in _TBB_CHOICES:
        found = _STATE["tbb_library"]
        tried = (
            f"fastrms preloaded {found}, but Numba still could not start TBB (a TBB too old for numba "
            f"{numba.__version__}?)"
            if found
            else f"fastrms looked for the tbb package's libtbb.so.12 (in {os.path.join(sys.prefix, 'lib')} "
            "and the package's file list) and found none"
        )
        fix = "pip install 'tbb>=2021.6' into this environment, or unset NUMBA_THREADING_LAYER"
    elif name == "omp":
        tried = "Numba could not load its OpenMP layer (no OpenMP runtime, e.g. libgomp, on the loader's path)"
        fix = "install an OpenMP runtime (Debian/Ubuntu: apt install libgomp1), or unset NUMBA_THREADING_LAYER"
    else:
        tried = "Numba could not load it"
        fix = "choose tbb (pip install tbb), omp or workqueue, or unset NUMBA_THREADING_LAYER"
    return RuntimeError(
        f"the threading layer {user!r} chosen in NUMBA_THREADING_LAYER cannot start: {tried}. Fix: {fix}. "
        f"(Numba said: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__})"
    )


def active_layer():
    """The threading layer Numba's thread pool runs on, or None before it has started."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def layer():
    """The active threading layer, starting Numba's thread pool if it is not running yet."""
    active = active_layer()
    if active is None:
        from numba.np.ufunc import parallel

        try:
            parallel._launch_threads()
        except ValueError as exc:  # "No threading layer could be loaded"
            if _STATE["user_choice"]:
                raise _user_layer_error(_STATE["user_choice"], exc) from None
            if not _STATE["chose_tbb"]:
                raise
            # We asked for TBB and Numba would not start it (e.g. a TBB too old for this Numba):
            # undo our choice and let Numba pick as it would have; the guards cover the rest.
            numba.config.THREADING_LAYER = "default"
            _STATE["tbb_library"] = None
            _STATE["chose_tbb"] = False
            _STATE["reason"] = (
                "TBB is installed but Numba could not start it: Numba's default order, with fastrms's guards"
            )
            parallel._launch_threads()
        active = numba.threading_layer()
    return active


def parallel_mode():
    """How the optimizer may call its parallel kernels here:

    `"free"` (tbb, omp), `"serialized"` (workqueue: one call at a time, under a lock) or
    `"serial"` (a child forked after its parent ran GNU OpenMP: serial kernels only).
    """
    if _STATE["forked_after_omp"]:
        return "serial"
    return "serialized" if layer() == "workqueue" else "free"


def serialized(kernel):
    """`kernel` wrapped so that only one thread runs it (or any other wrapped kernel) at once."""

    def call(*args):
        with _LOCK:
            return kernel(*args)

    call.kernel = kernel
    return call


def parallel_for(size, itemsize, state_arrays):
    """Whether a step of `size` elements of `itemsize` bytes with `state_arrays` state arrays
    runs on the parallel kernels here: it moves `fastrms.kernels.PARALLEL_MIN_BYTES` and this
    process may run parallel code (`parallel_mode() != "serial"`). Cached until `generation`
    changes: a front end asks once per step."""
    return _parallel_for(size, itemsize, state_arrays, _GENERATION)


@functools.lru_cache(maxsize=256)
def _parallel_for(size, itemsize, state_arrays, generation):
    from .. import kernels

    return (
        kernels.step_bytes(size, itemsize, state_arrays) >= kernels.PARALLEL_MIN_BYTES and parallel_mode() != "serial"
    )


def locked(kernel, parallel):
    """`kernel` as a front end calls it: `serialized(kernel)` when it is a parallel kernel
    and parallel kernels may not overlap here, else `kernel` itself."""
    return serialized(kernel) if parallel and parallel_mode() == "serialized" else kernel


def generation():
    """A number that changes whenever `parallel_mode` may answer differently (it does in
    a child forked after its parent ran GNU OpenMP): callers cache their choice of kernels
    and choose again when it changes. One global read."""
    return _GENERATION


def _after_fork_in_child():
    global _LOCK, _GENERATION
    _LOCK = threading.Lock()  # a lock held by another parent thread would never be released here
    if active_layer() == "omp":
        _STATE["forked_after_omp"] = True
        _GENERATION += 1


def info() -> dict:
    """What fastrms runs on: threading layer, threads, the parallel mode and why; the kernels'
    disk cache (its folder and what its lookups in this process did); the versions."""
    import platform

    import llvmlite
    import numpy

    from .. import kernels
    from .._version import __version__

    stats = kernels.cache_stats()
    return {
        "fastrms": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "threading_layer": layer(),
        "parallel_mode": parallel_mode(),
        "reason": _STATE["reason"],
        "user_threading_layer": _STATE["user_choice"],
        "tbb_library": _STATE["tbb_library"],
        "num_threads": numba.get_num_threads(),
        "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]  # set at import, unseen by mypy
        "parallel_min_bytes": kernels.PARALLEL_MIN_BYTES,
        "cache": kernels.CACHE_STATUS,
        "cache_folder": stats["folder"],
        "cache_hits": stats["hits"],
        "cache_misses": stats["misses"],
        "compiled_here": stats["compiled"],
        "source_hash": kernels.SOURCE_HASH[:16],
    }
