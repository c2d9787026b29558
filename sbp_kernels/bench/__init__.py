"""Benchmarks of sbp_kernels: the `sbp-bench` CLI (`python -m sbp_kernels.bench`).

cli: argument parsing and the run loop; cases: the ops at their benchmark shapes;
timing: timers and memory counters; report: tables, markdown, plot; overhead: the host cost
per call of SBP against dense (--overhead). See BENCHMARKS.md.
"""
