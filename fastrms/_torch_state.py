"""`fastrms.torch.RMSprop`'s state across pickling and state dicts (a private module of
`fastrms.torch`; it imports torch): which params live in flat buckets (`flatten=True`),
the defaults an older torch state dict lacks, and the checks a loaded state dict passes
before torch's own `load_state_dict` copies it in."""

import torch
from torch.optim.optimizer import _get_scalar_dtype

from ._torch_buckets import STATE_NAMES, Bucket

#: The state a 16-bit param keeps in float32 (its master copy and RMSprop's buffers).
_FLOAT32_STATE = (*STATE_NAMES, "master_param")
_LOW = (torch.bfloat16, torch.float16)

#: torch.optim.RMSprop's `__setstate__` defaults: what an older state dict's groups lack.
GROUP_DEFAULTS = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False, capturable=False)


class Layout:
    """Per param group: its flat buckets by dtype (`buckets`), the `(index, param)` of the
    params in no bucket (`loose`) and whether a param is listed twice (`repeats`); across
    groups, `flat_slot`: param -> `(bucket, index)` for the params that live in a bucket."""

    __slots__ = ("buckets", "loose", "repeats", "flat_slot")

    def __init__(self):
        self.buckets, self.loose, self.repeats, self.flat_slot = [], [], [], {}

    def add(self, params, buckets, state=None):
        """Register one group: `params` its list, `buckets` its `{dtype: Bucket}`; `state`
        (torch's per-param state) is adopted into the buckets when given."""
        for bucket in buckets.values():
            for i, p in enumerate(bucket.params):
                self.flat_slot[p] = (bucket, i)
                if state is not None and state.get(p):
                    bucket.adopt(i, state[p])
        self.buckets.append(buckets)
        self.loose.append([(j, p) for j, p in enumerate(params) if p not in self.flat_slot])
        self.repeats.append(len(set(params)) != len(params))

    def pickled(self):
        """What a pickle keeps of the buckets: each group's lists of bucketed params."""
        return [[bucket.params for bucket in buckets.values()] for buckets in self.buckets]

    @classmethod
    def unpickled(cls, param_groups, bucketed, state, stochastic=None):
        """The layout `pickled` described, its buckets built anew over `state`."""
        layout = cls()
        for gi, (group, lists) in enumerate(zip(param_groups, bucketed)):
            place = {p: (gi << 24) + j for j, p in enumerate(group["params"])}
            buckets = {params[0].dtype: Bucket(params, stochastic, [place[p] for p in params]) for params in lists}
            layout.add(group["params"], buckets, state)
        return layout


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


def copied(state_dict, param_groups):
    """The `state` of `state_dict` checked against this optimizer's `param_groups` (every
    state tensor with its param's number of elements, `step` one number) and copied, so the
    given dict is never written to; ValueError before anything is loaded."""
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
            if name in _FLOAT32_STATE and p is not None and t.numel() != p.numel():
                raise ValueError(
                    f"state[{key!r}][{name!r}] has shape {tuple(t.shape)}, its param {tuple(p.shape)}: "
                    "this state dict is not this model's"
                )
            if name == "step" and t.numel() != 1:
                raise ValueError(f"state[{key!r}]['step'] must hold one number, got shape {tuple(t.shape)}")
        out[key] = {n: t.clone() if torch.is_tensor(t) else t for n, t in value.items()}
    return out


def float32_state(copied, state_dict, param_groups, state):
    """After torch's `load_state_dict`, which casts every state tensor to its param's dtype:
    give each 16-bit param its float32 state and master back, from `copied` (the checked
    copies of `state_dict`'s, widened exactly when they were saved in 16 bits)."""
    ids = [i for g in state_dict["param_groups"] for i in g.get("params", ())]
    params = [p for g in param_groups for p in g["params"]]
    for key, p in zip(ids, params):
        if p.dtype in _LOW and key in copied:
            for name in _FLOAT32_STATE:
                t = copied[key].get(name)
                if torch.is_tensor(t):
                    state[p][name] = t.to(torch.float32)
