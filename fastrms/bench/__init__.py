"""Benchmark tooling: the peers fastrms is compared with (`.peers`), interleaved timing
(`.timing`), the table, plot and README block (`.report`) and the benchmarked
variants (`.cases`). `fastrms bench` (`fastrms.cli`) drives it."""
