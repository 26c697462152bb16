"""The per-tensor step of `fastrms.torch.RMSprop` at a flat array's cost (a private module of
`fastrms.torch`; it imports torch): a group stepped as it was at its last step keeps its
pointer tables, and each step looks at its params and grads one property at a time, each
look one C-level pass over the group (`map` over the tensors), instead of one Python
iteration per tensor.

What a kept table stands for, and is checked again at every step: the same params (the
layout's fingerprint), at the same addresses with the same sizes, contiguous; the same
state dicts holding the same state tensors; options keeping the same state (a learning rate
that a scheduler changes every step keeps the tables); every param with a dense,
contiguous CPU grad of its dtype and size that overlaps no param or state. Anything else
(a param without a grad, a new state tensor, a sparse or strided grad) takes the checked
path (`fastrms.torch._steps.Steps.checked_plan`), which explains a refusal."""

import operator
from itertools import repeat

import numpy as np
import torch

from ..core import spec
from ._tensors import NUMPY, PLAIN

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_CONTIGUOUS = torch.Tensor.is_contiguous
_ELEMENT_SIZE = torch.Tensor.element_size
_IS = operator.is_


class Kept:
    """One group's kept pointer tables (see the module): `reuse` gives the step's calls, or
    None when the group is no longer what they stand for."""

    __slots__ = ("mark", "state_of", "hyper", "names", "dtypes", "pptrs", "numels", "gdtypes", "gbytes", "keys",
                 "dicts", "held", "calls", "starts", "ends")  # fmt: skip

    @classmethod
    def of(cls, planned, params, state_of, held, steps):
        """The kept tables of a group `Steps.checked_plan` just planned (`planned`), or None
        when the group is not one the fast path serves: every param plain, contiguous and
        with a dense grad, listed once, no flat buckets, sparse grads, dense rows or
        stochastic rounding."""
        hyper, rounds, flat, sparse, lagging = planned
        if flat or sparse or lagging or len(rounds) != 1 or steps.dense_rows or steps.stochastic is not None:
            return None
        calls = rounds[0]
        if any(call.tables is not None for call in calls.values()):  # rowwise: the tables hold the grads
            return None
        if sum(len(call.owners) for call in calls.values()) != len(params) or not params:
            return None
        if not set(map(type, params)) <= PLAIN or not all(map(_CONTIGUOUS, params)):
            return None
        grads = list(map(_GRAD, params))
        if not all(map(_CONTIGUOUS, grads)):
            return None
        kept = cls()
        kept.mark, kept.state_of, kept.hyper, kept.names = held.seen, state_of, hyper, spec.of(hyper).names
        kept.dtypes = tuple(dict.fromkeys(NUMPY[p.dtype] for p in params))
        kept.pptrs, kept.numels = list(map(_DATA_PTR, params)), list(map(_NUMEL, params))
        kept.gdtypes = list(map(_DTYPE, params))
        kept.gbytes = np.array(kept.numels, dtype=np.int64) * np.array(list(map(_ELEMENT_SIZE, params)), np.int64)
        kept.keys, kept.dicts = list(state_of.keys()), list(state_of.values())
        kept.held = {}
        for d, p in zip(map(state_of.get, params), params):
            entry = steps.layouts[id(p)]
            for key, t in zip(entry.keys, entry.held):
                dicts, tensors = kept.held.setdefault(key, ([], []))
                dicts.append(d)
                tensors.append(t)
        kept.calls = []
        spans = []
        for dtype, call in calls.items():
            idx = None if len(calls) == 1 else np.array([i for i, p in enumerate(params) if p.dtype is dtype])
            kept.calls.append((dtype, idx, call))
            for c in range(min(call.ptrs.shape[1], call.spans.shape[1])):
                used = (call.ptrs[:, c] != 0) & (call.spans[:, c] > 0)
                if c != 1 and used.any():
                    spans.append((call.ptrs[used, c], call.ptrs[used, c] + call.spans[used, c]))
        starts = np.concatenate([s for s, _ in spans]) if spans else np.empty(0, np.int64)
        ends = np.concatenate([e for _, e in spans]) if spans else np.empty(0, np.int64)
        order = np.argsort(starts, kind="stable")
        kept.starts, kept.ends = starts[order], ends[order]
        return kept

    def reuse(self, params, state_of):
        """`{dtype: Call}` for this step, the tables' grad column set to the grads now, or None."""
        try:
            return self._reuse(params, state_of)
        except RuntimeError:  # a grad with no strided memory (sparse CSR, mkldnn): the checked path says so
            return None

    def _reuse(self, params, state_of):
        grads = list(map(_GRAD, params))
        if not (
            set(map(type, grads)) <= PLAIN  # no None, no subclass
            and all(map(_IS_CPU, grads))
            and all(map(_CONTIGUOUS, grads))  # False for a sparse COO grad
            and list(map(_DTYPE, grads)) == self.gdtypes
            and list(map(_NUMEL, grads)) == self.numels
            and list(map(_DATA_PTR, params)) == self.pptrs
            and list(map(_NUMEL, params)) == self.numels
            and all(map(_CONTIGUOUS, params))
            and len(state_of) == len(self.dicts)  # param -> state dict, by identity, without hashing tensors
            and all(map(_IS, state_of.keys(), self.keys))
            and all(map(_IS, state_of.values(), self.dicts))
            and all(all(map(_IS, map(dict.get, ds, repeat(key)), ts)) for key, (ds, ts) in self.held.items())
        ):  # fmt: skip
            return None
        gptrs = np.fromiter(map(_DATA_PTR, grads), dtype=np.int64, count=len(grads))
        # a grad must not overlap a param or state written in the call (the spans are disjoint, sorted)
        if self.starts.size:
            last = np.searchsorted(self.starts, gptrs + self.gbytes, side="left") - 1
            if np.any((last >= 0) & (self.ends[np.maximum(last, 0)] > gptrs) & (self.gbytes > 0)):
                return None
        out = {}
        for dtype, idx, call in self.calls:
            call.ptrs[:, 1] = gptrs if idx is None else gptrs[idx]
            out[dtype] = call._replace(grads=grads if idx is None else [grads[i] for i in idx])
        return out
