"""`fastrms bench --cuda`: the step on a GPU, against the same-traffic kernel on the device
and against torch's step of the same tensors (needs a CUDA GPU; numba-cuda's simulator
cannot time one).

- one float32 array of `n` elements: `fastrms.RMSprop` (`fastrms.optimizer.DeviceRMSprop`, one grid-stride
  launch) against a kernel that reads and writes the same bytes with no math (param, grad
  and `square_avg` read, param and `square_avg` written: 20 bytes an element);
- a model of `k` float32 tensors of mixed sizes (one multi-tensor launch) against
  `torch.optim.RMSprop(foreach=True)` over torch CUDA tensors of the same sizes and
  `torch.compile` of its step (its compile time reported apart), when torch with CUDA is
  installed;
- the same model kept in float16 over float32 masters on the device (the params float16,
  their grads float16: one multi-tensor launch that also writes the float16 params);
- the same model with 8-bit state (`state_storage="8bit"`, one blockwise launch) against
  bitsandbytes' `RMSprop8bit` over the same sizes, when bitsandbytes with CUDA is
  installed.

Seconds are medians of interleaved rounds, each sample synchronised with the device.
"""

import time

import numpy as np

from .timing import measure_calls

#: Bytes a plain step moves per float32 element: param, grad and square_avg read, param
#: and square_avg written.
BYTES = 20
#: The same with 8-bit `square_avg`: a byte an element and a float32 scale a 256-element block.
BYTES_8BIT = 12 + 2 * 260 / 256
#: float16 params over float32 masters: the master read and written (8), the float16 param
#: read (an element written from outside is the master's next value) and written (4), the
#: float16 grad read (2), square_avg read and written (8).
BYTES_MASTERS = 22


def cuda_steps(n=100_000_000, k=200, total=50_000_000, rounds=7, target=0.05, seed=0):
    """`{case: {"seconds": s, "GB/s": rate}}` (see the module); `"compile seconds"` for
    torch.compile's first call when it runs."""
    from numba import cuda

    import fastrms

    def synced(step):
        def run():
            step()
            cuda.synchronize()

        return run

    rng = np.random.default_rng(seed)
    p, g = cuda.to_device(rng.standard_normal(n).astype(np.float32)), cuda.to_device(rng.random(n, np.float32))
    opt = fastrms.RMSprop(p, 1e-3)
    v = cuda.to_device(np.zeros(n, np.float32))
    from ..kernels.cuda import traffic

    blocks = min(-(-n // 256), 4096)
    steps = {
        f"fastrms, one array of {n}": synced(lambda: opt.step(g)),
        f"same traffic, one array of {n}": synced(lambda: traffic[blocks, 256](p, g, v)),
    }
    sizes = _model_sizes(rng, k, total)
    params = [cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in sizes]
    grads = [cuda.to_device(rng.random(s, np.float32)) for s in sizes]
    model = fastrms.RMSprop(params, 1e-3)
    steps[f"fastrms, {k} tensors"] = synced(lambda: model.step(grads))
    lean = fastrms.RMSprop([cuda.to_device(q.copy_to_host()) for q in params], 1e-3, state_storage="8bit")
    steps[f"fastrms 8-bit state, {k} tensors"] = synced(lambda: lean.step(grads))
    halves = [cuda.to_device(q.copy_to_host().astype(np.float16)) for q in params]
    half_grads = [cuda.to_device(q.copy_to_host().astype(np.float16)) for q in grads]
    mastered = fastrms.RMSprop(halves, 1e-3)
    steps[f"fastrms float16 params over float32 masters, {k} tensors"] = synced(lambda: mastered.step(half_grads))
    extra = {}
    torch_steps, compile_seconds = _torch_steps(sizes, rng, synced)
    steps.update(torch_steps)
    steps.update(_bitsandbytes_steps(sizes, synced))
    if compile_seconds is not None:
        extra["torch.compile: first call (compile) seconds"] = compile_seconds
    seconds = measure_calls(steps, rounds, target)
    out = {}
    for case, s in seconds.items():
        per = BYTES_8BIT if "8bit" in case or "8-bit" in case else BYTES_MASTERS if "masters" in case else BYTES
        moved = (n if "one array" in case else total) * per
        out[case] = {"seconds": s, "GB/s": moved / s / 1e9}
    out.update({label: {"seconds": s, "GB/s": None} for label, s in extra.items()})
    return out


def _model_sizes(rng, k, total):
    weights = rng.random(k) ** 3
    sizes = np.maximum(1, (weights / weights.sum() * total).astype(np.int64))
    sizes[0] += total - sizes.sum()
    return [int(s) for s in sizes]


def _torch_steps(sizes, rng, synced):
    """torch's foreach step and torch.compile of it over CUDA tensors of `sizes`, or none
    when torch has no CUDA here."""
    try:
        import torch
    except ImportError:
        return {}, None
    if not torch.cuda.is_available():
        return {}, None
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
    for q in params:
        q.grad = torch.rand(q.shape, device="cuda")
    foreach = torch.optim.RMSprop(params, lr=1e-3, alpha=0.9, foreach=True)
    compiled_opt = torch.optim.RMSprop([torch.nn.Parameter(q.detach().clone()) for q in params], lr=1e-3, alpha=0.9)
    for q, r in zip(compiled_opt.param_groups[0]["params"], params):
        q.grad = r.grad.clone()
    compiled = torch.compile(compiled_opt.step)
    start = time.perf_counter()
    compiled()
    torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - start
    k = len(sizes)
    steps = {
        f"torch.optim.RMSprop(foreach=True), {k} tensors": synced(foreach.step),
        f"torch.compile of it, {k} tensors": synced(compiled),
    }
    return steps, compile_seconds


def _bitsandbytes_steps(sizes, synced):
    """bitsandbytes' `RMSprop8bit` (blockwise 8-bit state) over CUDA tensors of `sizes`, or
    none when bitsandbytes or torch's CUDA is missing here."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
    for q in params:
        q.grad = torch.rand(q.shape, device="cuda")
    opt = bnb.optim.RMSprop8bit(params, lr=1e-3, alpha=0.9)
    return {f"bitsandbytes RMSprop8bit, {len(sizes)} tensors": synced(opt.step)}
