"""The kept pointer tables of the per-tensor step (`fastrms.torch._fast.Kept`): after a few
steps on the kept path, every change a training loop or a tool makes between steps is
noticed, each against torch.optim.RMSprop making the same change."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms.torch import RMSprop  # noqa: E402


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7 + i, generator=g, dtype=torch.float64)) for i in range(4)]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(change, steps=6):
    """Both optimizers stepped `steps` times, `change(params, opt)` applied before step 3."""
    out = []
    for cls in (RMSprop, torch.optim.RMSprop):
        params = _params()
        opt = cls(params, lr=0.01, momentum=0.9)
        for s in range(steps):
            _grads(params, s)
            if s == 3:
                change(params, opt)
            opt.step()
        out.append((params, opt))
    (ours, mine), (theirs, _) = out
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    return ours, mine


def test_the_kept_path_is_taken_and_steps_as_torch():
    params, opt = _run(lambda params, opt: None)
    assert opt._steps.kept[0] is not None  # the group's tables were kept


def _replace_state(params, opt):  # an offloading tool: state[key] = value.to(...)
    for p in params:
        opt.state[p]["square_avg"] = opt.state[p]["square_avg"].clone()
        opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"] * 1.0


def _swap_state_dicts(params, opt):
    opt.state[params[1]] = dict(opt.state[params[1]])


def _replace_data(params, opt):
    params[2].data = params[2].data.clone() + 1


def _drop_a_grad(params, opt):
    params[0].grad = None


def _load(params, opt):
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "change", [_replace_state, _swap_state_dicts, _replace_data, _drop_a_grad, _load], ids=lambda f: f.__name__[1:]
)
def test_a_change_between_steps_is_noticed(change):
    _run(change)


def test_a_grad_that_aliases_a_param_or_is_not_dense_is_refused_on_the_kept_path_too():
    params = _params()
    opt = RMSprop(params, lr=0.01)
    for s in range(3):
        _grads(params, s)
        opt.step()
    before = [p.detach().clone() for p in params]
    params[1].grad = params[2].detach()[:8]  # the grad of one param is another param's memory
    with pytest.raises(ValueError, match="shares memory with another param, grad or state"):
        opt.step()
    params[1].grad = torch.ones(16, dtype=torch.float64)[::2]  # strided
    with pytest.raises(ValueError, match="laid out alike"):
        opt.step()
    params[1].grad = torch.ones(8, dtype=torch.float64).to_sparse()
    with pytest.raises(ValueError, match="sparse grad"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_a_scheduler_changing_lr_every_step_keeps_the_tables_and_steps_as_torch():
    out = []
    for cls in (RMSprop, torch.optim.RMSprop):
        params = _params()
        opt = cls(params, lr=0.01, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        kept = []
        for s in range(6):
            _grads(params, s)
            opt.step()
            sched.step()
            kept.append(getattr(opt, "_steps", None) and opt._steps.kept[0])
        out.append((params, kept))
    (ours, kept), (theirs, _) = out
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert kept[1] is not None and all(k is kept[1] for k in kept[1:])  # built once, then reused
