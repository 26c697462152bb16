"""A software prefetch for loops whose next addresses the hardware cannot guess.

A dense shell streams through memory and the hardware prefetchers keep ahead of it. A row
shell jumps to rows named by an index array, so each row's first cache line waits for DRAM:
the loop is bound by latency, not by bandwidth. `prefetch_rows` asks for the lines of
a row some iterations ahead, with intent to write, so their misses overlap the current
row's arithmetic. A prefetch is only a hint: it never faults, never changes a value, and
LLVM drops it on targets that have none.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Bytes of a cache line (64 on x86-64 and most AArch64 cores; a wrong guess costs only
#: redundant or missing hints, never a wrong result).
LINE = 64


@intrinsic
def prefetch_write(typingctx, array, index):
    """`llvm.prefetch` of `array`'s element `index` (an `intp`), for writing, into
    every cache level. No bounds check: a prefetch of any address is harmless."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # the intrinsic's name spells its pointer type: p0i8 while llvmlite writes typed
        # pointers (i8*), p0 once it writes opaque ones (ptr)
        spelled = "llvm.prefetch.p0" if str(byte_ptr) == "ptr" else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]), spelled
        )
        address = builder.bitcast(builder.gep(data, [index]), byte_ptr)
        # rw = 1 (write), locality = 3 (keep in every level), cache type = 1 (data)
        builder.call(fn, [address, i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(inline="always")
def prefetch_rows(array, start, width):
    """Prefetch, for writing, the cache lines of `array[start : start + width]` (flat
    indices): one hint per line, and one for the last element (a row need not start on a
    line)."""
    step = max(LINE // array.itemsize, 1)
    for j in range(0, width, step):
        prefetch_write(array, start + j)
    prefetch_write(array, start + width - 1)
