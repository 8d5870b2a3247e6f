"""mor: Mixture-of-Rewards federated alignment of VLMs -- the pipeline and its command line.

Stages (each writes its output atomically into the run directory; a rerun skips finished ones):
  base  build the tiny Qwen2-VL checkpoint (or take --base DIR, a real checkpoint)  -> base_init/
  sft   short supervised fine-tune on the public split: the server's reference policy -> base/
  reward  every client trains its Bradley-Terry RM on its own pairs, with its own VLM family
        (E1); FedAvg-RM in the homogeneous setting (E8); the client x domain pair-accuracy
        matrix, each entry computed by the client that owns the domain  -> clients/, rm_matrix-*.json
  eval  greedy answers on the test split, judged by exact match (E9), next to the blind
        (question-only) baseline of each domain, and the benchmark's gates -> results.json/.md

Later stages (router, grpo) plug into the same `STAGES` table.

Usage:  python mor.py [--run-dir runs/default] [--seed 0] [--quick] [--stages sft,eval]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

import data
import models
import safe_io
import federated
import grpo
import nts
import reward
import router
from reward import sft_loss, train_sft  # noqa: F401  (the reference SFT; re-exported for tests)

# Crash-safe outputs (data.py section 8): temp file beside the target, then a rename. Re-exported
# here because every stage writes through them.
from safe_io import atomic_dir, atomic_save_file, atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402,F401


def set_seed(seed: int) -> None:
    """Python's and torch's RNGs; on CPU the same seed then gives the same weights and results."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# E9: greedy evaluation, exact-match judge
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, encoder: models.Encoder, images, prompts, max_new_tokens: int = 4, greedy: bool = True,
             num_return_sequences: int = 1, share_images: bool = False) -> list[str]:
    """One `generate` call for the whole batch; vision placeholders and pad suppressed.
    share_images: run the vision tower once per distinct image of the batch and hand generate
    the features (`mm_encoder_outputs`); same answers (tested), less work when questions share
    images, as the test set's do (3.9 questions per image)."""
    device = next(model.parameters()).device
    if share_images:
        batch = encoder.encode_shared(model, images, prompts, device=device)
    else:
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


def evaluate(model, encoder: models.Encoder, test: dict[str, list[data.Example]], batch_size: int = 256,
             desc: str = "eval") -> dict:
    """Greedy answers per domain -> {'accuracy': {domain: acc}, 'correct': {domain: [0/1 ...]},
    'malformed_share': float}. The per-question 0/1 vectors feed the win rate (E9)."""
    model.eval()
    # Questions of all domains sorted by image, so a batch holds every question of its images
    # and the vision tower runs once per image (measured 2.8x faster per batch on the test set).
    # correct[d]: 0/1 per test question, in test order, so two policies' vectors align for E9's
    # win rate; malformed = not "<one word><|im_end|>", the reward-hacking signature (gate 5).
    order = sorted(((d, i) for d, exs in test.items() for i in range(len(exs))),
                   key=lambda di: (test[di[0]][di[1]].image, di))
    correct = {d: [0] * len(exs) for d, exs in test.items()}
    malformed = 0
    bar = tqdm(total=len(order), desc=desc, dynamic_ncols=True, disable=None)
    for s in range(0, len(order), batch_size):
        b = [test[d][i] for d, i in order[s:s + batch_size]]
        resp = generate(model, encoder, [e.image for e in b], [e.prompt for e in b], share_images=True)
        for (d, i), r, e in zip(order[s:s + batch_size], resp, b):
            correct[d][i] = int(judge(r, e.answer))
        malformed += sum(data.extract_answer(r) is None for r in resp)
        bar.update(len(b))
        bar.set_postfix(acc=f"{sum(map(sum, correct.values())) / (s + len(b)):.3f}")
    bar.close()
    return {"accuracy": {d: sum(h) / max(len(h), 1) for d, h in correct.items()}, "correct": correct,
            "malformed_share": malformed / max(len(order), 1)}


def win_rate(policy_correct: list[int], ref_correct: list[int]) -> float:
    """E9: mean of 1 (policy right, reference wrong), 0 (the reverse), 0.5 (tie)."""
    scores = [0.5 if p == r else float(p > r) for p, r in zip(policy_correct, ref_correct)]
    return sum(scores) / max(len(scores), 1)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

# Run sizes. DEFAULT: the tiny base pre-trained for 600 caption steps on 4,000 synthetic images
# (stage base), then 300 balanced SFT steps of 64 on the carelessly labelled public split (stage
# sft); measured reference and oracle gains in README ("gate 4"). The client RMs (SFT warm-up,
# then BT) reach >= 90% held-out pair accuracy in their own domain with DEFAULT (see README).
# QUICK is a smoke run, not a result.
PRETRAIN_IMAGES = 4000
QUICK = dict(pretrain_steps=5, sft_steps=40, test_per_domain=96, rm_sft_steps=10, rm_steps=10, rounds=5,
             seeds="0", grpo_steps=3, router_pairs=128)
DEFAULT = dict(pretrain_steps=600, sft_steps=300, test_per_domain=None, rm_sft_steps=300, rm_steps=300,
               rounds=30, seeds="0,1,2", grpo_steps=80, router_pairs=600)

# Client -> the family of its own VLM. Heterogeneous: colour needs no fine detail, so it gets
# LLaVA-OneVision (a patch-16 SigLIP tower, the cheapest); shape and position need the finer
# Qwen towers. Homogeneous: everyone holds the same tiny Qwen2-VL checkpoint, the premise of
# FedAvg-RM (averaging only makes sense between copies of one initialisation).
SETTINGS = {
    "heterogeneous": {"color": "llava_onevision", "shape": "qwen2_5_vl", "position": "qwen2_vl"},
    "homogeneous": {"color": "qwen2_vl", "shape": "qwen2_vl", "position": "qwen2_vl"},
}
# The bucket effect (the paper's "a bucket holds only as much as its shortest stave"): the
# heterogeneous federation plus a weak fourth client. `noisy` labelled the public split's images
# (all three domains) carelessly: half of its preferences are reversed (data.flip_pairs), so its
# RM carries no signal, yet it holds the most pairs. Avg RM gives it 1/K of every reward and
# Weighted RM the largest share (n_k measures quantity, not quality). MoR's router could learn
# from the other clients' data that its RM predicts nobody's preferences; measured (README), the
# weak client's routing loss on its random labels is lowest where the mixed margin is smallest,
# i.e. on its own RM's (mean |margin| 0.26 vs 0.53-0.88), and its large n_k in FedAvg carries
# that pull to every domain: MoR loses 2.6 points, Avg RM 0.4.
SETTINGS["bucket"] = dict(SETTINGS["heterogeneous"], noisy="llava_onevision")
WEAK_CLIENT, WEAK_FLIP = "noisy", 0.5
BUCKET_METHODS = "mor,avg_rm,weighted_rm"  # --full: the comparison the bucket effect is about
# A client brought with --client-data NAME=FILE joins the setting's federation with its own pairs
# and, unless --client-model NAME=DIR says otherwise, the tiny Qwen2-VL as its VLM.
USER_FAMILY = "qwen2_vl"
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # it becomes a directory and a method name


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
        self.user_data = dict(kv.split("=", 1) for kv in args.client_data)  # {client: pairs JSONL}

    @property
    def fed(self) -> data.Federation:
        if self._fed is None:
            self._fed = data.build_federation(self.args.seed, test_per_domain=self.args.test_per_domain)
            if WEAK_CLIENT in SETTINGS[self.args.setting]:
                # the weak client's questions: the public split's (its labels get flipped below)
                self._fed.clients[WEAK_CLIENT] = list(self._fed.public)
            for name in self.user_data:
                # a user client has pairs, not labelled questions: Run.clients reads its JSONL;
                # here it only takes its place (and its index k) among the K clients
                self._fed.clients[name] = []
        return self._fed

    def fed_test_size(self) -> dict:
        return {d: len(v) for d, v in self.fed.test.items()}

    def output(self, stage: str) -> Path:
        # results.json is the main table's (heterogeneous); other settings get results-<setting>.json
        tag = "" if self.args.setting == "heterogeneous" else f"-{self.args.setting}"
        return self.dir / STAGE_OUTPUT[stage].format(setting=self.args.setting, tag=tag)

    def done(self, stage: str) -> bool:
        return self.output(stage).exists()

    def clients(self) -> dict[str, federated.Client]:
        """The federation's members, each handed its own pairs and nothing else.
        The pairs are a pure function of the data seed, so every stage rebuilds identical
        clients (and identical held-out splits) instead of storing private data on the server."""
        def pairs(name, exs):
            if name in self.user_data:  # validated row by row: errors name file:line:field
                rows = safe_io.load_jsonl(self.user_data[name], "pairs")
                return [data.Pair(r["image"], r["prompt"], r["chosen"], r["rejected"], name) for r in rows]
            p = data.make_pairs(exs, self.args.seed)
            return data.flip_pairs(p, WEAK_FLIP, self.args.seed) if name == WEAK_CLIENT else p

        def client(name, exs):
            p = pairs(name, exs)
            # Format-only pairs on the public split's questions of the other domains (public:
            # any client may fetch them), --format-share of the client's own pair count: they
            # teach its RM what a malformed response is on prompts outside its domain
            # (data.format_pairs).
            fmt = data.format_pairs(self.fed.public, round(self.args.format_share * len(p)), self.args.seed, name,
                                    skip_domains={q.domain for q in p}) if self.args.format_share else None
            return federated.Client(name, p, self.args.seed, format_pairs=fmt)

        return {name: client(name, exs) for name, exs in self.fed.clients.items()}

    def family(self, client: str) -> str:
        return SETTINGS[self.args.setting].get(client, USER_FAMILY)

    def rm_dir(self, client: str) -> Path:
        """A client's RM upload. Keyed by family, so the homogeneous and heterogeneous settings
        share an RM whenever a client's family is the same in both (same seed, same result)."""
        return self.dir / "clients" / client / f"reward-{self.family(client)}"

    def client_init(self, client: str) -> Path:
        """The VLM a client starts from: --client-model NAME=DIR, else the tiny checkpoint of its
        family, built once per run (every client of one family starts from the same weights)."""
        given = dict(kv.split("=", 1) for kv in self.args.client_model)
        if client in given:
            return Path(given[client])
        fam = self.family(client)
        out = self.dir / "models" / fam
        if not out.exists():
            with atomic_dir(out) as tmp:
                models.build_tiny(fam, tmp, seed=self.args.seed)
        return out

    def rm_config(self) -> reward.RMConfig:
        # the local RM recipe every client follows (warm-up SFT sizes keep RMConfig's defaults)
        a = self.args
        return reward.RMConfig(sft_steps=a.rm_sft_steps, steps=a.rm_steps, batch=a.rm_batch, lr=a.rm_lr)

    def record_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(seconds, 2)
        atomic_write_json(self.timings_path, self.timings)


def stage_base(run: Run) -> None:
    """The embedded default's base: a tiny Qwen2-VL from a config, pre-trained to caption
    synthetic easy-VQA-style images (data.pretrain_examples), the stand-in for a downloaded
    pre-trained VLM. Skipped when --base is given: a real checkpoint arrives pre-trained."""
    a = run.args
    set_seed(a.seed)
    with atomic_dir(run.dir / "base_init") as tmp:
        models.build_tiny("qwen2_vl", tmp, seed=a.seed)
        if a.pretrain_steps:
            model, proc = models.load_vlm(tmp, device=run.device)
            examples = data.pretrain_examples(PRETRAIN_IMAGES, a.seed)
            losses = train_sft(model, models.Encoder(proc), examples, a.pretrain_steps, a.sft_batch, a.pretrain_lr,
                               a.seed, desc="pretrain")
            model.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / "pretrain_log.json", {"loss": losses, "steps": a.pretrain_steps,
                                                          "images": PRETRAIN_IMAGES})
            tqdm.write(f"pretrain: caption loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                       f"over {len(losses)} steps")


def base_init_dir(run: Run) -> Path:
    return Path(run.args.base) if run.args.base else run.dir / "base_init"


def stage_sft(run: Run) -> None:
    a = run.args
    set_seed(a.seed)
    # The same loader as for a real checkpoint: --base DIR swaps the tiny model for a real one.
    model, proc = models.load_vlm(base_init_dir(run), device=run.device)
    enc = models.Encoder(proc)
    # Public split only: the server never sees a client's questions (those stay in clients/).
    losses = train_sft(model, enc, run.fed.public, a.sft_steps, a.sft_batch, a.sft_lr, a.seed)
    with atomic_dir(run.dir / "base") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        atomic_write_json(tmp / "sft_log.json", {"loss": losses, "steps": a.sft_steps, "lr": a.sft_lr,
                                                 "batch": a.sft_batch, "examples": len(run.fed.public)})
    tqdm.write(f"sft: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
               f"over {len(losses)} steps on {len(run.fed.public)} public questions")


def stage_reward(run: Run, beside: list[str] = ()) -> dict:
    """E1 on every client, then the cross-domain matrix (and FedAvg-RM when homogeneous).

    `beside`: server stages (base, sft) that have not run yet. They and the clients' RMs need
    nothing from each other, so with --workers > 1 the server's chain is one more job in the
    pool: measured, the three RM jobs alone left one of two workers idle for a third of the
    stage. Returns {server stage: seconds it took inside its worker}."""
    a = run.args
    clients = run.clients()
    # In a real federation the clients train at the same time on their own machines; here they
    # share this one: --workers processes of one torch thread each (as in the grpo stage).
    # Only the upload directory comes back.
    todo = []
    for name in clients:
        if run.rm_dir(name).exists():  # resume: a finished client is never retrained
            tqdm.write(f"reward {name}: {run.rm_dir(name)} exists, kept")
        else:
            run.client_init(name)  # built here, once: two workers must not race for one family dir
            todo.append(name)
    jobs = [(a, None, list(beside))] if beside else []  # the server's chain first: the longest job
    jobs += [(a, name, []) for name in todo]
    times = {}
    if a.workers > 1 and len(jobs) > 1:
        for t in in_workers(_reward_worker, jobs, a.workers):
            times.update(t)
    else:
        times = server_job(run, beside)[1] if beside else {}
        for name in todo:
            tqdm.write(reward_job(run, clients[name]))
    uploads = {name: run.rm_dir(name) for name in clients}
    # FedAvg-RM is only defined between copies of one architecture and one initialisation: the
    # homogeneous setting. In the heterogeneous one, sharing parameters is impossible, which is
    # the paper's point: rewards are the common currency, weights are not.
    if a.setting == "homogeneous":
        uploads["fedavg_rm"] = fedavg_rm(run, clients)
    # Client j scores every uploaded RM on its own held-out pairs and reports one number per RM:
    # the matrix needs no data to leave a client. One RM in memory at a time (real checkpoints).
    matrix = {}
    for k, path in uploads.items():
        rm = reward.RewardModel.load(path, device=run.device)
        matrix[k] = {j: c.pair_accuracy(rm) for j, c in clients.items()}
        del rm
    atomic_write_json(run.output("reward"), {"setting": a.setting, "rm_pair_accuracy": matrix,
                                             "families": {k: run.family(k) for k in clients},
                                             "n_pairs": {k: c.n for k, c in clients.items()}})
    print(f"\nHeld-out pair accuracy (%), {a.setting} setting: row = reward model, column = domain\n")
    print(matrix_markdown(matrix))
    return times


def in_workers(fn, jobs: list, workers: int) -> list:
    """Run fn(job) for every job in `workers` spawned processes, in the order given (a long job
    first keeps the pool busy); fn returns (line, extra): each line is printed as its job
    finishes, and the extras come back in order of completion. spawn: a fresh
    interpreter per worker (no forked torch thread pool); each job rebuilds its Run from the
    args it carries, so its work is a pure function of the job."""
    import multiprocessing as mp

    extras = []
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        for line, extra in pool.imap_unordered(fn, jobs):
            tqdm.write(line)
            extras.append(extra)
        pool.close()  # let the workers exit cleanly (the with-block alone would terminate them)
        pool.join()
    return extras


def server_job(run: Run, stages: list[str]) -> tuple[str, dict]:
    """The server's own chain (base, then sft), timed stage by stage."""
    times = {}
    for name in stages:
        t = time.time()
        STAGES[name](run)
        times[name] = round(time.time() - t, 2)
    return "server: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()), times


def reward_job(run: Run, client: federated.Client) -> str:
    """E1 for one client: its RM trained on its own pairs from its own VLM, written atomically."""
    set_seed(run.args.seed)
    with atomic_dir(run.rm_dir(client.name)) as tmp:
        m = client.train_reward_model(run.client_init(client.name), tmp, run.rm_config(), run.device)
    return (f"reward {client.name} ({m['family']}): held-out pair accuracy {m['heldout_accuracy']:.3f} "
            f"on {m['heldout_pairs']} pairs, {m['seconds']:.0f}s")


def _reward_worker(job) -> tuple[str, dict]:
    """One client's RM, or (name None) the server's base and sft, in a worker process (one
    torch thread; the Run and its clients are rebuilt from the same args, a pure function of
    the data seed)."""
    args, name, server_stages = job
    torch.set_num_threads(1)
    run = Run(args)
    if name is None:
        return server_job(run, server_stages)
    return reward_job(run, run.clients()[name]), {}


def fedavg_rm(run: Run, clients: dict[str, federated.Client]) -> Path:
    """E8's parameter-sharing baseline: FedAvg of the client RMs, weights n_k. Its reward stats
    are pooled from the moments each client computes locally (count, sum, sum of squares)."""
    out = run.dir / "clients" / "fedavg_rm"
    if out.exists():
        return out
    rms = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in clients]
    # theta_FedAvg = sum_k n_k / sum_j n_j * theta_k over backbone and head alike (E4 applied to RMs)
    rm = federated.fedavg_reward_model(rms, [c.n for c in clients.values()])
    n, s, ss = map(sum, zip(*(c.reward_moments(rm) for c in clients.values())))
    rm.mean = s / n
    rm.std = max(((ss - n * rm.mean ** 2) / max(n - 1, 1)) ** 0.5, 1e-6)
    rm.info = {"client": "fedavg_rm", "family": rm.vlm.config.model_type, "n_pairs": int(sum(c.n for c in clients.values()))}
    with atomic_dir(out) as tmp:
        rm.save(tmp)
    return out


def matrix_markdown(matrix: dict[str, dict[str, float]], cols: list[str] | None = None,
                    corner: str = "RM \\ domain") -> str:
    """{row: {col: value in [0, 1]}} -> a markdown table in %."""
    cols = cols or list(next(iter(matrix.values())))
    lines = [f"| {corner} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows = [k for k in cols if k in matrix] + [k for k in matrix if k not in cols]  # domains first
    lines += [f"| {k} | " + " | ".join(f"{100 * matrix[k][c]:.1f}" for c in cols) + " |" for k in rows]
    return "\n".join(lines)


def weight_sources(run: Run, router_state: dict | None = None) -> dict:
    """Every reward a policy can be aligned with, as a weight source over the K client RMs
    (router.py): MoR's router, Avg RM, Weighted RM, and each client's RM alone (E8)."""
    names = list(run.fed.clients)
    # n_k as the clients reported them in the reward stage (Weighted RM needs nothing more)
    counts = json.loads(run.output("reward").read_text())["n_pairs"]
    out = {"avg_rm": router.avg_rm(len(names)), "weighted_rm": router.weighted_rm([counts[k] for k in names])}
    out.update({f"rm_{k}": router.single_rm(i, len(names)) for i, k in enumerate(names)})
    if router_state is not None:
        out = {"mor": make_router(run)(), **out}
        out["mor"].load_state_dict(router_state)
    return out


def make_router(run: Run):
    """The router's constructor: features are [prompt mean ; response mean] of the reference
    model's hidden states (2H), one logit per client RM."""
    H = json.loads((run.dir / "base" / "config.json").read_text())
    H = (H.get("text_config") or H)["hidden_size"]
    K, hidden = len(run.fed.clients), run.args.router_hidden
    return lambda: router.Router(2 * H, K, hidden, run.args.route_on)


def stage_router(run: Run) -> None:
    """E4: the router trained by FedAvg over the clients, each with the K frozen RMs."""
    a = run.args
    clients = run.clients()
    names = list(clients)
    # What every client downloads: the public reference (features, E2) and the K RM uploads.
    ref, proc = models.load_vlm(run.dir / "base", device=run.device)
    rms = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in names]
    t = time.time()
    for c in tqdm(clients.values(), desc="router: clients precompute features and RM scores", disable=None):
        c.prepare_routing(ref, models.Encoder(proc), rms, a.router_pairs)  # once: rounds then cost ms
    prep = time.time() - t
    del ref, rms
    set_seed(a.seed)
    make = make_router(run)
    model = make()
    # one extra exchange before round 0: feature moments -> the router's input standardisation
    model.set_feature_stats(*router.pooled_stats([c.feature_moments() for c in clients.values()]))

    def held_out(m):  # each client reports the mixed reward's accuracy on its held-out pairs
        return {"heldout_acc": {k: c.mixed_accuracy(m) for k, c in clients.items()}}

    t = time.time()
    log = federated.run_rounds(model, make, list(clients.values()), a.rounds, a.local_epochs, a.router_lr,
                               a.router_batch, a.client_fraction, a.seed, on_round=held_out)
    rounds_s = time.time() - t
    for e in log:
        tqdm.write(f"round {e['round']:3d}: routing loss {e['loss']:.4f}, held-out pair accuracy "
                   + ", ".join(f"{k} {100 * v:.1f}" for k, v in e["heldout_acc"].items()))
    # The comparison the issue asks for: held-out pair accuracy of the mixed reward per domain for
    # MoR and every fixed-weight baseline, each number computed by the client owning the domain.
    sources = weight_sources(run, model.state_dict())
    acc = {s: {k: c.mixed_accuracy(src) for k, c in clients.items()} for s, src in sources.items()}
    w = {k: c.routing_weights(model) for k, c in clients.items()}  # [2N_k, K] per domain
    weights = {k: dict(zip(names, wk.mean(0).tolist())) for k, wk in w.items()}
    entropy = {k: router.routing_entropy(wk) for k, wk in w.items()}
    summary = {"setting": a.setting, "rms": names, "heldout_pair_accuracy": acc, "routing_weights": weights,
               "routing_entropy": entropy, "max_entropy": math.log(len(names)), "rounds": log,
               "seconds": {"precompute": round(prep, 1), "rounds": round(rounds_s, 2)}}
    atomic_write_json(run.dir / f"router-{a.setting}.json", summary)
    atomic_save_file(run.output("router"), model.state_dict())
    print(router_markdown(summary))


def router_markdown(s: dict) -> str:
    names = s["rms"]
    out = [f"Held-out pair accuracy of the mixed reward (%), {s['setting']} setting", "",
           matrix_markdown(s["heldout_pair_accuracy"], names), "",
           "Mean routing weight of the trained router: row = domain of the response, column = RM", "",
           "| domain \\ RM | " + " | ".join(names) + " | entropy (nats) |", "|---|" + "---|" * (len(names) + 1)]
    out += [f"| {d} | " + " | ".join(f"{s['routing_weights'][d][k]:.2f}" for k in names)
            + f" | {s['routing_entropy'][d]:.2f} |" for d in names]
    out += ["", f"(uniform routing: entropy {s['max_entropy']:.2f}; collapse onto one RM: 0)"]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# GRPO (E5) for every method of E8
# ----------------------------------------------------------------------------------------------


def methods(run: Run) -> list[str]:
    """E8's methods in table order; --methods picks a subset.

      oracle       exact match with the gold answer: the upper bound the server never has
      mor          the federated router's soft mixture of the K client RMs (E3)
      mor_nts      the router as a Neural Thompson Sampling bandit, one RM per prompt (E6-E7);
                   mor_nts_batch: one RM per batch
      avg_rm       w_k = 1/K;   weighted_rm   w_k = n_k / sum n
      rm_<client>  one client's RM alone (how far a single expert carries)
      fedavg_rm    the parameter-averaged RM (homogeneous only: the baseline MoR replaces)"""
    names = list(run.fed.clients)
    out = ["oracle", "mor", "mor_nts", "mor_nts_batch", "avg_rm", "weighted_rm"] + [f"rm_{k}" for k in names]
    if run.args.setting == "homogeneous":
        out.append("fedavg_rm")
    if run.args.methods:
        want = run.args.methods.split(",")
        bad = sorted(set(want) - set(out))
        if bad:
            raise SystemExit(f"--methods: unknown {bad} for the {run.args.setting} setting; choose from {out}")
        out = [m for m in out if m in want]
    return out


def policy_dir(run: Run, method: str, seed: int) -> Path:
    # one directory per (setting, method, seed): the unit of resumption of the grpo stage
    return run.dir / "policies" / run.args.setting / method / f"seed{seed}"


def grpo_config(run: Run) -> grpo.GRPOConfig:
    # CLI flags -> the loop's config (clip eps, mu, max new tokens keep grpo.GRPOConfig's defaults)
    a = run.args
    return grpo.GRPOConfig(steps=a.grpo_steps, prompts=a.grpo_prompts, group=a.group, lr=a.grpo_lr, beta=a.beta,
                           format_guard=a.format_guard)


def stage_grpo(run: Run) -> None:
    """Align a copy of the reference with each method's reward, for each seed (E5, E8).

    Every (method, seed) is an independent job with its own output directory (the unit of
    resumption). With --workers W > 1 they run in W processes of one torch thread each: the tiny
    models do not keep two threads busy, and two 1-thread GRPO runs side by side took 18.6 s per
    25 steps each where one 2-thread run took 12.6 s (0.37 vs 0.50 s per step of throughput)."""
    a = run.args
    jobs = [(m, s) for m in methods(run) for s in a.seeds]
    todo = [(m, s) for m, s in jobs if not policy_dir(run, m, s).exists()]
    for m, s in sorted(set(jobs) - set(todo), key=jobs.index):
        tqdm.write(f"grpo {m} seed {s}: {policy_dir(run, m, s)} exists, kept")
    if a.workers > 1 and len(todo) > 1:
        # the costliest jobs first (they score with the most RMs), so the pool does not end on
        # one long job with the other worker idle
        todo.sort(key=lambda ms: -JOB_COST.get(ms[0], 1))
        in_workers(_grpo_worker, [(a, m, s) for m, s in todo], a.workers)
    else:
        cache: dict = {}
        for m, s in todo:
            tqdm.write(grpo_job(run, m, s, cache))
    summary = {m: [str(policy_dir(run, m, s).relative_to(run.dir)) for s in a.seeds] for m in methods(run)}
    atomic_write_json(run.output("grpo"), summary)


_WORKER_CACHE: dict = {}  # per worker process: the K RMs and the router, loaded by its first job
# Relative cost of a GRPO job (training + test eval, 1 thread, measured on the default run with
# 100 steps): Avg/Weighted RM and MoR score with every RM (77-89 s), NTS adds a bandit update
# and a policy forward per step (82-87 s), single RMs take 67-73 s and the oracle about 62 s.
JOB_COST = {"avg_rm": 1.3, "weighted_rm": 1.3, "mor": 1.2, "mor_nts": 1.2, "mor_nts_batch": 1.2}


def _grpo_worker(job) -> tuple[str, None]:
    """One (method, seed) job in a worker process: one torch thread, its own Run. A worker
    lives for the whole stage, so the RMs it loaded serve all of its jobs."""
    args, method, seed = job
    torch.set_num_threads(1)
    return grpo_job(Run(args), method, seed, _WORKER_CACHE), None


def grpo_job(run: Run, method: str, seed: int, cache: dict) -> str:
    """GRPO for one method and seed; writes policies/<setting>/<method>/seed<seed>/ atomically
    and returns the summary line. `cache` keeps the K client RMs and the router between the
    jobs of one process."""
    a, fed = run.args, run.fed
    # The pool's gold answers: read by the oracle reward and by the on-the-fly accuracy in the
    # logs, never by the trainer's update (MoR's server has no labels).
    gold = {(e.image, e.prompt): g for e, g in zip(fed.pool, fed.pool_gold)}
    out = policy_dir(run, method, seed)
    if method == "oracle":
        fn = grpo.OracleReward(gold)
    elif method == "fedavg_rm":
        fn = grpo.SingleReward(reward.RewardModel.load(run.dir / "clients" / "fedavg_rm", device=run.device))
    else:
        if "rms" not in cache:  # the K client uploads, loaded once for every RM method
            cache["rms"] = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in fed.clients]
            cache["router"] = router.load_state(run.output("router"), make_router(run)())
        rms, router_state = cache["rms"], cache["router"]
        if method.startswith("mor_nts"):
            ts = nts.NeuralTS(weight_sources(run, router_state)["mor"], lam=a.nts_lambda, nu=a.nts_nu,
                              update_steps=a.nts_update_steps, seed=seed)
            fn = grpo.NTSReward(rms, ts, a.group, per_batch=method == "mor_nts_batch")
        else:
            fn = grpo.MixedReward(rms, weight_sources(run, router_state)[method])
    # Every method starts from the same reference weights; only the reward differs. The seed
    # drives the prompt order and the sampling, so seeds measure RL noise.
    set_seed(seed)
    policy, proc = models.load_vlm(run.dir / "base", device=run.device)
    ref, _ = models.load_vlm(run.dir / "base", device=run.device)  # frozen pi_ref (E5)
    t = time.time()
    log = grpo.train_grpo(policy, ref, models.Encoder(proc), fed.pool, fn, grpo_config(run), seed, gold=gold,
                          desc=f"grpo {method} s{seed}")
    t_train = time.time() - t
    # E9 on the test split here, in the worker, rather than in the single-process eval stage:
    # the two workers then share it. Stored with the policy; eval adds the win rate.
    r = evaluate(policy, models.Encoder(proc), fed.test, desc=f"eval {method} s{seed}")
    # The policy appears under its final name only when complete: a kill here costs this one
    # (method, seed), and the rerun resumes with it.
    with atomic_dir(out) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        atomic_write_json(tmp / "test_eval.json", {"accuracy": r["accuracy"], "correct": r["correct"],
                                                   "malformed_share": r["malformed_share"],
                                                   "n": run.fed_test_size()})
        extra = {"nts": nts_summary(fn, fed)} if isinstance(fn, grpo.NTSReward) else {}
        atomic_write_json(tmp / "grpo_log.json", dict(log, **extra, rm_calls=getattr(fn, "calls", None),
                                                      seconds=round(t_train, 1),
                                                      config=vars(grpo_config(run))))
    w = min(10, len(log["reward"])) or 1
    return (f"grpo {method} seed {seed}: reward {sum(log['reward'][-w:]) / w:.3f}, "
            f"kl {sum(log['kl'][-w:]) / w:.3f}, sampled accuracy {sum(log['accuracy'][-w:]) / w:.3f}, "
            f"{time.time() - t:.0f}s")


def nts_summary(fn, fed) -> dict:
    """What the bandit did: arm-choice histogram per domain (per step and in total), the mean
    posterior variance and the feedback rate per step."""
    # The question text fixes the domain, so the prompt string maps to it (evaluator-side only).
    dom = {e.prompt: e.domain for e in fed.pool}
    names, total, steps = list(fed.clients), {}, []
    for h in fn.history:
        hist = {}
        for p, k in zip(h["prompts"], h["arms"]):
            hist.setdefault(dom[p], [0] * len(names))[k] += 1
            total.setdefault(dom[p], [0] * len(names))[k] += 1
        steps.append({"arms": hist, "variance": h["variance"], "feedback": h.get("feedback")})
    return {"rms": names, "arm_counts": total, "steps": steps}


def stage_eval(run: Run) -> None:
    fed = run.fed
    model, proc = models.load_vlm(run.dir / "base", device=run.device)
    ref = evaluate(model, models.Encoder(proc), fed.test, desc="eval reference")
    # Gate 1 of the benchmark: a question-only guesser fitted on the public split must sit at
    # chance, else the table would measure the text shortcut rather than vision (DESIGN 4).
    blind = data.blind_baseline(fed.public, fed.test)
    results = {
        "domains": list(fed.test),
        "eval_questions_per_domain": {d: len(v) for d, v in fed.test.items()},
        "seeds": run.args.seeds,  # the GRPO seeds every method's mean +/- std is taken over
        "data_seed": run.args.seed,  # split, reference SFT, client RMs and router
        "chance": {d: _chance(fed.test[d]) for d in fed.test},
        "blind": blind,
        "reference": ref["accuracy"],
        "reference_malformed_share": ref["malformed_share"],
        "wall_seconds": run.timings,
    }
    rm_file = run.output("reward")
    if rm_file.exists():
        rm = json.loads(rm_file.read_text())
        results["setting"], results["rm_pair_accuracy"] = rm["setting"], rm["rm_pair_accuracy"]
    if run.output("grpo").exists():
        results["methods"] = evaluate_methods(run, ref["correct"])
    results["gates"] = gates(results)
    main_table = run.dir / "results.json"
    if WEAK_CLIENT in SETTINGS[run.args.setting] and main_table.exists() and "methods" in results:
        # the bucket effect: the same methods and seeds without the weak client (the main table)
        without = json.loads(main_table.read_text()).get("methods", {})
        results["without_weak_client"] = {m: without[m]["accuracy"] for m in results["methods"] if m in without}
    atomic_write_json(run.dir / "reference_correct.json", ref["correct"])
    atomic_write_json(run.output("eval"), results)
    plots(run)
    md = results_markdown(results)
    atomic_write_text(run.output("eval").with_suffix(".md"), md)
    print("\n" + md)


def plots(run: Run) -> None:
    """grpo-<setting>.png: reward and on-the-fly sampled accuracy over GRPO steps per method
    (10-step moving average, seeds averaged); routing-<setting>.png: the router's mean weight
    per (domain, RM). matplotlib is optional: without it, one line says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    setting = run.args.setting

    def smooth(xs, w=10):  # trailing moving average: single GRPO steps are noisy (16 prompts)
        return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]

    if run.output("grpo").exists():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        # Rewards of different methods live on different scales (0/1 oracle vs standardised RM
        # mixtures): compare their trends, not their levels; accuracy is comparable across methods.
        for method in trained_methods(run):
            # trained_methods has checked that every seed's log is there
            logs = [json.loads((policy_dir(run, method, s) / "grpo_log.json").read_text()) for s in run.args.seeds]
            for ax, key in zip(axes, ("reward", "accuracy")):
                if logs and logs[0][key]:
                    n = min(len(lg[key]) for lg in logs)
                    mean = [sum(lg[key][i] for lg in logs) / len(logs) for i in range(n)]
                    ax.plot(smooth(mean), label=method)
        axes[0].set(title="reward of the method's own source (standardised)", xlabel="GRPO step")
        axes[1].set(title="sampled accuracy (gold, evaluator only)", xlabel="GRPO step")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        atomic_savefig(fig, run.dir / f"grpo-{setting}.png")
        plt.close(fig)
    summary = run.dir / f"router-{setting}.json"
    if summary.exists():
        r = json.loads(summary.read_text())
        # [domain, RM]: a good router is near-diagonal (each domain to its own client's RM)
        w = [[r["routing_weights"][d][k] for k in r["rms"]] for d in r["rms"]]
        fig, ax = plt.subplots(figsize=(4.5, 3.8))
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set(xticks=range(len(r["rms"])), yticks=range(len(r["rms"])), xticklabels=r["rms"],
               yticklabels=r["rms"], xlabel="reward model", ylabel="domain of the response",
               title=f"mean routing weight ({setting})")
        for i, row in enumerate(w):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k")
        fig.colorbar(im)
        fig.tight_layout()
        atomic_savefig(fig, run.dir / f"routing-{setting}.png")
        plt.close(fig)


def _mean_std(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd}


def _moving_max(xs: list[float], w: int = 10) -> float:
    """Largest w-step moving average: "stays under 5% over training" is a claim about every
    stretch of training, not just the end."""
    if not xs:
        return 0.0
    return max(sum(xs[i:i + w]) / len(xs[i:i + w]) for i in range(max(1, len(xs) - w + 1)))


def trained_methods(run: Run) -> list[str]:
    """The methods eval reports: --methods when given, else those the grpo stage trained
    (grpo-<setting>.json), so `--stages eval --force` alone after --full's bucket run evaluates
    its three methods. A policy that is not there is a one-line error, not a loader traceback."""
    ms = methods(run)
    if not run.args.methods:
        trained = json.loads(run.output("grpo").read_text())
        ms = [m for m in ms if m in trained]
    for m in ms:
        for s in run.args.seeds:
            d = policy_dir(run, m, s)
            if not (d / "grpo_log.json").exists():
                raise SystemExit(f"eval: {d} holds no GRPO policy; run --stages grpo with --methods {m} "
                                 f"--seeds {s} (or name in --methods only the methods trained)")
    return ms


def evaluate_methods(run: Run, ref_correct: dict) -> dict:
    """E9 for every aligned policy: greedy test accuracy and win rate vs the reference per domain,
    as mean and std over the GRPO seeds; plus the training-time malformed share (gate 5) and
    the final KL. A policy's evaluation is cached in its directory (eval.json)."""
    fed, out = run.fed, {}
    for method in trained_methods(run):
        per_seed = []  # one dict per GRPO seed: test accuracy, win rate, malformed share, KL
        for seed in run.args.seeds:
            d = policy_dir(run, method, seed)
            cache = d / "eval.json"
            # cached evaluations are reused only for the same test set (--test-per-domain may differ)
            done = d / "test_eval.json"  # written by the GRPO job on the same test set, if it was
            if cache.exists() and json.loads(cache.read_text()).get("n") == run.fed_test_size():
                ev = json.loads(cache.read_text())
            else:
                r = json.loads(done.read_text()) if done.exists() else {}
                if r.get("n") != run.fed_test_size():
                    model, proc = models.load_vlm(d, device=run.device)
                    r = evaluate(model, models.Encoder(proc), fed.test, desc=f"eval {method} s{seed}")
                ev = {"accuracy": r["accuracy"], "malformed_share": r["malformed_share"], "n": run.fed_test_size(),
                      "win_rate": {k: win_rate(r["correct"][k], ref_correct[k]) for k in fed.test}}
                atomic_write_json(cache, ev)
            log = json.loads((d / "grpo_log.json").read_text())
            ev["train_malformed"] = _moving_max(log["malformed"])
            ev["final_kl"] = sum(log["kl"][-10:]) / max(len(log["kl"][-10:]), 1)
            # RM rows scored per GRPO step (distinct samples x RMs run): soft mixtures pay K, hard
            # routing (NTS) and single RMs pay 1; the oracle pays none
            ev["rm_rows_per_step"] = sum(log.get("rm_calls") or [0]) / max(len(log["reward"]), 1)
            if "nts" in log:  # the bandit's choices: arm counts per domain, final variance, feedback rate
                ev["nts"] = {"arm_counts": log["nts"]["arm_counts"], "rms": log["nts"]["rms"],
                             "final_variance": log["nts"]["steps"][-1]["variance"],
                             "feedback_rate": sum(x["feedback"] or 0 for x in log["nts"]["steps"]) / len(log["nts"]["steps"])}
            per_seed.append(ev)
        doms = list(fed.test)
        out[method] = {
            "accuracy": {k: _mean_std([e["accuracy"][k] for e in per_seed]) for k in doms},
            "win_rate": {k: _mean_std([e["win_rate"][k] for e in per_seed]) for k in doms},
            "malformed_share": _mean_std([e["train_malformed"] for e in per_seed]),
            "eval_malformed_share": _mean_std([e["malformed_share"] for e in per_seed]),
            "final_kl": _mean_std([e["final_kl"] for e in per_seed]),
            "rm_rows_per_step": _mean_std([e["rm_rows_per_step"] for e in per_seed]),
        }
        if "nts" in per_seed[0]:  # arm choices summed over seeds: share of prompts per (domain, RM)
            rms = per_seed[0]["nts"]["rms"]
            counts = {d: [sum(e["nts"]["arm_counts"].get(d, [0] * len(rms))[k] for e in per_seed)
                          for k in range(len(rms))] for d in doms}
            out[method]["nts_arm_share"] = {d: {rm: c / max(sum(counts[d]), 1) for rm, c in zip(rms, counts[d])}
                                            for d in doms}
            out[method]["nts_final_variance"] = _mean_std([e["nts"]["final_variance"] for e in per_seed])
    return out


def gates(r: dict) -> dict:
    """The benchmark's soundness gates that can be computed so far (issue "benchmark must measure
    what it claims"): {name: {pass, value, threshold}}. A failed gate is reported, never hidden.
      1 blind baseline: max over domains of (blind - chance) <= 0.05
      2 reference: min over domains of (reference - blind) >= 0.10, and overall <= 0.80
      3 client RMs: min over clients of the in-domain held-out pair accuracy >= 0.90
      4 oracle GRPO: min over domains of (oracle policy - reference), mean over seeds, >= 0.05
      5 no reward hacking: max over methods of the largest 10-step moving share of malformed
        samples during GRPO < 0.05 (the final KL of each method is in the table)"""
    doms, n = r["domains"], r["eval_questions_per_domain"]
    out = {}
    v = max(r["blind"][d] - r["chance"][d] for d in doms)
    out["1_blind_at_chance"] = {"pass": v <= 0.05, "value": v, "threshold": 0.05}
    v = min(r["reference"][d] - r["blind"][d] for d in doms)
    out["2a_reference_above_blind"] = {"pass": v >= 0.10, "value": v, "threshold": 0.10}
    v = sum(r["reference"][d] * n[d] for d in doms) / max(sum(n.values()), 1)
    out["2b_reference_overall_at_most"] = {"pass": v <= 0.80, "value": v, "threshold": 0.80}
    if "rm_pair_accuracy" in r:
        m = r["rm_pair_accuracy"]
        v = min(m[c][c] for c in m if c in doms)  # a client is named after its domain
        out["3_client_rm_in_domain"] = {"pass": v >= 0.90, "value": v, "threshold": 0.90}
    # Gates 4-5 need aligned policies: computed once the grpo stage has run.
    ms = r.get("methods", {})
    if "oracle" in ms:
        v = min(ms["oracle"]["accuracy"][d]["mean"] - r["reference"][d] for d in doms)
        out["4_oracle_grpo_gain"] = {"pass": v >= 0.05, "value": v, "threshold": 0.05}
    if ms:
        v = max(m["malformed_share"]["mean"] for m in ms.values())
        out["5_no_reward_hacking"] = {"pass": v < 0.05, "value": v, "threshold": 0.05}
    return out


def _chance(exs: list[data.Example]) -> float:
    """Accuracy of a uniform guess among the answers the question admits (position questions
    name their two candidates, "left or right?", so chance is 1/2 there)."""
    d = exs[0].domain if exs else ""
    return 0.5 if d == "position" else 1.0 / len(data.DOMAIN_ANSWERS.get(d, [None]))


def results_markdown(r: dict) -> str:
    """results.json -> results.md, in reading order:
      1. chance, blind and reference accuracy per domain (is the benchmark sound?)
      2. every aligned policy: accuracy mean +/- std over seeds, win rate, malformed share, KL
      3. the client x domain RM pair-accuracy matrix (why routing is worth having)
      4. the gates, PASS or FAIL with their numbers, and the wall time of every stage
    Overall columns weight each domain by its number of test questions."""
    doms = r["domains"]
    lines = ["| | " + " | ".join(doms) + " | overall |", "|---|" + "---|" * (len(doms) + 1)]

    def row(name, accs):
        n = r["eval_questions_per_domain"]
        overall = sum(accs[d] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
        return f"| {name} | " + " | ".join(f"{100 * accs[d]:.1f}" for d in doms) + f" | {100 * overall:.1f} |"

    lines += [row("chance", r["chance"]), row("blind (question only)", r["blind"]),
              row("reference (SFT)", r["reference"])]
    out = ["# mor results", "", f"Test questions per domain: {r['eval_questions_per_domain']}; "
           f"data seed {r.get('data_seed')}, GRPO seeds {r['seeds']}. Accuracy in %, greedy answers, exact match.", ""] + lines
    if r.get("methods"):
        out += ["", f"GRPO-aligned policies: accuracy (%) mean +/- std over seeds {r['seeds']}; "
                "win rate vs the reference (%); max 10-step malformed share of samples during training (%); "
                "final KL; RM rows scored per step (distinct samples x RMs run)", "",
                "| method | " + " | ".join(doms) + " | overall | win rate | malformed | KL | RM rows/step |",
                "|---|" + "---|" * (len(doms) + 5)]
        n = r["eval_questions_per_domain"]  # overall = question-weighted mean of the domains
        # table order = E8's order (results.json stores its keys sorted)
        order = ["oracle", "mor", "mor_nts", "mor_nts_batch", "avg_rm", "weighted_rm", "fedavg_rm"]
        names = sorted(r["methods"], key=lambda k: (order.index(k) if k in order else len(order), k))
        for name, m in ((k, r["methods"][k]) for k in names):
            acc = {d: m["accuracy"][d]["mean"] for d in doms}
            overall = sum(acc[d] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
            wr = sum(m["win_rate"][d]["mean"] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
            out.append(f"| {name} | " + " | ".join(f"{100 * m['accuracy'][d]['mean']:.1f} +/- "
                                                  f"{100 * m['accuracy'][d]['std']:.1f}" for d in doms)
                       + f" | {100 * overall:.1f} | {100 * wr:.1f} | {100 * m['malformed_share']['mean']:.1f} "
                       f"| {m['final_kl']['mean']:.3f} | {m.get('rm_rows_per_step', {}).get('mean', 0):.0f} |")
    for name, m in r.get("methods", {}).items():
        if "nts_arm_share" in m:
            share = m["nts_arm_share"]
            out += ["", f"{name}: share of prompts routed to each RM (rows: domain of the prompt), final "
                    f"mean posterior variance {m['nts_final_variance']['mean']:.3f}", "",
                    matrix_markdown(share, list(next(iter(share.values()))), "domain \\ RM")]
    if r.get("without_weak_client"):
        # overall accuracy (question-weighted) with and without the weak client, same seeds
        def overall(acc):
            return sum(acc[d]["mean"] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)

        out += ["", f"Bucket effect: accuracy (%) without and with the weak client `{WEAK_CLIENT}` "
                f"({int(100 * WEAK_FLIP)}% of its preferences reversed), mean over seeds {r['seeds']}", "",
                "| method | " + " | ".join(f"{d} without / with" for d in doms) + " | overall without | with | change |",
                "|---|" + "---|" * (len(doms) + 3)]
        for name, acc0 in r["without_weak_client"].items():
            acc1 = r["methods"][name]["accuracy"]
            out.append(f"| {name} | " + " | ".join(f"{100 * acc0[d]['mean']:.1f} / {100 * acc1[d]['mean']:.1f}"
                                                  for d in doms)
                       + f" | {100 * overall(acc0):.1f} | {100 * overall(acc1):.1f} "
                       f"| {100 * (overall(acc1) - overall(acc0)):+.1f} |")
    if "rm_pair_accuracy" in r:
        out += ["", f"Client reward models ({r.get('setting', '')} setting), held-out pair accuracy (%): "
                "row = reward model, column = domain", "", matrix_markdown(r["rm_pair_accuracy"], doms)]
    if r.get("gates"):
        out += ["", "| gate | value | threshold | |", "|---|---|---|---|"]
        out += [f"| {k} | {g['value']:.3f} | {g['threshold']} | {'PASS' if g['pass'] else 'FAIL'} |"
                for k, g in r["gates"].items()]
    w = dict(r["wall_seconds"])
    beside = w.pop("beside_reward", 0.0)
    out += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in w.items())
            + ("; base and sft ran beside the clients' RMs, inside reward's time" if beside else "")
            + f". Run directory total: {sum(w.values()) - beside:.0f} s.", ""]
    return "\n".join(out)


# Stage name -> function, and the path whose existence marks it finished (see `Run`).
# Stages run in this order; later issues append reward, router, grpo.
STAGES = {"base": stage_base, "sft": stage_sft, "reward": stage_reward, "router": stage_router,
          "grpo": stage_grpo, "eval": stage_eval}
STAGE_OUTPUT = {"base": "base_init", "sft": "base", "reward": "rm_matrix-{setting}.json",
                "router": "router-{setting}.safetensors", "grpo": "grpo-{setting}.json", "eval": "results{tag}.json"}


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
    p.add_argument("--workers", type=int, default=None,
                   help="client RMs and GRPO jobs (method x seed) run side by side, one torch thread each "
                        "(default: 2 on a CPU with >= 2 cores, 1 on CUDA; results depend on it, "
                        "as on --threads)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="caption pre-training steps of the tiny base (default 600, --quick 5; 0: none)")
    p.add_argument("--sft-steps", type=int, default=None, help="reference SFT steps (default 300, --quick 40)")
    p.add_argument("--sft-batch", type=int, default=64, help="questions per SFT step, split evenly over domains (also the pre-training batch)")
    p.add_argument("--sft-lr", type=float, default=3e-4,
                   help="AdamW learning rate of the reference SFT (default %(default)s; 1e-3 collapsed shape "
                        "onto 'rectangle' in one of two runs, see README)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="AdamW learning rate of the caption pre-training")
    p.add_argument("--test-per-domain", type=int, default=None, help="cap on test questions per domain")
    p.add_argument("--setting", choices=list(SETTINGS), default="heterogeneous",
                   help="clients' VLM families: heterogeneous (LLaVA-OV / Qwen2.5-VL / Qwen2-VL), "
                        "homogeneous (all Qwen2-VL, adds FedAvg-RM) or bucket (heterogeneous + a weak "
                        "fourth client whose preferences are half reversed)")
    p.add_argument("--full", action="store_true",
                   help="the main table, then the homogeneous setting, then the bucket effect "
                        f"({BUCKET_METHODS})")
    p.add_argument("--client-model", action="append", default=[], metavar="NAME=DIR",
                   help="start client NAME's RM from a local checkpoint dir (repeatable)")
    p.add_argument("--client-data", action="append", default=[], metavar="NAME=FILE",
                   help="add client NAME with its own preference pairs: a JSONL file with image, prompt, "
                        "chosen, rejected per line, image paths relative to the file (repeatable); its RM "
                        f"starts from --client-model NAME=DIR or the tiny {USER_FAMILY}")
    p.add_argument("--rm-sft-steps", type=int, default=None, help="client SFT warm-up steps (default 300, --quick 20)")
    p.add_argument("--rm-steps", type=int, default=None, help="client Bradley-Terry steps (default 300, --quick 20)")
    p.add_argument("--rm-batch", type=int, default=32, help="pairs per BT step")
    p.add_argument("--format-share", type=float, default=0.0,
                   help="format-only pairs on public questions per own pair in each client's BT data "
                        "(default %(default).2f; 0: none); see data.format_pairs")
    p.add_argument("--rm-lr", type=float, default=3e-4, help="AdamW learning rate of the BT phase")
    p.add_argument("--rounds", type=int, default=None, help="federated router rounds R (default 30, --quick 5)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs E per client per round")
    p.add_argument("--router-lr", type=float, default=1e-3, help="AdamW learning rate of a client's router step")
    p.add_argument("--router-batch", type=int, default=64, help="pairs per router step")
    p.add_argument("--router-pairs", type=int, default=None,
                   help="training pairs per client used to fit the router (default 600, --quick 128)")
    p.add_argument("--route-on", choices=list(router.CONTEXTS), default="prompt+response",
                   help="what of e(x, y) the router reads: E2's prompt+response, or the prompt only")
    p.add_argument("--router-hidden", type=int, default=64, help="router MLP width")
    p.add_argument("--client-fraction", type=float, default=1.0, help="share of clients sampled per round")
    p.add_argument("--methods", default=None, help="comma-separated subset of E8's methods (default: all)")
    p.add_argument("--seeds", default=None, help="GRPO seeds, comma-separated (default 0,1,2; --quick 0)")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per method and seed (default 80, --quick 3)")
    p.add_argument("--grpo-prompts", type=int, default=16, help="prompts N per GRPO step")
    p.add_argument("--group", type=int, default=8, help="samples G per prompt")
    p.add_argument("--grpo-lr", type=float, default=2e-4, help="AdamW learning rate of GRPO")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight of GRPO")
    p.add_argument("--no-format-guard", dest="format_guard", action="store_false",
                   help="let malformed samples keep their reward (default: they rank last in their group, "
                        "grpo.format_guard)")
    p.add_argument("--nts-lambda", type=float, default=1e-3, help="NTS prior precision lambda (E6)")
    p.add_argument("--nts-nu", type=float, default=1.0, help="NTS exploration scale nu (E6); 0: no exploration")
    p.add_argument("--nts-update-steps", type=int, default=10,
                   help="NTS SGD steps on the feedback after each GRPO step (E6); 0: the bandit never learns")
    a = p.parse_args(argv)
    size = QUICK if a.quick else DEFAULT
    for k, v in size.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.workers is None:
        a.workers = 1 if a.device.startswith("cuda") else min(2, os.cpu_count() or 1)
    if a.workers < 1:
        p.error(f"--workers {a.workers}: must be >= 1")
    unknown = set(a.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    a.seeds = [int(x) for x in str(a.seeds).split(",")]  # "0,1,2" -> [0, 1, 2]
    user = []
    for kv in a.client_data:
        name, _, path = kv.partition("=")
        if not CLIENT_NAME.fullmatch(name) or not path:
            p.error(f"--client-data {kv!r}: expected NAME=FILE, NAME of letters, digits, '_' or '-'")
        if name in SETTINGS[a.setting]:
            p.error(f"--client-data {kv!r}: {name!r} is already a client of the {a.setting} setting; "
                    "pick another name")
        if name in user:
            p.error(f"--client-data: client name {name!r} given twice (client names must be unique)")
        user.append(name)
    seen = set()
    for kv in a.client_model:
        name = kv.split("=", 1)[0]
        if "=" not in kv or name not in [*SETTINGS[a.setting], *user]:
            p.error(f"--client-model {kv!r}: expected NAME=DIR with NAME one of {[*SETTINGS[a.setting], *user]}")
        if name in seen:
            p.error(f"--client-model: client {name!r} given twice")
        seen.add(name)
    if not 0 <= a.format_share <= 10:
        p.error(f"--format-share {a.format_share}: must be in [0, 10]")
    if not 0 < a.client_fraction <= 1:
        p.error(f"--client-fraction {a.client_fraction}: must be in (0, 1]")
    if a.base:
        a.stages = ",".join(s for s in a.stages.split(",") if s != "base")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.full:
        # One run directory, three settings: sft and the RMs of shared families are reused.
        argv = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--full"]
        for setting, extra in (("heterogeneous", []), ("homogeneous", []), ("bucket", ["--methods", BUCKET_METHODS])):
            print(f"=== --full: {setting} setting ===", flush=True)
            main([*argv, "--setting", setting, *(extra if a.methods is None else [])])
        return 0
    # An explicit thread count: torch's default spins badly when another process shares the
    # two cores (DESIGN 7), and speeds are only comparable at one fixed count.
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a)
    # the flags of the latest invocation, for the record (stages already done keep their outputs)
    atomic_write_json(run.dir / "config.json", vars(a))
    names = a.stages.split(",")
    pending = [n for n in names if a.force or not run.done(n)]
    # The server's base and sft run beside the clients' RMs when all three are still to do
    # (stage_reward); their own times are recorded, and "beside_reward" says how many of the
    # reward stage's seconds they already account for (the run's wall time is the sum minus it).
    beside = [n for n in ("base", "sft") if n in pending] if a.workers > 1 and "reward" in pending else []
    for name in names:
        if name not in pending:
            print(f"[{name}] done already ({run.output(name)}), skipped")
            continue
        if name in beside:
            print(f"[{name}] runs beside the clients' reward models (stage reward)", flush=True)
            continue
        t = time.time()
        print(f"[{name}] ...", flush=True)
        sub = STAGES[name](run, beside) if name == "reward" else STAGES[name](run)
        for k, v in (sub or {}).items():
            run.record_time(k, v)
        if sub:
            run.record_time("beside_reward", sum(sub.values()))
        # setting-specific stages (reward) are timed per setting: both can live in one run dir
        per_setting = "{setting}" in STAGE_OUTPUT[name] or (name == "eval" and a.setting != "heterogeneous")
        run.record_time(name + (f"-{a.setting}" if per_setting else ""), time.time() - t)
        print(f"[{name}] {time.time() - t:.1f}s", flush=True)
    # The tables are written inside `eval`, before its own time is known: stamp every stage's
    # wall time (including eval's) into them now.
    res_path = run.output("eval")
    if res_path.exists():
        res = json.loads(res_path.read_text())
        if res.get("wall_seconds") != run.timings:
            res["wall_seconds"] = run.timings
            atomic_write_json(res_path, res)
            atomic_write_text(res_path.with_suffix(".md"), results_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
