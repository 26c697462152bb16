"""`fastrms.RMSprop` over params that live on a CUDA device (`RMSprop(params)` is one of these
when its params are device arrays: numba-cuda's, CuPy's, torch CUDA tensors, anything with
`__cuda_array_interface__`). It imports numba-cuda, which fastrms itself never imports.

The options are `fastrms.RMSprop`'s, checked by the same rules, and a step follows the same
protocol (every check first, then the guard's verdict, then `Clock.take`), run by the CUDA
backend (`fastrms.backend.cuda.Plan`: one launch per dtype, the tables kept). State dicts
are the NumPy optimizer's, key for key (host copies): a run moves between a GPU and the
CPU through `state_dict`/`load_state_dict` or `save`/`load`. Refused on the device, naming
the option: `copy_to`, `state_storage="8bit"`, `state_layout="rowwise"`, `dense_rows` and
`step_rows` (the CPU's).
"""

import threading

import numpy as np

from .backend import cuda as backend
from .backend.layout import Slot
from .core import checkpoint, guard
from .core import options as O
from .core.clock import Clock
from .core.options import check_hyperparameters
from .optimizer import RMSprop

__all__ = ["DeviceRMSprop"]


class DeviceRMSprop(RMSprop):
    """`fastrms.RMSprop` on a CUDA device (see the module)."""

    def __init__(self, params, learning_rate=0.001, beta=0.9, epsilon=1e-8, *, copy_to=None, **options):
        options = O.resolve({**options, "learning_rate": learning_rate, "beta": beta, "epsilon": epsilon})
        self._single = backend.is_device_array(params)
        arrays = [params] if self._single else list(params)
        for i, p in enumerate(arrays):
            if not backend.is_device_array(p):
                raise TypeError(
                    f"params[{i}] is a {type(p).__module__}.{type(p).__name__} on the host, the others live on a "
                    "CUDA device: one optimizer steps its params on one device"
                )
        names = ["params"] if self._single else [f"params[{i}]" for i in range(len(arrays))]
        faces = [backend.interface(p, name) for p, name in zip(arrays, names)]
        for name, (_, _, dtype) in zip(names, faces):
            if dtype not in (np.float32, np.float64):
                raise TypeError(f"{name} must be float32 or float64 on the device, got {dtype}")
        self._dtypes = tuple(dict.fromkeys(dtype for _, _, dtype in faces))
        hyper = check_hyperparameters(options, self._dtypes)
        refused = {
            "copy_to": copy_to is not None,
            "state_storage='8bit'": hyper["state_storage"] == "8bit",
            "state_layout='rowwise'": hyper["state_layout"] == "rowwise",
            "dense_rows=True": hyper["dense_rows"],
        }
        for what, given in refused.items():
            if given:
                raise ValueError(f"{what} is a CPU option: the CUDA kernels step elementwise state in place")
        self._arrays, self._shapes = arrays, [shape for _, shape, _ in faces]
        self._masters, self._copies_given, self._copy_to = False, None, None
        self._stepping = False
        self._state = threading.RLock()
        self._configure(hyper, Clock(hyper, self._dtypes))
        self._device = backend.Plan(arrays, self._spec)
        self._last_grad_norm = None

    # ------------------------------------------------------------------ what the NumPy optimizer shows

    @property
    def params(self):
        """The parameter arrays (the user's own objects), in the structure given."""
        return self._arrays[0] if self._single else list(self._arrays)

    def _state_view(self, name):
        if name not in self._spec.names:
            return None
        arrays = [self._device.state(name, i).reshape(shape) for i, shape in enumerate(self._shapes)]
        return arrays[0] if self._single else arrays

    @property
    def parallel(self):
        """Always False: the step runs on the device, not on CPU threads."""
        return [False] * len(self._arrays)

    @property
    def kernel_calls(self):
        """The launch of each dtype group: "cuda dense" (one array) or "cuda segments"."""
        return ["cuda dense" if len(g.indices) == 1 else "cuda segments" for g in self._device.groups]

    @property
    def state_nbytes(self):
        """Bytes of the optimizer's state on the device."""
        return self._device.nbytes

    def __repr__(self):
        sizes = [int(np.prod(s)) for s in self._shapes]
        return f"RMSprop({len(sizes)} CUDA array(s), {sum(sizes)} elements, step_count={self._clock.step_count})"

    # ------------------------------------------------------------------ the step

    def step(self, grads):
        """One step on the device: every grad checked first (a device array of its param's
        dtype and shape, C-contiguous, sharing no memory with a param or the state), then
        the guard (a host sync, only with `clip_global_norm` or `skip_nonfinite`), then one
        launch per dtype. Returns None without waiting for the device."""
        state = self._state
        self._enter(state, "step", state.acquire(False))
        try:
            given = [grads] if self._single else grads
            if self._single and not backend.is_device_array(grads):
                backend.interface(grads, "grads")  # raises, naming what it is
            if not self._single and (isinstance(grads, (str, bytes)) or len(given) != len(self._arrays)):
                raise ValueError(f"grads must be a sequence of {len(self._arrays)} device arrays, like params")
            plan = self._device
            plan.load(plan.check_grads(list(given)))
            verdict = guard.GO
            if self._guarded:
                verdict = guard.guard(plan.sumsq, plan.nonfinite, lambda: [_host(g) for g in given], self._hyper)
                if verdict.norm is not None:
                    self._last_grad_norm = verdict.norm
            self._clock.take(verdict, plan.run)
        finally:
            self._stepping = False
            state.release()

    def step_rows(self, rows, grad_rows, param=None):
        """Not on the device: `step_rows` is the CPU optimizer's."""
        raise ValueError("step_rows steps rows of CPU arrays; on a CUDA device, step the whole grad")

    # ------------------------------------------------------------------ state dicts: the NumPy optimizer's

    def _shadow(self, with_state):
        """Host `Slot`s standing for the params (their shapes and dtypes), holding host
        copies of the state when `with_state`: what `fastrms.core.checkpoint` reads."""
        slots = []
        for i, shape in enumerate(self._shapes):
            slot = Slot(None, np.empty(shape, self._device.dtypes[i]), self._spec.names)
            if with_state:
                for name in self._spec.names:
                    setattr(slot, name, self._device.state(name, i).copy_to_host())
            slots.append(slot)
        return slots

    def state_dict(self):
        """`fastrms.RMSprop.state_dict`: the same keys, the state copied to the host."""
        with self._state:
            slots = self._shadow(True)
            return checkpoint.state_dict(slots, self._hyper, self._clock.step_count, self._clock.skipped_steps)

    def load_state_dict(self, state_dict):
        """`fastrms.RMSprop.load_state_dict`, the state copied to the device (a dict saved
        on the CPU loads here, and the reverse)."""
        step_count, skipped, hyper, arrays = checkpoint.validate(
            state_dict, self._shadow(False), self._hyper, self._dtypes, False
        )
        with self._state:
            for (i, name), a in arrays.items():
                self._device.state(name, i).copy_to_device(np.ascontiguousarray(a).reshape(-1))
            self._configure(hyper, Clock(hyper, self._dtypes, step_count, skipped, self._clock.last_lr))

    def load(self, path):
        """`fastrms.RMSprop.load`: a checkpoint written by `save`, on the CPU or a device."""
        d = checkpoint.read(path, self._shadow(False))
        try:
            self.load_state_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} does not fit this optimizer: {exc}") from None


def _host(a):
    """A host copy of device array `a` (the guard's rare float64-overflow path)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return backend.cuda.as_cuda_array(a).copy_to_host()
