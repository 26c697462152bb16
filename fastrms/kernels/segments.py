"""The loop shell over a chunk table: many arrays of one dtype stepped in one call.

A model is hundreds of arrays; a call per array costs a Python round trip each. This shell
takes them all at once, as apex's `multi_tensor_apply` and torch's fused optimizers do:

- `scalars`: the step's nine `Scalars` floats, one tuple, first as in every shell;
- `ptrs`: int64 `(arrays, 5)`, the data addresses of each array's param, grad,
  `square_avg`, `grad_avg` and `momentum_buffer` (0 where the variant keeps none); the
  copy shell (`copy=BFLOAT16`) reads a sixth column, the address of each param's copy;
- `sizes`: int64 `(arrays,)`, each array's element count;
- `chunks`: int64 `(chunks, 3)`, rows `(array, start, stop)` that cover every element
  of every array exactly once, sized so the threads stay balanced (`chunk_table`);
- `witness`: an empty array of the arrays' dtype (it fixes the compiled dtype).

Each chunk runs the serial `.dense.flat` shell of the same form over its slices: the same loop, and so the
same bits, as stepping each array on its own. A chunk starts on a multiple of `CHUNK`
elements, so on an 8-bit block too: its state is the bytes of its blocks (`codec.extent`).
The caller guarantees that the addresses are live, C-contiguous arrays of `witness`'s
dtype and of the given sizes (the optimizer validates every grad before filling in its
address); the shell cannot check raw addresses.
"""

import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from ._jit import jit, name
from .dense import IN_PLACE, Form, check_form, flat
from .reduce import BLOCK, block_sumsq_of, nonfinite
from .storage import BFLOAT16, NATIVE, grad_suffix

#: Elements per chunk: big enough that a chunk's loop vectorises and amortises its set-up,
#: small enough that two threads share a model of mixed sizes evenly. It is the sum of
#: squares' block, so an array's norm has the same bits stepped alone or in a table.
CHUNK = BLOCK

#: Columns of `ptrs` (the stochastic shell's sixth column is each array's noise key).
PARAM, GRAD, SQUARE_AVG, GRAD_AVG, MOMENTUM_BUFFER, COPY = range(6)
NOISE = COPY


@intrinsic
def _pointer(typingctx, address, witness):
    """`address` (an int64) as a typed pointer to `witness`'s dtype."""
    if not isinstance(witness, types.Array) or not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(witness.dtype)(address, witness)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


def chunk_table(sizes, chunk=CHUNK):
    """Rows `(array, start, stop)` covering arrays of `sizes` in chunks of at most
    `chunk` elements (empty arrays get no row)."""
    rows = [(a, start, min(start + chunk, n)) for a, n in enumerate(sizes) for start in range(0, n, chunk)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


_TABLES: dict = {}


def table(key, parallel, form=IN_PLACE):
    """The chunk-table shell of variant `key` for the array formats `form` (`.dense.Form`;
    not out of place), serial or `parallel=True`: `(scalars, witness, ptrs, sizes,
    chunks)`. Each chunk runs the serial flat shell of the same form over its slices: with
    `form.copy`, each param's copy (column `COPY`) written too; with `form.stochastic`,
    column `PARAM` holds the params' bfloat16 bits, column `NOISE` each array's noise key
    for this step, and each chunk its offset in its array: the bits of stepping each array
    alone."""
    tag = (key, bool(parallel), form.tag)
    fn = _TABLES.get(tag)
    if fn is None:
        check_form(form, "segments")
        if form.out:
            raise ValueError("segments: a chunk table is stepped in place (no out-of-place form)")
        fn = _TABLES[tag] = _build_table(key, bool(parallel), form)
    return fn


def segments(key, parallel, codec=NATIVE, copy=None, grads=NATIVE):
    """The chunk-table shell of variant `key`, the state stored as `codec` says, the grads
    read as `grads` says; with `copy`, each param's copy (column `COPY`) written too."""
    return table(key, parallel, Form(codec, grads, copy))


def stochastic_segments(key, parallel, codec=NATIVE, grads=BFLOAT16):
    """The chunk-table shell of bfloat16 params kept without a master copy (`witness` an
    empty float32 array): see `table`."""
    return table(key, parallel, Form(codec, grads, stochastic=True))


def _build_table(key, parallel, form):
    # Each chunk is handed to the serial flat shell, as slices: the same loop (vectorised,
    # the same bits) as one array's step, called once per chunk.
    run = flat(key, False, form)
    uses_m, uses_b = key.uses_grad_avg, key.uses_momentum_buffer
    has_copy, stoch = form.copy is not None, form.stochastic
    stored, read, extent = form.codec.witness, form.grads.witness, form.codec.extent
    copied = form.copy.witness if has_copy else NATIVE.witness
    bits = BFLOAT16.witness

    def shell(scalars, witness, ptrs, sizes, chunks):
        state = stored(witness)  # an empty array of the state's storage dtype
        given = read(witness)  # and of the grads'
        low = copied(witness)  # and of the copy's
        params = bits(witness) if stoch else witness  # and of the params'
        for c in prange(chunks.shape[0]):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            n = sizes[a]
            param = carray(_pointer(ptrs[a, PARAM], params), (n,))
            grad = carray(_pointer(ptrs[a, GRAD], given), (n,))
            held, first, last = extent(n), extent(start), extent(stop)  # storage elements (8-bit: whole blocks)
            square_avg = carray(_pointer(ptrs[a, SQUARE_AVG], state), (held,))
            grad_avg = carray(_pointer(ptrs[a, GRAD_AVG], state), (held if uses_m else 0,))
            momentum_buffer = carray(_pointer(ptrs[a, MOMENTUM_BUFFER], state), (held if uses_b else 0,))
            arrays = (param[start:stop], grad[start:stop], square_avg[first:last],
                      grad_avg[first:last] if uses_m else grad_avg,
                      momentum_buffer[first:last] if uses_b else momentum_buffer)  # fmt: skip
            if has_copy:
                copy_out = carray(_pointer(ptrs[a, COPY], low), (n,))
                run(scalars, *arrays, copy_out[start:stop])
            elif stoch:
                run(scalars, *arrays, start, ptrs[a, NOISE])
            else:
                run(scalars, *arrays)
        return parallel

    name(shell, f"segments_{key.tag}{form.label}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(shell)


_NONFINITE_SEGMENTS: dict = {}
_SUMSQ_SEGMENTS: dict = {}


def nonfinite_segments(parallel, grads=NATIVE):
    """`(witness, ptrs, sizes, chunks) -> bool`: whether any grad in the table, read as
    `grads` says, holds a NaN or an infinity (read-only): the dense check, per chunk."""
    fn = _NONFINITE_SEGMENTS.get((parallel, grads.tag))
    if fn is None:
        fn = _NONFINITE_SEGMENTS[(parallel, grads.tag)] = _make_nonfinite_segments(parallel, grads)
    return fn


def _make_nonfinite_segments(parallel, grads):
    check, read = nonfinite(False, grads), grads.witness

    def nonfinite_table(witness, ptrs, sizes, chunks):
        given = read(witness)  # an empty array of the grads' dtype
        count = 0
        for c in prange(chunks.shape[0]):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            grad = carray(_pointer(ptrs[a, GRAD], given), (sizes[a],))
            count += 1 if check(grad[start:stop]) else 0
        return count > 0

    name(nonfinite_table, f"nonfinite_segments{grad_suffix(grads)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(nonfinite_table)


#: `nonfinite_segments_serial/parallel(witness, ptrs, sizes, chunks)`: True if a grad of
#: the table holds a NaN or +-Inf.
nonfinite_segments_serial, nonfinite_segments_parallel = nonfinite_segments(False), nonfinite_segments(True)


def sumsq_segments(parallel, grads=NATIVE):
    """`(witness, ptrs, sizes, chunks) -> float`: the float64 sum of squares of every grad
    in the table, read as `grads` says (read-only): a partial sum per chunk
    (`.reduce.block_sumsq`), added in the table's order."""
    fn = _SUMSQ_SEGMENTS.get((parallel, grads.tag))
    if fn is None:
        fn = _SUMSQ_SEGMENTS[(parallel, grads.tag)] = _make_sumsq_segments(parallel, grads)
    return fn


def _make_sumsq_segments(parallel, grads):
    block, read = block_sumsq_of(grads), grads.witness

    def sumsq_table(witness, ptrs, sizes, chunks):
        given = read(witness)  # an empty array of the grads' dtype
        partial = np.empty(chunks.shape[0])
        for c in prange(chunks.shape[0]):
            a, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            grad = carray(_pointer(ptrs[a, GRAD], given), (sizes[a],))
            partial[c] = block(grad[start:stop])
        total = 0.0
        for c in range(chunks.shape[0]):
            total += partial[c]
        return total

    name(sumsq_table, f"sumsq_segments{grad_suffix(grads)}_{'parallel' if parallel else 'serial'}")
    return jit(parallel)(sumsq_table)


#: `sumsq_segments_serial/parallel(witness, ptrs, sizes, chunks)`: the float64 sum of
#: squares of the table's grads; the same bits as `.reduce.sumsq_serial` summing each
#: array's blocks in turn.
sumsq_segments_serial, sumsq_segments_parallel = sumsq_segments(False), sumsq_segments(True)


def _increment(addresses, witness):
    """`x += 1` for the scalar of `witness`'s dtype at each of `addresses` (torch's
    per-param `step` counters: one call instead of a torch op per param)."""
    one = witness.dtype.type(1.0)
    for i in range(addresses.size):
        carray(_pointer(addresses[i], witness), (1,))[0] += one


name(_increment, "increment_scalars")
increment = jit()(_increment)
