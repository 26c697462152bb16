"""fastrms: RMSprop as one fused, in-place Numba pass over flat float arrays.

Public face: :class:`RMSprop` (the optimizer), :func:`rmsprop` (the seed article's function),
:mod:`fastrms.schedules`, :mod:`fastrms.kernels` (callable from your own ``@njit`` code) and
:mod:`fastrms.reference` (the pure-NumPy version, for comparison).
"""

from . import kernels, reference, schedules
from .functional import rmsprop
from .optimizer import RMSprop
from .presets import PRESETS

__version__ = "0.1.0"

__all__ = ["RMSprop", "rmsprop", "schedules", "kernels", "reference", "PRESETS", "__version__"]
