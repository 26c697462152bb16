"""The contract every front end keeps, run against each: `fastrms.RMSprop` (NumPy),
`fastrms.dask.RMSprop` (Dask's local scheduler) and `fastrms.torch.RMSprop`. One set of
behaviours, one adapter per front end:

- the bits of `fastrms.reference` for every variant the front end takes;
- a checkpoint written mid-run and loaded into a new optimizer continues bit for bit;
- `skip_nonfinite` skips a step whose grads hold a NaN or an infinity, changing nothing
  but the count, and `clip_value` clamps as the reference does (front ends with those
  options: torch.optim.RMSprop has neither, and fastrms.torch keeps torch's options);
- a bad option is refused before anything exists, a bad grad before anything is written.
"""

import importlib.util

import numpy as np
import pytest

import fastrms
from fastrms import reference

#: The contract runs on the oldest supported numba and numpy too (.ci/run's last stage).
pytestmark = pytest.mark.lower_bound

LR = 0.01
STEPS = 6


class NumPyFront:
    name = "numpy"
    options = None  # every option

    def make(self, p, **opts):
        return fastrms.RMSprop(p.copy(), LR, **opts)

    def step(self, opt, g):
        opt.step(g)

    def params(self, opt):
        return opt.params

    def state(self, opt):
        return {k: np.asarray(v) for k, v in ((n, getattr(opt, n)) for n in ("square_avg", "grad_avg",
                "momentum_buffer")) if v is not None}  # fmt: skip

    def counts(self, opt):
        return opt.step_count, opt.skipped_steps

    def bad_grad(self, g):
        """A grad the step must refuse: here, the wrong shape."""
        return g[:5]

    def save(self, opt, path):
        opt.save(path / "ckpt.npz")

    def load(self, opt, path):
        opt.load(path / "ckpt.npz")


class DaskFront(NumPyFront):
    name = "dask"

    def __init__(self):
        import dask.array as da

        self.da = da

    def _array(self, a):
        return self.da.from_array(a, chunks=(7,) + a.shape[1:])

    def make(self, p, **opts):
        from fastrms.dask import RMSprop

        return RMSprop(self._array(p.copy()), LR, **opts)

    def step(self, opt, g):
        opt.step(self._array(g))

    def params(self, opt):
        return opt.params.compute()

    def state(self, opt):
        return {k: v.compute() for k, v in opt.state.items()}

    def save(self, opt, path):
        opt.save(path / "ckpt")

    def load(self, opt, path):
        opt.load(path / "ckpt")


class TorchFront:
    name = "torch"
    # torch.optim.RMSprop's own, and the guard fastrms.torch adds
    options = {"momentum", "centered", "weight_decay", "maximize", "skip_nonfinite", "clip_global_norm"}

    def __init__(self):
        import torch

        self.torch = torch

    def make(self, p, **opts):
        from fastrms.torch import RMSprop

        self.param = self.torch.tensor(p.copy())
        return RMSprop([self.param], lr=LR, alpha=0.9, eps=1e-8, **opts)

    def step(self, opt, g):
        opt.param_groups[0]["params"][0].grad = self.torch.from_numpy(np.array(g, order="K"))
        opt.step()

    def params(self, opt):
        return opt.param_groups[0]["params"][0].detach().numpy().copy()

    def state(self, opt):
        st = opt.state[opt.param_groups[0]["params"][0]]
        return {k: v.numpy().copy() for k, v in st.items() if k != "step"}

    def counts(self, opt):
        st = opt.state[opt.param_groups[0]["params"][0]]
        return int(st["step"]), opt.skipped_steps

    def bad_grad(self, g):
        """torch itself refuses a grad of another shape or dtype: a grad laid out otherwise
        (transposed strides) is fastrms.torch's to refuse."""
        return g.T.copy().T

    def save(self, opt, path):
        self.torch.save(opt.state_dict(), path / "ckpt.pt")

    def load(self, opt, path):
        opt.load_state_dict(self.torch.load(path / "ckpt.pt"))


def _fronts():
    out = [pytest.param(NumPyFront, id="numpy")]
    have = {name: importlib.util.find_spec(name) is not None for name in ("dask", "torch")}
    reason = "{} is not installed (python -m pip install -e '.[{}]' in the repository)"
    out.append(pytest.param(DaskFront, id="dask", marks=pytest.mark.skipif(not have["dask"],
               reason=reason.format("dask", "dask"))))  # fmt: skip
    out.append(pytest.param(TorchFront, id="torch", marks=pytest.mark.skipif(not have["torch"],
               reason=reason.format("torch", "torch"))))  # fmt: skip
    return out


@pytest.fixture(params=_fronts())
def front(request):
    return request.param()


VARIANTS = {
    "plain": {},
    "centered_momentum": dict(centered=True, momentum=0.9),
    "weight_decay_maximize": dict(weight_decay=0.01, maximize=True),
    "nesterov_lr_inside": dict(momentum=0.9, nesterov=True, lr_in_momentum=True),
}


def _takes(front, opts):
    return front.options is None or set(opts) <= front.options


def _problem(dtype=np.float32, shape=(20, 3)):
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(shape).astype(dtype)
    return p0, [rng.standard_normal(shape).astype(dtype) for _ in range(STEPS)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_bits_are_the_references(front, variant, dtype):
    opts = VARIANTS[variant]
    if not _takes(front, opts):
        pytest.skip(f"{front.name} takes only torch.optim.RMSprop's options, not {sorted(opts)}")
    p0, grads = _problem(dtype)
    opt, ref = front.make(p0, **opts), reference.RMSprop(p0.copy(), LR, **opts)
    for g in grads:
        front.step(opt, g)
        ref.step(g)
    np.testing.assert_array_equal(front.params(opt), ref.params[0])
    state = front.state(opt)
    assert set(state) == set(ref.state[0])
    for name, a in state.items():
        np.testing.assert_array_equal(a, ref.state[0][name], err_msg=name)
    assert front.counts(opt) == (STEPS, 0)


def test_a_checkpoint_continues_bit_for_bit(front, tmp_path):
    opts = VARIANTS["centered_momentum"]
    p0, grads = _problem()
    whole = front.make(p0, **opts)
    for g in grads:
        front.step(whole, g)
    first = front.make(p0, **opts)
    for g in grads[:3]:
        front.step(first, g)
    front.save(first, tmp_path)
    second = front.make(front.params(first), **opts)
    front.load(second, tmp_path)
    assert front.counts(second) == (3, 0)
    for g in grads[3:]:
        front.step(second, g)
    np.testing.assert_array_equal(front.params(second), front.params(whole))
    for name, a in front.state(whole).items():
        np.testing.assert_array_equal(front.state(second)[name], a, err_msg=name)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_nonfinite_changes_nothing_but_the_count(front, bad):
    if front.options is not None and "skip_nonfinite" not in front.options:
        pytest.skip(f"{front.name} has no skip_nonfinite")
    p0, grads = _problem()
    opt = front.make(p0, momentum=0.9, skip_nonfinite=True)
    front.step(opt, grads[0])
    before, state = front.params(opt), front.state(opt)
    g = grads[1].copy()
    g[4, 1] = bad
    front.step(opt, g)
    np.testing.assert_array_equal(front.params(opt), before)
    for name, a in front.state(opt).items():
        np.testing.assert_array_equal(a, state[name], err_msg=name)
    assert front.counts(opt) == (1, 1)


def test_clip_value_clamps_as_the_reference_does(front):
    if front.options is not None:
        pytest.skip(f"{front.name} has torch.optim.RMSprop's options: no clip_value")
    p0, grads = _problem()
    opt, ref = front.make(p0, clip_value=0.3), reference.RMSprop(p0.copy(), LR, clip_value=0.3)
    for g in grads:
        front.step(opt, g * 3)
        ref.step(g * 3)
    np.testing.assert_array_equal(front.params(opt), ref.params[0])


def test_a_bad_option_or_grad_is_refused_before_anything_is_written(front):
    p0, grads = _problem()
    bad = {"momentum": -0.5}
    with pytest.raises(ValueError, match="momentum"):
        front.make(p0, **bad)
    opt = front.make(p0, momentum=0.9)
    front.step(opt, grads[0])
    before, state = front.params(opt), front.state(opt)
    with pytest.raises((TypeError, ValueError)):
        front.step(opt, front.bad_grad(grads[1]))
    np.testing.assert_array_equal(front.params(opt), before)
    for name, a in front.state(opt).items():
        np.testing.assert_array_equal(a, state[name], err_msg=name)
    assert front.counts(opt) == (1, 0)
