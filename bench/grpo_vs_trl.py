"""Benchmark (not a test): seconds per GRPO step of the project's loop vs TRL's GRPOTrainer.

What is measured. One GRPO optimizer step = sample G responses for each of N prompts, score them
with the frozen reference (KL term) and the reward, group-normalise the advantages, one clipped
policy-gradient update (mu = 1). Both implementations run the *same work definition*:

  16 prompts x G = 8 -> 128 completions per step, 4 new tokens, temperature 1.0 (no top-k/top-p),
  beta 0.04 (k3 KL to the frozen reference), clip eps 0.2, mu = 1, AdamW lr 1e-4 constant
  (betas 0.9/0.999, eps 1e-8, wd 0), global grad-norm clip 1.0, fp32 on CPU, --threads torch threads,
  the policy's vision tower frozen on both sides (the project's default; --train-vision trains it on both),

on the same checkpoint (--model-dir, default runs/default/base: the project's tiny Qwen2-VL SFT
reference policy; TRL loads its reference model from the same directory) and the same prompts:
the federation's GRPO prompt pool, written to a JSONL file that the TRL side reads.

  ours  `grpo.train_grpo` with `mixture.OracleReward` on the pool, called exactly as stages.stage_grpo
        calls it. Step time = wall time between consecutive `on_step` callbacks (the callback
        fires once per step, after the update), so it covers the whole loop body: batch fetch +
        image decode + processor, generate, reference forward, reward, policy forward/backward,
        AdamW, logging. The first step is timed from just before the train_grpo call (optimizer
        construction included), which is why warm-up steps are dropped.
  TRL   bench/trl_grpo_bench.py, run as a subprocess by the python of a separate venv that has
        trl (--trl-python, default bench/.venv/bin/python; bench/README.md creates it), with the
        same --model-dir/--steps/--warmup/--threads/--seed. Its `loop_wall` (on_step_end ->
        on_step_end, dataloader and logging included) is the same quantity.

Both report the median over the steps after the first --warmup ones; ratio = TRL / ours. Peak
memory: ours is resource.getrusage(RUSAGE_SELF).ru_maxrss of this process (model, reference,
federation data and all); TRL's is the VmHWM of its own process, read by the harness at the end.

Known differences that are part of the implementations, not of the settings:
  * ours runs the vision tower once per distinct image (N = 16 per pass) and shares the features
    across the G samples (grpo.py module doc); TRL repeats each prompt G times in its sampler, so
    it encodes all 128 rows' images in generate, in the reference forward and in the policy
    forward, and runs the processor twice a step;
  * ours also pools the routing features from the reference forward's hidden states (E2);
  * prompts: the same pool, but each side draws its batches in its own seeded order;
  * rewards: ours is the oracle (well-formed one-word answer == gold), TRL's is "first word ==
    gold" (its decoded text has no end token to check); either costs < 1 ms per step.

Threads matter more than anything else on a small shared machine (2 OpenMP threads on 2 busy
cores spin-wait on every small op): compare at one fixed --threads, 1 by default, on both sides.

Usage (from the repository root; the TRL venv once, see bench/README.md):
  python3 -m venv bench/.venv && bench/.venv/bin/pip install -r bench/requirements.txt
  .venv/bin/python -m bench.grpo_vs_trl --threads 1 --steps 20 --warmup 3 --out /tmp/bench_grpo.json
--no-trl measures ours only (no TRL venv needed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(__file__).resolve().parent.parent  # the repository root
TRL_HARNESS = HERE / "bench" / "trl_grpo_bench.py"
TRL_VENV_HOWTO = "python3 -m venv bench/.venv && bench/.venv/bin/pip install -r bench/requirements.txt"

# The benchmark's work definition (bench/trl_grpo_bench.py's HPARAMS, in grpo.GRPOConfig's names).
SETTINGS = dict(prompts=16, group=8, max_new_tokens=4, lr=1e-4, beta=0.04, clip_eps=0.2, mu=1, temperature=1.0)


def vm_hwm_kb() -> int:
    """Peak resident set of this process's address space (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


# ----------------------------------------------------------------------------------------------
# Ours: grpo.train_grpo, timed per step through on_step, with a phase split from thin wrappers
# ----------------------------------------------------------------------------------------------


class PhaseTimer:
    """Seconds per phase, accumulated within a step and closed by on_step. The wrappers only add
    a perf_counter pair around calls the loop makes anyway; behaviour is unchanged."""

    def __init__(self):
        self.cur, self.steps = defaultdict(float), []

    def wrap(self, fn, name_of):
        """fn -> same fn that adds its wall time to phase name_of(*args) (None: not counted)."""
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                name = name_of(*a, **k)
                if name:
                    self.cur[name] += time.perf_counter() - t
        return timed

    def close(self) -> dict:
        d, self.cur = dict(self.cur), defaultdict(float)
        self.steps.append(d)
        return d


def bench_ours(args, fed) -> dict:
    import grpo
    import mixture
    import models

    # The pool's gold answers are read only by the oracle reward (as in stages.stage_grpo).
    t = time.perf_counter()
    gold = pool_gold(fed)
    policy, proc = models.load_vlm(args.model_dir, dtype=torch.float32, device="cpu")
    ref, _ = models.load_vlm(args.model_dir, dtype=torch.float32, device="cpu")  # frozen pi_ref
    setup_s = time.perf_counter() - t
    # (code from before GRPOConfig.train_vision trains the tower: measure it with --train-vision)
    vision = {"train_vision": args.train_vision} if hasattr(grpo.GRPOConfig, "train_vision") else {}
    cfg = grpo.GRPOConfig(steps=args.warmup + args.steps, **vision, **SETTINGS)

    # Phase split, the counterpart of the TRL harness's columns:
    #   rollout   Encoder (image load + processor) + policy.generate + decode
    #   ref_fwd   vision tower on the 16 images + reference forward (log-probs, hidden states)
    #   pol_fwd   vision tower + policy forward with grad (log-probs); the loss itself is in other
    #   bwd_opt   models.guarded_step: zero_grad, backward, grad clip, AdamW step
    #   other     the rest of the loop body (response batch, reward, advantages, loss, logging)
    ph = PhaseTimer()
    enc = models.Encoder(proc)

    class TimedEncoder(models.Encoder):  # __call__ is looked up on the type: subclass, not patch
        def __call__(self, *a, **k):
            return ph.wrap(super().__call__, lambda *_, **__: "rollout")(*a, **k)

        def decode(self, ids):
            return ph.wrap(super().decode, lambda *_, **__: "rollout")(ids)

    enc.__class__ = TimedEncoder
    which = lambda vlm, *_, **__: "ref_fwd" if vlm is ref else "pol_fwd"  # noqa: E731
    saved = (grpo.token_logprobs, models.image_features, models.guarded_step)
    grpo.token_logprobs = ph.wrap(saved[0], which)
    models.image_features = ph.wrap(saved[1], which)
    models.guarded_step = ph.wrap(saved[2], lambda *_, **__: "bwd_opt")
    policy.generate = ph.wrap(policy.generate, lambda *_, **__: "rollout")  # instance attr shadows the method

    ticks, cpu_ticks, phases = [], [], []

    def on_step(step, info):
        ticks.append(time.perf_counter())
        cpu_ticks.append(time.process_time())  # CPU seconds: what load on the other cores does not inflate
        phases.append(ph.close())

    la0 = loadavg()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        log = grpo.train_grpo(policy, ref, enc, fed.pool, mixture.OracleReward(gold), cfg, args.seed, gold=gold,
                              on_step=on_step, desc="bench grpo")
        total = time.perf_counter() - t0
    finally:
        grpo.token_logprobs, models.image_features, models.guarded_step = saved
        del policy.generate
    la1 = loadavg()
    # step i's wall time = tick_i - tick_{i-1}; step 1's is from just before train_grpo
    walls = [b - a for a, b in zip([t0, *ticks[:-1]], ticks)]
    for d, w in zip(phases, walls):
        d["other"] = w - sum(d.values())
    measured = walls[args.warmup:] or walls
    cpus = [b - a for a, b in zip([c0, *cpu_ticks[:-1]], cpu_ticks)]
    split = {k: statistics.median(d.get(k, 0.0) for d in phases[args.warmup:] or phases)
             for k in ("rollout", "ref_fwd", "pol_fwd", "bwd_opt", "other")}
    return {
        "median_s_per_step": statistics.median(measured),
        "median_cpu_s_per_step": statistics.median(cpus[args.warmup:] or cpus),
        "mean_s_per_step": statistics.mean(measured),
        "min_s_per_step": min(measured),
        "median_split_s": split,
        "step_wall_s": walls,
        "per_step_phases_s": phases,
        "total_train_s": total,
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB
        "vm_hwm_mb": vm_hwm_kb() / 1024,
        "loadavg_before_after": [la0, la1],
        "reward_per_step": log["reward"],
        "kl_per_step": log["kl"],
        "params": sum(p.numel() for p in policy.parameters()),
    }


# ----------------------------------------------------------------------------------------------
# TRL: bench/trl_grpo_bench.py in its own venv, as a subprocess with identical settings
# ----------------------------------------------------------------------------------------------


def pool_gold(fed) -> dict:
    """{(image, prompt): answer}: both sides train the oracle, whose reward needs every answer."""
    import data

    gold = data.pool_gold(fed)
    if gold is None:
        raise SystemExit("bench: the prompt pool has no gold answers; the oracle reward needs them")
    return gold


def write_prompts(fed, path: Path) -> Path:
    """The pool as JSONL (absolute image path, question, gold) for the TRL side, which imports
    nothing from the project: its venv only needs trl and the images on disk."""
    gold = pool_gold(fed)
    with open(path, "w") as f:
        for e in fed.pool:
            f.write(json.dumps({"image": os.path.abspath(e.image), "prompt": e.prompt,
                                "answer": gold[e.image, e.prompt]}) + "\n")
    return path


def bench_trl(args, workdir: Path, prompts: Path) -> dict:
    results, log_file = workdir / "trl_results.json", workdir / "trl.log"
    cmd = [args.trl_python, str(TRL_HARNESS), "--model-dir", str(Path(args.model_dir).resolve()),
           "--prompts", str(prompts), "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--seed", str(args.seed), "--output-dir", str(workdir / "trl_out"),
           "--results", str(results), "--show-completions", "4"] + ([] if args.train_vision else ["--freeze-vision"])
    print(f"[bench] TRL: {' '.join(cmd)}  (log: {log_file})", flush=True)
    with open(log_file, "w") as f:  # cwd: TRL's stray outputs go beside the results, not into the repo
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=workdir).returncode
    if rc != 0 or not results.is_file():
        tail = "".join(open(log_file).readlines()[-30:])
        raise SystemExit(f"[bench] TRL harness failed (exit {rc}); last lines of {log_file}:\n{tail}")
    r = json.loads(results.read_text())
    return {
        "median_s_per_step": r["median_s_per_step"],  # loop_wall: on_step_end -> on_step_end
        "median_cpu_s_per_step": r.get("median_cpu_s_per_step"),
        "median_step_wall_s": r["median_step_wall_s"],  # on_step_begin -> on_step_end
        "median_split_s": r["median_split_s"],
        "step_wall_s": [s["loop_wall"] for s in r["per_step"]],
        "total_train_s": r["total_train_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "loadavg_before_after": r["loadavg_before_after"],
        "versions": r["versions"],
        "reward_per_step": r["rewards_per_step"],
        "results_json": str(results),
        "log": str(log_file),
    }


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(HERE / "runs/default/base"),
                   help="Qwen2-VL checkpoint dir with processor + chat template (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="measured steps, after the warm-up ones")
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the median")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both (0: torch's default)")
    p.add_argument("--seed", type=int, default=42, help="sampling/batch-order seed (the TRL harness's default)")
    p.add_argument("--data-seed", type=int, default=0, help="federation split seed (runs/default used 0)")
    p.add_argument("--trl-python", default=str(HERE / "bench/.venv/bin/python"),
                   help="python of the separate venv with trl (default: bench/.venv/bin/python)")
    p.add_argument("--no-trl", action="store_true", help="measure ours only")
    p.add_argument("--train-vision", action="store_true",
                   help="train the policy's vision tower on both sides (default: frozen on both, the project's "
                        "default; TRL still encodes every row's image in each pass)")
    p.add_argument("--trl-first", action="store_true", help="run TRL before ours (to check order effects)")
    p.add_argument("--out", default=None, help="JSON results path (TRL's json and log go beside it)")
    args = p.parse_args(argv)
    # Both inputs are checked before any work: ours alone takes minutes before TRL would start.
    if not (Path(args.model_dir) / "config.json").is_file():
        p.exit(2, f"bench/grpo_vs_trl.py: no checkpoint at {args.model_dir}; build the project's base first "
                  "(python mor.py --stages base,sft) or pass --model-dir DIR\n")
    if not args.no_trl and not os.access(args.trl_python, os.X_OK):
        p.exit(2, f"bench/grpo_vs_trl.py: no TRL venv python at {args.trl_python}; create it from the repository "
                  f"root with: {TRL_VENV_HOWTO} (or pass --trl-python PY, or --no-trl)\n")
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # before any work: the pool size is fixed at first use
    sys.path.insert(0, str(HERE))  # import data, grpo from the repo whatever the cwd
    workdir = Path(args.out).resolve().parent if args.out else Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    if args.out:
        workdir = workdir / (Path(args.out).stem + "_files")
    workdir.mkdir(parents=True, exist_ok=True)

    import transformers

    import data

    # The federation as runs/default was built (data seed 0, default split sizes); its GRPO
    # prompt pool is what both sides train on.
    t = time.perf_counter()
    fed = data.build_federation(args.data_seed)
    prompts = write_prompts(fed, workdir / "prompts.jsonl")
    federation_s = time.perf_counter() - t

    res = {"command": " ".join([sys.executable, *sys.argv]), "settings": dict(SETTINGS, train_vision=args.train_vision),
           "steps": args.steps,
           "warmup": args.warmup, "threads": torch.get_num_threads(), "seed": args.seed,
           "model_dir": str(Path(args.model_dir).resolve()), "federation_s": federation_s,
           "pool_prompts": len(fed.pool),
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")}
    # back to back, one after the other: the two never share the cores with each other
    order = ["trl", "ours"] if args.trl_first else ["ours", "trl"]
    for name in order:
        if name == "ours":
            res["ours"] = bench_ours(args, fed)
        elif not args.no_trl:
            res["trl"] = bench_trl(args, workdir, prompts)
    ours, trl = res["ours"], res.get("trl")
    if trl:
        res["ratio_trl_over_ours"] = trl["median_s_per_step"] / ours["median_s_per_step"]
        res["cpu_ratio_trl_over_ours"] = trl["median_cpu_s_per_step"] / ours["median_cpu_s_per_step"]

    # ------------------------------------------------------------------ report
    n = f"steps {args.warmup + 1}..{args.warmup + args.steps}"
    print(f"\nGRPO s/step, median over {n}; 16 prompts x G=8, 4 new tokens, fp32, {res['threads']} thread(s)\n")
    print("| impl | median s/step | min s/step | peak RSS MB | loadavg before -> after |")
    print("| --- | --- | --- | --- | --- |")
    rows = [("ours (grpo.train_grpo)", ours)] + ([("TRL GRPOTrainer", trl)] if trl else [])
    for label, r in rows:
        mn = min(r["step_wall_s"][args.warmup:] or r["step_wall_s"])
        la = r["loadavg_before_after"]
        print(f"| {label} | {r['median_s_per_step']:.3f} | {mn:.3f} | {r['peak_rss_mb'] or float('nan'):.0f} | "
              f"{la[0][0]} -> {la[1][0]} |")
    if trl:
        print(f"\nratio TRL / ours: {res['ratio_trl_over_ours']:.2f}x wall, {res['cpu_ratio_trl_over_ours']:.2f}x CPU seconds "
              f"(median CPU s/step: ours {ours['median_cpu_s_per_step']:.3f}, TRL {trl['median_cpu_s_per_step']:.3f})")
    print("\nmedian split (s): ours " + json.dumps({k: round(v, 4) for k, v in ours["median_split_s"].items()}))
    if trl:
        print("median split (s): TRL  " + json.dumps({k: round(v, 4) for k, v in trl["median_split_s"].items()}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        print(f"\n[bench] results -> {args.out}")
    return res


if __name__ == "__main__":
    main()
