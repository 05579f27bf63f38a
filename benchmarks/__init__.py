"""Kernel benchmarks: ``python -m benchmarks.run_all [--smoke] [--out DIR]``; see benchmarks/harness.py."""
