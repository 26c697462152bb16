"""The loop shells over whole flat arrays, all from one builder: each reads the arrays a
variant uses, calls the variant's `element` and writes back, once per element, in one pass.

`flat(key, parallel, form)` builds the shell of variant `key`, serial or `parallel=True`,
for the array formats `form` (a `Form`):

    shell(scalars, param, grad, square_avg, grad_avg, momentum_buffer, *more) -> parallel

over 1-D C-contiguous arrays; `scalars` is one tuple of the nine `Scalars` floats (given
first, so every shell is called `shell(scalars, *arrays)`); `grad_avg` / `momentum_buffer`
may be empty when the variant does not use them. What `form` selects:

- `codec`: how the state is stored (`fastrms.kernels.storage`; the params' own dtype by
  default); `BLOCKWISE8` steps whole 8-bit blocks (`.blockwise` describes the block pass);
- `grads`: how the grads are read (a codec of `.storage.ARRAYS` for float32 params: bfloat16
  or float16 bit patterns in a uint16 array, widened exactly);
- `copy`: one more array, `*more = (copy,)`: each updated param is written into it too, as
  that codec stores it (the model's bf16 weights beside an fp32 master, in the same pass);
- `out`: out of place, `*more = (param_out, square_avg_out, grad_avg_out,
  momentum_buffer_out)`: the inputs are read, the outputs written (an output may be its
  input itself: each element is read before it is written; never a shifted view of one);
- `stochastic`: bfloat16 params kept without a master (`param` is their uint16 bits), `*more
  = (offset, noise)`: each element is widened, stepped in float32 and stored rounded
  stochastically with the random bits `stochastic_noise(noise, offset + i)`: the same bits
  serial or parallel, and whatever the chunking (`offset` is the slice's first element).

A shell checks only that the arrays it uses have `param`'s size (an 8-bit state: its blocks'
bytes), so it can never run past one; everything else is the caller's to validate. It is
callable from Python and from `@njit` code. `dense`, `dense_out` and `stochastic` name the
common forms.

The per-element body is written once below; the form's choices are compile-time constants
of the closure, so Numba prunes the branches a form does not take before it types the
shell: each compiled shell holds only its own loads and stores, in the loop body (a store
inside an inlined helper that takes the array stopped LLVM vectorising, `.element.apply`).
"""

from typing import Any, NamedTuple

import numpy as np
from numba import prange

from ._jit import jit, name
from .blockwise import TILE, tile
from .element import apply, constants
from .storage import BFLOAT16, BLOCK8, NATIVE, bfloat16_stochastic_bits, grad_suffix, stochastic_noise, suffix


class Form(NamedTuple):
    """The array formats of a flat shell (see the module): the state's codec, the grads',
    a low-precision copy written too, out of place, stochastic bfloat16 params."""

    codec: Any = NATIVE
    grads: Any = NATIVE
    copy: Any = None
    out: bool = False
    stochastic: bool = False

    @property
    def tag(self):
        """The form as a key of plain values."""
        return (self.codec.tag, self.grads.tag, None if self.copy is None else self.copy.tag, self.out,
                self.stochastic)  # fmt: skip

    @property
    def label(self):
        """What the form adds to a compiled function's name."""
        copy = "" if self.copy is None else f"_copy{suffix(self.copy)}"
        kind = "_out" if self.out else "_stochastic" if self.stochastic else ""
        return f"{kind}{suffix(self.codec)}{copy}{grad_suffix(self.grads)}"


#: The in-place form: native state and grads, no copy.
IN_PLACE = Form()


def check_form(form, shell="flat"):
    """Refuse a `form` no shell steps (before anything is compiled)."""
    if form.codec.block and (form.out or form.stochastic):
        what = "dense_out" if form.out else "stochastic"
        raise ValueError(f"{what}: the {form.codec.tag} state is kept in blocks; only dense() and segments() step it")
    if form.out + form.stochastic + (form.copy is not None) > 1:
        raise ValueError(f"{shell}: a shell writes its params one way: a copy, out of place or stochastically")


_FLAT: dict = {}


def flat(key, parallel, form=IN_PLACE):
    """The flat shell of variant `key` for `form` (see the module), built once."""
    tag = (key, bool(parallel), form.tag)
    fn = _FLAT.get(tag)
    if fn is None:
        check_form(form)
        fn = _FLAT[tag] = _build(key, bool(parallel), form)
    return fn


def dense(key, parallel, codec=NATIVE, copy=None, grads=NATIVE):
    """The in-place shell of variant `key`, the state stored as `codec` says, the grads read
    as `grads` says; with `copy` (a codec: `BFLOAT16`), each param's copy written too."""
    return flat(key, parallel, Form(codec, grads, copy))


def dense_out(key, parallel, codec=NATIVE):
    """The out-of-place shell of variant `key`: `(scalars, param, grad, square_avg,
    grad_avg, momentum_buffer, param_out, square_avg_out, grad_avg_out,
    momentum_buffer_out)`; the same element function as `dense`: the same bits."""
    return flat(key, parallel, Form(codec, out=True))


def stochastic(key, parallel, codec=NATIVE, grads=BFLOAT16):
    """The shell of variant `key` for bfloat16 params kept without a master copy:
    `(scalars, param, grad, square_avg, grad_avg, momentum_buffer, offset, noise)` (see the
    module), the state in float32 or as `codec` stores it."""
    return flat(key, parallel, Form(codec, grads, stochastic=True))


def _build(key, parallel, form):
    at, read = apply(key, form.codec), form.grads.load
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    blocks, has_copy, out, stoch = form.codec.block > 0, form.copy is not None, form.out, form.stochastic
    low = form.copy if has_copy else NATIVE
    encode, load, reseed = low.encode, low.load, low.reseed
    held, widen = form.codec.extent, BFLOAT16.load
    step_tile = tile(key, form.grads, form.copy) if blocks else None
    sizes = f"{name_of(form)}: grad, square_avg and every array written must have the size of param"
    if blocks:
        sizes += " (8-bit state: the bytes of its blocks)"
    centred = f"{name_of(form)}: grad_avg must have the size of param (centered variant)"
    momentum = f"{name_of(form)}: momentum_buffer must have the size of param (momentum variant)"
    extra = ("copy",) if has_copy else ("param_out", "square_avg_out", "grad_avg_out", "momentum_buffer_out") if out \
        else ("offset", "noise") if stoch else ()  # fmt: skip
    arity = f"{name_of(form)}: after the five arrays it takes {len(extra)} more ({', '.join(extra) or 'none'})"
    count = len(extra)

    def shell(scalars, param, grad, square_avg, grad_avg, momentum_buffer, *more):
        if len(more) != count:  # (too few: Numba refuses to type `more[...]` first)
            raise ValueError(arity)
        n = param.size
        e = held(n)  # the state's stored elements: n, or the bytes of n's 8-bit blocks
        # each form's extra arrays under names of their own, never aliases of the inputs (an
        # alias is a second pointer in the parallel loop's function, which LLVM must then
        # check for overlap at run time: 5-8% of a parallel 1e5-element step), each taken
        # from `more` on its own line (Numba's alias analysis follows `x = more[0]`, not a
        # tuple unpacked: the parallel loop's writes through it were dropped as dead)
        if has_copy:
            copy_out = more[0]
        if out:
            param_out = more[0]
            v_out = more[1]
            m_out = more[2]
            b_out = more[3]
        if stoch:
            offset = more[0]
            noise = more[1]
        if grad.size != n or square_avg.size != e or (has_copy and copy_out.size != n):
            raise ValueError(sizes)
        if out and (param_out.size != n or v_out.size != e):
            raise ValueError(sizes)
        if uses_m and (grad_avg.size != e or (out and m_out.size != e)):
            raise ValueError(centred)
        if uses_b and (momentum_buffer.size != e or (out and b_out.size != e)):
            raise ValueError(momentum)
        k = constants(np.float32, scalars) if stoch else constants(param.dtype.type, scalars)
        if not blocks:
            first = np.uint32(offset) if stoch else np.uint32(0)
            for i in prange(n):
                p = widen(param, i) if stoch else param[i]
                if reseed:  # a 16-bit param written since the last step: its value is the master's now
                    p = load(copy_out, i) if copy_out[i] != encode(p) else p
                p, v, m, b = at(i, p, read(grad, i), square_avg, grad_avg, momentum_buffer, k)
                if out:
                    param_out[i] = p
                    v_out[i] = v
                    if uses_m:
                        m_out[i] = m
                    if uses_b:
                        b_out[i] = b
                else:
                    if stoch:
                        param[i] = bfloat16_stochastic_bits(p, stochastic_noise(noise, np.uint32(first + np.uint32(i))))
                    else:
                        param[i] = p
                    if has_copy:
                        copy_out[i] = encode(p)
                    square_avg[i] = v
                    if uses_m:
                        grad_avg[i] = m
                    if uses_b:
                        momentum_buffer[i] = b
        else:  # 8-bit state: each block dequantised, stepped and requantised, a tile of blocks a thread
            blocks_of_n = (n + BLOCK8 - 1) // BLOCK8
            for t in prange((blocks_of_n + TILE - 1) // TILE):
                step_tile(t, blocks_of_n, n, param, grad, square_avg, grad_avg, momentum_buffer,
                          copy_out if has_copy else param, k)  # fmt: skip
        return parallel

    name(shell, f"{name_of(form)}_{key.tag}{form.label}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


def name_of(form):
    """The shell's family name, as errors and compiled functions give it."""
    if form.codec.block:
        return "blockwise"
    return "dense_out" if form.out else "stochastic" if form.stochastic else "dense"
