"""The guard of a `fastrms.torch.RMSprop` step (a private module of `fastrms.torch`; it
imports torch): `clip_global_norm` and `skip_nonfinite` decided once, over the grads the step
is about to read, before anything is written (`fastrms.core.guard.guard`, the formula):

    norm = sqrt(sum over the grads g of ||g||^2)        ||g|| in g's dtype (float32 for 16 bits)
    coef = min(1, max_norm / (norm + 1e-6))              folded into the kernel's grad scale

A DTensor's grad counts its local shard; the shards of one mesh are summed over the mesh
(one all-reduce of the sum of squares and the count of non-finite grads per mesh dimension,
a shard replicated along a dimension counted once), so every rank takes the same decision.
Every rank of a mesh must step (the all-reduce is collective), as with
`torch.nn.utils.clip_grad_norm_` over DTensors."""

import math

import torch

from ..core import guard
from ._tensors import PLAIN


def verdict(options, grads, owners):
    """The step's `fastrms.core.guard.Verdict` under `options` (`clip_global_norm`,
    `skip_nonfinite`) for `grads` (the tensors the kernels read: local shards for DTensor
    params) of the params `owners`."""
    plain, meshes = [], {}
    for g, p in zip(grads, owners):
        if type(p) in PLAIN:
            plain.append(g)
            continue
        mesh, placements = p.device_mesh, p.placements
        if any(placement.is_partial() for placement in placements):
            raise ValueError(
                f"a DTensor grad placed {tuple(placements)}: its shard holds partial sums, so its norm is not "
                "known before a reduction (clip_global_norm and skip_nonfinite need Shard or Replicate placements)"
            )
        counted = all(mesh.get_local_rank(d) == 0 for d, pl in enumerate(placements) if pl.is_replicate())
        meshes.setdefault(mesh, []).append(g if counted else None)
    total, bad = local_sums(plain)
    for mesh, shards in meshes.items():
        sumsq, nonfinite = local_sums([g for g in shards if g is not None])
        both = torch.tensor([sumsq, float(nonfinite)], dtype=torch.float64)
        for d in range(mesh.ndim):  # over every rank of the mesh: its dimensions one after another
            torch.distributed.all_reduce(both, group=mesh.get_group(d))
        total += float(both[0])
        bad = bad or float(both[1]) > 0
    arrays = lambda: [(g.float() if g.dtype in (torch.bfloat16, torch.float16) else g).numpy() for g in grads]  # noqa: E731
    return guard.guard(lambda: total, lambda: bad, arrays, options)


def local_sums(grads):
    """`(sum of squares, any non-finite)` over `grads` on this rank: the norms per dtype in one
    `torch._foreach_norm` call each, squared and summed in float64; the non-finite check reads
    the grads again only when that sum is not finite."""
    total, bad = 0.0, False
    by_dtype = {}
    for g in grads:
        if g.numel():
            by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, group in by_dtype.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        sumsq = float(torch.stack(norms).double().square().sum())
        if not math.isfinite(sumsq):
            bad = bad or any(not bool(torch.isfinite(g).all()) for g in group)
        total += sumsq
    return total, bad


__all__ = ["local_sums", "verdict"]
