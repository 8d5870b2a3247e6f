"""Profile (not a test): where the default run's time goes, by stage and, inside GRPO, the client
RM loop and evaluation, by phase; each phase's model FLOPs against what these cores reach on a
plain matmul of the model's widths, measured in the same run.

  .venv/bin/python -m bench.profile_run --run-dir runs/default --threads 1 --out docs/profile.json

What it runs: a representative slice of each loop, on the run directory's checkpoints (the
reference `base/`, the client RMs under `clients/` when the reward stage has run):

  grpo   `grpo.train_grpo` as the grpo stage calls it, on the federation's prompt pool (16 prompts
         x G = 8, 4 new tokens), rewarded by Avg RM over every client RM (the methods that run
         all K RMs, the stage's costliest jobs; the oracle when there are no RMs yet);
  rm     `reward.train_reward_model` of one client (SFT warm-up steps, then Bradley-Terry steps)
         from the tiny checkpoint of its family, on its own pairs, at the default batch sizes;
  eval   `judge.evaluate` of the reference on a slice of the test split (the per-job evaluation
         every GRPO job ends with).

Phases: thin wrappers add a timer around calls the loops make anyway (behaviour unchanged). A
call made inside another timed call counts for the outer one only, so the phases add up:

  rollout   Encoder (image load + processor), policy.generate, decode
  vision    the vision tower (models.image_features) outside generate
  ref_fwd   reference forward: token log-probs + hidden states for the routing features
  pol_fwd   policy forward with grad (and the no-grad ones of mu > 1 or the median rule)
  bwd_opt   models.guarded_step: zero_grad, backward, grad clip, AdamW step
  reward    the reward function (client RM forwards on the sampled responses, E3's mixture)
  inputs    Encoder calls of the RM loop and evaluation (processor, tokenisation)
  forward   RM / SFT forward (loss included)
  generate  evaluation's greedy generate
  other     the rest of the loop body (advantages, loss, logging, batch fetch)

Seconds: the median per step of wall time and of this process's CPU time (`time.process_time`;
with one thread it is the part of the wall time that load on the other cores does not inflate).

FLOPs: counted by torch's FlopCounterMode over extra steps run after the timed ones (the
counter's dispatch overhead would distort the timings): matmuls, convolutions and attention,
forward and backward. `peak` is the best GFLOP/s of a plain fp32 matmul [M, H] x [H, W] for W in
the model's widths (hidden, MLP, vocabulary; M = the rows x tokens of a GRPO forward), timed here
with the same threads. achieved = FLOPs / CPU seconds of the phase; share = achieved / peak: how
far each phase is from this machine's limit for the model's shapes.

Stages: the seconds the pipeline recorded for each stage of --run-dir (wall_seconds.json), when
there, beside the slice's own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent.parent  # the repository root
GRPO_PHASES = ("rollout", "vision", "ref_fwd", "pol_fwd", "bwd_opt", "reward", "other")
RM_PHASES = ("inputs", "vision", "forward", "bwd_opt", "other")
EVAL_PHASES = ("inputs", "vision", "generate", "other")


class Phases:
    """Wall and CPU seconds (and, when counting, FLOPs) per phase, accumulated within a step and
    closed by `close()`. Only the outermost timed call is charged: nested calls pass through."""

    def __init__(self):
        self.wall, self.cpu, self.flops = defaultdict(float), defaultdict(float), defaultdict(float)
        self.steps: list[dict] = []
        self.active = False
        self.counting = False

    def wrap(self, fn, name_of):
        def timed(*a, **k):
            name = name_of(*a, **k)
            if self.active or not name:
                return fn(*a, **k)
            self.active = True
            counter = FlopCounterMode(display=False) if self.counting else None
            w, c = time.perf_counter(), time.process_time()
            try:
                if counter is None:
                    return fn(*a, **k)
                with counter:
                    return fn(*a, **k)
            finally:
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.process_time() - c
                if counter is not None:
                    self.flops[name] += counter.get_total_flops()
                self.active = False
        return timed

    def close(self, wall: float, cpu: float) -> None:
        """End a step that took `wall` / `cpu` seconds in all: the untimed rest is `other`."""
        d = {"wall": dict(self.wall), "cpu": dict(self.cpu), "flops": dict(self.flops)}
        d["wall"]["other"] = wall - sum(self.wall.values())
        d["cpu"]["other"] = cpu - sum(self.cpu.values())
        self.steps.append(d)
        self.reset()

    def reset(self) -> None:
        """Drop what was timed since the last step closed (work after a loop's last step)."""
        self.wall, self.cpu, self.flops = defaultdict(float), defaultdict(float), defaultdict(float)


def patch(targets: list, ph: Phases):
    """targets: (object, attribute, name_of) -> wrappers installed; returns an undo function."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    for (obj, attr, name_of), (_, _, fn) in zip(targets, saved):
        setattr(obj, attr, ph.wrap(fn, name_of))

    def undo():
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    return undo


def summarise(ph: Phases, timed: list[dict], counted: list[dict], names: tuple, peak: float) -> dict:
    """Median seconds per step by phase over the timed steps, mean FLOPs per step over the counted."""
    out = {}
    for k in names:
        wall = statistics.median(s["wall"].get(k, 0.0) for s in timed)
        cpu = statistics.median(s["cpu"].get(k, 0.0) for s in timed)
        flops = statistics.mean(s["flops"].get(k, 0.0) for s in counted) if counted else 0.0
        gf = flops / cpu / 1e9 if cpu > 0 and flops else 0.0
        out[k] = {"wall_s": wall, "cpu_s": cpu, "gflop": flops / 1e9, "gflops_per_s": gf,
                  "share_of_peak": gf / peak if peak else 0.0}
    tot = {"wall_s": sum(v["wall_s"] for v in out.values()), "cpu_s": sum(v["cpu_s"] for v in out.values()),
           "gflop": sum(v["gflop"] for v in out.values())}
    tot["gflops_per_s"] = tot["gflop"] / tot["cpu_s"] if tot["cpu_s"] else 0.0
    tot["share_of_peak"] = tot["gflops_per_s"] / peak if peak else 0.0
    out["step"] = tot
    return out


# ----------------------------------------------------------------------------------------------
# The machine's limit at the model's shapes
# ----------------------------------------------------------------------------------------------


def matmul_peak(M: int, H: int, widths: dict, repeat: int = 20) -> dict:
    """GFLOP/s of fp32 x [M, H] @ w [H, W] for each width W (CPU time, best of `repeat`)."""
    out = {}
    for name, W in widths.items():
        x, w = torch.randn(M, H), torch.randn(H, W)
        x @ w  # warm the allocator and the kernel choice
        best = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            x @ w
            best = min(best, time.process_time() - t)
        out[name] = {"shape": [M, H, W], "gflops_per_s": 2 * M * H * W / max(best, 1e-9) / 1e9}
    return out


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------


def profile_grpo(args, fed, peak: float) -> dict:
    import data
    import grpo
    import mixture
    import models
    import reward
    import router
    from harness.pipeline import SETTINGS

    policy, proc = models.load_vlm(args.model_dir, dtype=torch.float32, device="cpu")
    ref, _ = models.load_vlm(args.model_dir, dtype=torch.float32, device="cpu")
    rm_dirs = [Path(args.run_dir) / "clients" / k / f"reward-{SETTINGS['heterogeneous'][k]}" for k in fed.clients]
    if all((d / "reward.json").is_file() for d in rm_dirs):
        rms = [reward.RewardModel.load(d) for d in rm_dirs]
        if args.cache and hasattr(grpo, "ImageFeatures"):  # as the grpo stage does: frozen RMs, features once
            for rm in rms:
                rm.image_features = grpo.ImageFeatures().bind(rm.vlm)
        reward_fn, source = mixture.MixedReward(rms, router.avg_rm(len(rms))), f"avg_rm over {len(rms)} client RMs"
    else:
        gold = data.pool_gold(fed)
        reward_fn, source = mixture.OracleReward(gold), "oracle (no client RMs in the run dir)"
    ph = Phases()
    enc = models.Encoder(proc)

    class TimedEncoder(models.Encoder):  # __call__ is looked up on the type: subclass, not patch
        def __call__(self, *a, **k):
            return ph.wrap(super().__call__, lambda *_, **__: "rollout")(*a, **k)

        def decode(self, ids):
            return ph.wrap(super().decode, lambda *_, **__: "rollout")(ids)

    enc.__class__ = TimedEncoder
    which = lambda vlm, *_, **__: "ref_fwd" if vlm is ref else "pol_fwd"  # noqa: E731
    undo = patch([(grpo, "token_logprobs", which), (models, "image_features", lambda *_, **__: "vision"),
                  (models, "guarded_step", lambda *_, **__: "bwd_opt"),
                  (policy, "generate", lambda *_, **__: "rollout")], ph)
    timed_fn = ph.wrap(reward_fn, lambda *_, **__: "reward")
    # one per worker in the stage, shared by its jobs: here by the timed and the counted runs
    # (absent in code before the cache: the profile then measures that code as it is)
    kw = {"features": grpo.ImageFeatures()} if args.cache and hasattr(grpo, "ImageFeatures") else {}
    features = kw.get("features")
    clock = [time.perf_counter(), time.process_time()]

    def on_step(step, info):
        w, c = time.perf_counter(), time.process_time()
        ph.close(w - clock[0], c - clock[1])
        clock[:] = [w, c]

    if hasattr(grpo.GRPOConfig, "train_vision"):
        args.grpo["train_vision"] = args.train_vision
    cfg = grpo.GRPOConfig(steps=args.warmup + args.grpo_steps, **args.grpo)
    try:
        clock[:] = [time.perf_counter(), time.process_time()]
        grpo.train_grpo(policy, ref, enc, fed.pool, timed_fn, cfg, args.seed, on_step=on_step, desc="profile grpo",
                        **kw)
        timed = ph.steps[args.warmup:]
        ph.steps, ph.counting = [], True
        ph.reset()
        cfg.steps = args.count_steps
        clock[:] = [time.perf_counter(), time.process_time()]
        # a fresh cache: the counted steps see new images as the timed ones did (a worker's first job)
        kw = {k: grpo.ImageFeatures() for k in kw}
        grpo.train_grpo(policy, ref, enc, fed.pool, timed_fn, cfg, args.seed + 1, on_step=on_step,
                        desc="profile grpo (FLOPs)", **kw)
        counted = ph.steps
    finally:
        undo()
    return {"reward": source, "config": vars(cfg), "phases": summarise(ph, timed, counted, GRPO_PHASES, peak),
            "vision_cache": {"computed": features.computed, "reused": features.reused} if features else None,
            "params": sum(p.numel() for p in policy.parameters()),
            "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad)}


# ----------------------------------------------------------------------------------------------
# A client's RM loop (E1): SFT warm-up and Bradley-Terry steps
# ----------------------------------------------------------------------------------------------


def profile_rm(args, fed, peak: float) -> dict:
    """Each client's RM loop as the reward stage runs it: its own VLM (Run.client_init), its own
    training pairs, the default recipe's batch sizes; SFT warm-up steps, then BT steps."""
    import models
    import mor
    import reward
    from harness.pipeline import Run

    run = Run(mor.parse_args(["--run-dir", args.run_dir, "--threads", str(args.threads)]))
    clients = run.clients()
    names = args.rm_client.split(",") if args.rm_client else list(clients)
    ph = Phases()
    undo = patch([(models.Encoder, "__call__", lambda *_, **__: "inputs"),
                  (models, "image_features", lambda *_, **__: "vision"),
                  (reward, "sft_loss", lambda *_, **__: "forward"),
                  (reward.RewardModel, "pair_rewards", lambda *_, **__: "forward"),
                  (models, "guarded_step", lambda *_, **__: "bwd_opt")], ph)
    wrapped_step, clock = models.guarded_step, [0.0, 0.0]

    def step_end(*a, **k):  # a step of either phase ends with its optimizer step
        ok = wrapped_step(*a, **k)
        w, c = time.perf_counter(), time.process_time()
        ph.close(w - clock[0], c - clock[1])
        clock[:] = [w, c]
        return ok

    models.guarded_step = step_end
    stats = reward.reward_stats  # the loop's closing pass over all pairs: no step of the loop, skipped here
    reward.reward_stats = lambda *a, **k: (0.0, 1.0)
    out = {}
    try:
        for name in names:
            init = run.client_init(name)
            vlm, proc = models.load_vlm(init, dtype=torch.float32, device="cpu")
            rm = reward.RewardModel(vlm, proc)
            pairs = clients[name]._train  # the profile stands in for the client: its own pairs only
            cfg = run.rm_config(name)
            res = {"family": vlm.config.model_type, "pairs": len(pairs), "sft_batch": cfg.sft_batch,
                   "bt_batch": cfg.batch}
            n = args.warmup + args.rm_steps
            for phase in ("sft", "bt"):
                runs = []
                for counting, steps, seed in ((False, n, args.seed), (True, args.count_steps, args.seed + 1)):
                    ph.steps, ph.counting = [], counting
                    ph.reset()
                    clock[:] = [time.perf_counter(), time.process_time()]
                    if phase == "sft":
                        reward.train_sft(rm.vlm, rm.encoder, reward.warmup_examples(pairs), steps, cfg.sft_batch,
                                         cfg.sft_lr, seed, desc=f"profile {name} sft")
                    else:
                        one = reward.RMConfig(sft_steps=0, steps=steps, batch=cfg.batch, lr=cfg.lr)
                        reward.train_reward_model(rm, pairs, one, seed, desc=f"profile {name}")
                    runs.append(ph.steps[:steps])
                res[phase] = summarise(ph, runs[0][args.warmup:], runs[1], RM_PHASES, peak)
            out[name] = res
    finally:
        models.guarded_step, reward.reward_stats = wrapped_step, stats
        undo()
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation (E9): greedy answers on a slice of the test split
# ----------------------------------------------------------------------------------------------


def profile_eval(args, fed, peak: float) -> dict:
    """judge.evaluate of the reference on a test slice, as each GRPO job ends. With the cache:
    a worker's first job encodes the test images, its later jobs reuse them (frozen tower)."""
    import grpo
    import judge
    import models

    model, proc = models.load_vlm(args.model_dir, dtype=torch.float32, device="cpu")
    per = max(1, args.eval_questions // len(fed.test))
    test = {d: exs[:per] for d, exs in fed.test.items()}
    ph = Phases()
    undo = patch([(models.Encoder, "__call__", lambda *_, **__: "inputs"),
                  (models, "image_features", lambda *_, **__: "vision"),
                  (model, "generate", lambda *_, **__: "generate")], ph)
    out = {"questions": sum(map(len, test.values()))}
    cached = args.cache and "features" in inspect.signature(judge.evaluate).parameters
    try:
        # (label, count FLOPs, cache): first job timed, then counted on a fresh cache; later jobs
        passes = [("first", False, "new"), ("first", True, "new")]
        if cached:
            passes += [("later", False, "keep"), ("later", True, "keep")]
        runs, cache = {}, None
        for label, counting, mode in passes:
            ph.counting = counting
            if cached and mode == "new":
                cache = grpo.ImageFeatures()
            w, c = time.perf_counter(), time.process_time()
            judge.evaluate(model, models.Encoder(proc), test, desc="profile eval", **({"features": cache} if cached else {}))
            ph.close(time.perf_counter() - w, time.process_time() - c)
            runs.setdefault(label, []).append(ph.steps[-1])
        for label, (timed, counted) in runs.items():
            out[label] = summarise(ph, [timed], [counted], EVAL_PHASES, peak)
    finally:
        undo()
    return out


# ----------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    """The markdown tables of docs/profile.md."""
    lines = []
    st = res.get("stages_recorded")
    if st:
        lines += ["| stage | seconds (recorded by the run) |", "| --- | --- |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in st.items()]
        lines.append("")
    peak = res["peak"]
    lines += [f"Peak: {peak['gflops_per_s']:.2f} GFLOP/s (best fp32 matmul of the model's widths, "
              f"{res['threads']} thread(s): " + ", ".join(f"{k} {v['shape']} {v['gflops_per_s']:.2f}"
                                                        for k, v in peak["by_width"].items()) + ")", ""]
    lines += ["| loop | phase | wall s/step | CPU s/step | GFLOP/step | GFLOP/s | share of peak |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    loops = [("grpo", res.get("grpo", {}).get("phases"))]
    for name, r in res.get("rm", {}).items():
        loops += [(f"rm {name} sft", r["sft"]), (f"rm {name} bt", r["bt"])]
    for label in ("first", "later"):
        loops.append((f"eval ({label} job, whole slice)", res.get("eval", {}).get(label)))
    for loop, phases in loops:
        for k, v in (phases or {}).items():
            if k != "step" and v["wall_s"] == 0 and v["gflop"] == 0:
                continue
            lab = f"**{k}**" if k == "step" else k
            lines.append(f"| {loop} | {lab} | {v['wall_s']:.3f} | {v['cpu_s']:.3f} | {v['gflop']:.3f} | "
                         f"{v['gflops_per_s']:.2f} | {100 * v['share_of_peak']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(HERE / "runs/default"), help="run directory (default %(default)s)")
    p.add_argument("--model-dir", default=None, help="the policy checkpoint (default: RUN_DIR/base)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="leading steps of each loop left out of the medians")
    p.add_argument("--grpo-steps", type=int, default=8, help="timed GRPO steps")
    p.add_argument("--rm-steps", type=int, default=4, help="timed RM steps per phase (SFT warm-up, BT)")
    p.add_argument("--count-steps", type=int, default=2, help="extra steps per loop run under the FLOP counter")
    p.add_argument("--eval-questions", type=int, default=256, help="test questions evaluated (spread over domains)")
    p.add_argument("--rm-clients", dest="rm_client", default=None,
                   help="comma-separated clients whose RM loops are profiled (default: every client)")
    p.add_argument("--train-vision", action="store_true", help="profile GRPO with the vision tower trained")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="no image-feature cache carried between runs and no RM feature cache (a single job's view)")
    p.add_argument("--only", default="grpo,rm,eval", help="comma-separated subset of grpo,rm,eval")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    args.model_dir = args.model_dir or str(Path(args.run_dir) / "base")
    if not (Path(args.model_dir) / "config.json").is_file():
        p.exit(2, f"bench/profile_run.py: no checkpoint at {args.model_dir}; build it first "
                  "(python mor.py --stages base,sft) or pass --model-dir DIR\n")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import data

    # The benchmark's GRPO work (bench/grpo_vs_trl.py's): 16 prompts x G = 8, 4 new tokens
    args.grpo = dict(prompts=16, group=8, max_new_tokens=4)
    fed = data.build_federation(0)
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    H = text["hidden_size"]
    widths = {"hidden": H, "mlp": text["intermediate_size"], "vocab": text["vocab_size"]}
    # M: the token rows of one GRPO forward (128 sampled rows x ~the prompt + answer length)
    M = 128 * 40
    by_width = matmul_peak(M, H, widths)
    peak = max(v["gflops_per_s"] for v in by_width.values())
    res = {"command": " ".join([os.path.basename(sys.executable), "-m", "bench.profile_run", *sys.argv[1:]]),
           "threads": torch.get_num_threads(), "model_dir": args.model_dir, "loadavg": open("/proc/loadavg").read().split()[:3],
           "peak": {"gflops_per_s": peak, "by_width": by_width}}
    timings = Path(args.run_dir) / "wall_seconds.json"
    if timings.is_file():
        res["stages_recorded"] = json.loads(timings.read_text())
    only = args.only.split(",")
    slices = {}
    for name, fn in (("grpo", profile_grpo), ("rm", profile_rm), ("eval", profile_eval)):
        if name in only:
            t = time.perf_counter()
            res[name] = fn(args, fed, peak)
            slices[name] = time.perf_counter() - t
    res["slice_seconds"] = slices
    md = table(res)
    print("\n" + md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    if args.md:
        Path(args.md).write_text(md)
    return res


if __name__ == "__main__":
    main()
