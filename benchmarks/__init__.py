"""
Benchmarks of coreason-budget against the floor (one bare EVALSHA) and two peers.

Not part of the default test run (pyproject's testpaths is ``tests``). Run
``python -m benchmarks.report`` from the repository root to regenerate
``benchmarks/RESULTS.md``, or ``pytest benchmarks --benchmark-only`` for the
pytest-benchmark tables alone.
"""
