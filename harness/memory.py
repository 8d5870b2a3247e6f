"""The memory plan: what each stage holds at its peak, predicted from the checkpoints' configs
and the run's flags before any stage starts, and checked against the device's memory.

Per stage, in bytes (b: bytes per weight, 4 for fp32 on CPU, 2 for bf16 on CUDA):

  weights     sum over the models resident at once of  P * b   (P from the safetensors headers)
  trainable   LoRA: r * L * (9 H + 2 kv + 3 I)  (q, o: H + H; k, v: H + kv; gate, up: H + I;
              down: I + H), + the RM head's H + 1; without LoRA every parameter
  optimizer   trainable * (4 fp32 weight copy of a LoRA adapter + 4 grad + 8 AdamW moments), or
              without LoRA trainable * 3 b (grad + two moments in the weights' dtype)
  activations R rows of T tokens through L decoder layers of width H, MLP width I, vocab V:
                logits      R T V * 4 * LOGITS_TRAIN copies when a loss reads them (the forward's
                            logits, the fp32 copy / log_softmax, and in the backward the
                            gradient, softmax temporary and input gradient), LOGITS_INFER without
                            grad, 0 for a reward model (no LM head)
                per layer   R T (10 H + 4 I) b + R heads T^2 * 4 (q, k, v, attention out,
                            residuals and norms; gate, up, act, product; the attention scores)
              with gradient checkpointing (LoRA) one layer's working set + L * R T H b saved
              block inputs; without it, L working sets when training, one when not.

A stage's total is its models' weights + optimizer + activations; with --workers W on a CPU the
W jobs of a stage run side by side, each holding its own models, so the W largest jobs add up.
The plan is a forecast: bench/real_shape.py measures each stage's peak beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import data
import models

MB = 2 ** 20
LOGITS_TRAIN = 5
LOGITS_INFER = 3


@dataclass
class Shape:
    """What the plan needs of a checkpoint: parameter count and the language model's widths."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv: int  # key/value width: kv heads * head dim


def shape_of(path: str | os.PathLike) -> Shape:
    """From config.json and the safetensors headers (no weights read): P counted exactly."""
    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    t = cfg.get("text_config") or cfg
    params = 0
    for f in sorted(p.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                params += size
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    return Shape(params, t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"], heads,
                 t.get("num_key_value_heads", heads) * head_dim)


def lora_params(s: Shape, r: int) -> int:
    """Trainable parameters of models.add_lora: r (d_in + d_out) per projection, 7 per layer."""
    return r * s.layers * (9 * s.hidden + 2 * s.kv + 3 * s.intermediate)


def model_need(s: Shape, b: int, lora_r: int = 0, train: bool = False, rows: int = 0, tokens: int = 0,
               logits: bool = True, head: bool = False) -> dict:
    """One model in one stage: {params, trainable, weights, optimizer, activations} (bytes but
    params/trainable). rows x tokens: the largest batch it runs; logits: whether its LM head runs
    (False for a reward model); head: a reward model's scalar head."""
    weights = s.params * b
    trainable = (lora_params(s, lora_r) if lora_r else s.params) + (s.hidden + 1 if head else 0) if train else 0
    optimizer = trainable * (16 if lora_r else 3 * b) if train else 0
    layer = rows * tokens * (10 * s.hidden + 4 * s.intermediate) * b + rows * s.heads * tokens ** 2 * 4
    if not train:
        act = layer
    elif lora_r:  # gradient checkpointing: the block inputs, and one block recomputed at a time
        act = layer + s.layers * rows * tokens * s.hidden * b
    else:
        act = s.layers * layer
    if logits:
        act += rows * tokens * s.vocab * 4 * (LOGITS_TRAIN if train else LOGITS_INFER)
    return {"params": s.params, "trainable": trainable, "weights": weights, "optimizer": optimizer,
            "activations": act}


def combine(parts: list[dict]) -> dict:
    """Models resident at once: weights and optimizer add up; activations of models that run
    one after another do not (the largest counts)."""
    out = {k: sum(p[k] for p in parts) for k in ("params", "trainable", "weights", "optimizer")}
    out["activations"] = max((p["activations"] for p in parts), default=0)
    out["total"] = out["weights"] + out["optimizer"] + out["activations"]
    return out


def as_mb(need: dict) -> dict:
    return {k: (v if k in ("params", "trainable") else round(v / MB, 1)) for k, v in need.items()}


# ----------------------------------------------------------------------------------------------
# The pipeline's plan (mor.py prints it before any stage) and the device's memory
# ----------------------------------------------------------------------------------------------


def device_memory_mb(device: str) -> float:
    """Total memory of the CUDA device, or the memory available to this process on a CPU host."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / MB
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def pipeline_plan(run, tokens: int) -> dict:
    """{stage: need} for the run's flags; tokens: the longest row (prompt with image + answer)."""
    from harness.pipeline import BASE_FAMILY

    a = run.args
    b = 2 if str(a.device).startswith("cuda") else 4
    base = shape_of(a.base) if a.base else shape_of(run.tiny_dir(BASE_FAMILY))
    lr_pol = run.lora_r(None)
    rms = {k: shape_of(run.client_init(k)) if not run.from_base(k) else base for k in run.fed.clients}
    w = max(a.workers, 1)
    plan = {}
    plan["sft"] = combine([model_need(base, b, lr_pol, True, a.sft_batch, tokens)])
    rm_jobs = []
    for k, s in rms.items():
        cfg = run.rm_config(k)
        sft = model_need(s, b, cfg.lora_r, True, cfg.sft_batch, tokens, head=True)
        bt = model_need(s, b, cfg.lora_r, True, 2 * cfg.batch, tokens, logits=False, head=True)
        rm_jobs.append(combine([max(sft, bt, key=lambda x: x["activations"])]))
    plan["reward"] = _side_by_side(rm_jobs, w)
    rm_infer = [model_need(s, b, rows=256, tokens=tokens, logits=False) for s in rms.values()]
    plan["router"] = combine([model_need(base, b, rows=256, tokens=tokens, logits=False), *rm_infer])
    rows = a.grpo_prompts * a.group
    policy = [model_need(base, b, lr_pol, True, rows, tokens)]
    if not lr_pol:  # a second, frozen copy as the reference
        policy.append(model_need(base, b, rows=rows, tokens=tokens))
    job = combine(policy + [model_need(s, b, rows=rows, tokens=tokens, logits=False) for s in rms.values()])
    plan["grpo"] = _side_by_side([job] * w, w)
    plan["eval"] = combine([model_need(base, b, rows=256, tokens=tokens, logits=False)])
    return plan


def longest_row(run) -> int:
    """Tokens of the longest row the stages build, counted by models.Encoder on a sample of the
    public split with the base's processor: chat template, image tokens, question, answer and
    end token, + --max-new-tokens of room (GRPO's samples and eval's answers)."""
    from transformers import AutoProcessor

    from harness.pipeline import BASE_FAMILY

    base = run.args.base or run.tiny_dir(BASE_FAMILY)
    enc = models.Encoder(AutoProcessor.from_pretrained(str(base)))
    exs = run.fed.public[:32]
    n = enc([e.image for e in exs], [e.prompt for e in exs], [(e.answer or "") + data.EOS for e in exs])
    return n["input_ids"].shape[1] + run.args.max_new_tokens


def report(run, stages: list[str]) -> None:
    """mor.py's check before any stage: the plan of the stages about to run, printed, and a
    refusal (SystemExit, one line) when one of them cannot fit the device."""
    plan = {k: v for k, v in pipeline_plan(run, longest_row(run)).items() if k in stages}
    if not plan:
        return
    limit = device_memory_mb(run.args.device)
    print("memory plan (harness/memory.py; bench/real_shape.py measures it):\n" + plan_table(plan, limit), flush=True)
    check_fits(run, plan, limit)


def _side_by_side(jobs: list[dict], workers: int) -> dict:
    """--workers processes each hold one job: the `workers` largest add up."""
    top = sorted(jobs, key=lambda j: -j["total"])[:workers]
    out = {k: sum(j[k] for j in top) for k in ("params", "trainable", "weights", "optimizer", "activations", "total")}
    return out


def plan_table(plan: dict, limit_mb: float) -> str:
    lines = [f"{'stage':<8}{'params':>14}{'trainable':>14}{'weights MB':>12}{'optim MB':>10}{'activ MB':>10}"
             f"{'total MB':>10}"]
    for st, n in plan.items():
        m = as_mb(n)
        lines.append(f"{st:<8}{m['params']:>14,}{m['trainable']:>14,}{m['weights']:>12,.0f}{m['optimizer']:>10,.0f}"
                     f"{m['activations']:>10,.0f}{m['total']:>10,.0f}")
    lines.append(f"device memory: {limit_mb:,.0f} MB")
    return "\n".join(lines)


def check_fits(run, plan: dict, limit_mb: float) -> None:
    """SystemExit naming the stages that do not fit, their figures, and the flags that shrink them."""
    over = {st: n["total"] / MB for st, n in plan.items() if n["total"] / MB > limit_mb}
    if not over:
        return
    a = run.args
    fixes = []
    if not run.lora_r(None) or any(not run.rm_config(k).lora_r for k in run.fed.clients):
        fixes.append("--lora-r 16 (adapters: no optimizer state for the base, no reference copy)")
    if a.workers > 1:
        fixes.append("--workers 1 (each worker holds its own models)")
    if "grpo" in over:
        fixes.append(f"--group {max(2, a.group // 2)} or --grpo-prompts {max(1, a.grpo_prompts // 2)} (GRPO's rows)")
        fixes.append(f"fewer RMs resident: fewer clients than {len(run.fed.clients)}")
    if "reward" in over:
        fixes.append(f"--rm-batch {max(1, a.rm_batch // 2)} / --rm-sft-batch {max(1, a.rm_sft_batch // 2)}")
    if "sft" in over:
        fixes.append(f"--sft-batch {max(1, a.sft_batch // 2)}")
    need = ", ".join(f"{st} {mb:,.0f} MB" for st, mb in over.items())
    raise SystemExit(f"memory plan: {need} > {limit_mb:,.0f} MB of the device; try {'; '.join(fixes)}")
