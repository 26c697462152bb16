"""Benchmark tooling: the peers fastrms is compared with (:mod:`.peers`), interleaved timing
(:mod:`.timing`), the table, plot and README block (:mod:`.report`) and the benchmarked
variants (:mod:`.cases`). ``fastrms bench`` (:mod:`fastrms.cli`) drives it."""
