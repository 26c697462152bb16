"""fastrms: RMSprop as one fused, in-place Numba pass over flat float arrays.

Public face: `RMSprop` (the optimizer), `rmsprop` (the seed article's function),
`pack` (many arrays in one buffer),
`fastrms.schedules`, `fastrms.kernels` (callable from your own `@njit` code) and
`fastrms.reference` (the pure-NumPy version, for comparison).

The house: `fastrms.kernels` (the Numba code, importing nothing of the rest), `fastrms.core`
(options, spec, clock, guard, memory, checkpoint, rows, runtime: what every front end shares),
`fastrms.backend` (the CPU backend: pointer tables, kernel choice, the step's calls), and the
front ends over them (`RMSprop`, `functional`, `rmsprop`, `fastrms.torch`, `fastrms.dask`).
"""

import sys

from .core import runtime

runtime.setup()  # before any parallel kernel runs: choose a thread- and fork-safe layer

from . import functional, kernels, reference, schedules  # noqa: E402
from ._version import __version__  # noqa: E402
from .backend import info  # noqa: E402
from .backend.layout import pack  # noqa: E402
from .core import checkpoint, spec  # noqa: E402
from .optimizer import RMSprop  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .seed import rmsprop  # noqa: E402

#: The core modules documented under their first paths: `import fastrms.spec` still works.
for _module in (checkpoint, runtime, spec):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
del _module

__all__ = [
    "RMSprop",
    "rmsprop",
    "pack",
    "functional",
    "schedules",
    "kernels",
    "reference",
    "info",
    "PRESETS",
    "__version__",
]


def __dir__():
    """The public names only: the package's internal modules (imported as it loads) stay
    importable but out of `dir(fastrms)` and tab completion."""
    return sorted(__all__)
