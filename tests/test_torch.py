"""fastrms.torch.RMSprop against torch.optim.RMSprop: parity, state dicts both ways, checks,
autograd, hooks, and ZeroRedundancyOptimizer on gloo (skipped, saying so, without torch)."""

import copy
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastrms import reference

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
from conftest import assert_optional_import  # noqa: E402

from fastrms.torch import RMSprop  # noqa: E402

CASES = [
    dict(),
    dict(momentum=0.9),
    dict(centered=True),
    dict(weight_decay=0.01),
    dict(maximize=True, alpha=0.9),
    dict(momentum=0.5, centered=True, weight_decay=0.1, eps=1e-6),
]


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(dtype)


def _train(model, opt, steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g, dtype=dtype)
        y = torch.randn(32, 1, generator=g, dtype=dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_close(a, b, dtype):
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "plain")
def test_training_matches_torch(case, dtype):
    ours, theirs = _model(dtype), _model(dtype)
    opt_ours = RMSprop(ours.parameters(), lr=1e-3, **case)
    opt_theirs = torch.optim.RMSprop(theirs.parameters(), lr=1e-3, **case)
    _train(ours, opt_ours, 50, dtype)
    _train(theirs, opt_theirs, 50, dtype)
    _assert_close(ours, theirs, dtype)
    assert not torch.equal(next(ours.parameters()), next(_model(dtype).parameters()))


def test_param_groups_with_their_own_options_and_add_param_group():
    def groups(model):
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        return [
            {"params": layers[0].parameters(), "momentum": 0.9},
            {"params": layers[1].parameters(), "centered": True, "lr": 5e-3},
        ], layers[2]

    ours, theirs = _model(torch.float64), _model(torch.float64)
    (g1, last1), (g2, last2) = groups(ours), groups(theirs)
    opt_ours, opt_theirs = RMSprop(g1, lr=1e-3), torch.optim.RMSprop(g2, lr=1e-3)
    opt_ours.add_param_group({"params": last1.parameters(), "weight_decay": 0.1, "maximize": True})
    opt_theirs.add_param_group({"params": last2.parameters(), "weight_decay": 0.1, "maximize": True})
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        _train(model, opt, 30, torch.float64)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)  # changes every group's lr in place
        for _ in range(10):
            _train(model, opt, 1, torch.float64, seed=7)
            scheduler.step()
    _assert_close(ours, theirs, torch.float64)


@pytest.mark.parametrize("direction", ["torch->fastrms", "fastrms->torch"])
def test_state_dicts_are_interchangeable_mid_run(direction):
    dtype = torch.float64
    case = dict(lr=1e-3, momentum=0.9, centered=True)
    first, second = (torch.optim.RMSprop, RMSprop) if direction == "torch->fastrms" else (RMSprop, torch.optim.RMSprop)
    straight, switched = _model(dtype), _model(dtype)
    opt = torch.optim.RMSprop(straight.parameters(), **case)
    _train(straight, opt, 40, dtype)
    a = first(switched.parameters(), **case)
    _train(switched, a, 20, dtype)
    sd = a.state_dict()
    assert set(sd["state"][0]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert sd["state"][0]["step"].shape == () and sd["state"][0]["step"].item() == 20
    assert set(sd["param_groups"][0]) == set(opt.state_dict()["param_groups"][0])
    b = second(switched.parameters(), **case)
    b.load_state_dict(sd)
    _train(switched, b, 20, dtype, seed=2)
    straight2 = _model(dtype)
    o = torch.optim.RMSprop(straight2.parameters(), **case)
    _train(straight2, o, 20, dtype)
    _train(straight2, o, 20, dtype, seed=2)
    _assert_close(switched, straight2, dtype)


def test_params_without_grad_are_skipped_and_closure_and_hooks_work():
    model = _model(torch.float32)
    frozen = list(model.parameters())[0]
    frozen.requires_grad_(False)
    before = frozen.clone()
    opt = RMSprop(model.parameters(), lr=1e-2)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    x = torch.randn(4, 8)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and seen == ["pre", "post"]
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters() if p.requires_grad)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_autograd_sees_the_stepped_values_and_a_stale_graph_is_refused():
    w = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([w], lr=0.1)
    (w * w).sum().backward()
    opt.step()
    assert torch.all(w < 1)
    w.grad = None
    out = (w * w).sum()  # a graph built after the step uses the new values
    out.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    stale = (w * w).sum()  # saved w before the next step...
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()  # ...as with torch.optim.RMSprop, the version counter says so


def test_channels_last_params_are_stepped_in_their_layout():
    conv_ours = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last).double()
    conv_theirs = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last).double()
    conv_theirs.load_state_dict(conv_ours.state_dict())
    assert not conv_ours.weight.is_contiguous()
    opt_ours, opt_theirs = RMSprop(conv_ours.parameters()), torch.optim.RMSprop(conv_theirs.parameters())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    for conv, opt in ((conv_ours, opt_ours), (conv_theirs, opt_theirs)):
        for _ in range(5):
            opt.zero_grad()
            conv(x).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(conv_ours.weight, conv_theirs.weight, rtol=1e-10, atol=1e-12)


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], capturable=True), "capturable"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], differentiable=True), "differentiable"),
        (lambda: RMSprop([torch.ones(2, dtype=torch.int32)]), "int32"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))]), "complex64"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(4, 4).t()[::2])]), "not dense"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], lr=-1.0), "lr must be"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], alpha=1.0), "alpha must be"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], eps=0.0), "eps must be"),
        (lambda: RMSprop(None, lr=torch.tensor([1.0, 2.0])), "Tensor lr must be 1-element"),  # before params
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], lrr=0.1), "argument 'lrr'. Did you mean 'lr'"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], learning_rate=0.1), "'learning_rate'. Did you mean 'lr'"),
        (lambda: RMSprop([torch.nn.Parameter(torch.ones(2))], weight_decay=0.1, dense_rows=True), "or weight_decay=0"),
    ],
)
def test_bad_construction_is_refused_naming_the_cause(make, error):
    with pytest.raises((TypeError, ValueError), match=error):
        make()


def test_a_bad_grad_is_refused_before_any_param_is_written():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, 4))
    opt = RMSprop([a, b], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(4, 4).to_sparse()
    before = _snapshot([a, b])
    with pytest.raises(ValueError, match=r"params'\]\[1\] has a sparse grad with 2 sparse and 0 dense dimensions"):
        opt.step()
    b.grad = torch.ones(4, 4).t().contiguous().t()  # a transposed grad for a contiguous param
    with pytest.raises(ValueError, match="laid out alike"):
        opt.step()
    for p, q in zip([a, b], before):
        assert torch.equal(p, q)
    # state may be created (zeros, step 0), as torch creates it before its own checks; never stepped
    assert all(float(opt.state[p].get("step", 0)) == 0 and not opt.state[p].get("square_avg", torch.zeros(1)).any()
               for p in (a, b))  # fmt: skip
    b.grad = torch.ones(4, 4)
    opt.step()
    assert torch.all(a < 1) and opt.state[a]["step"].item() == 1


def test_importing_fastrms_does_not_import_torch_and_a_missing_torch_is_one_clear_error():
    message = "fastrms.torch needs PyTorch; install it with: pip install torch==2.13.0"
    assert_optional_import("fastrms.torch", "torch", message)


_ZERO = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from fastrms.torch import RMSprop

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)]).double()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=RMSprop, lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(8, 16, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out)
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called ...")
    """
)


def test_zero_redundancy_optimizer_on_gloo_matches_one_process(tmp_path):
    """Two processes on 127.0.0.1 shard the optimizer state with ZeroRedundancyOptimizer
    (optimizer_class=fastrms.torch.RMSprop); the params equal a single-process run's."""
    script = tmp_path / "zero.py"
    script.write_text(_ZERO)
    # the rendezvous is a file; gloo's own connections stay on the loopback interface
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    out, store = tmp_path / "zero.pt", str(tmp_path / "store2")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", store, str(out)], env=env, stderr=subprocess.PIPE)
        for r in range(2)
    ]
    errors = [p.communicate(timeout=300)[1].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    single = tmp_path / "single.pt"
    run = subprocess.run(
        [sys.executable, str(script), "0", "1", str(tmp_path / "store1"), str(single)],
        env=env, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    sharded, alone = torch.load(out), torch.load(single)
    for a, b in zip(sharded, alone):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ flatten=True


def test_flatten_moves_params_grads_and_state_into_one_buffer_and_matches_torch():
    dtype = torch.float64
    ours, theirs = _model(dtype), _model(dtype)
    frozen = list(ours.parameters())[0]
    frozen.requires_grad_(False)
    list(theirs.parameters())[0].requires_grad_(False)
    kept = frozen.detach().clone()
    opt_ours = RMSprop(ours.parameters(), lr=1e-3, momentum=0.9, centered=True, flatten=True)
    opt_theirs = torch.optim.RMSprop(theirs.parameters(), lr=1e-3, momentum=0.9, centered=True)
    trained = [p for p in ours.parameters() if p.requires_grad]
    at = trained[0].data_ptr()
    for p in trained:  # the params tile one buffer, back to back, and so do their grads
        assert p.data_ptr() == at and p.is_contiguous()
        at += p.numel() * p.element_size()
    grads = [p.grad for p in trained]
    _train(ours, opt_ours, 30, dtype)  # zero_grad() (set_to_none=True) keeps the grads as views
    assert all(p.grad is g for p, g in zip(trained, grads))
    _train(theirs, opt_theirs, 30, dtype)
    _assert_close(ours, theirs, dtype)
    assert torch.equal(frozen, kept) and frozen not in opt_ours.state
    state = opt_ours.state[trained[1]]
    assert state["step"].item() == 30 and state["square_avg"].shape == trained[1].shape


def test_flatten_survives_a_replaced_grad_and_state_dicts_both_ways():
    dtype = torch.float64
    case = dict(lr=1e-3, momentum=0.5)
    ours, theirs = _model(dtype), _model(dtype)
    opt_ours = RMSprop(ours.parameters(), flatten=True, **case)
    opt_theirs = torch.optim.RMSprop(theirs.parameters(), **case)
    _train(ours, opt_ours, 10, dtype)
    _train(theirs, opt_theirs, 10, dtype)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):  # a grad replaced by a new tensor: still right
        opt.zero_grad()
        model(torch.ones(2, 8, dtype=dtype)).sum().backward()
        first = next(model.parameters())
        first.grad = first.grad.clone() * 2
        opt.step()
    _assert_close(ours, theirs, dtype)
    restart = RMSprop(ours.parameters(), flatten=True, **case)
    restart.load_state_dict(opt_theirs.state_dict())  # torch -> flattened fastrms
    back = torch.optim.RMSprop(theirs.parameters(), **case)
    back.load_state_dict(opt_ours.state_dict())  # flattened fastrms -> torch
    _train(ours, restart, 10, dtype, seed=3)
    _train(theirs, back, 10, dtype, seed=3)
    _assert_close(ours, theirs, dtype)


def _flat_pair():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in ((40, 30), (50,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opts = RMSprop(ours, lr=0.01, momentum=0.5, flatten=True), torch.optim.RMSprop(theirs, lr=0.01, momentum=0.5)
    return ours, theirs, opts


def _grads_into(params, seed):
    torch.manual_seed(seed)
    for p in params:  # in place where a grad is kept, as backward accumulates into it
        g = torch.randn(p.shape, dtype=p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad += g


def test_flatten_follows_torch_when_p_data_is_replaced_or_a_grad_written_after_zero_grad():
    ours, theirs, opts = _flat_pair()
    for s in range(6):
        for params, opt in zip((ours, theirs), opts):
            opt.zero_grad()  # set_to_none: fastrms keeps zeroed views; p.grad += g writes into them
            _grads_into(params, s)
            if s == 2:
                params[0].data = torch.full((40, 30), 0.5, dtype=torch.float64)  # a restore through .data
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert torch.all(ours[0] != 0.5)


def test_flatten_refuses_a_reshaped_param_or_state_before_writing_and_saves_each_state_alone():
    ours, theirs, (opt, ref) = _flat_pair()
    _grads_into(ours, 0), _grads_into(theirs, 0)
    opt.step(), ref.step()
    saved = ref.state_dict()
    saved["state"][0]["square_avg"] = saved["state"][0]["square_avg"].reshape(30, 40)  # the right size
    before = {k: t.clone() for k, t in opt.state[ours[1]].items()}
    with pytest.raises(ValueError, match=r"state\[0\]\['square_avg'\] has shape \(30, 40\), its param \(40, 30\)"):
        opt.load_state_dict(saved)
    assert all(torch.equal(opt.state[ours[1]][k], t) for k, t in before.items())  # nothing loaded
    sizes = []
    for optimizer in (opt, ref):  # one param's state saved alone: its elements, not the whole buffers'
        out = io.BytesIO()
        torch.save(optimizer.state_dict()["state"][1], out)
        sizes.append(len(out.getvalue()))
    assert sizes[0] <= sizes[1] + 100
    params = [p.detach().clone() for p in ours]
    ours[0].data = torch.zeros(30, 40, dtype=torch.float64)
    ours[0].grad = torch.ones(30, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]: its state 'square_avg' is not a CPU tensor like"):
        opt.step()
    assert torch.equal(ours[1], params[1])


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
def test_state_nbytes_counts_every_state_tensor_once(flatten):
    model = _model(torch.bfloat16)
    opt = RMSprop(model.parameters(), lr=1e-2, momentum=0.9, flatten=flatten)
    assert opt.state_nbytes == 0  # no state before the first step, as in torch
    _train(model, opt, 1, torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert opt.state_nbytes == 3 * 4 * n + steps  # float32 square_avg, momentum_buffer and master


def test_flatten_must_be_a_bool():
    with pytest.raises(TypeError, match="flatten must be True or False"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], flatten=1)


# ------------------------------------------------------------------ 16-bit params over float32 masters

LOW = [torch.bfloat16, torch.float16]


def _numpy_low(t):
    """A 16-bit tensor as the NumPy array of its dtype (ml_dtypes.bfloat16 or float16), same bits."""
    bits = t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return bits.view(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install ml_dtypes)")
    return bits.view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=["plain", "momentum,centered,wd"])
def test_a_16_bit_model_steps_its_float32_masters_as_the_reference_does_bit_for_bit(case, dtype):
    """The masters in the state follow fastrms.reference stepping float32 copies of the initial
    params from the 16-bit grads, and each param is its master rounded to nearest even."""
    model = _model(dtype)
    opt = RMSprop(model.parameters(), lr=1e-2, **case)
    torch_names = {"alpha": "beta", "eps": "epsilon"}
    options = {torch_names.get(k, k): v for k, v in case.items()}
    masters = [p.detach().float().numpy().copy() for p in model.parameters()]
    copies = [_numpy_low(p).copy() for p in model.parameters()]
    ref = reference.RMSprop(masters, 1e-2, beta=0.99, **options, copy_to=copies)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 1, generator=g).to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        grads = [_numpy_low(p.grad) for p in model.parameters()]
        opt.step()
        ref.step(grads)
    for p, master, low in zip(model.parameters(), masters, copies):
        state = opt.state[p]
        assert state["master_param"].dtype == state["square_avg"].dtype == torch.float32
        np.testing.assert_array_equal(state["master_param"].numpy(), master)
        np.testing.assert_array_equal(_numpy_low(p).view(np.uint16), low.view(np.uint16))


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_a_16_bit_model_matches_torch_over_float32_masters_with_the_copy_by_hand(dtype):
    """The recipe fastrms fuses: torch.optim.RMSprop over float32 masters, their grads the
    16-bit grads widened, then each 16-bit param copied from its master."""
    ours = _model(dtype)
    theirs = _model(dtype)
    masters = [p.detach().float().clone() for p in theirs.parameters()]
    opt = RMSprop(ours.parameters(), lr=1e-3, momentum=0.9)
    torch_opt = torch.optim.RMSprop(masters, lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 1, generator=g).to(dtype)
        for model in (ours, theirs):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
        for m, p in zip(masters, theirs.parameters()):
            m.grad = p.grad.float()
        torch_opt.step()
        with torch.no_grad():
            for m, p in zip(masters, theirs.parameters()):
                p.copy_(m)
    for p, m in zip(ours.parameters(), masters):
        torch.testing.assert_close(opt.state[p]["master_param"], m, rtol=1e-5, atol=1e-6)
        assert (p.float() - m).abs().max() <= m.abs().max() * 2.0**-7  # one 16-bit rounding of the master


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_16_bit_state_dicts_keep_the_float32_masters_and_resume_bit_for_bit(dtype):
    straight, resumed = _model(dtype), _model(dtype)
    opt = RMSprop(straight.parameters(), lr=1e-2, momentum=0.9, centered=True)
    _train(straight, opt, 3, dtype)
    saved = copy.deepcopy(opt.state_dict())
    assert all(v["master_param"].dtype == torch.float32 for v in saved["state"].values())
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), straight.parameters()):
            p.copy_(q)
    other = RMSprop(resumed.parameters(), lr=1e-2, momentum=0.9, centered=True)
    other.load_state_dict(saved)  # torch casts state to the params' dtype; the masters stay float32
    assert all(s["master_param"].dtype == s["square_avg"].dtype == torch.float32 for s in other.state.values())
    _train(straight, opt, 3, dtype, seed=5)
    _train(resumed, other, 3, dtype, seed=5)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["master_param"], other.state[q]["master_param"])
    source = _model(dtype)
    theirs = torch.optim.RMSprop(source.parameters(), lr=1e-2)  # torch's own 16-bit state loads too
    _train(source, theirs, 2, dtype)
    assert all(s["square_avg"].dtype == dtype for s in theirs.state.values())
    fresh = _model(dtype)
    mine = RMSprop(fresh.parameters(), lr=1e-2)
    mine.load_state_dict(theirs.state_dict())
    _train(fresh, mine, 2, dtype)
    assert all(s["master_param"].dtype == torch.float32 for s in mine.state.values())


def _zero_grad_step(model, opt):
    """A step with zero grads and no momentum: the weights must stay where they are."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = _snapshot(model.parameters())
    opt.step()
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("flatten", [False, True], ids=["per-tensor", "flatten"])
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_16_bit_weights_written_from_outside_are_where_the_next_step_starts(dtype, flatten):
    model, other = _model(dtype), _model(dtype, seed=7)
    opt = RMSprop(model.parameters(), lr=1e-2, flatten=flatten)
    _train(model, opt, 3, dtype)
    model.load_state_dict(other.state_dict())  # a restore: every weight written from outside
    assert _zero_grad_step(model, opt) == 0.0
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"].to(dtype), p)  # the master took the written value
    with torch.no_grad():
        next(model.parameters())[0].add_(1.0)  # an edit of one row
    assert _zero_grad_step(model, opt) == 0.0


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_a_16_bit_run_resumed_through_torch_optim_keeps_torchs_steps(dtype):
    model = _model(dtype)
    opt = RMSprop(model.parameters(), lr=1e-2)
    _train(model, opt, 3, dtype)
    theirs = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    theirs.load_state_dict(opt.state_dict())  # torch keeps (and casts) the masters it does not use
    _train(model, theirs, 3, dtype, seed=4)
    after_torch = _snapshot(model.parameters())
    opt.load_state_dict(theirs.state_dict())  # stale masters: the params are the truth
    assert _zero_grad_step(model, opt) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_torch))
    for p in model.parameters():  # a float32 detour and back: the old masters do not come back
        p.data = p.data.float()
    _train(model, opt, 2, torch.float32, seed=6)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    assert _zero_grad_step(model, opt) == 0.0


def test_16_bit_params_with_a_sparse_grad_or_a_bad_master_are_refused_with_nothing_written():
    table = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = RMSprop([w, table], lr=0.1)
    w.grad = torch.ones(3, dtype=torch.bfloat16)
    table.grad = torch.sparse_coo_tensor(
        torch.tensor([[1]]), torch.ones(1, 3, dtype=torch.bfloat16), (4, 3), check_invariants=True
    )
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: a torch.bfloat16 param with a sparse grad"):
        opt.step()
    assert torch.equal(w, torch.ones(3, dtype=torch.bfloat16)) and torch.equal(
        table, torch.ones(4, 3, dtype=torch.bfloat16)
    )
    table.grad = None
    opt.state[w]["master_param"] = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="its state 'master_param' is not a float32 CPU tensor of the param's shape"):
        opt.step()
    assert torch.equal(w, torch.ones(3, dtype=torch.bfloat16))
    del opt.state[w]["master_param"]  # made again from the param
    opt.step()
    assert torch.all(w < 1) and opt.state[w]["master_param"].dtype == torch.float32


# ------------------------------------------------------------------ bfloat16 params, stochastic rounding


def _bits(t):
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _reference_stochastic(params, steps, seed, case):
    """fastrms.reference's float32 step of each bfloat16 param from its widened grads, the
    result rounded stochastically with param j's key at each step: the params' bits."""
    wide = [reference.bfloat16_value(_bits(p)).reshape(p.shape) for p in params]
    state = [{} for _ in params]
    for t, grads in enumerate(steps, start=1):
        for j, g in enumerate(grads):
            if not state[j]:
                state[j] = {k: np.zeros(g.shape, np.float32) for k in ("square_avg", "grad_avg", "momentum_buffer")}
            new = reference.rmsprop_step(wide[j], g, state[j], t, 1e-2, beta=0.99, **case)
            bits = reference.bfloat16_stochastic_round(new, reference.stochastic_key(seed, j, t))
            wide[j] = reference.bfloat16_value(bits).reshape(g.shape)
    return wide


@pytest.mark.parametrize("case", [{}, {"momentum": 0.9, "centered": True}], ids=["plain", "momentum,centered"])
def test_stochastic_rounding_steps_bfloat16_params_in_place_as_the_reference_does(case):
    model = _model(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = RMSprop(model.parameters(), lr=1e-2, stochastic_rounding=True, seed=11, **case)
    g = torch.Generator().manual_seed(4)
    seen = []
    for _ in range(3):
        x, y = torch.randn(32, 8, generator=g).to(torch.bfloat16), torch.randn(32, 1, generator=g).to(torch.bfloat16)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        seen.append([reference.bfloat16_value(_bits(p.grad)).reshape(p.shape) for p in model.parameters()])
        opt.step()
    for p in start:
        p.grad = None
    want = _reference_stochastic(start, seen, 11, case)
    for p, w in zip(model.parameters(), want):
        np.testing.assert_array_equal(p.detach().float().numpy(), w)
        assert "master_param" not in opt.state[p] and opt.state[p]["square_avg"].dtype == torch.float32


def test_stochastic_rounding_resumes_from_a_state_dict_bit_for_bit_and_keeps_small_updates():
    straight, resumed = _model(torch.bfloat16), _model(torch.bfloat16)
    opt = RMSprop(straight.parameters(), lr=1e-2, stochastic_rounding=True, seed=3)
    _train(straight, opt, 2, torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), straight.parameters()):
            p.copy_(q)
    other = RMSprop(resumed.parameters(), lr=1e-2, stochastic_rounding=True, seed=3)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(straight, opt, 3, torch.bfloat16, seed=8)
    _train(resumed, other, 3, torch.bfloat16, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    # an update far below half a bfloat16 step: round to nearest loses it, stochastic rounding keeps it on average
    w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    sgd = RMSprop([w], lr=1e-4, stochastic_rounding=True, seed=1)
    w.grad = torch.ones_like(w)
    sgd.step()  # each element moves by lr / (sqrt(1 - alpha) + eps) = 1e-3: a quarter of the bfloat16 step below 1
    moved = float(1.0 - w.detach().float().mean())
    assert moved == pytest.approx(1e-4 / (0.01**0.5 + 1e-8), rel=0.05)


def test_stochastic_rounding_refuses_float16_and_a_bad_seed():
    with pytest.raises(TypeError, match="stochastic_rounding=True rounds bfloat16 params"):
        RMSprop([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))], stochastic_rounding=True)
    with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*64\), got -1"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], stochastic_rounding=True, seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False, got int"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], stochastic_rounding=1)


@pytest.mark.parametrize("stochastic", [False, True], ids=["master", "stochastic"])
def test_a_flattened_bfloat16_model_steps_as_the_unflattened_one_bit_for_bit(stochastic):
    """One buffer of bfloat16 params (their masters and state in float32 buffers) gives the
    per-tensor step's bits: every param with a grad (one dense call), and some without
    (the chunk table); state dicts load into it."""
    flat, loose = _model(torch.bfloat16), _model(torch.bfloat16)
    options = dict(lr=1e-2, momentum=0.9, stochastic_rounding=stochastic, seed=2)
    opt_flat = RMSprop(flat.parameters(), flatten=True, **options)
    opt_loose = RMSprop(loose.parameters(), **options)
    g = torch.Generator().manual_seed(6)
    for t in range(5):
        x, y = torch.randn(32, 8, generator=g).to(torch.bfloat16), torch.randn(32, 1, generator=g).to(torch.bfloat16)
        for model, opt in ((flat, opt_flat), (loose, opt_loose)):
            opt.zero_grad()
            first = model[0](x)
            if t == 2:  # backward does not reach the first layer: the chunk table over the rest
                first = first.detach()
            torch.nn.functional.mse_loss(model[1:](first).float(), y.float()).backward()
            opt.step()
    for opt, model in ((opt_flat, flat), (opt_loose, loose)):  # the first layer missed one step
        assert (opt.state[model[0].weight]["step"].item(), opt.state[model[2].weight]["step"].item()) == (4, 5)
    for p, q in zip(flat.parameters(), loose.parameters()):
        assert torch.equal(p, q), p.shape
        for name in ("square_avg", "momentum_buffer", *(() if stochastic else ("master_param",))):
            assert torch.equal(opt_flat.state[p][name], opt_loose.state[q][name]), name
    assert ("master_param" in opt_flat.state[next(flat.parameters())]) is not stochastic
    restart = RMSprop(flat.parameters(), flatten=True, **options)
    restart.load_state_dict(opt_loose.state_dict())
    assert all(restart.state[p]["square_avg"].dtype == torch.float32 for p in flat.parameters())
