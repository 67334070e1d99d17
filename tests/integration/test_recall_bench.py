"""bench/bench_recall.py end to end in its smoke setting: real training processes, results, report."""
import json
import subprocess
import sys

from helpers import REPO


def test_recall_bench_smoke_trains_resumes_and_reports(tmp_path):
    cmd = [sys.executable, str(REPO / "bench/bench_recall.py"), "--smoke", "--out", str(tmp_path),
           "--doc", str(tmp_path / "RECALL.md")]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["lr"]) for r in rows) == [("attention", 3e-3), ("attention", 1e-2),
                                                           ("delta", 3e-3), ("delta", 1e-2)]
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and r["steps_run"] >= 10 and r["diverged_at"] is None
    by_model = {r["model"]: r["state_bytes"] for r in rows}
    assert by_model["delta"] == 2 * 16 * 16 * 4, "depth-1 state: heads x d_h^2 floats"
    assert by_model["attention"] == 2 * 32 * 32 * 4, "KV cache: 2 x T x d floats"
    doc = (tmp_path / "RECALL.md").read_text()
    assert "| model | T 32, 2 pairs, d 32 |" in doc and "| delta rule (depth 1) | 32, 2 | 32 | 3e-03 | 0 |" in doc
    assert (tmp_path / "RECALL.png").stat().st_size > 0
    again = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    assert "acc=" not in again.stdout, "a rerun trains nothing that is already recorded"
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
