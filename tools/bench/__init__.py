"""Benchmarks. Each prints one JSON object per line: {"bench", "value", "unit", "baseline"}.

Run all with `make bench`, one with `make bench BENCH=log.append.100_writers` (a prefix such as
`log.append` selects several). Baselines are measured in the same run on the same machine.
"""
