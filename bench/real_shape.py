"""Real widths, few layers: one step of every stage on a checkpoint shaped like a real VLM, with
the memory plan's prediction beside the measured peak.

  python -m bench.real_shape --shape qwen2-vl-2b --layers 1 --device cpu --out real_shape.json

builds a checkpoint with Qwen2-VL-2B's widths (hidden 1536, 12 heads / 2 KV heads, MLP 8960, a
151,936-token vocabulary with tied embeddings, a 1280-wide vision tower with 16 heads, patch 14,
merge 2; random weights) but only --layers decoder layers and --layers vision blocks, then runs
each stage once, every one in its own process so that each peak is its own:

  sft     LoRA SFT step of the server's reference (models.add_lora, reward.train_sft)
  reward  a client's RM: one warm-up SFT step and one Bradley-Terry step with LoRA; the upload
  router  one federated round (E4) over 2 clients, the reference and the K = 2 RMs resident
  grpo    one GRPO step with MoR's soft routing (E3, E5): the LoRA policy, its reference = the
          base with adapters off, the K RMs and the router resident
  eval    greedy answers on a few test questions (E9)

and writes {stage: {params, trainable, peak_mb, predicted_mb, seconds, rows, tokens}} to --out.
peak_mb: on CPU, the process's peak resident set (VmHWM) minus its resident set
just before the stage's first model load (imports, data and tokenizer excluded); on CUDA,
torch.cuda.max_memory_allocated. predicted_mb: harness/memory.py's plan for the same models,
rows and tokens. Batches are tiny (2 to 8 rows a step; 112 px images, 16 image tokens) so that the CPU
run takes minutes: the widths, not the batch, are what is real here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import data
import federated
import grpo
import mixture
import models
import reward
import router as routing
from harness import memory
from judge import JUDGES, evaluate

# Qwen2-VL-2B-Instruct's config.json, as build_tiny's size keys; layers / vision_depth from --layers
SHAPES = {"qwen2-vl-2b": dict(hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936, tie=True,
                              vision_dim=1280, vision_heads=16, patch=14, merge=2, image=112, rope_theta=1e6)}
STAGES = ("sft", "reward", "router", "grpo", "eval")
LORA_R, K, SEED = 16, 2, 0
SFT_ROWS = 4  # rows of the SFT step; GRPO: 2 prompts x 4 samples = 8 rows


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / memory.MB


def hwm_mb() -> float:
    """This address space's peak resident set (MB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def one_pair_per_image(pairs: list, n: int) -> list:
    seen, out = set(), []
    for p in pairs:
        if p.image not in seen:
            seen.add(p.image)
            out.append(p)
    return out[:n]


def resident(*nets) -> None:
    """Page every weight in. On CPU, transformers maps a safetensors file into memory and a page
    counts in RSS only once read: an RM never reads the 152k-row embedding (no LM head), so
    without this its 900 MB would not count, while a device holds every weight it was given."""
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.sum()


def tokens_of(enc, images, prompts, responses) -> int:
    return enc(images, prompts, responses)["input_ids"].shape[1]


def run_stage(stage: str, work: Path, device: str) -> dict:
    """One stage in this process; returns its figures. Models come from `work` (built by main)."""
    fed = data.build_federation(SEED, test_per_domain=2)
    base, ref_dir, rm_dir = work / "base", work / "ref", work / "rm"
    b = 2 if device.startswith("cuda") else 4
    shape = memory.shape_of(base)
    from transformers import AutoProcessor

    enc = models.Encoder(AutoProcessor.from_pretrained(str(base)))
    doms = sorted(fed.clients)
    pairs = {d: one_pair_per_image(data.make_pairs(fed.clients[d][:40], SEED), 3) for d in doms[:K]}
    start, t0 = rss_mb(), time.time()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if stage == "sft":
        exs = fed.public[:SFT_ROWS]
        T = tokens_of(enc, [e.image for e in exs], [e.prompt for e in exs], [e.answer + data.EOS for e in exs])
        pred = memory.combine([memory.model_need(shape, b, LORA_R, True, SFT_ROWS, T)])
        model, proc = models.load_vlm(base, device=device)
        resident(model)
        trainable = models.add_lora(model, LORA_R)
        reward.train_sft(model, models.Encoder(proc), exs, steps=1, batch_size=SFT_ROWS, lr=1e-4, seed=SEED)
        out = _measure(start, t0, device, pred, rows=SFT_ROWS, tokens=T)
        models.merge_lora(model, ref_dir / "adapter")
        model.save_pretrained(ref_dir, safe_serialization=True)
        proc.save_pretrained(ref_dir)
    elif stage == "reward":
        ps = pairs[doms[0]][:1]  # one pair a BT step: 2 rows; the warm-up: 2 examples
        T = max(tokens_of(enc, [p.image] * 2, [p.prompt] * 2, [p.chosen, p.rejected]) for p in ps)
        pred = memory.combine([max(memory.model_need(shape, b, LORA_R, True, 2, T, head=True),
                                   memory.model_need(shape, b, LORA_R, True, 2, T, logits=False, head=True),
                                   key=lambda x: x["activations"])])
        vlm, proc = models.load_vlm(base, device=device)
        resident(vlm)
        torch.manual_seed(SEED)
        rm = reward.RewardModel(vlm, proc)
        warm = ps + pairs[doms[0]][1:2]
        cfg = reward.RMConfig(sft_steps=1, sft_batch=2, sft_lr=1e-4, steps=1, batch=1, lr=5e-5, lora_r=LORA_R)
        reward.train_reward_model(rm, warm, cfg, SEED)
        trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
        out = _measure(start, t0, device, pred, rows=2, tokens=T)
        rm.save(rm_dir)
    elif stage == "router":
        clients = [federated.Client(d, pairs[d], SEED, heldout=0.34) for d in doms[:K]]
        T = max(tokens_of(enc, [p.image] * 2, [p.prompt] * 2, [p.chosen, p.rejected]) for ps in pairs.values()
                for p in ps)
        rows = 2 * 2  # features and RM scores: a client's 2 training pairs, chosen and rejected
        pred = memory.combine([memory.model_need(shape, b, rows=rows, tokens=T, logits=False)] * (1 + K))
        ref, proc = models.load_vlm(ref_dir, device=device)
        rms = [reward.RewardModel.load(rm_dir, device=device) for _ in range(K)]
        resident(ref, *rms)
        for c in clients:
            c.prepare_routing(ref, models.Encoder(proc), rms)
        make = lambda: routing.Router(2 * shape.hidden, K)  # noqa: E731
        federated.run_rounds(make(), make, clients, rounds=1, local_epochs=1, lr=1e-3, batch_size=4, seed=SEED)
        trainable = sum(p.numel() for p in make().parameters())
        out = _measure(start, t0, device, pred, rows=rows, tokens=T)
    elif stage == "grpo":
        cfg = grpo.GRPOConfig(steps=1, prompts=2, group=4, max_new_tokens=4, lr=2e-5)
        exs = fed.pool[:2]
        T = tokens_of(enc, [e.image for e in exs], [e.prompt for e in exs], ["x"] * 2) - 1 + cfg.max_new_tokens
        rows = cfg.prompts * cfg.group
        pred = memory.combine([memory.model_need(shape, b, LORA_R, True, rows, T)]
                              + [memory.model_need(shape, b, rows=rows, tokens=T, logits=False)] * K)
        policy, proc = models.load_vlm(ref_dir, device=device)
        trainable = models.add_lora(policy, LORA_R)
        rms = [reward.RewardModel.load(rm_dir, device=device) for _ in range(K)]
        resident(policy, *rms)
        torch.manual_seed(SEED)
        fn = mixture.MixedReward(rms, routing.Router(2 * shape.hidden, K))  # MoR's soft routing (E3)
        grpo.train_grpo(policy, None, models.Encoder(proc), exs, fn, cfg, SEED)
        out = _measure(start, t0, device, pred, rows=rows, tokens=T)
    elif stage == "eval":
        test = {d: v[:2] for d, v in fed.test.items()}
        rows = sum(map(len, test.values()))
        ex = next(iter(test.values()))[0]
        T = tokens_of(enc, [ex.image], [ex.prompt], ["x"]) - 1 + 4
        pred = memory.combine([memory.model_need(shape, b, rows=rows, tokens=T, logits=False)])
        model, proc = models.load_vlm(ref_dir, device=device)
        resident(model)
        evaluate(model, models.Encoder(proc), test, judge=JUDGES["exact"], max_new_tokens=4)
        trainable = 0
        out = _measure(start, t0, device, pred, rows=rows, tokens=T)
    else:
        raise SystemExit(f"--stage {stage!r}: one of {STAGES}")
    out["trainable"] = int(trainable)
    return out


def _measure(start: float, t0: float, device: str, pred: dict, rows: int, tokens: int) -> dict:
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / memory.MB
    else:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec (the parent's peak)
        peak = hwm_mb() - start
    return {"params": int(pred["params"]), "peak_mb": round(peak, 1), "predicted_mb": round(pred["total"] / memory.MB, 1),
            "seconds": round(time.time() - t0, 1), "rows": rows, "tokens": tokens,
            "predicted": memory.as_mb(pred)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="qwen2-vl-2b")
    p.add_argument("--layers", type=int, default=1, help="decoder layers and vision blocks (the real model: 28 / 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="real_shape.json", help="where the JSON goes")
    p.add_argument("--workdir", default=None, help="checkpoints go here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: one stage in this process
    a = p.parse_args(argv)
    if a.layers < 1:
        p.error(f"--layers {a.layers}: must be >= 1")
    torch.set_num_threads(a.threads)
    if a.stage:  # the child: one stage, its figures as the last line of stdout
        print(json.dumps(run_stage(a.stage, Path(a.workdir), a.device)))
        return 0
    with tempfile.TemporaryDirectory(prefix="real_shape_", dir=a.workdir) as tmp:
        work = Path(tmp)
        size = dict(SHAPES[a.shape], layers=a.layers, vision_depth=a.layers)
        t = time.time()
        models.build_tiny("qwen2_vl", work / "base", seed=SEED, size=size)
        print(f"[real_shape] {a.shape} with {a.layers} layer(s) built in {time.time() - t:.0f}s", flush=True)
        results = {}
        for stage in STAGES:
            cmd = [sys.executable, "-m", "bench.real_shape", "--stage", stage, "--workdir", str(work),
                   "--device", a.device, "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if r.returncode != 0:
                raise SystemExit(f"[real_shape] stage {stage} failed:\n{r.stderr[-3000:]}")
            results[stage] = json.loads(r.stdout.strip().splitlines()[-1])
            s = results[stage]
            print(f"[real_shape] {stage:<7} peak {s['peak_mb']:>8.0f} MB  predicted {s['predicted_mb']:>8.0f} MB "
                  f"({100 * (s['predicted_mb'] / max(s['peak_mb'], 1e-9) - 1):+.0f}%)  {s['seconds']:.0f}s", flush=True)
    out = {"shape": a.shape, "layers": a.layers, "device": a.device, "lora_r": LORA_R, "rms": K,
           "peak": "peak RSS minus RSS before the first model load" if a.device == "cpu" else
                   "torch.cuda.max_memory_allocated", "stages": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"[real_shape] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
