"""One decorator for every kernel: Numba's options, and an on-disk cache that hits in every
new process and is never stale.

Numba's own cache keys a function on its own source file and, for a closure, on the pickled
cells: a cell holding another dispatcher pickles differently in each process, so every loop
shell built as a closure (each variant's dense, segment and row shells) missed in every new
process and added a file to the cache each time; and a function whose file did not change
kept its machine code after a change to the element function it inlines. `KernelCache`
is Numba's `FunctionCache` with two things replaced:

- the **stamp** that decides whether an index is fresh: a hash of every module of this package
  (all of them are compiled into every shell), of the function's own file, of fastrms's
  `_version.py` and of the Numba and llvmlite versions (`SOURCE_HASH`); a change to any
  of them, whatever the file's size or mtime, makes every entry stale;
- the **key** within an index: the signature, Numba's target description (CPU name and
  features) and the closure's cells described by value, a dispatcher by its module, name and
  line (its code is in the stamp), so the same variant has the same key in every process.

The **folder** follows the content too, not the install path (Numba names its folders after
the source's absolute path, so a second install of the same fastrms compiled everything
again): under `NUMBA_CACHE_DIR`, or Numba's user-wide cache when the package's own folder is
not writable, the kernels live in `fastrms-<SOURCE_HASH[:16]>`, which every install of the
same source with the same Numba and llvmlite shares (the key within it names the CPU). Where
no `NUMBA_CACHE_DIR` is set and the package's folder is writable, they stay in its
`__pycache__`, as Numba puts them.

The cache stays bounded: when an index is written, the data files it no longer names, and
the indexes (with their data) of the same source file that carry another stamp, are removed;
of the `fastrms-*` folders under one root, the `KEEP_FOLDERS` used last are kept.
Index and data files carry a digest of their bytes: a corrupt, truncated or foreign file
is never unpickled, the kernel is compiled instead. A loaded entry hands its reload hooks on
to its library (`KernelCache.load_overload`), so callers compiled against a cached parallel
kernel, ours or a user's, start Numba's threads.
"""

import contextlib
import hashlib
import itertools
import os
import pickle
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # no advisory file locks (Windows): saves are not serialised between processes there
    fcntl = None  # type: ignore[assignment]

import llvmlite
import numba
from numba import njit
from numba.core import config
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    IndexDataCacheFile,
    InTreeCacheLocator,
    _CacheLocator,
)
from numba.core.dispatcher import Dispatcher
from numba.core.serialize import dumps
from numba.misc.appdirs import AppDirs

#: Numba options of every kernel: NumPy's division semantics (no ZeroDivisionError branch in
#: the loop), the GIL released, no fastmath (its no-NaN/no-Inf flags break the non-finite
#: check and change results).
JIT_OPTIONS = dict(error_model="numpy", nogil=True)

#: "on" when compiled kernels are cached on disk, else why not. Caching is on by default:
#: without it every new process compiles each variant it uses again (0.15 s serial, 0.4 s
#: parallel). Numba looks for a writable place (next to the package, then the user-wide
#: cache, or NUMBA_CACHE_DIR, which fastrms never overrides); where there is none (a
#: read-only install with no writable home), the kernels are compiled in memory instead.
CACHE_STATUS = "on"

_HERE = Path(__file__).resolve().parent


def _source_hash():
    h = hashlib.sha256()
    for path in sorted(_HERE.glob("*.py")) + [_HERE.parent / "_version.py"]:
        h.update(path.name.encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:  # no _version.py beside a vendored copy of the kernels
            h.update(b"-")
    h.update(f"\0numba {numba.__version__}\0llvmlite {llvmlite.__version__}".encode())
    return h.hexdigest()


SOURCE_HASH = _source_hash()
"""SHA-256 (hex) of what every kernel is compiled from: the `fastrms.kernels` modules,
fastrms's version file, Numba's and llvmlite's versions. It stamps the on-disk cache; key
your own `NUMBA_CACHE_DIR` on it to keep your `@njit(cache=True)` callers fresh."""

#: The kernels' cache folder under `NUMBA_CACHE_DIR` or the user-wide cache: one per content.
FOLDER = f"fastrms-{SOURCE_HASH[:16]}"

#: How many `fastrms-*` folders one cache root keeps (the ones used last): an upgrade, a
#: second Numba or a development checkout each make one.
KEEP_FOLDERS = 4

_FILE_HASHES: "dict[str, str]" = {}

#: Every dispatcher made by `jit`, in order (for `cache_stats`).
DISPATCHERS: list = []


def _stamp(py_file):
    """The freshness stamp of a function defined in `py_file`."""
    path = os.path.realpath(py_file)
    if Path(path).parent == _HERE:
        return SOURCE_HASH
    own = _FILE_HASHES.get(path)
    if own is None:
        try:
            own = _FILE_HASHES[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            own = "-"
    return hashlib.sha256(f"{SOURCE_HASH}\0{own}".encode()).hexdigest()


def _cell_key(value):
    """A description of one closure cell that is the same in every process."""
    if isinstance(value, Dispatcher):
        fn = value.py_func
        return ("dispatcher", fn.__module__, fn.__qualname__, fn.__code__.co_firstlineno)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, repr(value))
    if isinstance(value, tuple):
        return (type(value).__name__, tuple(_cell_key(v) for v in value))
    return ("pickled", hashlib.sha256(dumps(value)).hexdigest())  # correct, if not stable


#: The first bytes of every index and data file this cache writes, before the SHA-256 of the rest.
MAGIC = b"fastrms-cache-1\n"


def _sealed(payload):
    return MAGIC + hashlib.sha256(payload).digest() + payload


def _unsealed(path):
    """The payload of a file `_sealed` wrote, or None (missing, unreadable, corrupt, foreign)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    head = len(MAGIC) + 32
    if len(blob) < head or not blob.startswith(MAGIC):
        return None
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(MAGIC) : head]:
        return None
    return payload


def _read_index(path):
    """`(numba version, stamp, overloads)` of an index file, or None if it is not one of ours."""
    payload = _unsealed(path)
    if payload is None:
        return None
    try:
        version, stamp, overloads = pickle.loads(payload)
    except Exception:  # a digest that matches a payload no index of ours holds
        return None
    return (version, stamp, overloads) if isinstance(overloads, dict) else None


#: The file in each cache folder that saves lock (`_BoundedIndex.save`).
LOCK_NAME = ".fastrms-save.lock"


@contextlib.contextmanager
def _exclusive(path):
    """An exclusive advisory lock on the file `path` (made if missing) for the block; nothing
    where the OS has no such locks or the file cannot be opened."""
    if fcntl is None:
        yield
        return
    try:
        held = open(path, "a+b")
    except OSError:
        held = None
    if held is None:
        yield
        return
    with held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


class _BoundedIndex(IndexDataCacheFile):
    """Numba's index and data files, sealed with a digest, pruned whenever the index is
    written, and saved under a lock."""

    def __init__(self, cache_path, filename_base, source_stamp, module_prefix):
        super().__init__(cache_path=cache_path, filename_base=filename_base, source_stamp=source_stamp)
        self._prefix = module_prefix
        self._base = filename_base

    def save(self, key, data):
        """Numba's save (the index read, the key given a data file, both written) under an
        exclusive lock on the cache folder, the data first. Unlocked, two processes compiling
        two signatures of one function at once each write back the index they read, under
        the same data file name: one signature is lost, and the next process compiles it
        again."""
        with _exclusive(os.path.join(self._cache_path, LOCK_NAME)):
            overloads = self._load_index()
            data_name = overloads.get(key)
            if data_name is None:
                taken = set(overloads.values())
                data_name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
                overloads[key] = data_name
            self._save_data(data_name, data)
            self._save_index(overloads)

    def _load_index(self):
        found = _read_index(self._index_path)
        if found is None or found[0] != self._version or found[1] != self._source_stamp:
            return {}
        return found[2]

    def _load_data(self, name):
        payload = _unsealed(self._data_path(name))
        if payload is None:
            raise OSError(f"{name}: missing, corrupt or not written by fastrms")  # Numba then compiles
        return pickle.loads(payload)

    def _save_data(self, name, data):
        with self._open_for_write(self._data_path(name)) as f:
            f.write(_sealed(self._dump(data)))

    def _save_index(self, overloads):
        with self._open_for_write(self._index_path) as f:
            f.write(_sealed(self._dump((self._version, self._source_stamp, overloads))))
        keep = set(overloads.values())
        try:
            names = os.listdir(self._cache_path)
        except OSError:
            return
        for entry in names:
            if entry.startswith(self._base + ".") and entry.endswith(".nbc") and entry not in keep:
                _remove(os.path.join(self._cache_path, entry))
            elif entry.startswith(self._prefix) and entry.endswith(".nbi") and entry != self._index_name:
                self._prune_other(entry)

    def _prune_other(self, index_name):
        """Remove another function's index of this source file, and its data, if it is stale."""
        path = os.path.join(self._cache_path, index_name)
        found = _read_index(path)
        if found is None:  # not ours, or being written: ignored when read, not ours to remove
            return
        if found[0] == self._version and found[1] == self._source_stamp:
            return
        base = index_name[: -len(".nbi")]
        _remove(path)
        for entry in os.listdir(self._cache_path):
            if entry.startswith(base + ".") and entry.endswith(".nbc"):
                _remove(os.path.join(self._cache_path, entry))


def _remove(path):
    try:
        os.remove(path)
    except OSError:  # another process removed it first, or it is not ours to remove
        pass


def _is_kernel_file(py_file):
    return Path(os.path.realpath(py_file)).parent == _HERE


_CLAIMED: "set[str]" = set()


def _claim(root, folder):
    """Mark `folder` under `root` as used now (once a process), and remove all but the
    `KEEP_FOLDERS` `fastrms-*` folders used last."""
    if folder in _CLAIMED:
        return
    _CLAIMED.add(folder)
    try:
        os.utime(folder)
        siblings = [os.path.join(root, e) for e in os.listdir(root) if e.startswith("fastrms-")]
        siblings.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
    except OSError:
        return
    for old in siblings[KEEP_FOLDERS:]:
        if os.path.realpath(old) != os.path.realpath(folder):
            shutil.rmtree(old, ignore_errors=True)


class _ContentLocator(_CacheLocator):
    """The kernels' folder `FOLDER` under a root (`_root`), whatever the package's path."""

    def __init__(self, py_func, py_file, root):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._root = root
        self._cache_path = os.path.join(root, FOLDER)

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        return SOURCE_HASH

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def root(cls):
        raise NotImplementedError

    @classmethod
    def from_function(cls, py_func, py_file):
        root = cls.root()
        if not root or not _is_kernel_file(py_file):
            return None
        self = cls(py_func, py_file, root)
        try:
            self.ensure_cache_path()
        except OSError:  # not writable: the next locator, or compiled in memory
            return None
        _claim(root, self._cache_path)
        return self


class _UserProvidedLocator(_ContentLocator):
    @classmethod
    def root(cls):
        return config.CACHE_DIR


class _UserWideLocator(_ContentLocator):
    @classmethod
    def root(cls):
        return AppDirs(appname="numba", appauthor=False).user_cache_dir


class _KernelCacheImpl(CompileResultCacheImpl):
    """Numba's locators for functions outside `fastrms.kernels`; the content folders for its own."""

    _locator_classes: list = [_UserProvidedLocator, InTreeCacheLocator, _UserWideLocator]

    def __init__(self, py_func):
        if not _is_kernel_file(py_func.__code__.co_filename):
            self._locator_classes = CompileResultCacheImpl._locator_classes
        super().__init__(py_func)


class KernelCache(FunctionCache):
    """Numba's function cache with fastrms's stamp, key and folder (see the module docstring)."""

    _impl_class = _KernelCacheImpl

    def __init__(self, py_func):
        super().__init__(py_func)
        modname = os.path.splitext(os.path.basename(py_func.__code__.co_filename))[0]
        self._cache_file = _BoundedIndex(
            self._cache_path, self._impl.filename_base, _stamp(py_func.__code__.co_filename), modname + "."
        )

    def load_overload(self, sig, target_context):
        """Numba's load, then the loaded library keeps the entry's reload hooks (a parallel
        kernel's starts Numba's threads): Numba re-runs them but leaves the library without
        them, so a caller compiled against it in this process would be cached without them and
        abort when linked in the next ("LLVM ERROR: Symbol not found: allocate_sched")."""
        cres = super().load_overload(sig, target_context)
        if cres is not None and cres.reload_init:
            cres.library._reload_init.update(cres.reload_init)
        return cres

    def _index_key(self, sig, codegen):
        fn = self._py_func
        cells = tuple(_cell_key(c.cell_contents) for c in fn.__closure__ or ())
        code = hashlib.sha256(fn.__code__.co_code + repr(cells).encode()).hexdigest()
        return (sig, codegen.magic_tuple(), code)


def jit(parallel=False):
    """`njit` with `JIT_OPTIONS`, cached on disk (`KernelCache`) where Numba can."""

    def wrap(fn):
        global CACHE_STATUS
        dispatcher = njit(parallel=parallel, **JIT_OPTIONS)(fn)
        if CACHE_STATUS == "on":
            try:
                dispatcher._cache = KernelCache(dispatcher.py_func)
            except RuntimeError as exc:  # Numba found no writable cache location
                if "cannot cache" not in str(exc):
                    raise
                CACHE_STATUS = f"off: {exc}"
        DISPATCHERS.append(dispatcher)
        return dispatcher

    return wrap


def cache_stats():
    """What the kernels' disk cache did in this process: `{"hits", "misses", "folder",
    "compiled"}`, `compiled` naming each function that missed (it was compiled here)."""
    hits = misses = 0
    compiled, folder = [], None
    for d in DISPATCHERS:
        stats = d.stats
        hits += sum(stats.cache_hits.values())
        missed = sum(stats.cache_misses.values())
        misses += missed
        if missed:
            compiled.append(d.py_func.__qualname__)
        if folder is None and isinstance(d._cache, KernelCache):
            folder = d._cache.cache_path
    return {"hits": hits, "misses": misses, "folder": folder, "compiled": compiled}


def name(fn, text):
    """Give `fn` its own name: Numba derives both the cache file and the machine-code
    symbol from the qualified name, and closures sharing one name would let a cached caller
    link against another variant's code in a later process."""
    fn.__name__ = fn.__qualname__ = text
    return fn
