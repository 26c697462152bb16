"""fastrms.torch.RMSprop with sparse grads (`nn.Embedding(sparse=True)`), which
torch.optim.RMSprop refuses: lazy rows against the NumPy reference bit for bit, and
`dense_rows=True` against a dense torch.optim.RMSprop run."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from fastrms import reference  # noqa: E402
from fastrms.torch import RMSprop  # noqa: E402


def _sparse(idx, vals, shape):
    return torch.sparse_coo_tensor(idx[None], vals, shape, check_invariants=True)


def _reference_rows(table, state, idx, vals, t, opts):
    """The lazy rule in NumPy: duplicates summed in the order given, then the touched rows
    stepped by the reference formula; every other row untouched."""
    unique, inverse = np.unique(idx, return_inverse=True)
    summed = np.zeros((unique.size, table.shape[1]), table.dtype)
    for i, j in enumerate(inverse):
        summed[j] += vals[i]
    sub = {k: v[unique] for k, v in state.items()}
    table[unique] = reference.rmsprop_step(table[unique], summed, sub, t, **opts)
    for k, v in sub.items():
        state[k][unique] = v


@pytest.mark.parametrize(
    "torch_opts, ref_opts",
    [
        (dict(), dict()),
        (dict(momentum=0.9, centered=True), dict(momentum=0.9, centered=True)),
        (dict(weight_decay=0.1, maximize=True), dict(weight_decay=0.1, maximize=True)),
    ],
    ids=["plain", "centered_momentum", "weight_decay_maximize"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lazy_rows_are_the_reference_rule_bit_for_bit(torch_opts, ref_opts, dtype):
    n, width = 40, 6
    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(n, width, generator=gen, dtype=dtype))
    opt = RMSprop([weight], lr=0.02, alpha=0.95, eps=1e-6, **torch_opts)
    table = weight.detach().numpy().copy()
    state = {"square_avg": np.zeros_like(table)}
    if ref_opts.get("centered"):
        state["grad_avg"] = np.zeros_like(table)
    if ref_opts.get("momentum"):
        state["momentum_buffer"] = np.zeros_like(table)
    for t in range(1, 8):
        idx = torch.randint(0, n, (12,), generator=gen)  # duplicates included
        vals = torch.randn(12, width, generator=gen, dtype=dtype)
        weight.grad = _sparse(idx, vals, (n, width))
        opt.step()
        _reference_rows(table, state, idx.numpy(), vals.numpy(), t, dict(lr=0.02, beta=0.95, epsilon=1e-6, **ref_opts))
        assert weight.detach().numpy().tobytes() == table.tobytes()
        for name, v in state.items():
            assert opt.state[weight][name].numpy().tobytes() == v.tobytes(), name
    assert float(opt.state[weight]["step"]) == 7


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_dense_rows_train_an_embedding_as_torch_trains_it_densely(centered):
    """An nn.Embedding(sparse=True) model against the same model with dense grads and
    torch.optim.RMSprop: without momentum an untouched row does not move, so the forward
    pass reads the same values and the runs agree to float32 rounding."""
    torch.manual_seed(0)
    sparse, dense = torch.nn.Embedding(60, 8, sparse=True), torch.nn.Embedding(60, 8, sparse=False)
    dense.weight.data.copy_(sparse.weight.data)
    ours = RMSprop(sparse.parameters(), lr=0.01, dense_rows=True, centered=centered)
    theirs = torch.optim.RMSprop(dense.parameters(), lr=0.01, centered=centered)
    lazy_model = torch.nn.Embedding(60, 8, sparse=True)
    lazy_model.weight.data.copy_(sparse.weight.data)
    lazy = RMSprop(lazy_model.parameters(), lr=0.01, centered=centered)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        idx = torch.randint(0, 60 if step % 4 else 6, (16,), generator=gen)  # some rows wait many steps
        if step == 39:
            idx = torch.arange(60)  # every row touched: every row's state caught up
        for model, opt in ((sparse, ours), (dense, theirs), (lazy_model, lazy)):
            opt.zero_grad()
            (model(idx) - 0.5).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.state[sparse.weight]["square_avg"], theirs.state[dense.weight]["square_avg"],
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    assert not torch.allclose(lazy_model.weight, dense.weight, rtol=1e-5, atol=1e-6)  # the lazy rule differs
    assert ours.state[sparse.weight]["row_step"].dtype == torch.int64
    assert repr(ours).startswith("fastrms.torch.RMSprop (flatten=False, dense_rows=True;")
    assert set(ours.state_dict()["param_groups"][0]) == set(theirs.state_dict()["param_groups"][0])


def test_dense_rows_with_momentum_catch_up_the_drift_of_the_missed_steps():
    """With momentum an untouched row keeps moving in a dense run; the row step applies the
    closed form of the missed steps when a row is touched again (and before a dense grad),
    so with the same grads the runs agree."""
    n, width = 30, 4
    gen = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(n, width, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours = RMSprop([a], lr=0.01, momentum=0.9, centered=True, dense_rows=True)
    theirs = torch.optim.RMSprop([b], lr=0.01, momentum=0.9, centered=True)
    for step in range(30):
        idx = torch.randint(0, n, (6,), generator=gen)
        vals = torch.randn(6, width, generator=gen)
        a.grad = _sparse(idx, vals, (n, width)) if step < 29 else _sparse(idx, vals, (n, width)).to_dense()
        b.grad = a.grad.to_dense()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the last, dense step caught every row up first
    assert torch.equal(ours.state[a]["row_step"], torch.full((n,), 30))


def test_state_dicts_cross_with_torch_optim_rmsprop():
    n, width = 20, 3
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(n, width, generator=gen))
    ours = RMSprop([a], lr=0.01, dense_rows=True)
    for _ in range(3):
        a.grad = _sparse(torch.randint(0, n, (5,), generator=gen), torch.randn(5, width, generator=gen), (n, width))
        ours.step()
    b = torch.nn.Parameter(a.detach().clone())
    theirs = torch.optim.RMSprop([b], lr=0.01)
    theirs.load_state_dict(ours.state_dict())  # torch keeps row_step and ignores it
    torch.testing.assert_close(theirs.state[b]["square_avg"], ours.state[a]["square_avg"], rtol=0, atol=0)
    # a torch state dict (no row_step) loads into the sparse mode: every row counts as up to date
    c = torch.nn.Parameter(torch.randn(n, width, generator=gen))
    plain = torch.optim.RMSprop([c], lr=0.01)
    c.grad = torch.randn(n, width, generator=gen)
    plain.step()
    d = torch.nn.Parameter(c.detach().clone())
    resumed = RMSprop([d], lr=0.01, dense_rows=True)
    resumed.load_state_dict(plain.state_dict())
    d.grad = _sparse(torch.tensor([2]), torch.ones(1, width), (n, width))
    resumed.step()
    assert torch.equal(resumed.state[d]["row_step"][[0, 2]], torch.tensor([1, 2]))


def test_bad_sparse_grads_are_refused_with_nothing_written():
    n, width = 10, 3
    a = torch.nn.Parameter(torch.ones(n, width))
    v = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([a, v], lr=0.1)
    v.grad = torch.ones(4)
    cases = [
        (torch.ones(n, width).to_sparse(), "2 sparse and 0 dense dimensions"),
        (torch.sparse_coo_tensor(torch.tensor([[3, n]]), torch.ones(2, width), (n, width), check_invariants=False),
         r"its sparse grad's rows\[1\] = 10 is outside \[0, 10\)"),
        (torch.sparse_coo_tensor(torch.tensor([[-1]]), torch.ones(1, width), (n, width), check_invariants=False),
         "negative indices are not accepted"),
    ]  # fmt: skip
    for grad, error in cases:
        a.grad = grad
        with pytest.raises(ValueError, match=error):
            opt.step()
        assert torch.all(a == 1) and torch.all(v == 1)
        assert float(opt.state[a].get("step", 0)) == 0
    with pytest.raises(ValueError, match="dense_rows=True cannot be combined with coupled weight_decay"):
        RMSprop([a], lr=0.1, weight_decay=0.1, dense_rows=True)
    vector = torch.nn.Parameter(torch.ones(5))
    vector.grad = torch.ones(5).to_sparse()
    with pytest.raises(ValueError, match=r"rows of a 2-D param"):
        RMSprop([vector]).step()


def test_a_sparse_step_counts_once_and_bumps_the_version_counter():
    emb = torch.nn.Embedding(8, 2, sparse=True)
    opt = RMSprop(emb.parameters(), lr=0.1)
    saved = emb.weight * 1.0  # a graph that saved the weight before the step
    idx = torch.tensor([1, 1, 3])
    emb(idx).sum().backward()
    version = emb.weight._version
    opt.step()
    assert emb.weight._version > version
    assert float(opt.state[emb.weight]["step"]) == 1
    rows = emb.weight.detach()
    untouched = [0, 2, 4, 5, 6, 7]
    assert torch.equal(rows[untouched], saved.detach()[untouched])
    assert not torch.equal(rows[[1, 3]], saved.detach()[[1, 3]])
