"""fastrms.bench.master: a bfloat16 model's step, fastrms.torch against torch's recipe over
float32 masters (the copies by hand) and torch.compile of it."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms import cli  # noqa: E402
from fastrms.bench import master  # noqa: E402


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_every_implementation_applies_the_same_step(dtype_name):
    """After three steps of each, the params agree to one 16-bit rounding of their masters
    (fastrms's float32 arithmetic differs from torch's in the last bits only), and they moved."""
    sizes = (1000, 37, 5000)
    calls, first = master.steps(sizes, dtype_name, compiled=False)
    assert set(calls) == {"fastrms", "torch"} | ({"fastrms, stochastic"} if dtype_name == "bfloat16" else set())
    assert first is None
    start = [p.detach().clone() for p in master._model(sizes, getattr(torch, dtype_name))]
    for _ in range(3):
        for step in calls.values():
            step()
    if "fastrms, stochastic" in calls:  # its params: the master's within a bfloat16 step per step taken,
        rounded = calls["fastrms, stochastic"].__self__.param_groups[0]["params"]  # at the largest magnitude
        for p, q in zip(rounded, calls["fastrms"].__self__.param_groups[0]["params"]):  # passed (a step
            p, q = p.detach().float(), q.detach().float()  # moves a weight by up to lr / sqrt(1 - alpha) = 1e-2)
            largest = torch.maximum(p.abs(), q.abs()) + 3e-2
            assert ((p - q).abs() <= 3 * torch.exp2(torch.floor(torch.log2(largest)) - 7)).all()
    ours = calls["fastrms"].__self__.param_groups[0]["params"]
    theirs = calls["torch"].__defaults__[3]  # the recipe's params' data
    for p, q, p0 in zip(ours, theirs, start):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p.float(), q.float(), rtol=2.0**-7, atol=1e-6)


def test_bench_master_prints_each_implementation_against_fastrms(capsys, monkeypatch):
    monkeypatch.setattr(master, "SHAPES", {"2 x 3000": (3000, 3000)})
    assert cli.main(["bench", "--master", "--no-compile", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 x 3000 (6000 params)" in out and "x fastrms" in out and "torch " in out and "compile" not in out
