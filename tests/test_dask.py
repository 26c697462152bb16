"""fastrms.dask: the lazy step over dask arrays, the optimizer on a LocalCluster, Zarr
checkpoints, and a worker killed mid-run (skipped, saying so, without dask)."""

import os
import signal

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]' distributed zarr)")
import dask  # noqa: E402
from conftest import assert_optional_import  # noqa: E402

import fastrms  # noqa: E402
from fastrms import schedules  # noqa: E402
from fastrms.dask import RMSprop, init_state, rmsprop_step  # noqa: E402

VARIANTS = [{}, {"momentum": 0.9, "centered": True}, {"weight_decay": 0.01, "maximize": True, "bias_correction": True}]


def _data(shape=(600, 20), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype), [rng.standard_normal(shape).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("chunks", [(600, 20), (100, 20), (77, 6)], ids=str)
def test_the_lazy_step_has_the_bits_of_fastrms_rmsprop_whatever_the_chunking(opts, chunks, dtype):
    p0, grads = _data(dtype=dtype)
    kept = p0.copy()
    ref = fastrms.RMSprop(p0.copy(), 0.01, **opts)
    param, state = da.from_array(p0, chunks=chunks), None
    for t in range(1, 7):
        g = grads[t % 3]
        ref.step(g)
        param, state = rmsprop_step(param, da.from_array(g, chunks=chunks), state, t, 0.01, **opts)
        param, state = dask.persist(param, state, scheduler="sync")
    np.testing.assert_array_equal(param.compute(), ref.params)
    np.testing.assert_array_equal(state["square_avg"].compute(), ref.square_avg)
    np.testing.assert_array_equal(p0, kept)  # input blocks are never written


def test_the_step_is_one_task_per_chunk():
    p0, grads = _data()
    param = da.from_array(p0, chunks=(50, 10))
    new_param, new_state = rmsprop_step(param, da.from_array(grads[0], chunks=(50, 10)), None, 1, 0.01, momentum=0.9)
    layers = new_param.__dask_graph__().layers
    step = [name for name in layers if name.startswith("fastrms-step-")]
    assert len(step) == 1 and len(layers[step[0]]) == param.npartitions == 24
    assert new_state["momentum_buffer"].chunks == param.chunks


def test_params_and_state_are_views_of_the_generation_not_copies():
    from fastrms.dask._cluster import _layer

    blocks = [np.arange(24.0).reshape(2, 3, 4) + 24 * i for i in range(2)]
    stacked = da.Array({("s", 0, i, 0): b for i, b in enumerate(blocks)}, "s", ((2,), (3, 3), (4,)), dtype=float)
    layer = _layer(stacked, 1)
    graph = dict(layer.__dask_graph__())
    for key in dask.core.flatten(layer.__dask_keys__()):
        chunk = dask.get(graph, key)
        np.testing.assert_array_equal(chunk, blocks[key[1]][1])
        assert np.shares_memory(chunk, blocks[key[1]])


def test_bad_inputs_are_refused_clearly():
    p0, grads = _data()
    param = da.from_array(p0, chunks=(100, 20))
    with pytest.raises(ValueError, match=r"grad must be chunked like param .* rechunk"):
        rmsprop_step(param, da.from_array(grads[0], chunks=(50, 20)), None, 1, 0.01)
    with pytest.raises(TypeError, match="grad must be a dask.array.Array"):
        rmsprop_step(param, grads[0], None, 1, 0.01)
    with pytest.raises(TypeError, match="learning_rate must be a number here"):
        rmsprop_step(param, param, None, 1, schedules.constant(0.1))
    with pytest.raises(ValueError, match="clip_global_norm is not supported over dask arrays"):
        rmsprop_step(param, param, None, 1, 0.1, clip_global_norm=1.0)
    with pytest.raises(ValueError, match="state must be a dict of exactly"):
        rmsprop_step(param, param, {"square_avg": param}, 1, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="epsilon must be"):
        RMSprop(param, epsilon=-1.0)
    with pytest.raises(TypeError, match="donate must be True or False, got 1"):
        RMSprop(param, donate=1)


def test_the_optimizer_matches_and_its_graph_does_not_grow():
    p0, grads = _data(dtype=np.float32)
    lr = schedules.exponential_decay(0.01, 0.9, 5)
    ref = fastrms.RMSprop(p0.copy(), lr, momentum=0.9, skip_nonfinite=True)
    opt = RMSprop(da.from_array(p0, chunks=(150, 20)), lr, momentum=0.9, skip_nonfinite=True)
    sizes = []
    for t in range(30):
        g = grads[t % 3].copy()
        if t == 4:
            g[3, 3] = np.nan
        ref.step(g)
        opt.step(da.from_array(g, chunks=(150, 20)))
        sizes.append(len(opt.params.__dask_graph__()))
    assert opt.step_count == ref.step_count == 29 and opt.skipped_steps == 1
    np.testing.assert_array_equal(opt.params.compute(), ref.params)
    np.testing.assert_array_equal(opt.state["momentum_buffer"].compute(), ref.momentum_buffer)
    assert set(sizes) == {2 * 4}  # per chunk: the computed generation block and its view; no lineage


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="distributed is not installed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _run(opt, grads, steps, start=0):
    chunks = opt.params.chunks
    for t in range(start, start + steps):
        opt.step(da.from_array(grads[t % 3], chunks=chunks))


def test_on_a_local_cluster_with_zarr_checkpoints(client, tmp_path):
    p0, grads = _data()
    ref = fastrms.RMSprop(p0.copy(), 0.01, centered=True, momentum=0.5)
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, centered=True, momentum=0.5)
    for t in range(6):
        ref.step(grads[t % 3])
    _run(opt, grads, 6)
    opt.save(tmp_path / "ckpt")
    saved_params = opt.params.compute()
    _run(opt, grads, 4, start=6)
    opt.save(tmp_path / "ckpt")  # a second save replaces the first generation
    assert len([e for e in os.listdir(tmp_path / "ckpt") if e.startswith("gen-")]) == 1
    for t in range(6, 10):
        ref.step(grads[t % 3])
    np.testing.assert_array_equal(opt.params.compute(), ref.params)
    resumed = RMSprop(da.from_array(opt.params.compute(), chunks=(100, 20)), 0.01, centered=True, momentum=0.5)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step_count == 10
    _run(resumed, grads, 3, start=10)
    _run(opt, grads, 3, start=10)
    np.testing.assert_array_equal(resumed.params.compute(), opt.params.compute())
    assert not np.array_equal(saved_params, opt.params.compute())


def test_hostile_or_mismatched_checkpoints_are_refused_with_nothing_changed(client, tmp_path):
    p0, grads = _data()
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9)
    _run(opt, grads, 2)
    opt.save(tmp_path / "good")
    before = (opt.step_count, opt.params.compute(), opt.state["momentum_buffer"].compute())
    (tmp_path / "empty").mkdir()
    (tmp_path / "escape").mkdir()
    (tmp_path / "escape" / "CURRENT").write_text("../good")
    other = RMSprop(da.from_array(p0[:300], chunks=(100, 20)), 0.01, momentum=0.9)
    other.save(tmp_path / "small")
    plain = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01)
    plain.save(tmp_path / "plain")
    cases = [
        (tmp_path / "empty", "no readable CURRENT"),
        (tmp_path / "escape", "not a generation of this folder"),
        (tmp_path / "small", "shapes or dtypes differ"),
        (tmp_path / "plain", "another variant"),
    ]
    for path, error in cases:
        with pytest.raises(ValueError, match=error):
            opt.load(path)
    with pytest.raises(FileNotFoundError):
        opt.load(tmp_path / "missing")
    after = (opt.step_count, opt.params.compute(), opt.state["momentum_buffer"].compute())
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])


#: How long a killed worker's replacement may take to start (a new process importing dask, numba
#: and fastrms): seconds when the machine is idle, more than a minute on a busy 2-core one.
RESTART_S = 180


def _save_then_kill_a_worker(client, tmp_path, p0, grads, before, after):
    """``before`` steps, a checkpoint in ``tmp_path / "ckpt"``, ``after`` more steps, then one of
    the two worker processes killed: ``(the optimizer, the params saved with the checkpoint)``."""
    opt = RMSprop(da.from_array(p0, chunks=(500, 20)), 0.01, momentum=0.9)
    _run(opt, grads, before)
    opt.save(tmp_path / "ckpt")
    saved = opt.params.compute()
    _run(opt, grads, after, start=before)
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    return opt, saved


def test_a_worker_killed_mid_run_fails_clearly_and_resumes_bit_identical(client, tmp_path):
    """Kill one of the two worker processes mid-run. The optimizer drops each step's lineage
    (so the scheduler does not grow), so Dask cannot recompute the lost chunks: the next
    step raises LostStateError (a RuntimeError) saying to resume, and the run resumed from
    the last Zarr checkpoint (with the params saved beside it) ends at the undisturbed bits."""
    from fastrms.dask import LostStateError

    p0, grads = _data(shape=(4000, 20))
    ref = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9)
    for t in range(12):
        ref.step(grads[t % 3])
    opt, params_at_5 = _save_then_kill_a_worker(client, tmp_path, p0, grads, 5, 2)
    with pytest.raises(LostStateError, match="resume from your last checkpoint"):
        _run(opt, grads, 5, start=7)
    client.wait_for_workers(2, timeout=RESTART_S)
    resumed = RMSprop(da.from_array(params_at_5, chunks=(500, 20)), 0.01, momentum=0.9)
    resumed.load(tmp_path / "ckpt")
    _run(resumed, grads, 7, start=5)
    np.testing.assert_array_equal(resumed.params.compute(), ref.params)


def test_the_schedulers_task_count_stays_flat_over_many_steps(client):
    p0, grads = _data()
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9)
    g = da.from_array(grads[0], chunks=(100, 20)).persist()
    counts = []
    for i in range(60):
        opt.step(g)
        if i in (9, 59):
            counts.append(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))
    # released tasks linger a little and the count wobbles (42 -> 66 seen); without the
    # re-keying it grows by ~25 tasks every step: ~1250 over these 50 steps
    assert counts[1] <= counts[0] + 150, counts


def test_grads_held_by_the_other_worker_or_computed_from_the_params_step_right_and_stay_flat(client):
    """A chunk whose grad lives on another worker than the generation's chunk goes the
    dependency path (the scheduler moves the grad; the result is re-keyed); grads computed
    lazily from ``opt.params`` depend on the old generation, yet no lineage piles up."""
    p0, grads = _data()
    workers = sorted(client.scheduler_info()["workers"])
    ref = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9)
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9)
    for t in range(4):
        g = client.persist(da.from_array(grads[t % 3], chunks=(100, 20)), workers=[workers[t % 2]])
        ref.step(grads[t % 3])
        opt.step(g)
    np.testing.assert_array_equal(opt.params.compute(), ref.params)
    counts = []
    for i in range(40):
        ref.step(ref.params * 0.5 - 0.1)
        opt.step(opt.params * 0.5 - 0.1)  # lazy: depends on the generation being replaced
        if i in (4, 39):
            counts.append(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))
    np.testing.assert_array_equal(opt.params.compute(), ref.params)
    np.testing.assert_array_equal(opt.state["momentum_buffer"].compute(), ref.momentum_buffer)
    assert counts[1] <= counts[0] + 150, counts  # ~60 tasks a step would pile up without re-keying


def _addresses(client, arrays):
    """``key -> (worker, address)`` of each chunk of the persisted ``arrays``, read on the
    workers (addresses are per process)."""
    from distributed import futures_of

    def read(keys, dask_worker=None):
        return {k: dask_worker.data[k].__array_interface__["data"][0] for k in keys if k in dask_worker.data}

    out = {}
    for worker, found in client.run(read, [f.key for f in futures_of(arrays)]).items():
        out.update({k: (worker, a) for k, a in found.items()})
    return out


def test_donating_steps_write_over_the_old_generation_with_the_same_bits(client):
    """With ``donate=True`` a chunk's step writes the new generation over the old chunk (the
    same memory on the worker) and gives the bits of fastrms.RMSprop; without it, never. The
    grads are computed on the workers from the params, the usual loop."""
    p0, _ = _data()
    ref = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9, centered=True)
    opts = {d: RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9, centered=True, donate=d)
            for d in (False, True)}  # fmt: skip
    reused = {False: 0, True: 0}
    for t in range(6):
        ref.step(ref.params * 0.5 - 0.1)
        for donate, opt in opts.items():
            before = set(_addresses(client, opt._gens).values())
            opt.step((opt.params * 0.5 - 0.1).persist())
            if t >= 1:  # the first step may still move chunks to meet their grads
                reused[donate] += len(before & set(_addresses(client, opt._gens).values()))
    for opt in opts.values():
        np.testing.assert_array_equal(opt.params.compute(), ref.params)
        np.testing.assert_array_equal(opt.state["grad_avg"].compute(), ref.grad_avg)
        np.testing.assert_array_equal(opt.state["momentum_buffer"].compute(), ref.momentum_buffer)
    assert reused[False] == 0
    assert reused[True] >= 5 * 6 // 2, reused  # 6 chunks a step: most of them in place


def test_a_donating_step_leaves_a_chunk_others_still_see_alone(client):
    """Views of three of the six chunks persisted on the workers keep those chunks out of
    place: they keep the old values; the other three are written over; the step is right."""
    from distributed import wait

    p0, _ = _data()
    ref = fastrms.RMSprop(p0.copy(), 0.01)
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, donate=True)
    for _ in range(2):
        ref.step(ref.params * 0.5 - 0.1)
        opt.step((opt.params * 0.5 - 0.1).persist())
    kept = opt.params.blocks[:3].persist()  # views of the first three chunks, held on the workers
    wait(kept)
    old = ref.params.copy()
    before = _addresses(client, opt._gens)
    ref.step(ref.params * 0.5 - 0.1)
    opt.step((opt.params * 0.5 - 0.1).persist())
    np.testing.assert_array_equal(kept.compute(), old[:300])
    np.testing.assert_array_equal(opt.params.compute(), ref.params)
    after = _addresses(client, opt._gens)
    reused = {k[2] for k, a in after.items() if a in set(before.values())}  # (name, 0, row block, 0)
    assert reused <= {3, 4, 5} and reused, reused


def test_a_failed_donating_step_leaves_the_optimizer_refusing_to_go_on(client, monkeypatch, tmp_path):
    """The old generation may be half overwritten: step, params, state, save and load all
    raise LostStateError saying to resume in a new optimizer."""
    from fastrms import dask as fd
    from fastrms.dask import _cluster as _dask_cluster

    p0, grads = _data()
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, donate=True)
    opt.save(tmp_path / "ckpt")
    calls = []

    def failing_wait(client, futures, watch, errors=True):
        calls.append(1)
        if len(calls) == 2:  # the grads' wait passes; the step's own fails
            raise OSError("connection lost")

    monkeypatch.setattr(_dask_cluster, "_wait", failing_wait)  # where the step waits for the cluster
    with pytest.raises(fd.LostStateError, match="OSError: connection lost"):
        opt.step(da.from_array(grads[0], chunks=(100, 20)))
    monkeypatch.undo()
    uses = [lambda: opt.step(da.from_array(grads[0], chunks=(100, 20))), lambda: opt.params, lambda: opt.state,
            lambda: opt.save(tmp_path / "other"), lambda: opt.load(tmp_path / "ckpt")]  # fmt: skip
    for use in uses:
        with pytest.raises(fd.LostStateError, match="a donating step failed .* in a new RMSprop"):
            use()


def test_only_a_chunk_nothing_else_can_see_is_written_over():
    """The checks behind ``donate`` on a worker, with a stand-in for the worker's state."""
    from types import SimpleNamespace

    from fastrms.dask import _blocks as fd

    def holder(data, key, grad, waiting=()):
        worker = SimpleNamespace(state=SimpleNamespace(tasks={key: SimpleNamespace(dependents=list(waiting))}))
        block = data[key]
        refs = fd._refs(block)
        return fd._sole_holder(worker, key, block, grad, refs)

    grad = np.zeros(100, np.float32)
    data = {"chunk": fd._output((2, 100), np.float32)}
    assert holder(data, "chunk", grad)
    view = data["chunk"][0]  # a view held anywhere in the process
    assert not holder(data, "chunk", grad)
    del view
    data["alias"] = data["chunk"]  # another key names it (a transfer holds it likewise)
    assert not holder(data, "chunk", grad)
    del data["alias"]
    assert holder(data, "chunk", grad)
    assert not holder(data, "chunk", grad, waiting=[SimpleNamespace(state="ready")])
    assert holder(data, "chunk", grad, waiting=[SimpleNamespace(state="memory")])
    assert not holder(data, "chunk", data["chunk"][1])  # the grad is the chunk's own memory
    assert not holder({"own": np.zeros((2, 100), np.float32)}, "own", grad)  # not a pool buffer
    data["chunk"].flags.writeable = False
    assert not holder(data, "chunk", grad)


def test_a_chunk_missing_from_its_worker_is_flagged_for_the_dependency_path(client):
    from fastrms.dask._blocks import _Key, _Missing, _pulled_step

    f = client.submit(_pulled_step, _Key(("no-such-chunk", 0)), _Key(("no-such-grad", 0)), ["square_avg"], 1,
                      0.01, 0.9, 1e-8, {}, pure=False)  # fmt: skip
    with pytest.raises(_Missing):
        f.result()


def test_task_outputs_reuse_only_buffers_nothing_refers_to():
    from fastrms.dask import _blocks as fd

    fd._BUFFERS.clear()
    a = fd._output((3, 1000), np.float32)
    first = id(a.base)
    view = a[1]
    del a
    b = fd._output((3, 1000), np.float32)
    assert id(b.base) != first  # a view of the first is still alive
    del view
    c = fd._output((3, 1000), np.float32)
    assert id(c.base) == first and c.shape == (3, 1000) and c.dtype == np.float32 and c.flags.c_contiguous
    del b, c
    d = fd._output((1, 1000), np.float32)  # no idle one of its size: a new one; idle bytes beyond busy freed
    assert [x.nbytes for x in fd._BUFFERS] == [4000]
    kept = id(d.base)
    del d
    e = fd._output((1, 1000), np.float32)
    assert id(e.base) == kept
    assert fd.release_buffers() == 0  # e is busy
    del e
    assert fd.release_buffers() == 4000 and fd._BUFFERS == []


def test_a_task_runs_its_kernel_on_at_most_omp_num_threads(monkeypatch):
    import numba

    from fastrms.dask import _blocks as fd

    before = numba.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with fd._task_threads():
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    with fd._task_threads():
        assert numba.get_num_threads() == before


def test_importing_fastrms_does_not_import_dask_and_a_missing_dask_is_one_clear_error():
    message = "fastrms.dask needs Dask; install it with: pip install 'dask[array]' distributed zarr"
    assert_optional_import("fastrms.dask", "dask", message)


def _chunk_files(folder, component):
    return sorted(p for p in (folder / component).rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray"))


def _generation(path):
    return path / (path / "CURRENT").read_text().strip()


@pytest.mark.parametrize("damage", ["deleted", "truncated", "junk", "zeros of the same size"])
def test_a_checkpoint_with_a_damaged_chunk_is_refused_with_nothing_changed(tmp_path, damage):
    """Zarr reads a missing chunk as its fill value, and a junk one as a codec error: load
    checks each chunk against the manifest save wrote (and NaN fills a missing one)."""
    p0, grads = _data()
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9)
    _run(opt, grads, 2)
    opt.save(tmp_path / "ckpt")
    files = _chunk_files(_generation(tmp_path / "ckpt"), "square_avg.0")
    assert len(files) == 6  # every chunk was written
    victim = files[3]
    data = victim.read_bytes()
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "junk":
        victim.write_bytes(os.urandom(len(data)))
    else:
        victim.write_bytes(bytes(len(data)))
    fresh = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01, momentum=0.9)
    before = fresh.state["square_avg"].compute()
    with pytest.raises(ValueError, match="checkpoint"):
        fresh.load(tmp_path / "ckpt")
    assert fresh.step_count == 0
    np.testing.assert_array_equal(fresh.state["square_avg"].compute(), before)


def test_a_pointer_that_is_a_fifo_or_a_generation_linked_outside_is_refused(tmp_path):
    p0, grads = _data()
    opt = RMSprop(da.from_array(p0, chunks=(100, 20)), 0.01)
    _run(opt, grads, 1)
    opt.save(tmp_path / "outside")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "CURRENT")
    with pytest.raises(ValueError, match="not a regular file"):  # not a read that blocks forever
        opt.load(fifo)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "gen-000000001-abcd").symlink_to(_generation(tmp_path / "outside"))
    (linked / "CURRENT").write_text("gen-000000001-abcd")
    with pytest.raises(ValueError, match="is a link"):
        opt.load(linked)
    opt.load(tmp_path / "outside")  # the real one still loads


def test_arrays_of_unknown_chunk_sizes_are_refused_at_construction():
    x = da.from_array(np.arange(10.0), chunks=5)
    unknown = x[x > 3]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        RMSprop(unknown, 0.01)
    opt = RMSprop(da.zeros(6, chunks=3), 0.01)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        opt.step(unknown)


def test_after_a_worker_dies_save_and_params_raise_within_seconds_and_the_last_checkpoint_stays(client, tmp_path):
    import time

    from fastrms.dask import LostStateError

    p0, grads = _data(shape=(4000, 20))
    opt, params_at_3 = _save_then_kill_a_worker(client, tmp_path, p0, grads, 3, 1)
    time.sleep(1.0)  # let the scheduler notice
    start = time.monotonic()
    with pytest.raises(LostStateError):
        opt.save(tmp_path / "ckpt")
    with pytest.raises(LostStateError):
        opt.params.compute()
    assert time.monotonic() - start < 30
    client.wait_for_workers(2, timeout=RESTART_S)
    resumed = RMSprop(da.from_array(params_at_3, chunks=(500, 20)), 0.01, momentum=0.9)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step_count == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("gen-")) == [
        _generation(tmp_path / "ckpt").name
    ]


def test_dask_refuses_a_state_storage_it_does_not_keep():
    p = da.ones(6, chunks=3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^fastrms.dask.RMSprop keeps the state in the params' dtype"):
        RMSprop(p, 0.1, state_storage="bfloat16")
    with pytest.raises(ValueError, match=r"^fastrms.dask.init_state\(\) keeps the state"):
        init_state(p, state_storage="bfloat16")
    with pytest.raises(ValueError, match=r"^rmsprop_step\(\) keeps the state"):
        rmsprop_step(p, p, {"square_avg": p}, 1, 0.1, state_storage="bfloat16")


def test_state_nbytes_is_the_state_arrays_of_every_param():
    params = [da.zeros((40, 30), dtype=np.float32, chunks=(20, 30)), da.zeros(50, dtype=np.float64, chunks=25)]
    assert RMSprop(params, 0.01).state_nbytes == 40 * 30 * 4 + 50 * 8
    assert RMSprop(params, 0.01, momentum=0.9, centered=True).state_nbytes == 3 * (40 * 30 * 4 + 50 * 8)
