"""The keyword-only options' static types, generated from `fastrms.core.options.OPTIONS`
(do not edit: `fastrms.core.options.typing_source()` writes this file, and a test checks it).
"""

from typing import Literal, TypedDict


class Options(TypedDict, total=False):
    """What `**options` of `RMSprop` and the other front ends may hold."""

    momentum: float
    """Momentum >= 0; 0 keeps no momentum buffer; default `0.0`."""
    centered: bool
    """Divide by the root of the variance estimate `v - m^2` (clamped at 0); default `False`."""
    nesterov: bool
    """Nesterov momentum; needs momentum > 0; default `False`."""
    lr_in_momentum: bool
    """Accumulate `lr * u` in the momentum buffer (Keras, TF1, optax) instead of `u` (PyTorch); default `False`."""
    weight_decay: float
    """Weight decay >= 0 (L2 on the gradient, or decoupled); default `0.0`."""
    decoupled_weight_decay: bool
    """Shrink the parameter by `lr * weight_decay` before the update (Keras 3, AdamW style); default `False`."""
    maximize: bool
    """Ascend instead of descend; default `False`."""
    bias_correction: bool
    """Divide `v` and `m` by `1 - beta^t`; default `False`."""
    eps_in_sqrt: bool
    """`sqrt(v + eps)` instead of `sqrt(v) + eps`; default `False`."""
    initial_scale: float
    """Starting value of `square_avg` (TF1 uses 1.0); default `0.0`."""
    state_storage: Literal["native", "bfloat16", "8bit"]
    """How the state is stored: "native" (the params' dtype), "bfloat16" (float32 params only: half the state's
    bytes; the update computes in float32 from the stored values and stores its result rounded to nearest even, as
    `torch.bfloat16` does; needs `ml_dtypes`, the `bfloat16` extra) or "8bit" (float32 params only: a quarter of the
    bytes and a little more, in blocks of 256 codes and a float32 scale, dequantised, stepped in float32 and
    requantised in one pass; see [docs/algorithm.md](algorithm.md)); default `'native'`."""
    state_layout: Literal["elementwise", "rowwise"]
    """The shape of `square_avg`: "elementwise" (one value per element) or "rowwise" (one per row of each param, its
    first axis, a 1-D param's rows being its elements: `v <- beta * v + (1 - beta) * mean(g^2)` over the row, as
    FBGEMM's rowwise optimizers keep an embedding table's state; with state_storage='native', not centered; see
    [docs/algorithm.md](algorithm.md)); default `'elementwise'`."""
    skip_nonfinite: bool
    """A step whose grads hold a NaN or an infinity changes nothing and is counted in `skipped_steps`; default
    `False`."""
    dense_rows: bool
    """`step_rows` replays, when a row is touched again, the zero-gradient steps it missed (closed form), so a
    sparse run equals a dense one up to rounding; off: lazy, a row's state decays only when it is touched
    (TensorFlow's sparse ops, torch's SparseAdam); default `False`."""
    clip_global_norm: float | None
    """`max_norm` > 0, or None: scale every grad, as the kernel reads it, by `min(1, max_norm / (norm + 1e-6))`,
    `norm` the 2-norm over all grads (`torch.nn.utils.clip_grad_norm_`'s formula); default `None`."""
    clip_value: float | None
    """`c` > 0, or None: clamp every grad element to `[-c, c]` as the kernel reads it
    (`torch.nn.utils.clip_grad_value_`); a NaN passes through; default `None`."""
