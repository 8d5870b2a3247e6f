"""Benchmark (not a test): seconds per GRPO step of soft MoR and hard routing as K grows.

The many-client settings' tables (results-many6/12.md) report each method's seconds per step as
its GRPO jobs measured them, two workers side by side on a machine that may be busy. This script
measures the same thing under one condition: in one process and one torch thread, the same
reference as policy, the same seeds (hence the same prompts and sampling stream), and the K = 3,
6 and 12 federations' own routers over the first K of the K = 12 setting's client RMs (the
experts, then the narrow clients in pipeline.MANY's order, so the first 6 are K = 6's).

For each K and each reward (mor_soft: the router's soft mixture, every RM on every distinct row;
mor_hard: the router's argmax RM per prompt, one RM per row), it runs grpo.train_grpo for
--warmup + --steps steps and reports the median step time after the warm-up and the median time
of the reward call alone (the log's reward_seconds), plus RM rows scored per step.

Usage, after `bash train.sh --setting many6` and `--setting many12` in the same run directory:
  .venv/bin/python -m bench.routing_cost --run-dir runs/main --steps 10 --out runs/main/bench_routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import grpo
import mixture
import models
import reward
import router
import safe_io
from harness.pipeline import Run, grpo_config, make_router
from mor import parse_args

SETTING_OF_K = {3: "heterogeneous", 6: "many6", 12: "many12"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/main")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = {K: Run(parse_args(["--setting", s, "--run-dir", a.run_dir])) for K, s in SETTING_OF_K.items()}
    big = runs[12]
    names = list(big.fed.clients)
    assert names[:6] == list(runs[6].fed.clients) and names[:3] == list(runs[3].fed.clients), names
    for K, run in runs.items():
        if not run.output("router").exists():
            raise SystemExit(f"{run.output('router')} is missing: run bash train.sh --run-dir {a.run_dir} "
                             f"--setting {SETTING_OF_K[K]} first")
    rms = [reward.RewardModel.load(big.rm_dir(k)) for k in names]  # loaded once, the first K used per K
    cfg = grpo_config(big)
    cfg.steps = a.warmup + a.steps
    out = {"steps": a.steps, "warmup": a.warmup, "seed": a.seed, "threads": 1, "K": {}}
    for K, run in runs.items():
        r = make_router(run)()  # this K's federated router
        r.load_state_dict(safe_io.load_router_state(run.output("router"), r))
        for method in ("mor_soft", "mor_hard"):
            fn = mixture.MixedReward(rms[:K], r) if method == "mor_soft" else mixture.HardReward(rms[:K], r, cfg.group)
            policy, proc = models.load_vlm(big.dir / "base")
            ref, _ = models.load_vlm(big.dir / "base")
            stamps = []
            t = time.perf_counter()
            log = grpo.train_grpo(policy, ref, models.Encoder(proc), big.fed.pool, fn, cfg, a.seed,
                                  on_step=lambda *_: stamps.append(time.perf_counter()),
                                  desc=f"K={K} {method}")
            steps = [b - a_ for a_, b in zip([t] + stamps, stamps)][a.warmup:]
            out["K"].setdefault(K, {})[method] = {
                "seconds_per_step": statistics.median(steps),
                "reward_seconds": statistics.median(log["reward_seconds"][a.warmup:]),
                "rm_rows_per_step": sum(fn.calls) / len(log["reward"])}
            m = out["K"][K][method]
            print(f"K={K:2d} {method:8s}: {m['seconds_per_step']:.2f} s/step, reward {m['reward_seconds']:.2f} s, "
                  f"{m['rm_rows_per_step']:.0f} rows", flush=True)
    for method in ("mor_soft", "mor_hard"):
        k12, k3 = out["K"][12][method], out["K"][3][method]
        out[f"{method}_ratio_12_vs_3"] = k12["seconds_per_step"] / k3["seconds_per_step"]
    print(f"K = 12 / K = 3 seconds per step: mor_soft {out['mor_soft_ratio_12_vs_3']:.2f}x (target <= 3), "
          f"mor_hard {out['mor_hard_ratio_12_vs_3']:.2f}x (target <= 1.2)")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
