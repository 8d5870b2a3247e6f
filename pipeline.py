"""One run of the pipeline: its directory, its federation, its sizes and settings.

A `Run` is what every stage receives: the parsed flags, the run directory, the clients (each
with its own pairs and nothing else), where each stage's output lives, and the method list of
E8. The stages themselves are in stages.py; the command line in mor.py.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

import data
import federated
import grpo
import models
import reward
import router
import safe_io
from safe_io import atomic_dir, atomic_write_json


def set_seed(seed: int) -> None:
    """Python's and torch's RNGs; on CPU the same seed then gives the same weights and results."""
    random.seed(seed)
    torch.manual_seed(seed)


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


# Where each stage's output lives; a stage is done when its output exists (written atomically).
STAGE_OUTPUT = {"base": "base_init", "sft": "base", "reward": "rm_matrix-{setting}.json",
                "router": "router-{setting}.safetensors", "grpo": "grpo-{setting}.json", "eval": "results{tag}.json"}


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
