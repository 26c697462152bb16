"""The backends under every front end: `cpu` (kernel choice, the step's calls) over `layout`
(pointer and chunk tables, packing), and `cuda` (params on a GPU; imported on demand).
Imports `fastrms.core` and `fastrms.kernels`."""

from ..core import runtime

__all__ = ["cuda_target", "info"]


def info() -> dict:
    """What fastrms runs on (`fastrms info`): `fastrms.core.runtime.info` (threads, the
    kernel cache, versions) and the CUDA target (`cuda_target`)."""
    return {**runtime.info(), "cuda": cuda_target()}


def cuda_target() -> dict:
    """The CUDA target: `{"available", "device", "why"}` (`fastrms.backend.cuda.describe`),
    or why not when numba-cuda is not installed. Imports numba-cuda when it is there (only
    `info` asks)."""
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:
        return {"available": False, "device": None, "why": "numba-cuda is not installed (pip install 'fastrms[cuda]')"}
    from . import cuda

    return cuda.describe()
