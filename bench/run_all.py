"""The benchmark suite: every benchmark, each in its own process, into one results file.

    python -m bench                          # = python bench/run_all.py --scale small
    python bench/run_all.py --scale tiny --out /tmp/b     # smoke run (no Ray, seconds)
    python bench/run_all.py --scale full                  # the issue's sizes (hours on 2 cores)
    python bench/run_all.py --only index,serve --serve-workdir out
    python bench/run_all.py --reuse bench/results.json    # rerun only the steps not ok there
    python bench/run_all.py --reuse bench/results.json --only embed   # redo one step
    python bench/report.py bench/results.json             # re-render tables and plots

Runs the steps of :data:`bench.plan.STEPS` (embedding, index, training, Serve, reward, judge,
GPU) as subprocesses, one after another so that they do not compete for the cores; each
writes its own JSON. Then writes ``<out>/results.json`` (the machine, every step's command,
wall time, status and raw results, and the derived figures: ratios measured side by side in
the same run, and fitted growth exponents), ``<out>/RESULTS.md`` and ``<out>/plots/*.png``.
A step that fails is recorded with the end of its log and the suite goes on; the exit status
is then 1. Nothing in the results is typed in: anchors (the GPU's A100 figure) are labelled
as anchors. Ray steps start their own local Ray (``RAY_ADDRESS`` is removed from their
environment), never a cluster already running on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from machine import machine_info  # noqa: E402 - bench/ is not a package
from plan import SCALES, STEPS, commands  # noqa: E402

CHILD_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
             "HF_HUB_OFFLINE": "1", "RAY_TRAIN_V2_ENABLED": "1"}


def run_step(name: str, cmds: list[list[str]], raw: Path, logs: Path,
             timeout_s: float) -> dict[str, Any]:
    """Run one step's commands in order; ``{"status", "wall_s", "commands", "result"}`` (or
    ``"error"`` and the end of the log when a command fails or times out)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | CHILD_ENV
    log = logs / f"{name}.log"
    rec: dict[str, Any] = {"commands": [shlex.join(c) for c in cmds], "log": str(log)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        for cmd in cmds:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    timeout=timeout_s, check=False).returncode
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                rec["wall_s"] = time.perf_counter() - t0
                rec["status"] = "failed"
                rec["error"] = (f"timed out after {timeout_s:.0f} s" if rc is None
                                else f"exit status {rc}") + f": {shlex.join(cmd[1:3])}"
                f.flush()
                rec["log_tail"] = log.read_text()[-3000:]
                return rec
    rec["wall_s"] = time.perf_counter() - t0
    out = raw / f"{name}.json"
    if not out.is_file():
        rec.update(status="failed", error=f"the step wrote no {out.name}")
        return rec
    rec["result"] = json.loads(out.read_text())
    rec["status"] = "skipped" if "skipped" in rec["result"] else "ok"
    if rec["status"] == "skipped":
        rec["reason"] = rec["result"]["skipped"]
    return rec


def reusable(path: Path, scale: str) -> dict[str, Any]:
    """The steps of an earlier results.json that succeeded (or that ran and reported why
    they skip, as the GPU step without a GPU), each marked with the date and machine load of
    the run that measured it (its ratios were measured side by side within that step).

    Raises:
        SystemExit: the file is missing or from another scale.
    """
    if not path.is_file():
        raise SystemExit(f"--reuse {path}: no such file")
    old = json.loads(path.read_text())
    if old["suite"]["scale"] != scale:
        raise SystemExit(f"--reuse {path}: that run is scale {old['suite']['scale']}, not {scale}")
    when = f"{old['machine']['date']} (load average {old['machine']['load_average']})"
    return {name: {"from_run": when, **rec} for name, rec in old["steps"].items()
            if rec.get("status") == "ok" or (rec.get("status") == "skipped" and "result" in rec)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--scale", default="small", choices=sorted(SCALES))
    ap.add_argument("--out", default=str(BENCH), help="results.json, RESULTS.md, plots/ go here")
    ap.add_argument("--workdir", default="",
                    help="generated data, logs and raw JSON (default: a temp dir)")
    ap.add_argument("--only", default="", help=f"comma-separated steps of {','.join(STEPS)}")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--index-dim", type=int, default=0,
                    help="vector dimension of the index benchmark (0: the scale's, 512)")
    ap.add_argument("--serve-workdir", default="",
                    help="serve this quickstart output instead of building a small world")
    ap.add_argument("--step-timeout", type=float, default=3600.0, help="seconds per command")
    ap.add_argument("--reuse", default="",
                    help="a results.json of an earlier run at the same scale: its steps that "
                         "succeeded are kept (marked with that run's date) unless named in "
                         "--only; the rest run again")
    args = ap.parse_args(argv)
    for flag in ("only", "skip"):
        names = [s.strip() for s in getattr(args, flag).split(",") if s.strip()]
        bad = sorted(set(names) - set(STEPS))
        if bad:
            ap.error(f"--{flag}: unknown steps {bad}; steps are {list(STEPS)}")
        setattr(args, flag, names)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every step that ran succeeded (skips included), else 1."""
    args = parse(argv)
    scale = SCALES[args.scale]
    out = Path(args.out).resolve()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="aligner-bench-")).resolve()
    raw, logs = work / "raw", work / "logs"
    for d in (out, raw, logs):
        d.mkdir(parents=True, exist_ok=True)
    plan = commands(scale, work, raw, args.index_dim or None, args.serve_workdir)
    wanted = [s for s in scale.steps if (not args.only or s in args.only)
              and s not in args.skip]
    started = time.time()
    results: dict[str, Any] = {
        "suite": {"scale": args.scale, "command": shlex.join([sys.executable, *sys.argv]),
                  "workdir": str(work), "steps": wanted},
        "machine": machine_info(),
        "steps": {},
    }
    reused = reusable(Path(args.reuse), args.scale) if args.reuse else {}
    print(f"benchmark suite, scale {args.scale}: steps {wanted}; logs in {logs}", flush=True)
    for name in STEPS:
        if name in reused and (name not in wanted or name not in args.only):
            results["steps"][name] = reused[name]
            print(f"{name}: reused from {reused[name]['from_run']}", flush=True)
            continue
        if name not in wanted:
            why = (scale.notes.get(name, f"not run at scale {args.scale}")
                   if name not in scale.steps else "left out (--only / --skip)")
            results["steps"][name] = {"status": "skipped", "reason": why}
            continue
        print(f"[{time.time() - started:6.0f} s] {name} ...", flush=True)
        rec = run_step(name, plan[name], raw, logs, args.step_timeout)
        if name in scale.notes and rec["status"] == "ok":
            rec["note"] = scale.notes[name]
        results["steps"][name] = rec
        print(f"[{time.time() - started:6.0f} s] {name}: {rec['status']} in "
              f"{rec['wall_s']:.0f} s" + (f" ({rec.get('error') or rec.get('reason')})"
                                          if rec["status"] != "ok" else ""), flush=True)
    results["suite"]["wall_s"] = time.time() - started
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]

    from report import write_all

    paths = write_all(results, out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 1 if any(r["status"] == "failed" for r in results["steps"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
