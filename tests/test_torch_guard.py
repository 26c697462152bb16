"""`clip_global_norm` and `skip_nonfinite` in fastrms.torch (`fastrms.torch._guard`): the
clipped run against torch.optim.RMSprop after `torch.nn.utils.clip_grad_norm_`, per tensor and
flattened, 16-bit grads included; a non-finite grad skips the whole step; what is refused.
Over a mesh of 2 ranks: tests/test_torch_dtensor.py."""

import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms.torch import RMSprop  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model(torch.randn(32, 8, generator=g).to(dtype) * 10).pow(2).sum().backward()


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_clip_global_norm_is_clip_grad_norm_then_the_step(flatten):
    # float64: five training steps amplify float32's rounding differences past 1e-6
    ours, theirs = _model().double(), _model().double()
    opt = RMSprop(ours.parameters(), lr=1e-2, momentum=0.9, clip_global_norm=1.0, flatten=flatten)
    ref = torch.optim.RMSprop(theirs.parameters(), lr=1e-2, momentum=0.9)
    for s in range(5):
        opt.zero_grad(), ref.zero_grad()
        _backward(ours, s), _backward(theirs, s)
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        grads = [p.grad.clone() for p in ours.parameters()]
        opt.step(), ref.step()
        assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-12) and float(norm) > 1.0  # it clipped
        assert all(torch.equal(p.grad, g) for p, g in zip(ours.parameters(), grads))  # grads are read, not written
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_the_norm_of_16_bit_grads_is_their_values_norm():
    model = _model().to(torch.bfloat16)
    opt = RMSprop(model.parameters(), lr=1e-2, clip_global_norm=1e9)
    _backward(model, 0)
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    opt.step()
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["skip", "skip+clip"])
def test_a_non_finite_grad_skips_the_whole_step_and_is_counted(clip):
    model = _model()
    opt = RMSprop(model.parameters(), lr=1e-2, momentum=0.9, skip_nonfinite=True, clip_global_norm=clip)
    _backward(model, 0)
    opt.step()
    state = {p: {k: t.clone() for k, t in s.items()} for p, s in opt.state.items()}
    before = [p.detach().clone() for p in model.parameters()]
    list(model.parameters())[-1].grad[0] = math.inf
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p][k], t) for p, s in state.items() for k, t in s.items())  # step too
    list(model.parameters())[-1].grad[0] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and all(float(s["step"]) == 2 for s in opt.state.values())


def test_bad_guard_options_and_sparse_grads_are_refused():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="clip_global_norm must be finite and > 0.0"):
        RMSprop(params, clip_global_norm=0.0)
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        RMSprop(params, skip_nonfinite="yes")
    table = torch.nn.Parameter(torch.ones(4, 3))
    opt = RMSprop([table], clip_global_norm=1.0)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (4, 3), check_invariants=True)
    with pytest.raises(ValueError, match="clip_global_norm and skip_nonfinite look at dense grads only"):
        opt.step()
    assert torch.equal(table, torch.ones(4, 3))
