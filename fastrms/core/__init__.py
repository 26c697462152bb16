"""What every front end shares: the options and their checks, the spec a step is built from,
the clock, the guard, the memory checks, checkpoints, row steps and the runtime (threads,
locks, the kernel cache). Imports `fastrms.kernels` and nothing above it."""
