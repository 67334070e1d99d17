"""Chaos run: a tiny 2-rank job under torchrun auto-restart, hit by seeded faults, then compared
bit for bit with the same job run without faults.

    python bench/chaos.py --layout dp2 [--seed 0] [--faults 22] [--steps 240] [--doc docs/reliability.md]

The plan (kinds, target ranks, trigger steps) is a function of --seed alone; only the wall-clock
moment a fault lands inside a step or a save depends on the machine. Kinds, and who restarts:

  sigkill    SIGKILL a rank at step k: torchrun (--max-restarts) restarts the worker group.
  sigterm    SIGTERM / SIGUSR1 a rank at step k: every rank stops at the next step boundary, saves,
  sigusr1    writes PREEMPTED and exits 0; torchrun exits 0 and this driver relaunches it, as
             SLURM's requeue would. Each launch alternates sync and async checkpoint saves.
  stall      SIGSTOP a rank at step k: the others fail in their next collective after
             parallel.timeout_s; torchrun restarts the group; the driver sends SIGCONT once the
             others are gone, so torchrun's pending SIGTERM ends the stopped rank at once.
  save_kill  SIGKILL a rank while step-N (N >= k) is written and not yet committed (sync or async,
             whichever the launch uses); torchrun restarts. HOPE_DIST_CKPT_COMMIT_DELAY_MS holds
             every save open for --delay-ms before its marker so the kill can land inside it.
  tick_kill  SIGKILL a rank during step p >= k at which the slowest CMS level ticks
             ((p + 1) % period == 0, p not a checkpoint step); torchrun restarts.

Every run resumes from its newest committed checkpoint (checkpoint.resume=auto). At the end every
committed checkpoint on disk (keep_last is large: none is pruned) is verified (sizes, crc32) and
compared, tensor by tensor and byte by byte, with the uninterrupted run's checkpoint of the same
step (model, optimizer state, CMS window sums, RNG, data position). Writes RUN/faults.jsonl,
RUN/chaos.md and, with --doc, the block between `<!-- chaos-LAYOUT:begin/end -->` of that file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch

from hope_dist.checkpoint import MARKER, committed_steps, read_flat, verify
from hope_dist.faults import DELAY_ENV

REPO = Path(__file__).resolve().parents[1]

KINDS = ("sigkill", "sigterm", "sigusr1", "stall", "save_kill", "tick_kill")
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1,
           "save_kill": signal.SIGKILL, "tick_kill": signal.SIGKILL}
LAYOUTS = {"dp2": {"parallel.dp_replicate": 2}, "tp2": {"parallel.tp": 2}}
SLOWEST_PERIOD = 8


def overrides(run_dir: Path, layout: str, steps: int, interval: int, timeout_s: float, async_save: bool) -> list[str]:
    """configs/tiny.yaml shrunk to a few hundred CPU steps a minute; every checkpoint is kept."""
    o = {"run_dir": run_dir, "model.d_model": 32, "model.n_heads": 2, "model.chunk_size": 16,
         "model.proj_chunk_size": 32,
         "model.cms": f"[{{width: 32, period: 1}}, {{width: 32, period: 2}}, {{width: 32, period: {SLOWEST_PERIOD}}}]",
         "training.seq_len": 64, "training.global_batch": 4, "training.micro_batch": 2, "training.steps": steps,
         "optim.warmup_steps": 5, "eval.every": 0, "data.valid_fraction": 0, "metrics.wandb": False,
         "metrics.progress": False, "checkpoint.interval": interval, "checkpoint.keep_last": 100000,
         "checkpoint.async_save": async_save, "parallel.timeout_s": timeout_s, **LAYOUTS[layout]}
    return ["--config", str(REPO / "configs/tiny.yaml")] + [f"--{k}={v}" for k, v in o.items()]


def make_plan(seed: int, n: int, steps: int, world: int) -> list[dict]:
    """n faults, every kind n // 6 times or more, at increasing trigger steps at least 4 apart.
    Launches alternate sync/async saves and change only at a preemption: reshuffle until save kills
    fall in both kinds of launch (when there are two or more)."""
    rng = random.Random(seed)
    while True:
        kinds = list(KINDS) * (n // len(KINDS)) + [rng.choice(KINDS) for _ in range(n % len(KINDS))]
        rng.shuffle(kinds)
        modes, launch = [], 0
        for k in kinds:
            modes.append("async" if launch % 2 else "sync")
            launch += k in ("sigterm", "sigusr1")
        save_modes = [m for k, m in zip(kinds, modes) if k == "save_kill"]
        if len(set(save_modes)) == min(2, len(save_modes)):
            break
    at = sorted(rng.sample(range(12, steps - 12, 4), n))
    return [{"kind": k, "rank": rng.randrange(world), "at_step": s + rng.randrange(4)} for k, s in zip(kinds, at)]


class Run:
    """One chaos (or reference) run: its torchrun processes, log, metrics and checkpoints."""

    def __init__(self, run_dir: Path, args, chaos: bool):
        self.dir, self.args, self.chaos = run_dir, args, chaos
        self.log = run_dir.parent / f"{run_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.launches = 0
        self.rows: list[dict] = []
        self._metrics_at = self._log_at = 0
        self.resumed: list[int] = []  # "resumed from ... at step N", in order
        self.log_text = ""
        self.complete = False
        self.seen_committed: set[int] = set()  # every committed step this driver saw on disk
        self.t0 = time.monotonic()

    def launch(self) -> None:
        async_save = self.chaos and self.launches % 2 == 1
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        if self.chaos:
            env[DELAY_ENV] = str(self.args.delay_ms)
        cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=100",
               "--monitor-interval=0.1", str(REPO / "hope_dist/pretrain.py"),
               *overrides(self.dir, self.args.layout, self.args.steps, self.args.interval, self.args.timeout_s,
                          async_save)]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        self.launches += 1
        self.save_mode = "async" if async_save else "sync"

    def poll(self) -> None:
        """Read new metrics rows and log lines; relaunch torchrun after a clean stop (PREEMPTED),
        as SLURM's requeue would."""
        metrics = self.dir / "metrics.jsonl"
        if metrics.exists():
            with open(metrics) as f:
                f.seek(self._metrics_at)
                text = f.read()
            complete = text[:text.rfind("\n") + 1]
            self._metrics_at += len(complete)
            self.rows += [json.loads(line) for line in complete.splitlines()]
        with open(self.log, errors="replace") as f:
            f.seek(self._log_at)
            new = f.read()
        self._log_at += len(new)
        self.log_text += new
        for line in new.splitlines():
            if "resumed from" in line and " at step " in line:
                self.resumed.append(int(line.rsplit(" at step ", 1)[1].split()[0]))
        if self.complete or self.proc.poll() is None:
            return
        if (self.dir / "COMPLETE").exists():
            self.complete = True
        elif self.proc.returncode != 0 or not (self.dir / "PREEMPTED").exists():
            raise RuntimeError(f"torchrun exited {self.proc.returncode} without finishing; see {self.log}")
        else:
            self.launch()

    def in_progress(self) -> int:
        """The step the workers are computing now (the newest logged step + 1)."""
        return self.rows[-1]["step"] + 1 if self.rows else 0

    def workers(self) -> dict[int, int]:
        """rank -> pid of torchrun's live worker processes (its children with a RANK)."""
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) != self.proc.pid or stat[0] == "Z":
                    continue
                env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
            except (OSError, ValueError):
                continue
            if b"RANK" in env:
                found[int(env[b"RANK"])] = int(d.name)
        return found

    def stop(self) -> None:
        """Kill what is left of this run (workers run in sessions of their own)."""
        if self.proc and self.proc.poll() is None:
            for pid in self.workers().values():
                os.kill(pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)


def wait(run: Run, until, timeout: float = 600.0, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.poll()
        got = until()
        if got is not None and got is not False:
            return got
        time.sleep(every)
    raise TimeoutError(f"chaos driver: condition not met within {timeout:.0f} s; see {run.log}")


def fire(run: Run, fault: dict, args) -> dict:
    """Wait for the fault's trigger, send it, wait until the run is past its resume step."""
    kind, rank, k = fault["kind"], fault["rank"], fault["at_step"]

    def trigger():
        if run.complete:
            raise RuntimeError(f"the run completed before fault {fault} fired: use more --steps")
        pid, p = run.workers().get(rank), run.in_progress()
        if pid is None or not run.rows:
            return None
        if kind == "save_kill":
            open_saves = sorted(int(c.name[5:]) for c in (run.dir / "checkpoints").glob("step-*")
                                if not (c / MARKER).exists())
            hit = [s for s in open_saves if s >= k]
            return (pid, f"save of step-{hit[0]} ({run.save_mode})") if hit else None
        if kind == "tick_kill":
            return (pid, p) if p >= k and (p + 1) % SLOWEST_PERIOD == 0 and p % args.interval else None
        return (pid, p) if p >= k else None

    pid, hit = wait(run, trigger, timeout=900)
    run.seen_committed |= set(committed_steps(run.dir / "checkpoints"))
    rows_before, resumes_before, launches_before = len(run.rows), len(run.resumed), run.launches
    sent, log_mark = time.monotonic(), len(run.log_text)
    record = {**fault, "wall_s": round(sent - run.t0, 1), "hit": hit}
    if kind == "stall":
        others = [p for r, p in run.workers().items() if r != rank]
        os.kill(pid, signal.SIGSTOP)
        wait(run, lambda: all(_gone(p) for p in others), timeout=args.timeout_s * 3 + 60, every=0.05)
        failed_after = time.monotonic() - sent
        os.kill(pid, signal.SIGCONT)  # torchrun's SIGTERM, pending while stopped, now ends it
    else:
        os.kill(pid, SIGNALS[kind])
    wait(run, lambda: len(run.resumed) > resumes_before, timeout=900)
    record["resumed_from"] = resumed = run.resumed[resumes_before]
    wait(run, lambda: len(run.rows) > rows_before and run.rows[-1]["step"] >= resumed, timeout=900)
    # the faulted attempt's newest logged step: the row before the first step backwards
    rows = [r["step"] for r in run.rows[max(0, rows_before - 1):]]
    back = next((j for j in range(1, len(rows)) if rows[j] <= rows[j - 1]), None)
    record["last_logged"] = rows[back - 1] if back is not None else resumed - 1
    if run.launches > launches_before:
        at = (run.dir / "PREEMPTED").read_text().split()[1]
        record["ended"] = (f"clean stop at step {at} (saved, PREEMPTED, exit 0); "
                           f"driver relaunched torchrun ({run.save_mode} saves)")
    elif kind == "stall":
        timeout = "Timed out" in run.log_text[log_mark:]
        record["ended"] = (f"peers failed {failed_after:.1f} s later{' (collective timeout)' if timeout else ''}; "
                           f"torchrun restarted the workers")
    else:
        record["ended"] = "torchrun restarted the workers"
    if kind == "tick_kill":
        record["ended"] += f"; killed inside step {hit}: {'yes' if record['last_logged'] == hit - 1 else 'no'}"
    record["recovered_s"] = round(time.monotonic() - sent, 1)
    run.seen_committed |= set(committed_steps(run.dir / "checkpoints"))
    print(json.dumps(record), flush=True)
    return record


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def bitwise_equal(a: Path, b: Path) -> list[str]:
    """Keys of two checkpoints whose tensors (or objects) differ in any byte; [] when identical."""
    fa, fb = read_flat(a), read_flat(b)
    diff = sorted(set(fa) ^ set(fb))
    for key in sorted(set(fa) & set(fb)):
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor):
            same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
        else:
            same = x == y
        if not same:
            diff.append(key)
    return diff


def run_to_end(run: Run, faults: list[dict], args) -> list[dict]:
    run.launch()
    records = [fire(run, f, args) for f in faults]
    wait(run, lambda: run.complete, timeout=1800, every=0.2)
    return records


def summarize(args, records, chaos: Run, ref: Run, elapsed: float) -> tuple[str, dict]:
    ckpts, ref_ckpts = chaos.dir / "checkpoints", ref.dir / "checkpoints"
    steps = committed_steps(ckpts)
    lost = sorted(chaos.seen_committed - set(steps))
    damaged = {s: verify(ckpts / f"step-{s}") for s in steps}
    common = [s for s in steps if (ref_ckpts / f"step-{s}" / MARKER).exists()]
    unequal = {s: d for s in common if (d := bitwise_equal(ckpts / f"step-{s}", ref_ckpts / f"step-{s}"))}
    final = bitwise_equal(ckpts / f"step-{args.steps}", ref_ckpts / f"step-{args.steps}")
    n_keys = Counter(k.split(".")[0] for k in read_flat(ckpts / f"step-{args.steps}"))
    restarts = sum("torchrun restarted" in r["ended"] for r in records)
    summary = {"layout": args.layout, "seed": args.seed, "steps": args.steps, "faults": len(records),
               "by_kind": dict(Counter(r["kind"] for r in records)),
               "save_kills": dict(Counter(r["hit"].split("(")[1][:-1] for r in records if r["kind"] == "save_kill")),
               "torchrun_restarts": restarts, "driver_relaunches": chaos.launches - 1,
               "committed_checkpoints": len(steps), "lost": lost, "damaged": {s: d for s, d in damaged.items() if d},
               "compared_with_reference": len(common), "unequal": unequal, "final_equal": not final,
               "final_keys": dict(n_keys), "wall_s": round(elapsed, 1)}
    kinds = ", ".join(f"{k} {n}" for k, n in summary["by_kind"].items())
    lines = [
        f"Command: `python bench/chaos.py --layout {args.layout} --seed {args.seed} --faults {args.faults} "
        f"--steps {args.steps} --timeout-s {args.timeout_s:g} --doc docs/reliability.md` "
        f"({elapsed / 60:.1f} min on 2 busy CPU cores).", "",
        f"- faults: **{len(records)}** ({kinds}; save kills: "
        f"{', '.join(f'{m} {n}' for m, n in summary['save_kills'].items())})",
        f"- restarts: {restarts} by torchrun (`--max-restarts`), {chaos.launches - 1} relaunches by the driver "
        f"after a clean stop (PREEMPTED)",
        f"- committed checkpoints: {len(steps)} on disk, {len(lost)} lost of the {len(chaos.seen_committed)} the "
        f"driver saw committed during the run; verified (sizes, crc32): {len(steps) - len(summary['damaged'])}"
        f"; equal byte for byte to the uninterrupted run's at the same step: {len(common) - len(unequal)} of "
        f"{len(common)}",
        f"- final step-{args.steps} (model, optimizer, CMS window sums, RNG, data position: "
        f"{', '.join(f'{k} {n}' for k, n in n_keys.items())} entries) equal to the uninterrupted run bitwise: "
        f"**{'yes' if not final else 'no: ' + ', '.join(final[:5])}**", "",
        "| # | fault | rank | wall s | trigger step | hit | last step logged | resumed from | how it ended |",
        "|---:|---|---:|---:|---:|---|---:|---:|---|"]
    for i, r in enumerate(records, 1):
        lines.append(f"| {i} | {r['kind']} | {r['rank']} | {r['wall_s']} | {r['at_step']} | {r['hit']} | "
                     f"{r['last_logged']} | {r['resumed_from']} | {r['ended']} |")
    return "\n".join(lines), summary


def write_block(doc: Path, name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = doc.read_text()
    if begin not in old or end not in old:
        raise SystemExit(f"{doc} has no {begin} ... {end} block; add one where the chaos results go")
    doc.write_text(old[:old.index(begin)] + f"{begin}\n{text}\n{end}" + old[old.index(end) + len(end):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="dp2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=5, help="checkpoint.interval")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="parallel.timeout_s (ends a stall)")
    ap.add_argument("--delay-ms", type=int, default=300, help=f"{DELAY_ENV}: how long a save stays open")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "chaos")
    ap.add_argument("--doc", type=Path, help="markdown file with a chaos-LAYOUT block to rewrite")
    args = ap.parse_args()
    out = args.out / args.layout
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or pass another --out")
    out.mkdir(parents=True)
    plan = make_plan(args.seed, args.faults, args.steps, world=2)
    t0 = time.monotonic()
    ref, chaos = Run(out / "reference", args, chaos=False), Run(out / "chaos", args, chaos=True)
    try:
        run_to_end(ref, [], args)
        chaos.t0 = time.monotonic()
        records = run_to_end(chaos, plan, args)
    finally:
        ref.stop()
        chaos.stop()
    text, summary = summarize(args, records, chaos, ref, time.monotonic() - t0)
    (out / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "chaos.md").write_text(text + "\n")
    if args.doc:
        write_block(args.doc, f"chaos-{args.layout}", text)
    print(text)


if __name__ == "__main__":
    main()
