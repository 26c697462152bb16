"""`param_groups` is read at every step (`fastrms.torch._state.Layout.sync`): the edits
training stacks make to an optimizer's groups, each against torch.optim.RMSprop doing the
same, per tensor and with flatten=True."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms.torch import RMSprop  # noqa: E402

MODES = [{}, {"flatten": True}]
IDS = ["per-tensor", "flatten"]


def _params(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5 + i, generator=g)) for i in range(n)]


def _pair(mode, groups):
    """The same params twice, and an optimizer for each: fastrms's and torch's."""
    ours, theirs = _params(), _params()

    def make(ps, cls, kw):
        return cls([{"params": [ps[i] for i in idx], **opts} for idx, opts in groups], lr=0.01, **kw)

    return ours, theirs, make(ours, RMSprop, mode), make(theirs, torch.optim.RMSprop, {})


def _grads(ours, theirs, seed):
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(ours, theirs):
        grad = torch.randn(p.shape, generator=g)
        for t in (p, q):  # in place where a grad is kept, as backward accumulates into it (flatten's views)
            if t.grad is None:
                t.grad = grad.clone()
            else:
                t.grad.copy_(grad)


def _same(ours, theirs):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_zero_1_2_steps_one_group_at_a_time_with_that_groups_options(mode):
    # DeepSpeed ZeRO-1/2 with a client optimizer: `optimizer.param_groups = [group]; step()`
    groups = [([0, 1], {}), ([2, 3], {"lr": 0.05, "momentum": 0.9})]
    ours, theirs, a, b = _pair(mode, groups)
    for opt in (a, b):
        opt.all_groups = opt.param_groups
    for s in range(4):
        _grads(ours, theirs, s)
        for opt in (a, b):
            for group in opt.all_groups[::-1] if s % 2 else opt.all_groups:
                opt.param_groups = [group]
                opt.step()
            opt.param_groups = opt.all_groups
        _same(ours, theirs)
    _grads(ours, theirs, 9)
    a.param_groups, b.param_groups = [a.all_groups[1]], [b.all_groups[1]]
    before = [p.detach().clone() for p in ours[:2]]
    a.step(), b.step()
    _same(ours, theirs)
    assert all(torch.equal(p, q) for p, q in zip(ours[:2], before)), "a group outside param_groups moved"


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_zero_3_hands_a_new_partition_to_the_group_before_each_step(mode):
    ours, theirs, a, b = _pair(mode, [([0], {})])
    parts_ours, parts_theirs = ours[1:], theirs[1:]
    for s in range(6):
        _grads(ours, theirs, s)
        a.param_groups[0]["params"] = [parts_ours[s % 3]]
        b.param_groups[0]["params"] = [parts_theirs[s % 3]]
        a.step(), b.step()
        _same(ours, theirs)
    assert all(not torch.equal(p, q) for p, q in zip(parts_ours, _params()[1:])), "a partition never stepped"


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("edit", ["append", "replace", "pop", "remove"])
def test_edits_of_the_groups_between_steps_are_what_the_next_step_steps(mode, edit):
    ours, theirs, a, b = _pair(mode, [([0, 1], {}), ([2], {"lr": 0.1})])
    for s in range(5):
        _grads(ours, theirs, s)
        if s == 2:
            for opt, ps in ((a, ours), (b, theirs)):
                if edit == "append":
                    opt.param_groups[0]["params"].append(ps[3])
                elif edit == "replace":
                    opt.param_groups[0]["params"][1] = ps[3]
                elif edit == "pop":
                    opt.param_groups.pop(0)
                else:
                    opt.param_groups[0]["params"].remove(ps[0])
        a.step(), b.step()
        _same(ours, theirs)


def test_swap_in_optimizer_params_and_state_steps_the_swapped_in_tensors():
    from torch.optim._stateless import swap_in_optimizer_params_and_state

    ours, theirs, a, b = _pair({}, [([0, 1, 2, 3], {})])
    _grads(ours, theirs, 0)
    a.step(), b.step()
    outside_ours, outside_theirs = _params(seed=5), _params(seed=5)
    _grads(outside_ours, outside_theirs, 1)
    for opt, ps, live in ((a, outside_ours, ours), (b, outside_theirs, theirs)):
        state = opt.state_dict()
        state = {**state, "state": {k: {n: t.clone() for n, t in v.items()} for k, v in state["state"].items()}}
        before = [p.detach().clone() for p in live]
        with swap_in_optimizer_params_and_state(opt, {str(i): p for i, p in enumerate(ps)}, state):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(live, before)), "a live param moved"
        opt.swapped = state
    _same(outside_ours, outside_theirs)
    for k in a.swapped["state"]:
        for name in ("square_avg", "step"):
            torch.testing.assert_close(a.swapped["state"][k][name], b.swapped["state"][k][name])


def test_a_group_edited_into_something_unsteppable_is_refused_before_anything_is_written():
    ours, theirs, a, b = _pair({}, [([0, 1], {})])
    _grads(ours, theirs, 0)
    before = [p.detach().clone() for p in ours]
    a.param_groups[0]["params"].append(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[2\] has dtype torch.int64"):
        a.step()
    a.param_groups[0]["params"][2] = ours[0][1:]  # a view of param 0: shares its memory
    with pytest.raises(ValueError, match=r"param_groups\[0\]: params 0 and 2 share memory"):
        a.step()
    a.param_groups[0]["params"] = (p for p in ours)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] must be a list of tensors, got generator"):
        a.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, before))


class _OffloadLike:
    """torchao's `CPUOffloadOptimizer(params, optimizer_class=...)` call sequence, on CPU
    tensors (the real one asserts a CUDA or XPU device): one optimizer per param over a host
    copy whose preallocated grad a post-accumulate-grad hook overwrites in place, stepped in
    the order backward reached the params, each param copied back after its step; its
    `param_groups` are every inner optimizer's, for LR schedulers."""

    def __init__(self, params, optimizer_class, **kwargs):
        self.host, self.optims, self.queue = {}, {}, {}
        for p in params:
            host = torch.empty_like(p)
            host.grad = torch.empty_like(host)
            host.copy_(p.detach())
            self.host[p] = host
            p.register_post_accumulate_grad_hook(self._arrived)
            self.optims[p] = optimizer_class([{"params": host}], **kwargs)

    def _arrived(self, p):
        self.host[p].grad.copy_(p.grad)
        self.queue.pop(p, None)
        self.queue[p] = True

    @torch.no_grad()
    def step(self):
        for p in self.queue:
            self.optims[p].step()
            p.copy_(self.host[p])
        self.queue.clear()

    def zero_grad(self):
        for p in self.host:
            p.grad = None

    @property
    def param_groups(self):
        return sum((o.param_groups for o in self.optims.values()), start=[])


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_torchao_cpu_offload_call_sequence_matches_torch_optim(mode):
    models = []
    for cls, kw in ((RMSprop, mode), (torch.optim.RMSprop, {})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
        start = [p.detach().clone() for p in model.parameters()]
        opt = _OffloadLike(list(model.parameters()), cls, lr=1e-2, momentum=0.9, **kw)
        g = torch.Generator().manual_seed(1)
        for s in range(6):
            opt.zero_grad()
            model(torch.randn(5, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
            if s == 3:
                for group in opt.param_groups:  # an LR scheduler's edit
                    group["lr"] *= 0.5
            opt.step()
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(not torch.equal(p, q) for p, q in zip(models[0].parameters(), start))  # every param was stepped
