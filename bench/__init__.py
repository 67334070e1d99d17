"""Benchmarks, one script per benchmark (results in docs/BENCHMARKS.md). Installed with hope_dist as the
`bench` package, so a script runs as `python bench/NAME.py` or `python -m bench.NAME` without editing
sys.path, and one benchmark (or a test) imports another's pieces as `from bench.NAME import ...`."""
