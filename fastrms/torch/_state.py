"""`fastrms.torch.RMSprop`'s state across pickling and state dicts (a private module of
`fastrms.torch`; it imports torch): which params live in flat buckets (`flatten=True`),
the defaults an older torch state dict lacks, and the checks a loaded state dict passes
before torch's own `load_state_dict` copies it in."""

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from ..kernels import storage
from ._buckets import STATE_NAMES, Bucket
from ._tensors import ELEMENTWISE

#: The state a 16-bit param keeps in float32 (its master copy and RMSprop's buffers).
_FLOAT32_STATE = (*STATE_NAMES, "master_param")
_LOW = (torch.bfloat16, torch.float16)

#: torch.optim.RMSprop's `__setstate__` defaults: what an older state dict's groups lack.
GROUP_DEFAULTS = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False, capturable=False)


class Layout:
    """Which params live in flat buckets (`flatten=True`), and how the groups `param_groups`
    holds now are stepped: per group, its buckets by dtype whose params all sit in it
    (`buckets`, one dense call each), the `(index, param)` of the others (`loose`, stepped per
    tensor; a bucketed param whose bucket is split across groups or partly gone is stepped
    through its views) and whether a param is listed twice (`repeats`). `flat_slot`: param ->
    `(bucket, index)` for every param ever bucketed. `sync` reads `param_groups` again when
    their fingerprint (the params' ids, group by group) changed: torch.optim reads them at
    every step, and so do ZeRO's and torch's utilities that edit them."""

    __slots__ = ("buckets", "loose", "repeats", "flat_slot", "seen", "every")

    def __init__(self):
        self.buckets, self.loose, self.repeats, self.flat_slot = [], [], [], {}
        self.every = []  # every bucket made, in order
        self.seen = None  # the fingerprint of the groups the fields above describe

    def register(self, buckets, state=None):
        """Take `buckets` (an iterable of `Bucket`); `state` (torch's per-param state) is
        adopted into them when given."""
        for bucket in buckets:
            self.every.append(bucket)
            for i, p in enumerate(bucket.params):
                self.flat_slot[p] = (bucket, i)
                if state is not None and state.get(p):
                    bucket.adopt(i, state[p])
        self.seen = None

    def sync(self, param_groups, check):
        """Lay out the groups `param_groups` holds now, if they changed since the last call;
        `check(gi, params)` (or None) checks each group's params then, raising before
        anything is written."""
        mark = fingerprint(param_groups)
        if mark == self.seen:
            return
        if check is not None:
            for gi, group in enumerate(param_groups):
                check(gi, group["params"])
        self.buckets, self.loose, self.repeats = [], [], []
        for group in param_groups:
            params = group["params"]
            members = {id(p) for p in params}
            whole = {}
            for p in params:
                slot = self.flat_slot.get(p)
                if slot is not None and slot[0].dtype not in whole:
                    bucket = slot[0]
                    if all(id(q) in members for q in bucket.params):
                        whole[bucket.dtype] = bucket
            inside = {id(p) for bucket in whole.values() for p in bucket.params}
            self.buckets.append(whole)
            self.loose.append([(j, p) for j, p in enumerate(params) if id(p) not in inside])
            self.repeats.append(len(members) != len(params))
        self.seen = mark

    def pickled(self):
        """What a pickle keeps of the buckets: each group's lists of bucketed params."""
        return [[bucket.params for bucket in buckets.values()] for buckets in self.buckets]

    @classmethod
    def unpickled(cls, param_groups, bucketed, state, stochastic=None):
        """The layout `pickled` described, its buckets built anew over `state`."""
        layout = cls()
        for gi, (group, lists) in enumerate(zip(param_groups, bucketed)):
            place = {p: (gi << 24) + j for j, p in enumerate(group["params"])}
            layout.register([Bucket(params, stochastic, [place[p] for p in params]) for params in lists], state)
        layout.sync(param_groups, None)
        return layout


def fingerprint(param_groups):
    """What decides a layout: the params of each group, by identity (a layout holds them, so
    an id is not reused while it is kept). A group whose `params` is not a list or tuple is
    refused, as it could not be read twice."""
    mark = []
    for gi, group in enumerate(param_groups):
        params = group["params"] if isinstance(group, dict) and "params" in group else None
        if not isinstance(params, (list, tuple)):
            raise TypeError(f"param_groups[{gi}]['params'] must be a list of tensors, got {type(params).__name__}")
        mark.append(tuple(map(id, params)))
    return tuple(mark)


def upgrade(param_groups, state):
    """What torch.optim.RMSprop's `__setstate__` does to an older pickle: its groups get the
    defaults they lack, and a `step` stored as a number becomes a tensor."""
    for group in param_groups:
        for name, value in GROUP_DEFAULTS.items():
            group.setdefault(name, value)
        for p in group["params"]:
            p_state = state.get(p)
            if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_get_scalar_dtype())


def copied(state_dict, param_groups, form):
    """The `state` of `state_dict` checked against this optimizer's `param_groups` (every
    state tensor as `form` keeps it: `fastrms.torch._tensors.Form`, a float one of the
    param's shape where that is bfloat16, `step` one number) and copied, so the given dict
    is never written to; ValueError before anything is loaded."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    saved = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not isinstance(saved, dict):
        raise ValueError("a state dict has 'state' (a dict) and 'param_groups' (a list)")
    ids = [i for g in groups for i in g.get("params", ())]
    params = [p for g in param_groups for p in g["params"]]
    by_id = dict(zip(ids, params)) if len(ids) == len(params) else {}
    out = {}
    for key, value in saved.items():
        p = by_id.get(key)
        if not isinstance(value, dict):
            raise ValueError(f"state[{key!r}] must be a dict, got {type(value).__name__}")
        for name, t in value.items():
            if not torch.is_tensor(t):
                continue
            if name in _FLOAT32_STATE and p is not None:
                _check_form(f"state[{key!r}][{name!r}]", name, t, p, form)
            if name == "step" and t.numel() != 1:
                raise ValueError(f"state[{key!r}]['step'] must hold one number, got shape {tuple(t.shape)}")
        out[key] = {n: t.clone() if torch.is_tensor(t) else t for n, t in value.items()}
    return out


def _check_form(where, name, t, p, form):
    """A saved state tensor `t` is one `form` keeps for `p` (a float tensor of `p`'s shape
    stands for a param-shaped one in any float dtype: it is cast when loaded)."""
    dtype, shape = form.of(name, p, torch.float32 if p.dtype in _LOW else p.dtype)
    if form.param_shaped(name):
        if t.shape != p.shape:
            raise ValueError(
                f"{where} has shape {tuple(t.shape)}, its param {tuple(p.shape)}: this state dict is not this model's"
            )
        return
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(
            f"{where} is {t.dtype} of shape {tuple(t.shape)}; this optimizer keeps it as {dtype} of shape {shape} "
            f"({'8-bit blocks' if form.codec.block else 'one value a row'}): load a state dict saved with the same "
            "state_storage and state_layout"
        )
    if form.codec.block:  # a scale is a block's largest finite magnitude: finite, >= 0
        scales = storage.block_parts(t.detach().numpy(), p.numel())[1]
        if not (np.isfinite(scales) & (scales >= 0)).all():
            raise ValueError(f"{where} holds a negative or non-finite block scale (a block's scale is >= 0)")


def kept_forms(copied, state_dict, param_groups, state, form):
    """After torch's `load_state_dict`, which casts every state tensor to its param's dtype:
    give each param its state back as `form` keeps it, from `copied` (the checked copies of
    `state_dict`'s): a 16-bit param's float32 state and master, bfloat16 state, 8-bit
    blocks (cast exactly when they were saved so; rounded to nearest even into bfloat16)."""
    ids = [i for g in state_dict["param_groups"] for i in g.get("params", ())]
    params = [p for g in param_groups for p in g["params"]]
    for key, p in zip(ids, params):
        if key not in copied or (form == ELEMENTWISE and p.dtype not in _LOW):
            continue
        kept = torch.float32 if p.dtype in _LOW else p.dtype
        for name in _FLOAT32_STATE:
            t = copied[key].get(name)
            if torch.is_tensor(t):
                state[p][name] = t.to(form.of(name, p, kept)[0])
