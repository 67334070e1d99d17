"""bench/gpu_check.sh in its CPU dry mode (tiny sizes, Triton interpreter): the one prepared GPU
check runs every row end to end here, so it cannot rot before a GPU is lent."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nbefore\n\n<!-- gpu_check:begin -->\nold\n<!-- gpu_check:end -->\n\nafter\n")
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)  # ~45 CPU-s; wall on a loaded 2-core box is far more
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = out.read_text()
    assert doc.startswith("# Benchmarks\n\nbefore\n") and doc.endswith("after\n") and "old" not in doc
    assert "dry run" in doc and "failed" not in doc and "FAIL" not in doc
    assert doc.count(": ok |") == 4  # selfmod and titans + momentum, float32 and bf16, within the contract
    assert "| 1x40x2x16 |" in doc  # bench_memory_triton's smoke shape, both paths timed
    assert "hope_2m" in doc and "transformer_2m" in doc
    estimator = (ROOT / "tools/estimate_memory.py").exists()
    assert ("skipped: tools/estimate_memory.py" in doc) != estimator
