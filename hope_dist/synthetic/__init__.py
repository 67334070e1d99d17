"""Synthetic tasks that train and test a sequence mixer's in-context recall (bench/bench_recall.py)."""
