"""Experiments: sweeps of trainings (one run folder per cell), the cells' scores, and the results
pages written from the benchmarks' and sweeps' records."""
