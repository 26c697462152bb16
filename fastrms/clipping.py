"""The arithmetic of `clip_global_norm` around the kernels (`torch.nn.utils.clip_grad_norm_`'s
formula); the sum of squares itself is a kernel (`fastrms.kernels.reduce`), and
`clip_value` is a clamp inside the element function.



    norm = sqrt(sum over every element of every grad of g^2)      (float64, fixed order)
    coef = min(1, max_norm / (norm + 1e-6))
    g   <- coef * g        as the kernel reads it; the caller's grads are never written
"""

import math

import numpy as np

__all__ = ["coefficient", "overflow"]

#: Added to the norm before dividing, as torch does (optax's `clip_by_global_norm` adds nothing).
NORM_EPS = 1e-6


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
