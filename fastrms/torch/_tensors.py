"""The tensors `fastrms.torch.RMSprop` steps: what it checks of them before anything is
written (params CPU, float32/float64, or bfloat16/float16 over a float32 master copy kept in
the state, and dense in memory; a param and its grad laid out alike;
distinct params not sharing memory; no param, state or grad of one kernel call overlapping
another, as threads would race on shared memory), and each param's cached layout (`layout`:
its state, created as torch creates it, and the addresses a kernel call reads)."""

import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from ..kernels import storage
from ._buckets import LOW, MASTER, STATE_NAMES

#: The dtypes the fused step takes, with the NumPy dtype it computes in (and keeps the state
#: in): a 16-bit param's is float32, its master copy's.
NUMPY = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: np.dtype(np.float32),
    torch.float16: np.dtype(np.float32),
}
__all__ = ["LOW", "MASTER", "NUMPY"]
#: The dtypes of a param's `step` counter.
STEP_DTYPES = (torch.float32, torch.float64)


#: The tensor types whose memory is their values: stepped as they are.
PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_NO_DISPATCH = torch.Tensor.__torch_dispatch__


def dtensor_type():
    """`torch.distributed.tensor.DTensor`, or None while nothing has imported it (then no
    DTensor exists): fastrms never imports torch.distributed itself."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(t, name):
    """The tensor whose memory the kernel steps for `t`: `t` itself, or a DTensor's local
    shard (FSDP2's params, `distribute_tensor`'s). Any other tensor subclass (a wrapper whose
    `data_ptr()` is not its values', a fake or lazy tensor) is refused with a TypeError naming
    `name`: the kernel would read and write the wrong memory."""
    kind = type(t)
    if kind in PLAIN:
        return t
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        shard = t.to_local()
        if type(shard) not in PLAIN:
            raise TypeError(f"{name} is a DTensor whose local shard is a {type(shard).__name__}; fastrms steps "
                            "DTensors whose shards are plain tensors")  # fmt: skip
        return shard
    if isinstance(t, torch.Tensor) and kind.__torch_dispatch__ is _NO_DISPATCH and (t.numel() == 0 or t.data_ptr()):
        return t  # a Python subclass of a plain tensor: its memory is its values
    raise TypeError(
        f"{name} is a {kind.__module__}.{kind.__qualname__}, a tensor subclass whose memory fastrms cannot step "
        "in place (it steps plain tensors, nn.Parameter and DTensor's local shards)"
    )


def local_pair(p, g, name):
    """`(local(p), local(g))` for a param that is not a plain tensor: a DTensor param's grad
    must be a DTensor on the same mesh with the same placements (its shard is then laid out
    like the param's)."""
    t = local(p, name)
    if t is p:
        return p, g
    if type(g) is not type(p):
        raise ValueError(f"{name} is a DTensor, its grad a {type(g).__name__}; a DTensor param's grad is a DTensor")
    if g.device_mesh != p.device_mesh or g.placements != p.placements:
        raise ValueError(
            f"{name}: its grad is placed {tuple(g.placements)} on {g.device_mesh}, the param {tuple(p.placements)} "
            f"on {p.device_mesh}; fastrms steps the shards in place, so they must be placed alike"
        )
    return t, local(g, f"{name}'s grad")


def dense(t):
    """Whether `t`'s elements fill `numel` consecutive slots of memory (contiguous, or a
    permutation of a contiguous layout such as channels-last), with no overlap."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def first_overlap(starts, ends):
    """`(i, j)`, two of the byte spans `[starts[k], ends[k])` that overlap, or None."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    clash = np.flatnonzero(s[1:] < reach[:-1])
    if clash.size == 0:
        return None
    j = int(clash[0]) + 1
    i = int(np.flatnonzero(e[:j] > s[j])[0])
    return int(order[i]), int(order[j])


def holds(keys, tensors):
    """A check that a state dict still holds `tensors` under `keys` (two to five: the
    state a variant keeps, `step` and a 16-bit param's master), written out for up to
    four: a step runs it once per param."""
    if len(keys) == 2:
        (k0, k1), (t0, t1) = keys, tensors
        return lambda d: d.get(k0) is t0 and d.get(k1) is t1
    if len(keys) == 3:
        (k0, k1, k2), (t0, t1, t2) = keys, tensors
        return lambda d: d.get(k0) is t0 and d.get(k1) is t1 and d.get(k2) is t2
    if len(keys) == 4:
        (k0, k1, k2, k3), (t0, t1, t2, t3) = keys, tensors
        return lambda d: d.get(k0) is t0 and d.get(k1) is t1 and d.get(k2) is t2 and d.get(k3) is t3
    pairs = tuple(zip(keys, tensors))
    return lambda d: all(d.get(k) is t for k, t in pairs)


def check_param(p, name):
    """`p` is a CPU float32/float64/bfloat16/float16 tensor, dense in memory (the fused step
    writes it in place)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} is a {type(p).__name__}, not a tensor")
    p = local(p, name)
    if p.device.type != "cpu":
        raise ValueError(f"{name} is on {p.device}; fastrms.torch.RMSprop steps CPU tensors only")
    if p.dtype not in NUMPY:
        raise TypeError(
            f"{name} has dtype {p.dtype}; fastrms.torch.RMSprop steps float32 and float64 tensors, and "
            "bfloat16 and float16 ones over a float32 master copy (complex and integer are not supported)"
        )
    if not dense(p):
        raise ValueError(
            f"{name} is not dense in memory (strides {tuple(p.stride())} for shape {tuple(p.shape)}); "
            "the fused step writes a param's memory in place: make it contiguous first"
        )


def check_disjoint(params, where):
    """Distinct params must not share memory: one kernel call steps them at once."""
    if len(params) < 2:
        return
    shards = [local(p, f"{where}['params']") for p in params]
    starts = np.array([p.data_ptr() for p in shards], dtype=np.int64)
    ends = starts + np.array([p.numel() * p.element_size() for p in shards], dtype=np.int64)
    keep = ends > starts
    clash = first_overlap(starts[keep], ends[keep])
    if clash is not None:
        i, j = (np.flatnonzero(keep)[k] for k in clash)
        a, b = sorted((int(i), int(j)))
        raise ValueError(
            f"{where}: params {a} and {b} share memory (views of one storage); fastrms steps a group's "
            "params at once, so they must be separate tensors"
        )


def check_pair(p, g, name):
    """The slow path: a sparse grad, or a param or grad that is not contiguous."""
    if g.layout != torch.strided:
        raise ValueError(f"{name} has a {g.layout} grad; fastrms steps dense grads and sparse COO grads of rows")
    check_param(p, name)
    if g.stride() != p.stride() and p.numel() > 1:
        raise ValueError(
            f"{name}: its grad has strides {tuple(g.stride())}, its param {tuple(p.stride())}; the fused "
            "step reads them element for element, so they must be laid out alike (make both contiguous)"
        )


def check_overlaps(checked, at, spans, ptrs, where):
    """No param or state of one kernel call may overlap another, nor a grad any of them
    (threads would race on shared memory); grads may overlap each other (they are only
    read). `spans` gives the bytes each address of `ptrs` covers (`Entry.spans`; 0: not an
    address): column 1 is the grad, read; every other is written. Checked again only when an
    address or a span changed (`checked[at]`: the last check's pointers and spans)."""
    columns = [c for c in range(min(ptrs.shape[1], spans.shape[1])) if c != 1 and spans[:, c].any()]
    addresses = ptrs[:, [1, *columns]]
    last = checked.get(at)
    if last is not None and np.array_equal(last[1], spans) and np.array_equal(last[0], addresses):
        return
    written, sized = ptrs[:, columns], spans[:, columns]
    grad_bytes = spans[:, 1]
    used = (written != 0) & (sized > 0)
    owner = np.broadcast_to(np.arange(len(ptrs))[:, None], written.shape)[used]
    w_start = written[used]
    w_end = w_start + sized[used]
    clash = first_overlap(w_start, w_end)
    culprit = None if clash is None else int(owner[clash[1]])
    if culprit is None and w_start.size:
        order = np.argsort(w_start)
        starts, ends = w_start[order], w_end[order]
        g_start, g_end = ptrs[:, 1], ptrs[:, 1] + grad_bytes
        last_before = np.searchsorted(starts, g_end, side="left") - 1
        hit = (last_before >= 0) & (ends[np.maximum(last_before, 0)] > g_start) & (grad_bytes > 0)
        if hit.any():
            culprit = -1 - int(np.flatnonzero(hit)[0])
    if culprit is not None:
        who = f"the grad of param {-1 - culprit}" if culprit < 0 else f"param {culprit} (or its state)"
        raise ValueError(
            f"{where}: {who} of this dtype shares memory with another param, grad or state stepped in the same "
            "call; fastrms steps them at once, so they must be separate tensors"
        )
    checked[at] = (addresses, spans)


class Form(NamedTuple):
    """How an optimizer keeps its params' state (`state_storage`, `state_layout`): the
    dtype and shape of each state tensor, and a fresh one."""

    codec: storage.Codec = storage.NATIVE
    rowwise: bool = False

    def of(self, state_name, p, kept):
        """`(dtype, shape)` of state `state_name` of a param shaped like `p` whose state is
        kept in `kept` (its dtype; float32 for a 16-bit param): `p`'s shape in `kept`
        (native), in bfloat16, one value a row of its first axis (rowwise `square_avg`), or
        the bytes of its 8-bit blocks (1-D uint8, 256 codes and a float32 scale a block)."""
        if state_name == MASTER:
            return kept, tuple(p.shape)
        if self.rowwise and state_name == "square_avg":
            return kept, tuple(p.shape[:1])
        if self.codec.block:
            return torch.uint8, (storage.extent(self.codec, p.numel()),)
        return (torch.bfloat16 if self.codec is storage.BFLOAT16 else kept), tuple(p.shape)

    def param_shaped(self, state_name):
        """Whether state `state_name` is laid out like its param (else a 1-D tensor)."""
        return state_name == MASTER or not (self.codec.block or (self.rowwise and state_name == "square_avg"))

    def fresh(self, state_name, p, kept):
        """A new state tensor `state_name` for `p`, holding zeros (as torch starts it)."""
        dtype, shape = self.of(state_name, p, kept)
        if self.param_shaped(state_name):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        t = torch.zeros(shape, dtype=dtype)
        if self.codec.block:  # zero-valued blocks: a zero scale, the codes of zero
            storage.fill(self.codec, t.numpy(), np.float32, 0.0)
        return t


#: The state as torch keeps it: in the param's dtype, element by element.
ELEMENTWISE = Form()


class Entry(NamedTuple):
    """A param's cached layout (`layout`): what it was made from, checked again before each
    use, and what a kernel call reads."""

    param: torch.Tensor  # the param it is the layout of
    address: int  # the param's (local shard's) data address when made
    shape: tuple  # its (local) shape
    names: tuple  # the state the variant keeps, fastrms.core.spec's names
    state: dict  # torch's per-param state dict
    keys: tuple  # the state keys held (`names`, "step", a 16-bit param's MASTER)
    holds: "Callable[[dict], bool]"  # whether `state` still holds `held` under `keys`
    strides: "tuple | None"  # its strides when not contiguous (else None)
    state_ptrs: tuple  # the addresses of square_avg, grad_avg, momentum_buffer (0: not kept) and a 16-bit param
    numel: int  # its (local) number of elements
    tensors: list  # the state tensors (and a master), whose version counters a step bumps
    step: tuple  # `(dtype, address)` of its `step` counter
    held: tuple  # the tensors `holds` checks
    stepped: int  # the address the kernel steps: the param's, or its float32 master's
    spans: tuple  # the bytes each column of its pointer row covers (`check_overlaps`)


def layout(p, names, address, name, state, slot, stochastic=False, form=ELEMENTWISE):
    """The cached layout of `p` (see `_plan`), made anew: its state created as
    torch creates it (a buffer the options need and the state lacks, after momentum or
    centering is switched on mid-run, starts at zero) and checked to be laid out like
    `p`. The entry holds the state tensors, so they live as long as it is used. `slot`:
    `(bucket, index)` for a param that lives in a bucket (`flatten=True`), else None.

    A 16-bit param (`LOW`) keeps its state in float32 and a float32 master copy of itself
    (`state[MASTER]`, made from the param when missing); the kernel steps the master and
    writes the param back, rounded to nearest even: the entry's pointers are then
    `(master, state..., param)`. With `stochastic` a bfloat16 param keeps no master: the
    kernel steps it in place (float32 state, stochastic rounding). `form` says how the state
    is kept (`Form`: the params' dtype, bfloat16, 8-bit blocks, rowwise)."""
    shard = local(p, name)  # a DTensor's local shard; else p
    if p.is_inference():
        raise RuntimeError(
            f"{name}: Inplace update to inference tensor outside InferenceMode is not allowed (the param was "
            "made under torch.inference_mode(); torch refuses to step it too)"
        )
    kept = torch.float32 if p.dtype in LOW else p.dtype
    low = p.dtype in LOW and not stochastic  # stepped over a master copy
    if not state:
        state["step"] = torch.zeros((), dtype=_get_scalar_dtype()) if slot is None else slot[0].steps[slot[1]]
    if low and MASTER not in state:  # the master starts as the param
        if slot is None:
            state[MASTER] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        else:
            state[MASTER] = slot[0].state_view(MASTER, slot[1])
            state[MASTER].copy_(p.detach())
    tensors, shards = [], []  # the state tensors, and the memory the kernel steps of each
    for state_name in (*names, MASTER) if low else names:
        if state_name not in state:
            if slot is None:
                state[state_name] = form.fresh(state_name, p, kept)
            else:
                state[state_name] = slot[0].state_view(state_name, slot[1])
        t = state[state_name]
        dtype, shape = form.of(state_name, p, kept)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape or not t.is_cpu:
            if (dtype, shape) == (p.dtype, tuple(p.shape)):
                like = "a CPU tensor like the param"
            elif shape == tuple(p.shape):
                like = f"a {str(dtype).replace('torch.', '')} CPU tensor of the param's shape"
            else:
                like = f"a {str(dtype).replace('torch.', '')} CPU tensor of shape {shape}"
            raise ValueError(f"{name}: its state {state_name!r} is not {like}")
        if not form.param_shaped(state_name):  # 8-bit blocks or one value a row: a plain 1-D tensor
            if type(t) not in PLAIN or not t.is_contiguous():
                raise ValueError(f"{name}: its state {state_name!r} is not a contiguous plain tensor")
            tensors.append(t)
            shards.append(t)
            continue
        placed = shard is p or (type(t) is type(p) and t.placements == p.placements and t.device_mesh == p.device_mesh)
        if not placed:
            raise ValueError(f"{name}: its state {state_name!r} is not a DTensor placed like the param "
                             f"({tuple(p.placements)} on {p.device_mesh})")  # fmt: skip
        held_shard = local(t, f"{name}: its state {state_name!r}")
        if held_shard.shape != shard.shape or (held_shard.stride() != shard.stride() and shard.numel() > 1):
            raise ValueError(f"{name}: its state {state_name!r} is not laid out like the param")
        tensors.append(t)
        shards.append(held_shard)
    ptrs, spans = [0, 0, 0], [0] * 6
    for state_name, t in zip(names, shards):
        ptrs[STATE_NAMES.index(state_name)] = t.data_ptr()
        spans[2 + STATE_NAMES.index(state_name)] = t.numel() * t.element_size()
    numel = shard.numel()
    spans[0] = spans[1] = numel * shard.element_size()  # the param (stepped in place), its grad
    if low:
        ptrs.append(address)  # the 16-bit param: the copy the kernel writes
        spans[0], spans[5] = numel * 4, numel * shard.element_size()  # its master stepped, itself written
    step = state["step"]
    if not torch.is_tensor(step):
        step = state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())  # as torch's __setstate__
    if not step.is_cpu or step.dtype not in STEP_DTYPES or step.numel() != 1:
        raise ValueError(
            f"{name}: its state 'step' is a {step.dtype} tensor of shape {tuple(step.shape)} on {step.device}; "
            "fastrms counts steps in a CPU float32 or float64 tensor of one element"
        )
    keys = (*names, "step", MASTER) if low else (*names, "step")
    held = (*tensors[: len(names)], step, tensors[-1]) if low else (*tensors, step)
    return Entry(
        param=p,
        address=address,
        shape=shard.shape,
        names=names,
        state=state,
        keys=keys,
        holds=holds(keys, held),
        strides=None if shard.is_contiguous() else shard.stride(),
        state_ptrs=tuple(ptrs),
        numel=shard.numel(),
        tensors=tensors,
        step=(step.dtype, step.data_ptr()),
        held=held,
        stepped=shards[-1].data_ptr() if low else address,
        spans=tuple(spans),
    )
