"""DTensor params (`fastrms.torch._tensors.local`) and the guard over a mesh
(`fastrms.torch._guard`): FSDP2's `fully_shard` on 2 CPU ranks (gloo on 127.0.0.1, the
processes started and stopped here) against torch.optim.RMSprop on the same sharded model,
with torch's and fastrms's clipping, a NaN on one rank, and a DCP save/restore mid-run;
DTensors of one rank stepped as torch steps them (a crash before: a DTensor's data_ptr() is
0, so each runs in a subprocess); every other tensor subclass refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
if not torch.distributed.is_available():  # pragma: no cover - torch builds without distributed
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

from fastrms.torch import RMSprop  # noqa: E402

_FSDP = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch import nn

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from fastrms.torch import RMSprop

    OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)


    def build():
        torch.manual_seed(0)
        # 13 and 5 rows over 2 ranks: uneven shards
        model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 1))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model


    def train(model, opt, steps, seed, torch_clip=False):
        g = torch.Generator().manual_seed(seed * 10 + rank)  # each rank its own data
        for _ in range(steps):
            x = torch.randn(4, 7, generator=g)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if torch_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()


    def full(model):
        return [p.full_tensor().detach().clone() for p in model.parameters()]


    def gap(a, b):
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))  # relative to the tensor's scale


    report = {}
    for mode in ("plain", "torch clip_grad_norm_", "fastrms clip_global_norm"):
        ours, theirs = build(), build()
        opt = RMSprop(ours.parameters(), **OPTIONS, clip_global_norm=0.05 if mode.startswith("fastrms") else None)
        ref = torch.optim.RMSprop(theirs.parameters(), **OPTIONS)
        train(ours, opt, 6, 1, torch_clip=mode.startswith("torch"))
        train(theirs, ref, 6, 1, torch_clip=mode != "plain")
        states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        report[mode] = {
            "gap": gap(full(ours), full(theirs)),
            "moved": gap(full(ours), full(build())) > 1e-3,
            "state DTensors placed like their params": all(
                isinstance(t, DTensor) and t.placements == p.placements for p, s in opt.state.items()
                for k, t in s.items() if k != "step"),  # fmt: skip
            "states": len(states),
            "norm": opt.last_grad_norm,
            "torch's norm": float(torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()]).full_tensor()),
        }
    # skip_nonfinite: a NaN in one rank's shard skips the step on every rank
    model = build()
    opt = RMSprop(model.parameters(), **OPTIONS, skip_nonfinite=True)
    train(model, opt, 2, 1)
    before = full(model)
    opt.zero_grad()
    model(torch.randn(4, 7)).pow(2).mean().backward()
    if rank == 1:
        next(model.parameters()).grad.to_local()[0, 0] = float("nan")
    opt.step()
    unmoved = all(torch.equal(a, b) for a, b in zip(full(model), before))
    report["skipped on every rank"] = opt.skipped_steps == 1 and unmoved
    # DCP: save mid-run, restore into a fresh model and optimizer, go on: the same as going straight on
    model = build()
    opt = RMSprop(model.parameters(), **OPTIONS, clip_global_norm=0.05)
    train(model, opt, 3, 1)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=out + ".dcp")  # fmt: skip
    train(model, opt, 3, 2)
    straight = full(model)
    fresh = build()
    opt2 = RMSprop(fresh.parameters(), **OPTIONS, clip_global_norm=0.05)
    loaded = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(loaded, checkpoint_id=out + ".dcp")
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, opt2, loaded["optim"])
    train(fresh, opt2, 3, 2)
    report["dcp resumed equals straight"] = all(torch.equal(a, b) for a, b in zip(full(fresh), straight))
    report["dcp step"] = [float(s["step"]) for s in opt2.state.values()]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
    """
)

_ONE_RANK = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from fastrms.torch import RMSprop

    store, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))

    def make():
        torch.manual_seed(0)
        return [
            torch.nn.Parameter(distribute_tensor(torch.randn(301, 15), mesh, [Shard(0)])),
            torch.nn.Parameter(distribute_tensor(torch.randn(0, 3), mesh, [Shard(0)])),  # an empty shard
            torch.nn.Parameter(distribute_tensor(torch.randn(9), mesh, [Replicate()])),
            torch.nn.Parameter(torch.randn(4)),  # a plain param beside them
        ]

    ours, theirs = make(), make()
    opt = RMSprop(ours, lr=0.01, momentum=0.9, centered=True)
    ref = torch.optim.RMSprop(theirs, lr=0.01, momentum=0.9, centered=True)
    for s in range(4):
        torch.manual_seed(10 + s)
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            if isinstance(p, DTensor):
                p.grad = distribute_tensor(g, mesh, p.placements)
                q.grad = distribute_tensor(g.clone(), mesh, q.placements)
            else:
                p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    report = {
        "gap": max(float((full(p) - full(q)).abs().max() / full(q).abs().max())
                   for p, q in zip(ours, theirs) if p.numel()),
        "state": [sorted(k for k, t in opt.state[p].items() if isinstance(t, DTensor)) for p in ours],
        "torch's state": [sorted(k for k, t in ref.state[q].items() if isinstance(t, DTensor)) for q in theirs],
        "steps": [float(opt.state[p]["step"]) for p in ours],
    }
    bf = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4).bfloat16(), mesh, [Shard(0)]))
    low = RMSprop([bf], lr=0.01)
    bf.grad = distribute_tensor(torch.zeros(6, 4).bfloat16(), mesh, [Shard(0)])
    low.step()
    with torch.no_grad():
        bf.to_local().add_(1.0)  # written from outside: the next step starts there
    written = bf.full_tensor().clone()
    low.step()
    report["16-bit"] = {
        "master is a DTensor": isinstance(low.state[bf]["master_param"], DTensor),
        "written weights kept": bool(torch.equal(bf.full_tensor(), written)),
    }
    bad = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
    refusals = {}
    try:
        RMSprop([bad], flatten=True)
    except TypeError as exc:
        refusals["flatten"] = str(exc)
    opt = RMSprop([bad], lr=0.1)
    bad.grad = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
    try:
        opt.step()
    except ValueError as exc:
        refusals["grad placed otherwise"] = str(exc)
    report["refusals"] = refusals
    report["untouched"] = bool(torch.equal(bad.full_tensor(), torch.nn.Parameter(bad.detach()).full_tensor()))
    with open(out, "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    os._exit(0)
    """
)


def _env():
    # the rendezvous is a file; gloo's own connections stay on the loopback interface
    return {**os.environ, "NUMBA_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def test_dtensors_of_one_rank_are_stepped_as_torch_steps_them_with_dtensor_state(tmp_path):
    script, out = tmp_path / "one.py", tmp_path / "one.json"
    script.write_text(_ONE_RANK)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(out)], env=_env(),
                         timeout=300, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gap"] < 1e-6
    assert report["state"] == report["torch's state"] == [["grad_avg", "momentum_buffer", "square_avg"]] * 3 + [[]]
    assert report["steps"] == [4.0] * 4
    assert report["16-bit"] == {"master is a DTensor": True, "written weights kept": True}
    assert "flatten=True moves plain params" in report["refusals"]["flatten"]
    assert "its grad is placed (Replicate(),)" in report["refusals"]["grad placed otherwise"]


def test_fsdp2_on_two_cpu_ranks_matches_torch_optim_and_resumes_from_dcp(tmp_path):
    script, out = tmp_path / "fsdp.py", tmp_path / "fsdp.json"
    script.write_text(_FSDP)
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", store, str(out)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        errors = [p.communicate(timeout=300)[1].decode()[-3000:] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), errors
    report = json.loads(out.read_text())
    for mode in ("plain", "torch clip_grad_norm_", "fastrms clip_global_norm"):
        assert report[mode]["gap"] < 1e-6 and report[mode]["moved"], (mode, report[mode])
        assert report[mode]["state DTensors placed like their params"] and report[mode]["states"] == 18
    ours = report["fastrms clip_global_norm"]
    assert abs(ours["norm"] - ours["torch's norm"]) <= 1e-6 * ours["torch's norm"]  # summed over both ranks
    assert report["skipped on every rank"]
    assert report["dcp resumed equals straight"] and report["dcp step"] == [6.0] * 6


class _Wrapper(torch.Tensor):
    """A wrapper subclass: no storage of its own (its data_ptr() is not its values')."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_other_tensor_subclasses_are_refused_naming_the_param_at_construction_and_at_step():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a .*_Wrapper, a tensor subclass"):
        RMSprop([torch.nn.Parameter(torch.ones(2)), _Wrapper(torch.ones(3))])
    p = torch.nn.Parameter(torch.ones(2))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.param_groups[0]["params"].append(_Wrapper(torch.ones(3)))
    with pytest.raises(TypeError, match=r"\['params'\]\[1\] is a .*_Wrapper"):
        opt.step()
    assert torch.equal(p, torch.ones(2))

    class Plain(torch.nn.Parameter):  # a Python subclass of a plain tensor: its memory is its values
        pass

    q = Plain(torch.ones(2))
    opt = RMSprop([q], lr=0.1)
    q.grad = torch.ones(2)
    opt.step()
    assert torch.all(q < 1)
