"""Measure a local Flower federation on this machine: how late a crashed SuperNode is noticed, and
what a round costs. The figures of docs/flower.md come from these commands (run from the repo root):

  python tests/flower_timing.py liveness [--round-timeout 120] [--rounds 3]
  python tests/flower_timing.py rounds [--rounds 6]
  python tests/flower_timing.py idle
  FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 python tests/flower_timing.py rounds   # faster task polling

All three use the tests' synthetic caches (3 clients, D=16, K=3, 200-300 pairs, E=2): the rounds cost
Flower's overhead, not compute.

liveness  SIGKILLs c1's SuperNode (and its ClientApp) as round 1 starts, then logs when each later
          round ended and why c1 dropped (our --round-timeout, or the SuperLink's offline verdict),
          and the time the SuperLink itself recorded for c1 going offline (`flwr supernode ls`:
          offline-at, the end of its heartbeat patience, in whole seconds).
rounds    the per-round wall seconds of a run without faults.
idle      the CPU a started, idle federation uses over 30 s (what the SuperExecs' task polling costs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from test_flower import _federation  # noqa: E402

from federation import flower_fed  # noqa: E402
from federation import flower_local  # noqa: E402


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def liveness(rounds: int, round_timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mor-liveness-"))
    man, _, _ = _federation(tmp)
    log: dict = {"round_timeout": round_timeout, "rounds": []}

    def during(fed, cfg):  # kill c1 as round 1 starts, then time every later round
        progress = Path(cfg.progress_path)
        while not _lines(progress) and fed.run_proc.poll() is None:
            time.sleep(0.05)
        t_kill = time.time()
        fed.kill_node("c1")
        seen = 1
        while seen < rounds and fed.run_proc.poll() is None:
            entries = _lines(progress)
            for e in entries[seen:]:
                log["rounds"].append({"round": e["round"], "ended_after_kill_s": round(time.time() - t_kill, 1),
                                      "round_s": e["seconds"], "c1": e["dropped"].get("c1")})
            seen = len(entries)
            time.sleep(0.05)
        # what the SuperLink recorded, asked over its Control API while it still runs
        out = subprocess.run([flower_local.flower_bin("flwr"), "supernode", "ls", flower_local.SUPERLINK_NAME,
                              "--format", "json"], env=fed._env(fed.server_home), capture_output=True, text=True,
                             timeout=120).stdout
        nodes = json.loads(out[out.index("{"):])["nodes"]
        for n in nodes:  # "offline-at": when its heartbeat patience ran out (whole seconds, UTC)
            if n["offline-at"] not in ("", "N/A"):
                off = datetime.fromisoformat(n["offline-at"].replace("Z", "+00:00")).timestamp()
                log["superlink_offline_after_kill_s"] = round(off - t_kill, 1)
        log["node_status"] = sorted(n["status"] for n in nodes)

    flower_fed.launch(man, tmp, overrides=dict(rounds=rounds, min_clients=2, round_timeout=round_timeout,
                                               evaluate=False), timeout=600, verbose=False, during=during)
    return log


def round_times(rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mor-rounds-"))
    man, _, _ = _federation(tmp)
    s = flower_fed.launch(man, tmp, overrides=dict(rounds=rounds, evaluate=False), timeout=600, verbose=False)
    per = [e["seconds"] for e in s["rounds"]]
    return {"task_poll_interval": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                                                 "1 (Flower's default)"),
            "round_s": per, "median_s": statistics.median(per), "handshake_s": s["seconds"]["handshake"],
            "launch_wall_s": s["seconds"]["launch_wall"]}


def idle_cpu(seconds: float) -> dict:
    """CPU seconds per second that a started but idle federation burns (SuperLink, 3 SuperNodes and
    their SuperExecs polling for tasks), from /proc after start-up has settled."""
    tmp = Path(tempfile.mkdtemp(prefix="mor-idle-"))
    man, _, _ = _federation(tmp)
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(fed) -> float:  # utime + stime of every process the federation runs, in seconds
        total = 0
        for p in fed._procs:
            for pid in flower_local._process_tree(p.pid):
                try:
                    total += sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
                except (OSError, ValueError):
                    pass
        return total / tick

    with flower_local.LocalFederation(flower_fed.load_manifest(man)["caches"], tmp / "work", tmp / "logs",
                                      verbose=False) as fed:
        time.sleep(15)  # imports and registration done
        c0, t0 = cpu(fed), time.time()
        time.sleep(seconds)
        used = cpu(fed) - c0
    return {"task_poll_interval": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                                                 "1 (Flower's default)"),
            "idle_cpu_s_per_s": round(used / (time.time() - t0), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("liveness", "rounds", "idle"))
    p.add_argument("--rounds", type=int, default=None, help="liveness: 3, rounds: 6")
    p.add_argument("--round-timeout", type=float, default=120.0, help="liveness: our wait for a round's replies")
    a = p.parse_args()
    torch.set_num_threads(1)
    t = time.time()
    res = (liveness(a.rounds or 3, a.round_timeout) if a.what == "liveness" else
           round_times(a.rounds or 6) if a.what == "rounds" else idle_cpu(30.0))
    res["wall_s"] = round(time.time() - t, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
