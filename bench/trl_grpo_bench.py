"""The TRL side of bench/grpo_vs_trl.py: seconds per GRPO optimizer step of TRL's GRPOTrainer on CPU.

What is measured. TRL's GRPOTrainer trains a Qwen2-VL checkpoint (--model-dir: the project's tiny
base, so both sides run the same model) on the prompts of --prompts (bench/grpo_vs_trl.py writes the
federation's GRPO prompt pool there: image path, question, gold answer). One optimizer step is the
same work definition as bench/grpo_vs_trl.py's:

  16 prompts x G = 8 -> 128 completions per step, one generation per optimizer step, 4 new tokens,
  temperature 1.0 (top_p 1, top_k 0), beta 0.04 (k3 KL to the frozen reference, loaded by TRL from
  the same directory), clip eps 0.2, mu = 1, loss "grpo" (mean over a sequence's tokens, then over
  sequences), group-scaled advantages with the unbiased std, AdamW lr 1e-4 constant (0.9/0.999,
  eps 1e-8, wd 0), global grad-norm clip 1.0, fp32 on CPU, no vLLM, no activation checkpointing.

Reported per step: `loop_wall` (on_step_end -> on_step_end: dataloader, image decode and logging
included; this is what bench/grpo_vs_trl.py compares), `step_wall` (on_step_begin -> on_step_end), and a
phase split timed by this harness. TRL itself logs only the whole `training_step` time; its
per-phase timers go to wandb/mlflow/trackio only, so the phases are timed here by wrapping the
trainer's own methods in a subclass, without changing what they do:

  rollout          _generate: chat template + processor on the 128 rows + generate + decode
  ref_fwd          no-grad _get_per_token_logps_and_entropies: the frozen reference's forward
  scoring_other    the rest of _generate_and_score_completions: processor re-run for the forward
                   inputs, rewards, advantages
  policy_fwd_loss  compute_loss: policy forward with grad + GRPO loss
  backward_etc     training_step minus the above: backward
  optimizer        on_pre_optimizer_step -> on_step_end: grad clip, AdamW, zero_grad

The reward is 1.0 if the completion's first word equals the gold answer (case-insensitive): it
costs < 1 ms a step and exists so that the advantages are not all zero.

Pinned to the versions of bench/requirements.txt: the phase timers hook private GRPOTrainer
methods, which a TRL release may rename (checked at start). Usually run by bench/grpo_vs_trl.py; alone:

  bench/.venv/bin/python bench/trl_grpo_bench.py --model-dir runs/default/base \\
      --prompts PROMPTS.jsonl --steps 20 --warmup 3 --threads 1 --output-dir /tmp/trl_grpo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

# Everything is local: the checkpoint, the processor and the images. A hub lookup would only add
# latency (or hang on a machine without network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# The work definition, in TRL's GRPOConfig names, saved verbatim with the results. Where a value
# equals TRL's default it is still set, so that a TRL release that changes the default cannot
# change the benchmark.
HPARAMS = dict(
    prompts_per_step=16,
    num_generations=8,
    max_completion_length=4,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    beta=0.04,
    epsilon=0.2,
    num_iterations=1,
    learning_rate=1e-4,
    lr_scheduler_type="constant",  # TRL's default decays linearly to 0 over max_steps
    warmup_steps=0,
    optim="adamw_torch",
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    max_grad_norm=1.0,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
    loss_type="grpo",  # TRL's default is "dapo" (token-level normalisation), not GRPO's
    scale_rewards="group",
    importance_sampling_level="token",
    use_bias_correction_kl=False,  # TRL's default True multiplies KL_t by the ratio: other gradient
    mask_truncated_completions=False,
    activation_checkpointing=False,  # TRL defaults to recomputing activations: slower, not GRPO
    bf16=False,  # TRL's default resolves to bf16 where the CPU supports it; the project runs fp32
    fp16=False,
    use_vllm=False,
)

# The private GRPOTrainer methods the phase timers wrap. A method that a TRL release renamed would
# simply never be called through the subclass, and its phase would read 0 s without any error.
TIMED_METHODS = ["_generate", "_generate_and_score_completions", "_calculate_rewards",
                 "_get_per_token_logps_and_entropies", "compute_loss", "training_step"]


# ----------------------------------------------------------------------------------------------
# Data and reward
# ----------------------------------------------------------------------------------------------


def load_prompts(path: str):
    """JSONL of {"image": path, "prompt": question, "answer": gold} -> the dataset TRL expects: a
    conversational `prompt` (TRL puts the image block in front of the text, as models.Encoder
    does), an `image` column decoded to PIL by `datasets`, and `answer` for the reward."""
    from datasets import Dataset, Features, Image, Value

    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        raise SystemExit(f"[trl] {path}: no prompts")
    features = Features({"prompt": [{"role": Value("string"), "content": Value("string")}],
                         "image": Image(), "answer": Value("string")})
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                              "image": [r["image"] for r in rows],
                              "answer": [r["answer"] for r in rows]}, features=features)


LAST_BATCH: list[tuple] = []  # (question, completion, gold, reward) of the latest call, for display


def first_word_reward(completions, answer, prompts=None, **kwargs):
    """1.0 iff the completion's first word equals the gold answer, case-insensitive."""
    LAST_BATCH.clear()
    rewards = []
    for i, (completion, gold) in enumerate(zip(completions, answer)):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        words = text.split()
        rewards.append(1.0 if words and words[0].lower() == gold.lower() else 0.0)
        q = prompts[i][-1]["content"] if prompts is not None else "?"
        if not isinstance(q, str):  # multimodal content: the text block
            q = next((c["text"] for c in q if c.get("type") == "text"), "?")
        LAST_BATCH.append((q, text, gold, rewards[-1]))
    return rewards


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class PhaseTimes:
    """Seconds per phase, accumulated within a step and closed by the step-end callback."""

    def __init__(self):
        self.cur, self.steps = defaultdict(float), []

    def add(self, name: str, dt: float) -> None:
        self.cur[name] += dt

    def close_step(self, extra: dict) -> None:
        self.steps.append({**self.cur, **extra})
        self.cur = defaultdict(float)


def timed_trainer_class(phases: PhaseTimes):
    import torch
    from trl import GRPOTrainer

    missing = [m for m in TIMED_METHODS if not hasattr(GRPOTrainer, m)]
    if missing:
        raise SystemExit(f"[trl] this trl lacks GRPOTrainer.{', .'.join(missing)}: install the versions "
                         "pinned in bench/requirements.txt")

    def timed(method, phase, only=lambda: True):
        def wrapper(self, *a, **k):
            t = time.perf_counter()
            try:
                return getattr(super(TimedGRPOTrainer, self), method)(*a, **k)
            finally:
                if only():
                    phases.add(phase, time.perf_counter() - t)
        return wrapper

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall-clock timers around its phases; behaviour unchanged."""

        _generate = timed("_generate", "rollout")
        _generate_and_score_completions = timed("_generate_and_score_completions", "gen_and_score")
        _calculate_rewards = timed("_calculate_rewards", "rewards")
        # With mu = 1 there is no old-policy pass, so the only no-grad log-prob call is the
        # reference model's; the policy's own call (with grad) is inside compute_loss.
        _get_per_token_logps_and_entropies = timed("_get_per_token_logps_and_entropies", "ref_fwd",
                                                   only=lambda: not torch.is_grad_enabled())
        compute_loss = timed("compute_loss", "policy_fwd_loss")
        training_step = timed("training_step", "training_step")

    return TimedGRPOTrainer


def step_timer(phases: PhaseTimes, log_rows: list):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t_prev_end = time.perf_counter()  # the first loop_wall includes the first fetch
            self.c_prev_end = time.process_time()  # CPU seconds of this process: what load elsewhere does not inflate

        def on_step_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            cpu = time.process_time()
            phases.close_step({"step": state.global_step, "step_wall": now - self.t_begin,
                               "loop_wall": now - self.t_prev_end, "optimizer": now - self.t_opt,
                               "loop_cpu": cpu - self.c_prev_end})
            self.t_prev_end, self.c_prev_end = now, cpu

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                log_rows.append({"step": state.global_step, **logs})

    return StepTimer()


def vm_hwm_mb() -> float:
    """Peak resident set of this process's address space (MB). Read here, not by the parent: Linux
    carries a process's ru_maxrss across fork and exec, so the child's rusage as the parent sees
    it could be the parent's own (larger) peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="Qwen2-VL checkpoint dir with processor + chat template")
    ap.add_argument("--prompts", required=True, help='JSONL of {"image": path, "prompt": str, "answer": str}')
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps in all (max_steps)")
    ap.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the median")
    ap.add_argument("--seed", type=int, default=42, help="TRL's seed: sampler order and sampling")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--show-completions", type=int, default=8, help="print N completions of the last step")
    ap.add_argument("--output-dir", default="trl-grpo-out", help="TRL's output_dir (nothing is saved there)")
    ap.add_argument("--results", default=None, help="JSON results path (default <output-dir>/results.json)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="freeze the policy's vision tower (model.model.visual) before training, as the project's "
                         "GRPO does by default: no vision gradient, no vision update (images still encoded each pass)")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise SystemExit(f"[trl] {args.model_dir}: not a checkpoint directory (no config.json)")

    import torch

    if args.threads > 0:
        # Before any work: the OpenMP pool is sized at first use. On a small shared machine, two
        # threads that spin-wait on each other's tiny ops can be many times slower than one.
        torch.set_num_threads(args.threads)

    import accelerate
    import transformers
    import trl
    from trl import GRPOConfig

    versions = {"python": sys.version.split()[0], "trl": trl.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__, "accelerate": accelerate.__version__}
    print("[trl] versions:", versions, "| torch threads:", torch.get_num_threads(), flush=True)

    hp = HPARAMS
    per_step = hp["prompts_per_step"] * hp["num_generations"]
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=per_step,  # TRL counts completions here, not prompts
        model_init_kwargs={"dtype": "float32"},
        max_steps=args.steps,
        seed=args.seed,
        use_cpu=True,
        logging_steps=1,  # one log row per step: the reward and KL of every step
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,  # the project decodes images in-process too
        remove_unused_columns=False,  # the reward reads the `answer` column
        disable_tqdm=True,
        **{k: v for k, v in hp.items() if k != "prompts_per_step"},
    )
    phases, log_rows = PhaseTimes(), []
    trainer = timed_trainer_class(phases)(
        model=args.model_dir,  # loaded like a checkpoint; TRL builds the frozen reference from it too
        reward_funcs=[first_word_reward],
        args=config,
        train_dataset=load_prompts(args.prompts),
        callbacks=[step_timer(phases, log_rows)],
    )
    if args.freeze_vision:  # before train(): the Trainer builds its optimizer from requires_grad params there
        for p in trainer.model.model.visual.parameters():
            p.requires_grad_(False)
    print(f"[trl] params {sum(p.numel() for p in trainer.model.parameters()):,} | trainable "
          f"{sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,} | ref "
          f"{type(trainer.ref_model).__name__} | loss_type {trainer.loss_type} | generation batch "
          f"{config.generation_batch_size} | suppress_tokens {trainer.generation_config.suppress_tokens}", flush=True)

    la0 = loadavg()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    la1 = loadavg()
    ckpt = getattr(trainer.model, "is_activation_checkpointing", None)
    if ckpt:
        raise SystemExit("[trl] activation checkpointing is on: the timings would include recomputation")

    # ------------------------------------------------------------------ report
    if args.show_completions and LAST_BATCH:
        print("\n[trl] completions of the last step (question | completion | gold | reward):")
        stride = max(1, len(LAST_BATCH) // args.show_completions)
        for q, text, gold, r in LAST_BATCH[::stride][:args.show_completions]:
            print(f"   {q!r:45} | {text!r:24} | {gold:9} | {r}")

    logs = {r["step"]: r for r in log_rows if "reward" in r}
    steps = phases.steps
    for s in steps:
        s["backward_etc"] = s.get("training_step", 0) - s.get("gen_and_score", 0) - s.get("policy_fwd_loss", 0)
        s["scoring_other"] = s.get("gen_and_score", 0) - s.get("rollout", 0) - s.get("ref_fwd", 0)
        log = logs.get(s["step"], {})
        s["reward"], s["kl"] = log.get("reward"), log.get("kl")
        s["trl_step_time"], s["completion_len"] = log.get("step_time"), log.get("completions/mean_length")
    measured = steps[args.warmup:] or steps

    def med(key):
        vals = [s[key] for s in measured if s.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    nan = float("nan")
    print("\n step | loop_s | step_s | rollout | ref_fwd | score+ | pol_fwd | bwd+   | optim  | reward | kl")
    for s in steps:
        print(f" {s['step']:4d} | {s['loop_wall']:6.3f} | {s['step_wall']:6.3f} | {s.get('rollout', 0):7.3f} | "
              f"{s.get('ref_fwd', 0):7.3f} | {s['scoring_other']:6.3f} | {s.get('policy_fwd_loss', 0):7.3f} | "
              f"{s['backward_etc']:6.3f} | {s['optimizer']:6.3f} | {s['reward'] if s['reward'] is not None else nan:6.3f} | "
              f"{s['kl'] if s['kl'] is not None else nan:7.5f}")

    split_keys = ["rollout", "ref_fwd", "scoring_other", "rewards", "policy_fwd_loss", "backward_etc", "optimizer",
                  "trl_step_time"]
    summary = {
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before_after": [la0, la1],
        "hparams": hp,
        "model_dir": os.path.abspath(args.model_dir),
        "steps": len(steps),
        "warmup_excluded": args.warmup,
        "median_s_per_step": med("loop_wall"),
        "median_cpu_s_per_step": med("loop_cpu"),
        "median_step_wall_s": med("step_wall"),
        "median_split_s": {k: med(k) for k in split_keys},
        "rewards_per_step": [s["reward"] for s in steps],
        "kl_per_step": [s["kl"] for s in steps],
        "total_train_s": total,
        "peak_rss_mb": vm_hwm_mb(),
        "per_step": steps,
    }
    print(f"\n[trl] median s/step over steps {args.warmup + 1}..{len(steps)} (end-to-end loop): "
          f"{summary['median_s_per_step']:.3f}  (on_step_begin -> on_step_end: {summary['median_step_wall_s']:.3f})")
    print("[trl] median split (s):", json.dumps({k: round(v, 4) for k, v in summary["median_split_s"].items()}))
    results = args.results or os.path.join(args.output_dir, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"[trl] results -> {results}")


if __name__ == "__main__":
    main()
