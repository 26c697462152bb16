"""fastrms.core.checkpoint: hostile files and dicts are refused with one error type and nothing
changed; saves keep files' modes, refuse non-files and clean up after themselves."""

import io
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import assert_unchanged, snapshot

import fastrms


def _opt(shape=(4,), dtype=np.float64, **kw):
    opt = fastrms.RMSprop(np.ones(shape, dtype), 0.1, momentum=0.9, **kw)
    opt.step(np.full(shape, 0.5, dtype))
    return opt


def test_a_0d_params_checkpoint_loads_back(tmp_path):
    opt = _opt(shape=())
    opt.save(tmp_path / "c.npz")
    other = fastrms.RMSprop(np.ones(()), 0.1, momentum=0.9)
    other.load(tmp_path / "c.npz")
    assert other.step_count == 1 and other.square_avg.shape == () and other.square_avg == opt.square_avg


def _members(path):
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def _rewrite(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(value):
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def _hostile(path, kind):
    opt = _opt()
    opt.save(path)
    m = _members(path)
    if kind == "a .npy, not an .npz":
        np.save(path, np.ones(4))
        os.replace(str(path) + ".npy", path)
    elif kind == "a member that is not .npy":
        m["square_avg.0.npy"] = b"not an npy file at all"
        _rewrite(path, m)
    elif kind == "a member under another name":
        m["notes.txt"] = b"hello"
        _rewrite(path, m)
    elif kind == "a huge declared member":
        # a small file whose member claims 3.2 GB: header of a (400_000_000,) float64 array
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (400_000_000,)})
        m["square_avg.0.npy"] = header.getvalue() + b"\0" * 64
        _rewrite(path, m)
    elif kind == "a member declaring another shape":
        m["square_avg.0.npy"] = _npy(np.ones(5))
        _rewrite(path, m)
    elif kind == "an object array":
        m["square_avg.0.npy"] = _npy(np.ones(4)).replace(b"'<f8'", b"'|O' ")
        _rewrite(path, m)
    elif kind == "encrypted member":
        _rewrite(path, m)
        data = bytearray(path.read_bytes())
        offset = data.index(b"PK\x03\x04")  # set the 'encrypted' bit in the first local and central headers
        data[offset + 6] |= 1
        central = data.index(b"PK\x01\x02")
        data[central + 8] |= 1
        path.write_bytes(bytes(data))
    elif kind == "unknown compression":
        _rewrite(path, m)
        data = bytearray(path.read_bytes())
        central = data.index(b"PK\x01\x02")
        data[central + 10] = 99  # compression method 99 (AES) in the central directory
        path.write_bytes(bytes(data))
    elif kind == "step_count stored as 1.5":
        m["step_count.npy"] = _npy(np.float64(1.5))
        _rewrite(path, m)
    elif kind == "step_count stored as '5'":
        m["step_count.npy"] = _npy(np.str_("5"))
        _rewrite(path, m)
    elif kind == "beta stored as a string":
        m["beta.npy"] = _npy(np.str_("0.9"))
        _rewrite(path, m)
    elif kind == "negative square_avg":
        m["square_avg.0.npy"] = _npy(-np.ones(4))
        _rewrite(path, m)
    elif kind == "NaN square_avg":
        m["square_avg.0.npy"] = _npy(np.full(4, np.nan))
        _rewrite(path, m)
    elif kind == "NaN momentum buffer":
        m["momentum_buffer.0.npy"] = _npy(np.full(4, np.nan))
        _rewrite(path, m)
    elif kind == "a folder":
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(kind)


HOSTILE = [
    "a .npy, not an .npz",
    "a member that is not .npy",
    "a member under another name",
    "a huge declared member",
    "a member declaring another shape",
    "an object array",
    "encrypted member",
    "unknown compression",
    "step_count stored as 1.5",
    "step_count stored as '5'",
    "beta stored as a string",
    "negative square_avg",
    "NaN square_avg",
    "NaN momentum buffer",
    "a folder",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_every_hostile_file_is_one_valueerror_and_changes_nothing(kind, tmp_path):
    path = tmp_path / "c.npz"
    _hostile(path, kind)
    opt = _opt()
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load(path)
    assert_unchanged(opt, before)


def test_a_huge_declared_member_is_refused_before_it_is_allocated(tmp_path):
    import tracemalloc

    path = tmp_path / "c.npz"
    _hostile(path, "a huge declared member")
    assert path.stat().st_size < 10_000
    opt = _opt()
    tracemalloc.start()
    with pytest.raises(ValueError, match="declares|must be"):
        opt.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000_000


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("step_count", 5.7, "integer"),
        ("step_count", "5", "integer"),
        ("step_count", np.array(5), "integer"),
        ("step_count", -1, ">= 0"),
        ("square_avg.0", -np.ones(4), "negative"),
        ("square_avg.0", np.full(4, np.nan), "NaN"),
        ("momentum_buffer.0", np.array([0, np.nan, 0, 0]), "NaN"),
        ("square_avg.0", np.array([0, -np.inf, 0, 0]), "negative"),
        ("beta", "0.9", "beta must be a real number"),
        ("epsilon", 1e-46, "rounds to 0 in float32"),
    ],
)
def test_load_state_dict_checks_values_not_only_shapes(key, value, match):
    opt = _opt(dtype=np.float32)
    d = opt.state_dict()
    if isinstance(value, np.ndarray) and value.ndim:
        value = value.astype(np.float32)
    d[key] = value
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError), match=match):
        opt.load_state_dict(d)
    assert_unchanged(opt, before)


def test_save_takes_bytes_paths_as_load_does(tmp_path):
    opt = _opt()
    path = os.fsencode(tmp_path / "c.npz")
    opt.save(path)
    opt.load(path)


def test_save_takes_the_longest_legal_file_name(tmp_path):
    name = "c" * 251 + ".npz"  # 255 bytes: the usual limit of one path component
    opt = _opt()
    opt.save(tmp_path / name)
    opt.load(tmp_path / name)


def test_save_keeps_an_existing_files_permission_bits(tmp_path):
    path = tmp_path / "c.npz"
    opt = _opt()
    opt.save(path)
    os.chmod(path, 0o644)
    opt.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    new = tmp_path / "new.npz"
    opt.save(new)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~umask


def test_save_refuses_to_replace_anything_but_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opt = _opt()
    with pytest.raises(ValueError, match="not a regular file"):
        opt.save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(ValueError, match="folder"):
        opt.save(tmp_path)
    if os.path.exists("/dev/null") and os.access("/dev", os.W_OK):
        with pytest.raises(ValueError, match="not a regular file"):
            opt.save("/dev/null")
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_save_through_a_symlink_writes_the_file_it_points_to(tmp_path):
    real = tmp_path / "real.npz"
    link = tmp_path / "link.npz"
    opt = _opt()
    opt.save(real)
    link.symlink_to(real)
    opt.step(np.ones(4))
    opt.save(link)
    assert link.is_symlink()
    other = _opt()
    other.load(real)
    assert other.step_count == 2


def test_an_orphan_temporary_file_of_a_dead_process_is_cleaned_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    orphan = tmp_path / f".fastrms-{pid}-{'ab' * 8}.tmp"
    orphan.write_bytes(b"x" * 1000)
    mine = tmp_path / f".fastrms-{os.getpid()}-{'cd' * 8}.tmp"  # a live process's: kept
    mine.write_bytes(b"y")
    other = tmp_path / "unrelated.tmp"
    other.write_bytes(b"z")
    _opt().save(tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.npz", mine.name, other.name])
