"""mor: Mixture-of-Rewards federated alignment of VLMs -- the pipeline and its command line.

Stages (each writes its output atomically into the run directory; a rerun skips finished ones):
  base  build the tiny Qwen2-VL checkpoint (or take --base DIR, a real checkpoint)  -> base_init/
  sft   short supervised fine-tune on the public split: the server's reference policy -> base/
  eval  greedy answers on the test split, judged by exact match (E9), next to the blind
        (question-only) baseline of each domain                              -> results.json/.md

Later stages (reward, router, grpo) plug into the same `STAGES` table.

Usage:  python mor.py [--run-dir runs/default] [--seed 0] [--quick] [--stages sft,eval]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data

# ----------------------------------------------------------------------------------------------
# Crash-safe outputs: write beside the target, then rename (atomic on POSIX). A killed run
# leaves either the previous good state or nothing, never half a file.
# ----------------------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a hidden temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: the old output moves aside, the new one takes its name. A kill between them
    # leaves the previous good copy under .old*, never a half-written directory under `path`.
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def set_seed(seed: int) -> None:
    """Python's and torch's RNGs; on CPU the same seed then gives the same weights and results."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# SFT: the reference policy (cross-entropy on the response tokens only)
# ----------------------------------------------------------------------------------------------


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over response tokens. batch: Encoder output with response_mask.

      L_SFT = - (1 / sum_t m_t) * sum_t m_t * log p_theta(y_t | x, y_<t)      m: response mask
    Prompt and image tokens carry no loss: the reference learns to answer, not to ask.
    """
    batch = dict(batch)
    resp = batch.pop("response_mask")  # [B, T]
    logits = model(**batch).logits[:, :-1]  # [B, T-1, V]: position t predicts token t+1
    targets = batch["input_ids"][:, 1:].masked_fill(resp[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_sft(model, encoder: data.Encoder, examples: list[data.Example], steps: int, batch_size: int,
              lr: float, seed: int, desc: str = "sft") -> list[float]:
    """AdamW on domain-balanced batches of `examples`; returns the loss per step."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = data.balanced_batches(examples, batch_size, seed)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, disable=None)
    for _ in bar:
        b = next(batches)
        # chosen = gold answer + end token: the reference must learn to stop after one word,
        # or every later reward model sees malformed samples from the very first GRPO step.
        batch = encoder([e.image for e in b], [e.prompt for e in b], [e.answer + data.EOS for e in b], device)
        loss = sft_loss(model, batch)
        if not data.guarded_step(opt, loss, model.parameters(), desc):
            continue
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# E9: greedy evaluation, exact-match judge
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, encoder: data.Encoder, images, prompts, max_new_tokens: int = 4, greedy: bool = True,
             num_return_sequences: int = 1) -> list[str]:
    """One `generate` call for the whole batch; vision placeholders and pad suppressed."""
    device = next(model.parameters()).device
    batch = encoder(images, prompts, device=device)  # left-padded prompts [B, T_prompt]
    # Suppressing <|image_pad|> & co. keeps sampled responses re-scorable: one stray placeholder
    # and the next forward fails with "image features and image tokens do not match" (DESIGN 7).
    # mm_token_type_ids travels in `batch`; without it generate silently falls back to 1-D
    # positions and sampling and scoring disagree.
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         num_return_sequences=num_return_sequences, suppress_tokens=encoder.banned_ids,
                         pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id,
                         top_k=None, top_p=None, temperature=None if greedy else 1.0)
    return encoder.decode(out[:, batch["input_ids"].shape[1]:])  # new tokens only [B*n, <=max_new]


def judge(response: str, gold: str) -> bool:
    """Embedded judge: a well-formed one-word answer equal to the gold answer."""
    return data.extract_answer(response) == gold.lower()


def evaluate(model, encoder: data.Encoder, test: dict[str, list[data.Example]], batch_size: int = 128,
             desc: str = "eval") -> dict:
    """Greedy answers per domain -> {'accuracy': {domain: acc}, 'correct': {domain: [0/1 ...]},
    'malformed_share': float}. The per-question 0/1 vectors feed the win rate (E9)."""
    model.eval()
    # correct[d]: 0/1 per test question, in test order, so two policies' vectors align for E9's
    # win rate; malformed = not "<one word><|im_end|>", the reward-hacking signature (gate 5).
    correct, malformed, total = {}, 0, 0
    bar = tqdm(total=sum(len(v) for v in test.values()), desc=desc, dynamic_ncols=True, disable=None)
    for d, exs in test.items():
        hits = []
        for i in range(0, len(exs), batch_size):
            b = exs[i:i + batch_size]
            resp = generate(model, encoder, [e.image for e in b], [e.prompt for e in b])
            hits += [int(judge(r, e.answer)) for r, e in zip(resp, b)]
            malformed += sum(data.extract_answer(r) is None for r in resp)
            total += len(b)
            bar.update(len(b))
            bar.set_postfix({d: f"{sum(hits) / len(hits):.3f}"})
        correct[d] = hits
    bar.close()
    return {"accuracy": {d: sum(h) / max(len(h), 1) for d, h in correct.items()}, "correct": correct,
            "malformed_share": malformed / max(total, 1)}


def win_rate(policy_correct: list[int], ref_correct: list[int]) -> float:
    """E9: mean of 1 (policy right, reference wrong), 0 (the reverse), 0.5 (tie)."""
    scores = [0.5 if p == r else float(p > r) for p, r in zip(policy_correct, ref_correct)]
    return sum(scores) / max(len(scores), 1)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

# Run sizes. DEFAULT's reference (300 balanced steps of 64) measured 97.8 / 46.7 / 74.4 % on
# colour / shape / position: above the blind baseline everywhere, with room left to align.
# QUICK is a smoke run (under a minute), not a result.
QUICK = dict(sft_steps=40, test_per_domain=128)
DEFAULT = dict(sft_steps=300, test_per_domain=None)


class Run:
    """One run directory: its config, the federation, the stage outputs and their wall times.

    A stage is finished when its output path exists; outputs appear only through an atomic
    rename, so existence means complete, and a killed run resumes at the first missing output.
    The federation is rebuilt from the seed on demand (1.5 s): it is a pure function of it.
    """

    def __init__(self, args):
        self.args = args
        self.dir = Path(args.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = args.device
        self._fed = None
        self.timings_path = self.dir / "wall_seconds.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    @property
    def fed(self) -> data.Federation:
        if self._fed is None:
            self._fed = data.build_federation(self.args.seed, test_per_domain=self.args.test_per_domain)
        return self._fed

    def done(self, stage: str) -> bool:
        return (self.dir / STAGE_OUTPUT[stage]).exists()

    def record_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(seconds, 2)
        atomic_write_json(self.timings_path, self.timings)


def stage_base(run: Run) -> None:
    """The embedded default's base: a tiny Qwen2-VL from a config (skipped when --base is given)."""
    with atomic_dir(run.dir / "base_init") as tmp:
        data.build_tiny("qwen2_vl", tmp, seed=run.args.seed)


def base_init_dir(run: Run) -> Path:
    return Path(run.args.base) if run.args.base else run.dir / "base_init"


def stage_sft(run: Run) -> None:
    a = run.args
    set_seed(a.seed)
    # The same loader as for a real checkpoint: --base DIR swaps the tiny model for a real one.
    model, proc = data.load_vlm(base_init_dir(run), device=run.device)
    enc = data.Encoder(proc)
    # Public split only: the server never sees a client's questions (those stay in clients/).
    losses = train_sft(model, enc, run.fed.public, a.sft_steps, a.sft_batch, a.sft_lr, a.seed)
    with atomic_dir(run.dir / "base") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        atomic_write_json(tmp / "sft_log.json", {"loss": losses, "steps": a.sft_steps, "lr": a.sft_lr,
                                                 "batch": a.sft_batch, "examples": len(run.fed.public)})
    tqdm.write(f"sft: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
               f"over {len(losses)} steps on {len(run.fed.public)} public questions")


def stage_eval(run: Run) -> None:
    fed = run.fed
    model, proc = data.load_vlm(run.dir / "base", device=run.device)
    ref = evaluate(model, data.Encoder(proc), fed.test, desc="eval reference")
    # Gate 1 of the benchmark: a question-only guesser fitted on the public split must sit at
    # chance, else the table would measure the text shortcut rather than vision (DESIGN 4).
    blind = data.blind_baseline(fed.public, fed.test)
    results = {
        "domains": list(fed.test),
        "eval_questions_per_domain": {d: len(v) for d, v in fed.test.items()},
        "seeds": [run.args.seed],
        "chance": {d: _chance(fed.test[d]) for d in fed.test},
        "blind": blind,
        "reference": ref["accuracy"],
        "reference_malformed_share": ref["malformed_share"],
        "wall_seconds": run.timings,
    }
    atomic_write_json(run.dir / "reference_correct.json", ref["correct"])
    atomic_write_json(run.dir / "results.json", results)
    md = results_markdown(results)
    atomic_write_text(run.dir / "results.md", md)
    print("\n" + md)


def _chance(exs: list[data.Example]) -> float:
    """Accuracy of a uniform guess among the answers the question admits (position questions
    name their two candidates, "left or right?", so chance is 1/2 there)."""
    d = exs[0].domain if exs else ""
    return 0.5 if d == "position" else 1.0 / len(data.DOMAIN_ANSWERS.get(d, [None]))


def results_markdown(r: dict) -> str:
    """results.json -> the markdown table: one row per accuracy source, one column per domain,
    and an overall column weighted by the number of test questions of each domain."""
    doms = r["domains"]
    lines = ["| | " + " | ".join(doms) + " | overall |", "|---|" + "---|" * (len(doms) + 1)]

    def row(name, accs):
        n = r["eval_questions_per_domain"]
        overall = sum(accs[d] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
        return f"| {name} | " + " | ".join(f"{100 * accs[d]:.1f}" for d in doms) + f" | {100 * overall:.1f} |"

    lines += [row("chance", r["chance"]), row("blind (question only)", r["blind"]),
              row("reference (SFT)", r["reference"])]
    out = ["# mor results", "", f"Test questions per domain: {r['eval_questions_per_domain']}; "
           f"seeds: {r['seeds']}. Accuracy in %, greedy answers, exact match.", ""] + lines
    out += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in r["wall_seconds"].items()), ""]
    return "\n".join(out)


# Stage name -> function, and the path whose existence marks it finished (see `Run`).
# Stages run in this order; later issues append reward, router, grpo.
STAGES = {"base": stage_base, "sft": stage_sft, "eval": stage_eval}
STAGE_OUTPUT = {"base": "base_init", "sft": "base", "eval": "results.json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="where every stage writes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the init and every sampler")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes: small steps, 128 test questions/domain")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    p.add_argument("--force", action="store_true", help="rerun the named stages even if their output exists")
    p.add_argument("--base", default=None, help="a local Qwen2-VL/Qwen2.5-VL checkpoint dir to use as the base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (cuda loads in bf16); default: cuda when available")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MOR_THREADS", "0")),
                   help="torch CPU threads (0: torch's default); compare speeds at one fixed count")
    p.add_argument("--sft-steps", type=int, default=None, help="reference SFT steps (default 300, --quick 40)")
    p.add_argument("--sft-batch", type=int, default=64, help="questions per SFT step, split evenly over domains")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="AdamW learning rate of the SFT")
    p.add_argument("--test-per-domain", type=int, default=None, help="cap on test questions per domain")
    a = p.parse_args(argv)
    size = QUICK if a.quick else DEFAULT
    for k, v in size.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    unknown = set(a.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    if a.base:
        a.stages = ",".join(s for s in a.stages.split(",") if s != "base")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a)
    # the flags of the latest invocation, for the record (stages already done keep their outputs)
    atomic_write_json(run.dir / "config.json", vars(a))
    for name in a.stages.split(","):
        if run.done(name) and not a.force:
            print(f"[{name}] done already ({run.dir / STAGE_OUTPUT[name]}), skipped")
            continue
        t = time.time()
        print(f"[{name}] ...", flush=True)
        STAGES[name](run)
        run.record_time(name, time.time() - t)
        print(f"[{name}] {time.time() - t:.1f}s", flush=True)
    # The tables are written inside `eval`, before its own time is known: stamp every stage's
    # wall time (including eval's) into them now.
    res_path = run.dir / "results.json"
    if res_path.exists():
        res = json.loads(res_path.read_text())
        if res.get("wall_seconds") != run.timings:
            res["wall_seconds"] = run.timings
            atomic_write_json(res_path, res)
            atomic_write_text(run.dir / "results.md", results_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
