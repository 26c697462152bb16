"""fastrms.torch's lean state (`state_storage="bfloat16" | "8bit"`, `state_layout="rowwise"`;
`fastrms.torch._tensors.Form`): the same kernels as `fastrms.RMSprop` with the same options,
so the same bits; state dicts that round-trip under torch's key names; refusals that name
what to change, before anything is written or loaded."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

import fastrms  # noqa: E402
from fastrms.torch import RMSprop  # noqa: E402

#: a 2-D table, a vector longer than one 8-bit block (256), a 3-D tensor and a scalar
SHAPES = [(300, 17), (1000,), (5, 7, 3), ()]
#: every storage and layout, each with a variant that keeps a second state array
COVER = [
    ("bfloat16", "elementwise", {"centered": True}),
    ("bfloat16", "elementwise", {"momentum": 0.9, "weight_decay": 0.01}),
    ("8bit", "elementwise", {"momentum": 0.9}),
    ("8bit", "elementwise", {"centered": True, "maximize": True}),
    ("native", "rowwise", {"momentum": 0.9}),
    ("native", "rowwise", {}),
]
IDS = [f"{s}-{layout}-{'-'.join(o) or 'plain'}" for s, layout, o in COVER]


def _problem(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _torch_run(params, grads, storage, layout, opts, dtype=torch.float32):
    ps = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(dtype)) for p in params]
    opt = RMSprop(ps, lr=0.01, state_storage=storage, state_layout=layout, **opts)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = torch.from_numpy(g.copy()).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize(("storage", "layout", "opts"), COVER, ids=IDS)
def test_the_lean_state_steps_bit_for_bit_as_the_numpy_front_end_with_the_same_options(storage, layout, opts):
    params, grads = _problem()
    ps, opt = _torch_run(params, grads, storage, layout, opts)
    arrays = [p.copy() for p in params]
    theirs = {"decoupled_weight_decay": False, **{("beta" if k == "alpha" else k): v for k, v in opts.items()}}
    numpy_opt = fastrms.RMSprop.like("torch", arrays, state_storage=storage, state_layout=layout, **theirs)
    for step in grads:
        numpy_opt.step([g.copy() for g in step])
    for p, a in zip(ps, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    kept = opt.state[ps[0]]["square_avg"]
    want = {"bfloat16": torch.bfloat16, "8bit": torch.uint8}.get(storage, torch.float32)
    assert kept.dtype == want
    assert tuple(kept.shape) == {"8bit": (260 * 20,), "native": (300,)}.get(storage, (300, 17))


@pytest.mark.parametrize(("storage", "layout", "opts"), COVER[1::2], ids=IDS[1::2])
def test_a_state_dict_round_trips_and_the_run_goes_on_bit_for_bit(storage, layout, opts):
    params, grads = _problem(steps=4)
    straight, _ = _torch_run(params, grads, storage, layout, opts)
    ps, opt = _torch_run(params, grads[:2], storage, layout, opts)
    saved = opt.state_dict()
    kept = {
        "square_avg",
        *({"momentum_buffer"} if "momentum" in opts else ()),
        *({"grad_avg"} if "centered" in opts else ()),
    }
    assert set(saved["state"][0]) == {"step", *kept}  # torch's key names
    again = RMSprop(ps, lr=0.01, state_storage=storage, state_layout=layout, **opts)
    again.load_state_dict(saved)
    for p in ps:
        for name, t in opt.state[p].items():
            assert again.state[p][name].dtype == t.dtype and torch.equal(again.state[p][name], t), name
    for step in grads[2:]:
        for p, g in zip(ps, step):
            p.grad = torch.from_numpy(g.copy())
        again.step()
    for p, q in zip(ps, straight):
        assert torch.equal(p, q)


def test_bfloat16_state_loads_into_torch_optim_and_torch_state_into_bfloat16_rounded_to_nearest_even():
    params, grads = _problem()
    ps, opt = _torch_run(params, grads, "bfloat16", "elementwise", {})
    theirs = torch.optim.RMSprop(ps, lr=0.01)
    theirs.load_state_dict(opt.state_dict())  # torch casts the state to the params' dtype: exact from bfloat16
    assert theirs.state[ps[0]]["square_avg"].dtype == torch.float32
    assert torch.equal(theirs.state[ps[0]]["square_avg"], opt.state[ps[0]]["square_avg"].float())
    back = RMSprop(ps, lr=0.01, state_storage="bfloat16")
    widened = theirs.state_dict()
    widened["state"][0]["square_avg"] = widened["state"][0]["square_avg"] * 1.001  # not a bfloat16 value any more
    back.load_state_dict(widened)
    want = widened["state"][0]["square_avg"].to(torch.bfloat16)
    assert back.state[ps[0]]["square_avg"].dtype == torch.bfloat16
    assert torch.equal(back.state[ps[0]]["square_avg"], want)


def test_16bit_params_keep_their_float32_master_and_lean_state():
    params, grads = _problem()
    ps, opt = _torch_run(params, grads, "8bit", "elementwise", {"momentum": 0.9}, dtype=torch.bfloat16)
    state = opt.state[ps[1]]
    assert state["master_param"].dtype == torch.float32 and state["square_avg"].dtype == torch.uint8
    assert torch.equal(state["master_param"].to(torch.bfloat16), ps[1].detach())  # the param is its master, rounded
    moved = [not torch.equal(p.detach(), torch.from_numpy(a).to(torch.bfloat16)) for p, a in zip(ps, params)]
    assert all(moved)


def test_8bit_state_takes_about_a_quarter_of_float32s_bytes():
    params, grads = _problem()
    _, native = _torch_run(params, grads, "native", "elementwise", {"momentum": 0.9})
    _, lean = _torch_run(params, grads, "8bit", "elementwise", {"momentum": 0.9})
    _, row = _torch_run(params, grads, "native", "rowwise", {})
    counters = 4 * len(SHAPES)  # the float32 `step` tensors
    assert (lean.state_nbytes - counters) < 0.3 * (native.state_nbytes - counters)
    assert row.state_nbytes - counters == 4 * (300 + 1000 + 5 + 1)  # one float32 a row


def test_a_state_dict_of_another_storage_is_refused_before_anything_loads():
    params, grads = _problem()
    ps, lean = _torch_run(params, grads, "8bit", "elementwise", {})
    native = RMSprop(ps, lr=0.01)
    before = {k: v.clone() for k, v in native.state_dict()["state"].items()} if native.state else {}
    with pytest.raises(ValueError, match=r"state\[0\]\['square_avg'\] has shape \(5200,\), its param \(300, 17\)"):
        native.load_state_dict(lean.state_dict())
    assert native.state_dict()["state"] == before
    other = RMSprop(ps, lr=0.01, state_storage="8bit")
    plain = torch.optim.RMSprop(ps, lr=0.01)
    with pytest.raises(ValueError, match=r"is torch.float32 of shape \(300, 17\); this optimizer keeps it as "
                                         r"torch.uint8 of shape \(5200,\) \(8-bit blocks\)"):  # fmt: skip
        _steps_once(plain, ps, grads[0])
        other.load_state_dict(plain.state_dict())
    broken = lean.state_dict()
    blocks = broken["state"][1]["square_avg"].clone()
    blocks[256:260] = torch.tensor(np.array([-1.0], "<f4").view(np.uint8))  # the first block's scale: -1
    broken["state"][1]["square_avg"] = blocks
    with pytest.raises(ValueError, match=r"state\[1\]\['square_avg'\] holds a negative or non-finite block scale"):
        other.load_state_dict(broken)
    assert not other.state


def _steps_once(opt, ps, grads):
    for p, g in zip(ps, grads):
        p.grad = torch.from_numpy(g.copy())
    opt.step()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"state_storage": "bf16"}, ValueError, "state_storage"),
        ({"state_layout": "rows"}, ValueError, "state_layout"),
        ({"state_storage": "8bit", "flatten": True}, ValueError, "flatten=True keeps the state in flat buffers"),
        ({"state_layout": "rowwise", "flatten": True}, ValueError, "use flatten=False"),
        ({"state_storage": "8bit", "stochastic_rounding": True}, ValueError, "stochastic_rounding=True steps"),
        ({"state_layout": "rowwise", "centered": True}, ValueError, "centered=False"),
        ({"state_storage": "bfloat16", "dense_rows": True}, ValueError, "dense_rows=True needs state_storage"),
    ],
)
def test_options_the_lean_state_cannot_take_are_refused_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        RMSprop([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_params_and_grads_the_lean_state_cannot_step_are_refused_before_anything_is_written():
    with pytest.raises(TypeError, match=r"is torch.bfloat16: state_layout='rowwise' steps float32 and float64"):
        RMSprop([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], state_layout="rowwise")
    with pytest.raises(ValueError, match="state_storage='bfloat16' keeps the state of float32 params"):
        RMSprop([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], state_storage="bfloat16")
    table, dense = torch.nn.Parameter(torch.ones(6, 4)), torch.nn.Parameter(torch.ones(5))
    opt = RMSprop([dense, table], state_storage="bfloat16")
    dense.grad = torch.ones(5)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (6, 4), check_invariants=True)
    with pytest.raises(ValueError, match=r"has a sparse grad; its rows are stepped by the row kernels"):
        opt.step()
    assert torch.equal(dense, torch.ones(5)) and float(opt.state[dense].get("step", 0)) == 0  # nothing stepped
