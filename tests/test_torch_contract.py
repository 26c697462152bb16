"""fastrms.torch.RMSprop keeps torch.optim.RMSprop's contract: torch's own OptimizerInfo
inputs and error inputs, copies and pickles, older state dicts, and memory safety against
hostile tensors (each memory case in a subprocess, with a guard region around the tensors)."""

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms.torch import RMSprop  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


def _optim_info():
    common = pytest.importorskip(
        "torch.testing._internal.common_optimizers", reason="torch's test material needs expecttest (the dev extra)"
    )
    return next(info for info in common.optim_db if info.optim_cls is torch.optim.RMSprop)


def _model(dtype, seed=0):
    """A 0-d param, a 1-D param, a matrix, and a param that never gets a grad."""
    torch.manual_seed(seed)
    params = {
        "scale": torch.nn.Parameter(torch.tensor(0.5, dtype=dtype)),
        "bias": torch.nn.Parameter(torch.randn(4, dtype=dtype)),
        "weight": torch.nn.Parameter(torch.randn(3, 4, dtype=dtype)),
        "unused": torch.nn.Parameter(torch.randn(5, dtype=dtype)),
    }
    return torch.nn.ParameterDict(params)


def _loss(m, x):
    return ((x @ m["weight"].T).sum(1) * m["scale"] + m["bias"].sum()).pow(2).mean()


def _train(m, opt, steps, dtype, set_to_none=True):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        _loss(m, torch.randn(8, 4, generator=g, dtype=dtype)).backward()
        opt.step()


def _assert_same(ours, theirs, opt_ours, opt_theirs, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **tol)
    a, b = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    assert a.keys() == b.keys()  # the same params have state (not the unused one)
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            assert a[k][name].dtype == b[k][name].dtype, name
            torch.testing.assert_close(a[k][name], b[k][name], **tol)


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
@DTYPES
def test_every_optim_input_of_torchs_optimizer_info_matches_torch(dtype, flatten):
    for optim_input in _optim_info().optim_inputs_func("cpu", dtype):
        kwargs = optim_input.kwargs
        ours, theirs = _model(dtype), _model(dtype)
        opt_ours = RMSprop(ours.parameters(), **kwargs, flatten=flatten)
        opt_theirs = torch.optim.RMSprop(theirs.parameters(), **kwargs)
        _train(ours, opt_ours, 7, dtype)
        _train(theirs, opt_theirs, 7, dtype)
        _assert_same(ours, theirs, opt_ours, opt_theirs, dtype)
        assert torch.equal(ours["unused"], _model(dtype)["unused"]), optim_input.desc


@DTYPES
def test_torchs_error_inputs_raise_what_torch_raises(dtype):
    common = pytest.importorskip("torch.testing._internal.common_optimizers", reason="needs expecttest")
    for error_input in _optim_info().optim_error_inputs_func("cpu", dtype):
        optim_input = error_input.optimizer_error_input
        assert error_input.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR
        params = optim_input.params
        if params is None:
            params = [torch.nn.Parameter(torch.randn(2, 2, dtype=dtype))]
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                RMSprop(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                RMSprop(params, **optim_input.kwargs)


# ------------------------------------------------------------------ copies and state dicts


def _both(flatten, dtype=torch.float64):
    m = _model(dtype)
    opt = RMSprop(m.parameters(), lr=1e-2, momentum=0.9, centered=True, flatten=flatten)
    _train(m, opt, 3, dtype)
    return m, opt


def _roundtrips():
    def torch_save(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "torch.save": torch_save}


@pytest.mark.parametrize("how", list(_roundtrips()))
@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_a_copied_or_pickled_optimizer_steps_as_the_original(flatten, how):
    m, opt = _both(flatten)
    m2, opt2 = _roundtrips()[how]((m, opt))
    assert {id(p) for p in opt2.param_groups[0]["params"]} == {id(p) for p in m2.parameters()}
    _train(m, opt, 4, torch.float64)
    _train(m2, opt2, 4, torch.float64)
    _assert_same(m2, m, opt2, opt, torch.float64)
    assert not torch.equal(m2["weight"], _model(torch.float64)["weight"])


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_an_older_state_dict_loads_as_torch_loads_it(flatten):
    m, opt = _both(False)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("capturable", "foreach", "maximize", "differentiable"):
            del group[key]
    for state in old["state"].values():
        state["step"] = float(state["step"])  # torch < 1.12 kept a Python number
    ours, theirs = _model(torch.float64, seed=2), _model(torch.float64, seed=2)
    opt_ours = RMSprop(ours.parameters(), lr=1e-2, momentum=0.9, centered=True, flatten=flatten)
    opt_theirs = torch.optim.RMSprop(theirs.parameters(), lr=1e-2, momentum=0.9, centered=True)
    opt_ours.load_state_dict(copy.deepcopy(old))
    opt_theirs.load_state_dict(copy.deepcopy(old))
    assert opt_ours.param_groups[0]["capturable"] is False and opt_ours.param_groups[0]["maximize"] is False
    _train(ours, opt_ours, 3, torch.float64)
    _train(theirs, opt_theirs, 3, torch.float64)
    _assert_same(ours, theirs, opt_ours, opt_theirs, torch.float64)


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_load_state_dict_never_writes_to_the_dict_it_is_given(flatten):
    m, opt = _both(False)
    given = opt.state_dict()
    given = {"state": copy.deepcopy(given["state"]), "param_groups": copy.deepcopy(given["param_groups"])}
    frozen = copy.deepcopy(given)
    m2 = _model(torch.float64, seed=3)
    opt2 = RMSprop(m2.parameters(), lr=1e-2, momentum=0.9, centered=True, flatten=flatten)
    opt2.load_state_dict(given)
    _train(m2, opt2, 3, torch.float64)
    assert given["param_groups"] == frozen["param_groups"]
    for k, state in given["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(frozen["state"][k][name])), (k, name)


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_a_state_of_other_shapes_is_refused_before_anything_is_loaded(flatten):
    m, opt = _both(flatten)
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    k = next(i for i, p in enumerate(opt.param_groups[0]["params"]) if p.dim() == 2)
    sd["state"][k]["square_avg"] = torch.ones(1, 1, dtype=torch.float64)  # weight is (3, 4): no broadcasting
    with pytest.raises(ValueError, match=rf"state\[{k}\]\['square_avg'\] has shape \(1, 1\)"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for k in before["state"]:
        for name in before["state"][k]:
            assert torch.equal(before["state"][k][name], after["state"][k][name])


def test_the_step_counter_has_torchs_scalar_dtype_and_a_float32_state_is_cast_as_torch_casts_it():
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        ours, theirs = _model(torch.float64), _model(torch.float64)
        opt_ours, opt_theirs = RMSprop(ours.parameters()), torch.optim.RMSprop(theirs.parameters())
        _train(ours, opt_ours, 2, torch.float64)
        _train(theirs, opt_theirs, 2, torch.float64)
        assert opt_ours.state[ours["bias"]]["step"].dtype == torch.float64
        _assert_same(ours, theirs, opt_ours, opt_theirs, torch.float64)
        small = _model(torch.float32)
        small_opt = torch.optim.RMSprop(small.parameters())
        _train(small, small_opt, 2, torch.float32)  # a float32 state
        for opt in (opt_ours, opt_theirs):
            opt.load_state_dict(small_opt.state_dict())
        _train(ours, opt_ours, 2, torch.float64)
        _train(theirs, opt_theirs, 2, torch.float64)
        _assert_same(ours, theirs, opt_ours, opt_theirs, torch.float64)
    finally:
        torch.set_default_dtype(default)


# ------------------------------------------------------------------ what torch refuses, and no grad


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_params_without_a_grad_this_step_neither_move_nor_get_state(flatten):
    ours, theirs = _model(torch.float64), _model(torch.float64)
    opt_ours = RMSprop(ours.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1, flatten=flatten)
    opt_theirs = torch.optim.RMSprop(theirs.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    for m, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        _train(m, opt, 2, torch.float64)
        opt.zero_grad(set_to_none=True)
        m["bias"].sum().backward()  # only the bias has a grad this step
        opt.step()
    _assert_same(ours, theirs, opt_ours, opt_theirs, torch.float64)
    assert ours["unused"] not in opt_ours.state


def test_a_grad_of_another_shape_and_an_inference_tensor_are_refused():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(2, 3)
    with torch.no_grad():
        p.data = p.data.view(3, 2)  # the grad keeps its shape
    with pytest.raises(ValueError, match=r"grad has shape \(2, 3\), the param \(3, 2\)"):
        opt.step()
    assert torch.equal(p, torch.ones(3, 2)) and not opt.state[p]
    with torch.inference_mode():
        q = torch.ones(3)
    q.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        RMSprop([q], lr=0.1).step()
    assert torch.equal(q, torch.ones(3))


def test_a_param_listed_twice_is_stepped_twice_as_torch_does():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ours = RMSprop([a, a], lr=0.1, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.optim.RMSprop([b, b], lr=0.1, momentum=0.5)
    for _ in range(3):
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert ours.state[a]["step"].item() == theirs.state[b]["step"].item() == 6
    with pytest.raises(ValueError, match="listed twice"), pytest.warns(UserWarning, match="duplicate"):
        RMSprop([a, a], flatten=True)


def test_two_params_over_one_storage_and_a_grad_aliasing_a_param_are_refused():
    base = torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        RMSprop([torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])])
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([a, b], lr=0.1)
    a.grad, b.grad = b.detach(), torch.ones(4)  # a's grad is b's memory
    with pytest.raises(ValueError, match="the grad of param 0 .*shares memory"):
        opt.step()
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.ones(4))
    a.grad = torch.ones(4)
    opt.step()  # a fresh grad: the check runs again and passes
    assert torch.all(a < 1)


# ------------------------------------------------------------------ memory safety, in subprocesses

#: Each case steps tensors that are views into the middle of an arena; the arena outside
#: them must be unchanged, and the process must end cleanly (a crash is a failed test).
GUARDED = """
import torch, warnings
from fastrms.torch import RMSprop

arena = torch.full((3000,), 7.0)
guard = lambda: torch.cat([arena[:1000], arena[2000:]]).clone()
before = guard()
p = torch.nn.Parameter(arena[1000:1200])
q = torch.nn.Parameter(torch.ones(300))
opt = RMSprop([p, q], lr=0.1, momentum=0.9, flatten=FLATTEN)
p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
opt.step()
outcome = "stepped"
try:
CASE
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
except (ValueError, TypeError, RuntimeError) as exc:
    outcome = f"refused: {type(exc).__name__}: {exc}"
assert torch.equal(guard(), before), "a write outside the params"
print(outcome)
"""

MEMORY_CASES = {
    "a meta step tensor": "    opt.state[p]['step'] = torch.tensor(1.0, device='meta')",
    "fewer elements at the same address": "    p.data = p.data[:2]",
    "a param swapped to meta": (
        "    torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(200, device='meta')))\n    p.grad = None"
    ),
    "a state tensor replaced by a small one": "    opt.state[q]['square_avg'] = torch.zeros(3)",
}


@pytest.mark.slow
@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_hostile_tensors_are_refused_or_stepped_and_nothing_outside_them_is_written(case, flatten):
    script = GUARDED.replace("FLATTEN", str(flatten)).replace("CASE", textwrap.indent(MEMORY_CASES[case], ""))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    outcome = out.stdout.strip().splitlines()[-1]
    if case == "a param swapped to meta":
        assert outcome.startswith("refused: ValueError") and "meta" in outcome
    elif not flatten or case == "fewer elements at the same address":
        assert outcome.startswith("refused: ValueError"), outcome
    # flatten=True steps its own buffers: a state entry replaced by hand is not read (the guard holds)


def test_a_tensor_lr_is_used_at_its_own_precision_as_torch_uses_it():
    """`lr=torch.tensor(0.01)` is a float32 0.00999999977: torch steps float64 params with
    that value, and so does fastrms; a float64 tensor gives 0.01. The two runs differ by
    about 2e-8 relative, far beyond the rounding between fastrms and torch."""

    def run(opt_class, lr):
        p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
        opt = opt_class([p], lr=lr)
        for step in range(3):
            p.grad = torch.linspace(-1, 1, 5, dtype=torch.float64) * (step + 1)
            opt.step()
        return p.detach()

    single, double = torch.tensor(0.01), torch.tensor(0.01, dtype=torch.float64)
    for lr in (single, double):
        torch.testing.assert_close(run(RMSprop, lr), run(torch.optim.RMSprop, lr), rtol=1e-15, atol=1e-15)
    assert not torch.allclose(run(RMSprop, single), run(RMSprop, double), rtol=1e-12, atol=0)
