"""Optimizer state on disk and in dicts: validation, and `.npz` files written atomically and
read with bounds.

A checkpoint is a plain `.npz` (a zip of `.npy` members, no pickles): the state arrays
(`"<name>.<i>"`), the step counts, the hyperparameters, a format version and a marker.
Reading it never unpickles and never allocates more than the optimizer it is loaded into
holds: every member's declared shape and dtype are checked against what that optimizer
expects before anything is decompressed. Whatever is wrong with a file, `read` raises
`ValueError` (`FileNotFoundError` when there is no file) and changes nothing.

Saving writes a temporary file in the target's folder, named `.fastrms-<pid>-<random>.tmp`
so that it is recognisable, flushes it to disk and renames it over the target, so a crash
never leaves a torn file under the target's name. The temporary file of a process that died
mid-save is removed by the next save into that folder (or by hand: any
`.fastrms-*.tmp` whose process is gone).
"""

import math
import os
import re
import secrets
import stat
import zipfile

import numpy as np

from ..kernels import storage
from . import spec
from .checks import STEP_MAX, count
from .options import (
    ALL_STATE_NAMES,
    BOOL_OPTIONS,
    CHOICE_OPTIONS,
    DEFAULTS,
    FLOAT_OPTIONS,
    OPTIONAL_OPTIONS,
    check_hyperparameters,
    formula,
)

FORMAT_VERSION = 1
MARKER_KEY, MARKER = "fastrms_checkpoint", "fastrms.RMSprop"
COUNT_KEYS = ("format_version", "step_count", "skipped_steps", "num_params")
REQUIRED_KEYS = (*COUNT_KEYS, *FLOAT_OPTIONS, *BOOL_OPTIONS)
_TMP = re.compile(r"^\.fastrms-(\d+)-[0-9a-f]{16}\.tmp$")
#: The dtypes a storage keeps state in besides the params' own (bfloat16 bits: uint16; 8-bit
#: blocks: uint8, 1-D, `_blocks_shape`).
_STORED = tuple(dict.fromkeys(c.dtype for c in storage.CODECS.values() if c.dtype is not None))
#: Room for a member's .npy header beyond its data.
_HEADER_ROOM = 4096


# ------------------------------------------------------------------ validation


def state_dict(slots, hyper, step_count, skipped_steps):
    """The NumPy optimizer's `state_dict` (see `fastrms.RMSprop.state_dict`): counts, the
    hyperparameters that are values, and a copy of each slot's state arrays, as they are
    stored (`state_storage="bfloat16"`: uint16 bit patterns shaped like the param;
    `"8bit"`: the 1-D uint8 array of its blocks, each 256 codes then the block's float32
    scale, `fastrms.kernels.storage.block_parts`)."""
    d = {
        "format_version": FORMAT_VERSION,
        "step_count": step_count,
        "skipped_steps": skipped_steps,
        "num_params": len(slots),
    }
    for key, value in hyper.items():
        if value is not None and not callable(value):
            d[key] = value
    kept = spec.of(hyper)
    for i, slot in enumerate(slots):
        for state in kept.state:
            a = getattr(slot, state.name)  # 8-bit blocks stay 1-D; else the values' shape
            d[f"{state.name}.{i}"] = a.copy() if kept.codec.block else a.reshape(state.values(slot.shape)).copy()
        if slot.row_step.size:  # dense_rows: the step that last touched each row
            d[f"row_step.{i}"] = slot.row_step.copy()
    return d


def validate(d, slots, current_hyper, dtypes, masters=False):
    """Check a state dict against an optimizer's `slots` (each with `shape` and
    `dtype`) and hyperparameters; returns `(step_count, skipped_steps, hyper, arrays)`
    with `arrays[(i, name)]` the value for slot `i`. With `masters` (16-bit params) each
    slot's float32 master (`master_param.<i>`, finite) is state too. Raises
    TypeError/ValueError naming the entry; never writes."""
    if not isinstance(d, dict):
        raise TypeError(f"state_dict must be a dict, got {type(d).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ValueError(f"state_dict is missing {missing}")
    if count("state_dict['format_version']", d["format_version"], minimum=0) != FORMAT_VERSION:
        raise ValueError(f"state_dict format_version must be {FORMAT_VERSION}, got {d['format_version']!r}")
    step_count = count("state_dict['step_count']", d["step_count"], minimum=0, maximum=STEP_MAX)
    skipped_steps = count("state_dict['skipped_steps']", d["skipped_steps"], minimum=0, maximum=STEP_MAX)
    if count("state_dict['num_params']", d["num_params"], minimum=0) != len(slots):
        raise ValueError(f"state_dict holds state for {d['num_params']} params, this optimizer has {len(slots)}")
    merged = {k: d[k] for k in (*FLOAT_OPTIONS, *BOOL_OPTIONS)}
    merged.update({k: d.get(k) for k in OPTIONAL_OPTIONS})  # stored only when set: absent is None (off)
    merged.update({k: d.get(k, DEFAULTS[k]) for k in CHOICE_OPTIONS})  # absent (older dicts): the default
    merged["learning_rate"] = d.get("learning_rate", current_hyper["learning_rate"])
    try:
        hyper = check_hyperparameters(merged, dtypes)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"state_dict: {exc}") from None
    mine, theirs = formula(current_hyper), formula(hyper)
    differ = [k for k in mine if mine[k] != theirs[k]]
    if differ:
        raise ValueError(
            "state_dict is of another variant: "
            + ", ".join(f"{k}={theirs[k]} (this optimizer: {mine[k]})" for k in differ)
        )
    expected = set(REQUIRED_KEYS) | ({"learning_rate", *OPTIONAL_OPTIONS, *CHOICE_OPTIONS} & d.keys())
    arrays = {}
    kept = spec.of(hyper)
    for i, slot in enumerate(slots):
        for state in kept.state:
            key = f"{state.name}.{i}"
            expected.add(key)
            a = d.get(key)
            if type(a) is not np.ndarray:
                raise ValueError(f"state_dict[{key!r}] must be a numpy.ndarray, got {type(a).__name__}")
            want = state.dtype(slot.dtype)
            shape = (kept.extent(slot.flat.size),) if kept.codec.block else state.values(slot.shape)
            if a.dtype != want or a.shape != shape:
                raise ValueError(
                    f"state_dict[{key!r}] must be {want} of shape {shape}, got {a.dtype} of shape {a.shape}"
                )
            if kept.codec.block:  # a scale is a block's largest finite magnitude: finite, >= 0
                scales = storage.block_parts(a, slot.flat.size)[1]
                if not (np.isfinite(scales) & (scales >= 0)).all():
                    raise ValueError(
                        f"state_dict[{key!r}] holds a negative or non-finite block scale; a block's scale is its "
                        "largest finite magnitude (>= 0)"
                    )
            _check_values(key, state.name, kept.decode(state.name, a, slot.flat.size))
            arrays[(i, state.name)] = a
    for i, slot in enumerate(slots if masters else ()):
        key = f"master_param.{i}"
        expected.add(key)
        a = d.get(key)
        if type(a) is not np.ndarray or a.dtype != slot.dtype or a.shape != slot.shape:
            got = f"{a.dtype} of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"state_dict[{key!r}] must be {slot.dtype} of shape {slot.shape}, got {got}")
        if not np.isfinite(a).all():
            raise ValueError(f"state_dict[{key!r}] holds NaN or infinite values")
        arrays[(i, "master_param")] = a
    if hyper["dense_rows"]:
        for i, slot in enumerate(slots):
            if len(slot.shape) != 2:
                continue
            key = f"row_step.{i}"
            expected.add(key)
            a = d.get(key)
            if type(a) is not np.ndarray or a.dtype != np.int64 or a.shape != (slot.shape[0],):
                got = f"{a.dtype} of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"state_dict[{key!r}] must be int64 of shape ({slot.shape[0]},), got {got}")
            if a.size and (a.min() < 0 or a.max() > step_count):
                raise ValueError(f"state_dict[{key!r}] holds step numbers outside [0, step_count={step_count}]")
            arrays[(i, "row_step")] = a
    unexpected = sorted(set(d) - expected, key=str)
    if unexpected:
        raise ValueError(f"state_dict has entries this optimizer does not use: {unexpected}")
    return step_count, skipped_steps, hyper, arrays


def _check_values(key, name, a):
    """State a run of finite grads can produce: no NaN, and `square_avg >= 0` (+inf
    included: a finite grad whose square overflows makes it so). The one rule of what `load`
    accepts and `save` writes (`loadable`)."""
    if np.isnan(a).any():
        raise ValueError(
            f"state_dict[{key!r}] holds NaN values; only a step with a NaN or infinite grad makes them "
            "(skip_nonfinite=True refuses such steps)"
        )
    if name == "square_avg" and (a < 0).any():
        raise ValueError(f"state_dict[{key!r}] holds negative values; a mean of squares is >= 0")


def loadable(d):
    """Refuse (ValueError, naming the entry) to save a state dict of this optimizer's that
    `validate` would refuse to load: one holding NaN state (left by a step with a NaN or
    infinite grad) or a non-finite master. A checkpoint `save` writes is one `load` reads."""
    for key, a in d.items():
        name = key.rpartition(".")[0] if isinstance(key, str) else ""
        if not isinstance(a, np.ndarray) or name not in (*ALL_STATE_NAMES, "master_param"):
            continue
        try:
            if name == "master_param":
                if not np.isfinite(a).all():
                    raise ValueError(f"state_dict[{key!r}] holds NaN or infinite values")
            else:
                _check_values(key, name, _decoded(name, a))
        except ValueError as exc:
            raise ValueError(f"not saved: {exc}; nothing was written") from None


def _decoded(name, a):
    """The values a state array of `state_dict` holds (native: itself; bfloat16 bits: uint16;
    8-bit blocks: uint8)."""
    if a.dtype.kind == "f":
        return a
    codec = storage.BLOCKWISE8 if a.dtype == np.uint8 else storage.BFLOAT16
    return storage.decode(codec, a, signed=name != "square_avg")


# ------------------------------------------------------------------ writing


def write(path, state_dict):
    """Write `state_dict` (arrays and Python scalars) to the `.npz` file `path`
    atomically. `path` may be str, bytes or os.PathLike; an existing file keeps its
    permission bits; anything but a regular file at `path` is refused (ValueError)."""
    path = _target(path)
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder {folder!r} of checkpoint {path!r} does not exist")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    arrays = {key: np.asarray(value) for key, value in state_dict.items()}
    arrays[MARKER_KEY] = np.asarray(MARKER)
    _remove_orphans(folder)
    tmp = os.path.join(folder, f".fastrms-{os.getpid()}-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask does not trim an existing file's bits
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _target(path):
    """The file a save writes: `path` decoded, through a symlink, never a non-file."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be str, bytes or os.PathLike, got {type(path).__name__}") from None
    if os.path.islink(path):
        path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise ValueError(f"checkpoint path {path!r} is {kind}; refusing to replace it")
    return path


def _remove_orphans(folder):
    """Remove temporary files left by saves whose process has died."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        except (PermissionError, OverflowError):
            pass


def _fsync_folder(folder):
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------ reading


def read(path, slots):
    """The state dict stored in `path`, for an optimizer over `slots`; ValueError for
    anything that is not such a checkpoint, FileNotFoundError when there is no file."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be str, bytes or os.PathLike, got {type(path).__name__}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a regular file")
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            return _read_members(z, slots)
    except ValueError as exc:
        raise ValueError(f"{path!r} is not a usable fastrms checkpoint: {exc}") from None
    except Exception as exc:  # zip, zlib, OS and NumPy errors of every kind: one documented type
        raise ValueError(f"{path!r} is not a readable fastrms checkpoint: {type(exc).__name__}: {exc}") from None


def _blocks_shape(slot):
    """The shape of a state member of `slot` kept in 8-bit blocks (`state_storage="8bit"`)."""
    return (storage.extent(storage.BLOCKWISE8, slot.flat.size),)


def _read_members(z, slots):
    expected = {key: ((), "iu") for key in COUNT_KEYS}
    expected.update({key: ((), "fiu") for key in (*FLOAT_OPTIONS, *OPTIONAL_OPTIONS, "learning_rate")})
    expected.update({key: ((), "b") for key in BOOL_OPTIONS})
    expected.update({key: ((), "U") for key in CHOICE_OPTIONS})
    expected[MARKER_KEY] = ((), "U")
    for i, slot in enumerate(slots):
        for name in ALL_STATE_NAMES:  # in the params' dtype, or as a storage keeps it (validate checks which)
            shapes = (slot.shape, _blocks_shape(slot), slot.shape[:1])  # elementwise, 8-bit blocks, rowwise
            expected[f"{name}.{i}"] = (shapes, (slot.dtype, *_STORED))
        expected[f"master_param.{i}"] = ((slot.shape,), (slot.dtype,))  # 16-bit params' masters (validate decides)
        if len(slot.shape) == 2:
            expected[f"row_step.{i}"] = (((slot.shape[0],),), (np.dtype(np.int64),))
    d = {}
    for info in z.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else None
        if key not in expected or key in d:
            raise ValueError(f"unexpected member {info.filename!r}")
        if info.flag_bits & 0x1:
            raise ValueError(f"member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"member {info.filename!r} uses an unsupported compression ({info.compress_type})")
        shape, kind = expected[key]
        arrays_of = isinstance(kind, tuple)  # the shapes and dtypes a state member may have
        largest = max(math.prod(s) for s in shape) * max(k.itemsize for k in kind) if arrays_of else 1024
        limit = _HEADER_ROOM + largest
        if info.file_size > limit:
            raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes, more than it can hold")
        with z.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                got_shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                got_shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"member {info.filename!r} has .npy version {version}")
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects")
            if arrays_of:
                if got_shape not in shape or dtype not in kind or fortran:
                    want = " or ".join(str(k) for k in dict.fromkeys(kind))
                    shapes = " or ".join(str(s) for s in shape)
                    raise ValueError(f"{key!r} must be {want} of shape {shapes}, got {dtype} of shape {got_shape}")
            elif got_shape != () or dtype.kind not in kind:
                raise ValueError(f"{key!r} must be a single value, got {dtype} of shape {got_shape}")
        with z.open(info) as fp:
            value = np.lib.format.read_array(fp, allow_pickle=False)
        d[key] = value if arrays_of else value.item()
    if d.pop(MARKER_KEY, None) != MARKER:
        raise ValueError(f"no {MARKER_KEY!r} marker: not written by fastrms.RMSprop.save")
    return d
