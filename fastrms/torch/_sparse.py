"""`fastrms.torch.RMSprop`'s sparse grads: the row-sparse COO grads of
`nn.Embedding(sparse=True)` (and `nn.EmbeddingBag`) stepped through the row kernel
(`fastrms.core.rows`), which `torch.optim.RMSprop` refuses.

A param `(n, width)` whose grad is a sparse COO tensor with one sparse and one dense
dimension (indices `(1, nnz)`, values `(nnz, width)`, coalesced or not) is stepped on the
rows it names: each named row gets torch's dense RMSprop update with the sum of its grad rows
(duplicates added in the order given), every other row stays bitwise unchanged. The param's
`step` counts one step per call. The optimizer's `dense_rows` (fastrms's own, default
False) chooses what an untouched row does:

- lazy (False): its state does not decay (as TensorFlow's sparse ops and torch's
  `SparseAdam` do), so a run differs from a dense one;
- dense-equivalent (True): the state keeps `row_step` (the step that last touched each
  row), and a row touched again after `k` untouched steps first gets the closed form of those
  `k` zero-gradient steps, so the run equals a dense `torch.optim.RMSprop` run up to
  rounding. Coupled `weight_decay` has no closed form and is refused; with momentum the
  closed form uses the current `lr` (exact while it is constant).
"""

import numpy as np
import torch

from ..core import rows as rows_step
from ..core import runtime, spec
from ..core.memory import span
from ..core.options import scalars

#: The state key of the per-row step counters (`dense_rows=True`).
ROW_STEP = "row_step"


def _numpy(t):
    return t.detach().numpy().reshape(-1)


def check(p, g, name):
    """Refuse a sparse grad the row kernel cannot take, naming why."""
    if g.layout != torch.sparse_coo:
        raise ValueError(f"{name} has a {g.layout} grad; fastrms steps dense grads and sparse COO grads of rows")
    if p.dim() != 2 or g.sparse_dim() != 1 or g.dense_dim() != 1:
        raise ValueError(
            f"{name} has a sparse grad with {g.sparse_dim()} sparse and {g.dense_dim()} dense dimensions for a "
            f"param of shape {tuple(p.shape)}; fastrms steps sparse grads of rows of a 2-D param (one sparse "
            "dimension and one dense, as nn.Embedding(sparse=True) gives)"
        )
    if g.shape != p.shape or g.dtype != p.dtype:
        raise ValueError(f"{name}: its sparse grad is {g.dtype} {tuple(g.shape)}, the param {p.dtype} {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError(f"{name}: a param with a sparse grad must be contiguous (its rows are stepped in place)")


def counters(state, n, name):
    """The param's `row_step` counters (checked), or None when its state has none."""
    found = state.get(ROW_STEP)
    if found is not None and not (torch.is_tensor(found) and found.dtype == torch.int64 and found.shape == (n,)):
        raise ValueError(f"{name}: its state {ROW_STEP!r} must be an int64 tensor of shape ({n},)")
    return found


def table(p, g, tensors, names, state, dense_rows, parallel, name):
    """The `fastrms.core.rows.Table` of one param: its state `tensors` (in `names` order, as
    `fastrms.torch.RMSprop._layout` made them) and the grad's rows, checked; `row_step`
    created (every row up to date at the param's current step) or checked when
    `dense_rows`. Nothing is written."""
    n, width = p.shape
    param = _numpy(p)
    rows = rows_step.indices(g._indices()[0].numpy(), f"{name}: its sparse grad's indices")
    grads = rows_step.grad_rows(g._values().contiguous().numpy(), rows.size, width, param.dtype, name)
    state_arrays = dict(zip(names, (_numpy(t) for t in tensors)))
    start, end = span(grads)
    for a in (param, *state_arrays.values()):
        a_start, a_end = span(a)
        if grads.size and a.size and a_start < end and start < a_end:
            raise ValueError(f"{name}: its sparse grad's values share memory with the param or its state")
    last, row_step = np.zeros(0, np.int64), None
    if dense_rows:
        row_step = counters(state, n, name)
        if row_step is None:
            row_step = torch.full((n,), int(float(state["step"])), dtype=torch.int64)
        last = row_step.numpy()
    empty = param[:0]
    table = rows_step.Table(
        param, state_arrays.get("square_avg", empty), state_arrays.get("grad_avg", empty),
        state_arrays.get("momentum_buffer", empty), n, width, rows, grads, last, f"{name}: its sparse grad's rows",
        parallel,
    )  # fmt: skip
    rows_step.check_bounds(table)  # before any param's step: a step that fails changes nothing
    return table, row_step


def catch_up(p, tensors, names, counters, key, t, hyper, lr):
    """`dense_rows`, before a dense grad steps a param that was stepped by rows: bring every
    lagging row up to date (the closed form of its zero-gradient steps), then mark every row
    stepped at `t`."""
    state_arrays = dict(zip(names, (_numpy(t) for t in tensors)))
    param, last = _numpy(p), counters.numpy()
    empty = param[:0]
    rows_step.catch_up(
        param, state_arrays.get("square_avg", empty), state_arrays.get("grad_avg", empty),
        state_arrays.get("momentum_buffer", empty), p.shape[1], last, t, hyper, key, scalars(hyper, lr, t),
    )  # fmt: skip
    last[...] = t


def lagging(p, cached, names, hyper, name):
    """`dense_rows`: the arguments of `catch_up` before a dense grad steps `p`, a param
    stepped by rows (`cached` its layout, `fastrms.torch._tensors.layout`)."""
    state = cached.state
    found = counters(state, p.shape[0], name)
    return p, cached.tensors, names, found, spec.of(hyper).variant, int(float(state["step"])) + 1


def step(hyper, p, table, row_step, entry, bumped):
    """One row step of `p` (its sparse grad's `table`), at its own step count as torch
    counts; `row_step` (dense_rows) goes into its state, and `p` and its state tensors onto
    `bumped` (their version counters are bumped after the step)."""
    state, key, lr = entry.state, spec.of(hyper).variant, hyper["learning_rate"]
    if row_step is not None:
        state[ROW_STEP] = row_step
    count = state["step"]
    t = int(float(count)) + 1
    rows_step.step([table], t, hyper, key,
                   lambda make, parallel: runtime.locked(make(key, bool(parallel)), parallel),
                   lambda verdict, run: run(scalars(hyper, lr, t)))  # torch's count; no guard here  # fmt: skip
    count.add_(1)
    bumped.append(p)
    bumped.extend(entry.tensors)
