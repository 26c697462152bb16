"""`fastrms bench --accuracy`: what each precision mode does to training, on a small model.

A two-layer tanh network (64 inputs, 128 hidden units, 1 output, 8449 parameters) learns a
teacher network of the same shape from 4096 samples by full-batch gradient descent on the
mean squared error, forward and backward in NumPy float32, the step fastrms's (RMSprop, the
seed's defaults but lr). The modes differ only in what they keep:

- `float32`: params and state in float32 (8 bytes a parameter);
- `bfloat16 state`: `state_storage="bfloat16"` (6 bytes);
- `8-bit state`: `state_storage="8bit"` (5.02 bytes: 4 + 260 / 256);
- `bfloat16 + master`: the model computes with bfloat16 weights; the step updates float32
  masters and writes the bfloat16 weights in the same pass (`copy_to`; 10 bytes: 2 + 4 + 4);
- `bfloat16, stochastic`: only bfloat16 weights, each step's result rounded stochastically
  (6 bytes), as `fastrms.torch.RMSprop(stochastic_rounding=True)` rounds them (the same
  bits: `fastrms.reference.bfloat16_stochastic_round` with the same keys);
- `bfloat16, no master`: the model keeps only bfloat16 weights, each step's result rounded
  to nearest (6 bytes): the baseline that stalls once an update is below half a bfloat16
  step of its weight.

Every run starts from the same weights (rounded to bfloat16 for the bfloat16 modes) and
sees the same data; the losses are computed in float32 from the weights the model uses.
"""

import numpy as np

from .. import reference
from ..optimizer import RMSprop

#: Each mode with the bytes it keeps per parameter (weights the model uses + master + state).
MODES = {"float32": 8, "bfloat16 state": 6, "8-bit state": 5.02, "bfloat16 + master": 10, "bfloat16, stochastic": 6,
         "bfloat16, no master": 6}  # fmt: skip

_IN, _HIDDEN, _SAMPLES = 64, 128, 4096


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((_SAMPLES, _IN)).astype(np.float32)
    w1 = (rng.standard_normal((_IN, _HIDDEN)) / np.sqrt(_IN)).astype(np.float32)
    w2 = (rng.standard_normal((_HIDDEN, 1)) / np.sqrt(_HIDDEN)).astype(np.float32)
    y = np.tanh(x @ w1) @ w2  # the teacher
    start = [
        (rng.standard_normal((_IN, _HIDDEN)) / np.sqrt(_IN)).astype(np.float32),
        np.zeros(_HIDDEN, np.float32),
        (rng.standard_normal((_HIDDEN, 1)) / np.sqrt(_HIDDEN)).astype(np.float32),
    ]
    return x, y.astype(np.float32), start


def _loss_and_grads(weights, x, y):
    """The mean squared error of the network `weights` (float32 arrays) and its gradients."""
    w1, b1, w2 = weights
    h = np.tanh(x @ w1 + b1)
    err = h @ w2 - y
    loss = float(np.mean(err * err))
    d_out = (2.0 / len(y)) * err
    d_h = (d_out @ w2.T) * (1.0 - h * h)
    return loss, [x.T @ d_h, d_h.sum(axis=0), h.T @ d_out]


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def train(mode, steps=600, learning_rate=1e-4, seed=0, beta=0.9, kept=None):
    """The loss before each step and after the last (`steps + 1` floats) of `mode`; with a
    dict `kept`, `kept[mode]` is then the optimizer's final `square_avg` (float32 values)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    x, y, start = _problem(seed)
    params = [w.copy() for w in start]
    low = mode.startswith("bfloat16") and mode != "bfloat16 state"
    storage = {"bfloat16 state": "bfloat16", "8-bit state": "8bit"}.get(mode, "native")
    copies = None
    if low:
        bf16 = _bfloat16()
        params = [w.astype(bf16).astype(np.float32) for w in params]  # the bfloat16 start
        copies = [w.astype(bf16) for w in params]
    opt = RMSprop(params, learning_rate, beta, copy_to=copies if mode == "bfloat16 + master" else None,
                  state_storage=storage)  # fmt: skip
    losses = []
    for t in range(1, steps + 2):
        used = [c.astype(np.float32) for c in copies] if mode == "bfloat16 + master" else params
        loss, grads = _loss_and_grads(used, x, y)
        losses.append(loss)
        if len(losses) > steps:
            break
        opt.step([g.astype(np.float32) for g in grads])
        if mode == "bfloat16, no master":  # only bfloat16 weights are kept: round each step
            for p in params:
                p[...] = p.astype(_bfloat16()).astype(np.float32)
        elif mode == "bfloat16, stochastic":  # param j's key at step t, as fastrms.torch draws it
            for j, p in enumerate(params):
                bits = reference.bfloat16_stochastic_round(p, reference.stochastic_key(seed, j, t))
                p[...] = reference.bfloat16_value(bits).reshape(p.shape)
    if kept is not None:
        kept[mode] = [np.asarray(a, np.float32) for a in opt.square_avg]
    return losses


def study(steps=600, learning_rate=1e-4, seed=0, beta=0.9, kept=None):
    """Each mode's losses: `{mode: [loss, ...]}` (`kept`: see `train`)."""
    return {mode: train(mode, steps, learning_rate, seed, beta, kept) for mode in MODES}


def state_error(kept, mode):
    """`(median, 90th percentile)` of `|v / v_float32 - 1|` over every element: how far
    `mode`'s final `square_avg` is from the float32 run's (`kept` from `study`)."""
    mine = np.concatenate([np.asarray(a, np.float32).ravel() for a in kept[mode]])
    full = np.concatenate([np.asarray(a, np.float32).ravel() for a in kept["float32"]])
    error = np.abs(mine / full - 1)
    return float(np.median(error)), float(np.quantile(error, 0.9))


def plot(losses, path):
    """The loss curves, one per mode, on a log scale; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, curve in losses.items():
        style = "--" if "no master" in mode else (":" if "stochastic" in mode else "-")
        ax.plot(curve, label=f"{mode} ({MODES[mode]} B/param)", lw=1.6, ls=style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean squared error")
    ax.set_title("RMSprop on a 64-128-1 tanh network: the precision modes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
