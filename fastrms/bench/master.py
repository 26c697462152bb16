"""`fastrms bench --master`: a 16-bit model's optimizer step on the CPU, as offloaded
training runs it (the model's weights and grads in bfloat16, the optimizer over float32
master weights), in one process, interleaved:

- `fastrms`: `fastrms.torch.RMSprop` over the bfloat16 params: one fused pass reads each
  bfloat16 grad, steps the float32 master kept in the state and writes the param back;
- `fastrms, stochastic`: `fastrms.torch.RMSprop(stochastic_rounding=True)`: no master, the
  bfloat16 param stepped in place and rounded stochastically (14 bytes a parameter a step
  against the master's 20);
- `torch`: the recipe by hand, `torch.optim.RMSprop` (its default, foreach on CPU) over
  float32 master tensors: the grads widened into the masters' grads
  (`torch._foreach_copy_`), the step, and the params copied back from the masters
  (`torch._foreach_copy_`);
- `torch.compile`: the same three lines under `torch.compile` (inductor fuses them on the
  CPU); its first call, the compile, is timed apart.

Every implementation starts from the same params and grads and applies the same update
(torch's formula; fastrms matches it to float32 rounding, `tests/test_torch.py`).
"""

import time

import numpy as np

from .timing import measure_calls

#: The models timed by default: one big tensor, and a model of many mid-sized ones.
SHAPES = {"1 x 1e7": (10_000_000,), "100 x 1e5": (100_000,) * 100}


def _model(sizes, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return params


def steps(sizes, dtype_name="bfloat16", compiled=True, lr=1e-3):
    """The zero-argument steps `{name: step}` over a fresh model of tensors of `sizes`, and
    the seconds `torch.compile`'s first call took (None without it)."""
    import torch

    import fastrms.torch

    dtype = getattr(torch, dtype_name)
    ours = _model(sizes, dtype)
    opt = fastrms.torch.RMSprop(ours, lr=lr)
    out = {"fastrms": opt.step}
    if dtype is torch.bfloat16:
        rounded = fastrms.torch.RMSprop(_model(sizes, dtype), lr=lr, stochastic_rounding=True)
        out["fastrms, stochastic"] = rounded.step
    first = None
    recipes = [("torch", False)] + ([("torch.compile", True)] if compiled else [])
    for name, compile_it in recipes:
        params = _model(sizes, dtype)
        masters = [p.detach().float() for p in params]
        for m in masters:
            m.grad = torch.zeros_like(m)
        grads, data = [p.grad for p in params], [p.data for p in params]
        master_grads = [m.grad for m in masters]
        torch_opt = torch.optim.RMSprop(masters, lr=lr)

        def recipe(torch_opt=torch_opt, master_grads=master_grads, grads=grads, data=data, masters=masters):
            with torch.no_grad():
                torch._foreach_copy_(master_grads, grads)
                torch_opt.step()
                torch._foreach_copy_(data, masters)

        if compile_it:
            recipe = torch.compile(recipe)
            t0 = time.perf_counter()
            recipe()
            first = time.perf_counter() - t0
        out[name] = recipe
    return out, first


def measure(shapes=None, dtype_name="bfloat16", rounds=7, compiled=True, target=0.05):
    """Median seconds per step of each implementation for each model: rows
    `{"model", "params", "seconds": {name: s}, "compile_s"}`."""
    import torch

    rows = []
    threads = torch.get_num_threads()
    for label, sizes in (shapes or SHAPES).items():
        calls, first = steps(sizes, dtype_name, compiled)
        seconds = measure_calls(calls, rounds=rounds, target=target)
        rows.append({"model": label, "params": int(np.sum(sizes)), "seconds": seconds, "compile_s": first})
    torch.set_num_threads(threads)
    return rows
