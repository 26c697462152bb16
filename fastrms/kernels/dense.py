"""Loop shells over whole flat arrays: each reads the arrays a variant uses, calls the
variant's `element` and writes back, once per element, in place.

`dense(key, parallel)` is the in-place shell `(param, grad, square_avg, grad_avg,
momentum_buffer, *scalars)` over 1-D C-contiguous arrays of one float dtype (`grad_avg` /
`momentum_buffer` may be empty when the variant does not use them; `scalars` is a
`Scalars`, passed unpacked). It checks only that the arrays it uses have `param`'s size,
so it can never run past one; everything else is the caller's to validate. It returns
whether it ran in parallel. Callable from Python and from `@njit` code. The state is
stored as `codec` says (`fastrms.kernels.storage`; the params' own dtype by default).
With `copy` (a codec: `BFLOAT16`) the shell takes one more array after the state,
`(param, grad, square_avg, grad_avg, momentum_buffer, copy, *scalars)`, and writes each
updated param element into it too, as that codec stores it: a low-precision copy of the
params (the model's bf16 weights beside an fp32 master) in the same pass. With `grads` (a
codec of `.storage.ARRAYS`, float32 params) the shell reads the grad as that codec's 16-bit
bit patterns (bfloat16 or float16 grads in a uint16 array), widened exactly to float32.
With `codec=BLOCKWISE8` it is `.blockwise`'s shell: the state arrays are 8-bit blocks.
"""

import numpy as np
from numba import prange

from ._jit import jit, name
from .blockwise import blockwise
from .element import apply, constants
from .storage import BFLOAT16, NATIVE, bfloat16_stochastic_bits, grad_suffix, stochastic_noise, suffix

_DENSE: dict = {}


def dense(key, parallel, codec=NATIVE, copy=None, grads=NATIVE):
    """The in-place shell of variant `key`, serial or `parallel=True`, its state stored as
    `codec` says, its grads read as `grads` says; with `copy`, the copy shell (see the
    module)."""
    tag = (key, parallel, codec.tag, None if copy is None else copy.tag, grads.tag)
    fn = _DENSE.get(tag)
    if fn is None:
        if codec.block:  # whole 8-bit blocks at a time: the state arrays are the blocks' bytes
            fn = _DENSE[tag] = blockwise(key, parallel, copy, grads)
        elif copy is None:
            fn = _DENSE[tag] = _make_dense(key, parallel, codec, grads)
        else:
            fn = _DENSE[tag] = _make_copy(key, parallel, codec, copy, grads)
    return fn


def _make_copy(key, parallel, codec, copy, grads):
    at, read = apply(key, codec), grads.load
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    encode, load, reseed = copy.encode, copy.load, copy.reseed

    def shell(param, grad, square_avg, grad_avg, momentum_buffer, copy_out, lr, beta, eps_in, eps_out, wd, mu,
              grad_scale, bc, clip):  # fmt: skip
        n = param.size
        if grad.size != n or square_avg.size != n or copy_out.size != n:
            raise ValueError("dense: grad, square_avg and the copy must have the size of param")
        if uses_m and grad_avg.size != n:
            raise ValueError("dense: grad_avg must have the size of param (centered variant)")
        if uses_b and momentum_buffer.size != n:
            raise ValueError("dense: momentum_buffer must have the size of param (momentum variant)")
        k = constants(param.dtype.type, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip)
        for i in prange(n):
            p = param[i]
            if reseed:  # a 16-bit param written since the last step: its value is the master's now
                p = load(copy_out, i) if copy_out[i] != encode(p) else p
            p, v, m, b = at(i, p, read(grad, i), square_avg, grad_avg, momentum_buffer, k)
            param[i] = p
            copy_out[i] = encode(p)
            square_avg[i] = v
            if uses_m:
                grad_avg[i] = m
            if uses_b:
                momentum_buffer[i] = b
        return parallel

    kind = f"{suffix(codec)}_copy{suffix(copy)}{grad_suffix(grads)}"
    name(shell, f"dense_{key.tag}{kind}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


def _make_dense(key, parallel, codec, grads):
    at, read = apply(key, codec), grads.load
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(param, grad, square_avg, grad_avg, momentum_buffer, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc,
              clip):  # fmt: skip
        n = param.size
        if grad.size != n or square_avg.size != n:
            raise ValueError("dense: grad and square_avg must have the size of param")
        if uses_m and grad_avg.size != n:
            raise ValueError("dense: grad_avg must have the size of param (centered variant)")
        if uses_b and momentum_buffer.size != n:
            raise ValueError("dense: momentum_buffer must have the size of param (momentum variant)")
        k = constants(param.dtype.type, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip)
        for i in prange(n):
            p, v, m, b = at(i, param[i], read(grad, i), square_avg, grad_avg, momentum_buffer, k)
            param[i] = p
            square_avg[i] = v
            if uses_m:
                grad_avg[i] = m
            if uses_b:
                momentum_buffer[i] = b
        return parallel

    name(shell, f"dense_{key.tag}{suffix(codec)}{grad_suffix(grads)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


def _elementwise(codec, shell):
    """Refuse a block codec (8-bit state) in a shell that reads the state element by element."""
    if codec.block:
        raise ValueError(f"{shell}: the {codec.tag} state is kept in blocks; only dense() and segments() step it")


_DENSE_OUT: dict = {}


def dense_out(key, parallel, codec=NATIVE):
    """The out-of-place shell of variant `key`: `(param, grad, square_avg, grad_avg,
    momentum_buffer, param_out, square_avg_out, grad_avg_out, momentum_buffer_out,
    *scalars)` reads the first five and writes the last four, element by element; an output
    may be its input itself (each element is read before it is written), never a shifted
    view of one. The same element function as `dense`: the same bits."""
    fn = _DENSE_OUT.get((key, parallel, codec.tag))
    if fn is None:
        _elementwise(codec, "dense_out")
        fn = _DENSE_OUT[(key, parallel, codec.tag)] = _make_dense_out(key, parallel, codec)
    return fn


def _make_dense_out(key, parallel, codec):
    at = apply(key, codec)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(param, grad, square_avg, grad_avg, momentum_buffer, param_out, square_avg_out, grad_avg_out,
              momentum_buffer_out, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip):  # fmt: skip
        n = param.size
        if grad.size != n or square_avg.size != n or param_out.size != n or square_avg_out.size != n:
            raise ValueError("dense_out: every array must have the size of param")
        if uses_m and (grad_avg.size != n or grad_avg_out.size != n):
            raise ValueError("dense_out: grad_avg and grad_avg_out must have the size of param (centered variant)")
        if uses_b and (momentum_buffer.size != n or momentum_buffer_out.size != n):
            raise ValueError("dense_out: momentum buffers must have the size of param (momentum variant)")
        k = constants(param.dtype.type, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip)
        for i in prange(n):
            p, v, m, b = at(i, param[i], grad[i], square_avg, grad_avg, momentum_buffer, k)
            param_out[i] = p
            square_avg_out[i] = v
            if uses_m:
                grad_avg_out[i] = m
            if uses_b:
                momentum_buffer_out[i] = b
        return parallel

    name(shell, f"dense_out_{key.tag}{suffix(codec)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


_STOCHASTIC: dict = {}


def stochastic(key, parallel, codec=NATIVE, grads=BFLOAT16):
    """The in-place shell of variant `key` for bfloat16 params kept without a master copy:
    `(param, grad, square_avg, grad_avg, momentum_buffer, offset, noise, *scalars)`, with
    `param` the params' bfloat16 bits (uint16), the grads read as `grads` says, the state
    in float32 (or as `codec` stores it). Each element is widened, stepped in float32 and
    stored rounded stochastically (`.storage.bfloat16_stochastic_bits`) with the random bits
    `stochastic_noise(noise, offset + i)`: the same bits serial or parallel, and whatever the
    chunking (`offset` is the slice's first element in its array)."""
    tag = (key, parallel, codec.tag, grads.tag)
    fn = _STOCHASTIC.get(tag)
    if fn is None:
        _elementwise(codec, "stochastic")
        fn = _STOCHASTIC[tag] = _make_stochastic(key, parallel, codec, grads)
    return fn


def _make_stochastic(key, parallel, codec, grads):
    at, read, widen = apply(key, codec), grads.load, BFLOAT16.load
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer

    def shell(param, grad, square_avg, grad_avg, momentum_buffer, offset, noise, lr, beta, eps_in, eps_out, wd, mu,
              grad_scale, bc, clip):  # fmt: skip
        n = param.size
        if grad.size != n or square_avg.size != n:
            raise ValueError("stochastic: grad and square_avg must have the size of param")
        if uses_m and grad_avg.size != n:
            raise ValueError("stochastic: grad_avg must have the size of param (centered variant)")
        if uses_b and momentum_buffer.size != n:
            raise ValueError("stochastic: momentum_buffer must have the size of param (momentum variant)")
        k = constants(np.float32, lr, beta, eps_in, eps_out, wd, mu, grad_scale, bc, clip)
        first = np.uint32(offset)
        for i in prange(n):
            p, v, m, b = at(i, widen(param, i), read(grad, i), square_avg, grad_avg, momentum_buffer, k)
            param[i] = bfloat16_stochastic_bits(p, stochastic_noise(noise, np.uint32(first + np.uint32(i))))
            square_avg[i] = v
            if uses_m:
                grad_avg[i] = m
            if uses_b:
                momentum_buffer[i] = b
        return parallel

    kind = f"{suffix(codec)}{grad_suffix(grads)}"
    name(shell, f"stochastic_{key.tag}{kind}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)
