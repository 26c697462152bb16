"""The guard of a step, for every front end: `skip_nonfinite` and `clip_global_norm`
(`torch.nn.utils.clip_grad_norm_`'s formula) decided once, before anything is written. The
sums of squares and the non-finite checks are kernels (`fastrms.kernels.reduce`), which the
caller passes in; `clip_value` is a clamp inside the element function.

    norm = sqrt(sum over every element of every grad of g^2)      (float64, fixed order)
    coef = min(1, max_norm / (norm + 1e-6))
    g   <- coef * g        as the kernel reads it; the caller's grads are never written
    skip the step          when skip_nonfinite and a grad holds a NaN or an infinity
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Verdict", "coefficient", "guard", "guarded", "needs_norm", "overflow"]

#: Added to the norm before dividing, as torch does (optax's `clip_by_global_norm` adds nothing).
NORM_EPS = 1e-6


class Verdict(NamedTuple):
    """What the guard decided: `stepped` False when `skip_nonfinite` refused the step; `norm`
    the global norm before clipping (None without `clip_global_norm`); `coef` the factor on
    every grad (1.0 without clipping)."""

    stepped: bool
    norm: "float | None"
    coef: float

    def scaled(self, scalars):
        """The kernel scalars (`fastrms.kernels.Scalars`) with the clipping coefficient folded
        into the grad scale: `grad_scale * coef` (the scalars themselves when `coef` is 1)."""
        return scalars if self.coef == 1.0 else scalars._replace(grad_scale=scalars.grad_scale * self.coef)


GO = Verdict(True, None, 1.0)
SKIP = Verdict(False, None, 1.0)


def guarded(options: "Mapping[str, Any]") -> bool:
    """Whether the options (`fastrms.core.options`, resolved) ask for the guard: a look at the
    grads before the step writes anything."""
    return options["clip_global_norm"] is not None or bool(options["skip_nonfinite"])


def needs_norm(options: "Mapping[str, Any]") -> bool:
    """Whether the guard needs the grads' sum of squares (`sumsq`)."""
    return options["clip_global_norm"] is not None


def guard(
    sumsq: "Callable[[], float]",
    nonfinite: "Callable[[], bool]",
    grads: "Callable[[], Sequence[np.ndarray]]",
    options: "Mapping[str, Any]",
) -> Verdict:
    """The step's verdict under `options` (`clip_global_norm`, `skip_nonfinite`; resolved).
    `sumsq()`: the float64 sum of squares over every grad, in a fixed order; `nonfinite()`:
    whether any grad holds a NaN or an infinity; `grads()`: the grads (read only on the rare
    float64-overflow path). With clipping the norm is the non-finite check (one pass): a
    finite sum needs no second look."""
    max_norm, skip_nonfinite = options["clip_global_norm"], options["skip_nonfinite"]
    if max_norm is None:
        return SKIP if skip_nonfinite and nonfinite() else GO
    total = sumsq()
    norm = math.sqrt(total)
    if math.isfinite(total):
        return Verdict(True, norm, coefficient(norm, max_norm))
    if nonfinite():  # a NaN or an infinity in the grads
        return Verdict(False, norm, math.nan) if skip_nonfinite else Verdict(True, norm, coefficient(norm, max_norm))
    norm, coef = overflow(grads(), max_norm)  # finite grads whose float64 squares overflowed
    return Verdict(True, norm, coef)


def coefficient(norm, max_norm):
    """`min(1, max_norm / (norm + 1e-6))`; NaN when `norm` is NaN (`torch.clamp` keeps a
    NaN), 0 when it is infinite."""
    if math.isnan(norm):
        return math.nan
    coef = max_norm / (norm + NORM_EPS)
    return coef if coef < 1.0 else 1.0


def overflow(grads, max_norm):
    """`(norm, coef)` for finite `grads` whose float64 sum of squares overflowed (float64
    grads beyond about 1e154 make it): the squares summed again, each grad scaled by the
    largest magnitude first. `norm` is infinite only when the norm itself is beyond
    float64's range (about 1.8e308); `coef` is `min(1, max_norm / norm)` from the scaled
    sum either way, finite and > 0 (the formula's 1e-6 is far below the norm's rounding
    there). Rare, so NumPy."""
    scale = max((float(np.max(np.abs(g))) for g in grads if g.size), default=0.0)
    scaled = math.sqrt(sum(float(np.sum(np.square(g / scale, dtype=np.float64))) for g in grads if g.size))
    norm = scale * scaled
    if math.isfinite(norm):
        return norm, coefficient(norm, max_norm)
    return norm, min(1.0, (max_norm / scale) / scaled)
