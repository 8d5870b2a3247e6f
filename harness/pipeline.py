"""One run of the pipeline: its directory, its federation, its sizes and settings.

A `Run` is what every stage receives: the parsed flags, the run directory, the clients (each
with its own pairs and nothing else), where each stage's output lives, and the method list of
E8. The stages themselves are in harness/stages.py; the command line in mor.py.
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
from harness import provenance
from safe_io import atomic_dir, atomic_write_json


def set_seed(seed: int) -> None:
    """Python's and torch's RNGs; on CPU the same seed then gives the same weights and results."""
    random.seed(seed)
    torch.manual_seed(seed)


# Run sizes. DEFAULT: the tiny base pre-trained for 600 caption steps on 4,000 synthetic images
# (stage base), then 300 balanced SFT steps of 64 on the carelessly labelled public split (stage
# sft); measured reference and oracle gains in docs/benchmark.md (gate 4). The client RMs (SFT warm-up,
# then BT) reach >= 90% held-out pair accuracy in their own domain with DEFAULT (docs/results.md).
# QUICK is a smoke run, not a result.
PRETRAIN_IMAGES = 4000


QUICK = dict(pretrain_steps=5, sft_steps=40, test_per_domain=96, rm_sft_steps=10, rm_steps=10, rounds=5,
             seeds="0", grpo_steps=3, router_pairs=128)


DEFAULT = dict(pretrain_steps=600, sft_steps=300, test_per_domain=None, rm_sft_steps=300, rm_steps=300,
               rounds=30, seeds="0,1,2,3,4", grpo_steps=40, router_pairs=600)


# Training recipes. A flag left unset takes TINY's value when every model is a tiny one and REAL's
# when --base or a --client-model points at a real checkpoint (mor.parse_args). TINY is the
# measured recipe of the embedded default (full fine-tuning, fp32, CPU). REAL is a starting point
# for 2B-class VLMs in bf16 on a GPU (docs/real-checkpoints.md): LoRA rank 16 with the usual
# LoRA learning rates (about 10x full fine-tuning's), smaller batches of longer rows (a real
# image is hundreds of tokens, and every row's logits span a 152k vocabulary: 4 prompts x 8
# samples keep Qwen2-VL-2B's GRPO stage under 80 GB in the memory plan, harness/memory.py).
TINY = dict(sft_lr=3e-4, sft_batch=64, rm_sft_lr=1e-3, rm_sft_batch=64, rm_lr=3e-4, rm_batch=32, grpo_lr=2e-4,
            grpo_prompts=16)
REAL = dict(sft_lr=1e-4, sft_batch=16, rm_sft_lr=1e-4, rm_sft_batch=16, rm_lr=5e-5, rm_batch=8, grpo_lr=2e-5,
            grpo_prompts=4)
REAL_LORA_R = 16  # --lora-r's default for a real checkpoint; tiny ones train every parameter

BASE_FAMILY = "qwen2_vl"  # the embedded base's family (stages.stage_base builds it)

# Client -> the family of its own VLM. Heterogeneous: colour needs no fine detail, so it gets
# LLaVA-OneVision (a patch-16 SigLIP tower, the cheapest); shape and position need the finer
# Qwen towers. Homogeneous: everyone holds the same tiny Qwen2-VL checkpoint, the premise of
# FedAvg-RM (averaging only makes sense between copies of one initialisation).
SETTINGS = {
    "heterogeneous": {"color": "llava_onevision", "shape": "qwen2_5_vl", "position": "qwen2_vl"},
    "homogeneous": {"color": "qwen2_vl", "shape": "qwen2_vl", "position": "qwen2_vl"},
}


# A weak fourth client, two ways (docs/benchmark.md). Both join the heterogeneous federation.
#
# bucket, the paper's bucket effect ("a bucket holds only as much as its shortest stave"): the
# weak client is honest but weak, "a weak computer or a bad model", and fails the way real weak
# RMs fail: few pairs and a systematic shortcut. `weak` holds clean labels on WEAK_QUESTIONS
# public-split questions, all of whose answers are one per domain (WEAK_ANSWERS), and trains its
# RM with a fraction of the recipe (WEAK_RM_STEPS): it has only ever seen red, circle and left
# preferred, so its RM leans that way inside every domain whatever the image shows, as the
# narrow clients of many6 lean inside theirs. Avg RM hands that lean 1/K of every reward; MoR's
# router can learn from the experts' pairs that the weak RM ranks them badly. Its premise (Avg RM
# loses >= 3 points at 95%) is checked in the setting's own table (report.bucket_claim).
#
# noisy, a stress test beyond the paper: `noisy` labelled the public split's questions
# carelessly, half of its preferences reversed (data.flip_pairs), so its RM carries no signal,
# yet it holds the most pairs. Measured (docs/results.md): its routing loss on random labels is
# lowest where the mixed margin is smallest, i.e. on its own RM's, and its large n_k in plain
# FedAvg carries that pull to every domain (MoR -2.6 points, Avg RM -0.4); a robust --aggregate
# rule (federated.py) is the answer to it.
SETTINGS["bucket"] = dict(SETTINGS["heterogeneous"], weak="llava_onevision")
SETTINGS["noisy"] = dict(SETTINGS["heterogeneous"], noisy="llava_onevision")
# Your own task: no embedded client; the federation is the --client-data clients.
SETTINGS["own"] = {}

# Many clients: the federation grows from K = 3 to 6 and 12 (docs/benchmark.md, "Many clients").
# The three domain experts stay; narrow clients join, each an honest client with a narrow but
# consistent taste: it labelled (correctly) only the public split's questions whose answer lies in
# its own subset, so its RM has only ever seen those answers preferred. The average hands each
# domain's expert 1/K of every reward and the narrow RMs of that domain, which favour their own
# answers whatever the image shows, a share each; a router can learn from the clients' own pairs
# whose RM to trust for which (prompt, response). No new data: the public split's images, as the
# bucket setting's weak client uses them. Each narrow client's VLM is its domain expert's family,
# and it runs the RM recipe for as many epochs as its expert does (Run.rm_config), not as many
# steps: it holds a sixth to two fifths of the expert's questions.
NARROW = {  # client -> (domain, the answers its questions have)
    "red_brown": ("color", ("red", "brown")), "circle": ("shape", ("circle",)),
    "left_right": ("position", ("left", "right")),
    "green_yellow": ("color", ("green", "yellow")), "blue_teal": ("color", ("blue", "teal")),
    "black_gray": ("color", ("black", "gray")), "rectangle": ("shape", ("rectangle",)),
    "triangle": ("shape", ("triangle",)), "top_bottom": ("position", ("top", "bottom")),
}
MANY = {"many6": list(NARROW)[:3], "many12": list(NARROW)}  # setting -> its narrow clients (K6 is in K12)
for _s, _names in MANY.items():
    SETTINGS[_s] = dict(SETTINGS["heterogeneous"], **{n: SETTINGS["heterogeneous"][NARROW[n][0]] for n in _names})
MANY_METHODS = "mor,mor_soft,mor_hard,avg_rm,weighted_rm"  # what the many-client settings compare
# The federation as it grows, smallest K first: (setting, its results file). A many-client table
# reads only the smaller K's (results-many12 reads K = 3 and 6), so no two evaluations read each other.
MANY_K = [("heterogeneous", "results.json"), *((s, f"results-{s}.json") for s in MANY)]
NARROW_MIN_STEPS = 30  # a narrow client's RM recipe, scaled to its data, never shorter than this
WEAK_FLIP = 0.5  # noisy: share of its preferences reversed
WEAK_QUESTIONS = 240  # weak: its clean questions (an expert holds 1,000-1,500 of its one domain)
WEAK_ANSWERS = ("red", "circle", "left")  # weak: the answers of all its questions, its shortcut
WEAK_RM_STEPS = (30, 40)  # weak: (SFT warm-up, BT) steps instead of the recipe's (300, 300)
# setting -> (its weak client, how the tables describe it)
WEAK_CLIENTS = {"bucket": ("weak", f"honest labels on {WEAK_QUESTIONS} questions answered "
                                   f"{'/'.join(WEAK_ANSWERS)} only, an RM trained "
                                   f"{WEAK_RM_STEPS[0]} + {WEAK_RM_STEPS[1]} steps"),
                "noisy": ("noisy", f"{int(100 * WEAK_FLIP)}% of its preferences reversed")}


def weak_client(setting: str) -> str | None:
    return WEAK_CLIENTS[setting][0] if setting in WEAK_CLIENTS else None


BUCKET_METHODS = "mor,avg_rm,weighted_rm"  # --full: the comparison the weak-client settings are about


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
        self._rows: dict[tuple, list[dict]] = {}

    def rows(self, path: str, kind: str) -> list[dict]:
        """A user JSONL file, validated row by row (safe_io.load_jsonl), read once per process;
        preference pairs get the end token where the file has none (safe_io.with_end_token)."""
        if (path, kind) not in self._rows:
            rows = safe_io.load_jsonl(path, kind)
            # pairs end in the end token, as every policy sample does (appended to a file without it)
            self._rows[path, kind] = safe_io.with_end_token(rows, path, data.EOS) if kind == "pairs" else rows
        return self._rows[path, kind]

    @property
    def fed(self) -> data.Federation:
        """The embedded benchmark's federation (a pure function of the data seed), with the parts
        the user replaced by files: --sft-data (public split), --prompts (GRPO pool), --eval
        (test split, grouped by each row's domain, 'all' without one) and --client-data."""
        if self._fed is None:
            a = self.args
            fed = data.build_federation(a.seed, test_per_domain=a.test_per_domain)
            if a.setting == "own":
                fed.clients = {}
            if a.setting == "noisy":
                # the noisy client's questions: the public split's (its labels get flipped below)
                fed.clients["noisy"] = list(fed.public)
            if a.setting == "bucket":
                # the weak client's: a seeded sample of the public split's questions whose answer
                # is one of WEAK_ANSWERS, with their true labels (the server's copy of that split
                # was labelled carelessly): few, clean, and all leaning one way per domain
                clean = data.build_federation(a.seed, test_per_domain=1, confusions={}).public
                lean = [e for e in clean if e.answer in WEAK_ANSWERS]
                fed.clients["weak"] = random.Random(f"weak-{a.seed}").sample(lean, min(WEAK_QUESTIONS, len(lean)))
            if a.setting in MANY:
                # the narrow clients' questions: the public split's, clean labels, by answer subset
                clean = data.build_federation(a.seed, test_per_domain=1, confusions={}).public
                for name in MANY[a.setting]:
                    dom, answers = NARROW[name]
                    fed.clients[name] = [e for e in clean if e.domain == dom and e.answer in answers]
            for name in self.user_data:
                # a user client has pairs, not labelled questions: Run.clients reads its JSONL;
                # here it only takes its place (and its index k) among the K clients
                fed.clients[name] = []
            if a.sft_data:
                fed.public = data.examples_from_rows(self.rows(a.sft_data, "sft"))
            if a.prompts:
                fed.pool = data.examples_from_rows(self.rows(a.prompts, "prompts"))
                # gold answers only when every prompt has one: the oracle reward needs them all
                gold = [e.answer for e in fed.pool]
                fed.pool_gold = gold if all(gold) else None
                for e in fed.pool:
                    e.answer = None  # the trainer never sees an answer
            if a.eval:
                test = data.by_domain(data.examples_from_rows(self.rows(a.eval, "eval")))
                fed.test = {d: v[:a.test_per_domain] for d, v in test.items()}
            self._fed = fed
        return self._fed

    @property
    def own_task(self) -> bool:
        """True when the server's data is the user's: the embedded benchmark's gates, chance and
        blind baselines do not apply."""
        a = self.args
        return bool(a.prompts or a.eval or a.sft_data)

    def fed_test_size(self) -> dict:
        return {d: len(v) for d, v in self.fed.test.items()}

    # ------------------------------------------------------------------------------------------
    # Provenance (harness/provenance.py): the inputs each output is made from. Upstream outputs enter as
    # the digests of *their* inputs, so a change anywhere upstream reaches every output below it.
    # ------------------------------------------------------------------------------------------

    def data_source(self, flag: str) -> str:
        """'embedded', or the digest of the user's JSONL file named by --<flag> and its images."""
        path = getattr(self.args, flag, None)
        return provenance.data_digest(path) if path else "embedded"

    def base_inputs(self) -> dict:
        a = self.args
        if a.base:  # a real checkpoint arrives pre-trained: its files are the input
            return {"checkpoint": str(Path(a.base).resolve()), "files": provenance.dir_digest(a.base)}
        return {"stage": "base", "seed": a.seed, "pretrain_steps": a.pretrain_steps, "batch": a.sft_batch,
                "lr": a.pretrain_lr, "images": PRETRAIN_IMAGES}

    def sft_inputs(self) -> dict:
        a = self.args
        out = {"stage": "sft", "base": provenance.digest(self.base_inputs()), "seed": a.seed, "steps": a.sft_steps,
               "batch": a.sft_batch, "lr": a.sft_lr, "data": self.data_source("sft_data")}
        return dict(out, lora_r=self.lora_r(None)) if self.lora_r(None) else out

    def lora_r(self, client: str | None) -> int:
        """LoRA rank for the server's policy (client None) or a client's RM: --lora-r when given
        (0: off), else REAL_LORA_R for a real checkpoint (--base, --client-model NAME=DIR) and 0
        for a tiny one, whose full fine-tuning the embedded default's tables were measured with."""
        a = self.args
        if getattr(a, "lora_r", None) is not None:
            return a.lora_r
        real = bool(a.base) if client is None else any(kv.split("=", 1)[0] == client for kv in a.client_model)
        return REAL_LORA_R if real else 0

    def rm_inputs(self, client: str) -> dict:
        a = self.args
        given = dict(kv.split("=", 1) for kv in a.client_model)
        init = ({"checkpoint": provenance.dir_digest(given[client])} if client in given
                else {"base": provenance.digest(self.base_inputs())} if self.from_base(client)
                else {"tiny": self.family(client), "seed": a.seed})
        if client in self.user_data:
            src = provenance.data_digest(self.user_data[client])
        else:
            weak = f"embedded, {WEAK_QUESTIONS} clean questions answered {'/'.join(WEAK_ANSWERS)}"
            src = {"noisy": "embedded, half reversed", "weak": weak}.get(
                client if client == weak_client(a.setting) else None, "embedded")
            if client in NARROW and client in MANY.get(a.setting, ()):
                src = f"embedded public split, clean labels, answers {'/'.join(NARROW[client][1])}"
        cfg = self.rm_config(client)
        out = {"stage": "reward", "client": client, "init": init, "data": src, "seed": a.seed,
               "sft_steps": cfg.sft_steps, "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr,
               "format_share": a.format_share}
        if (cfg.sft_lr, cfg.sft_batch, cfg.lora_r) != (TINY["rm_sft_lr"], TINY["rm_sft_batch"], 0):
            out.update(sft_lr=cfg.sft_lr, sft_batch=cfg.sft_batch, lora_r=cfg.lora_r)  # the tiny recipe's keys as before
        if a.format_share:  # format pairs are drawn from the public split
            out["public"] = self.data_source("sft_data")
        return out

    def rm_digests(self) -> dict:
        return {k: provenance.digest(self.rm_inputs(k)) for k in self.fed.clients}

    def matrix_inputs(self) -> dict:
        return {"stage": "reward matrix", "setting": self.args.setting, "rms": self.rm_digests()}

    def router_inputs(self) -> dict:
        a = self.args
        return {"stage": "router", "reference": provenance.digest(self.sft_inputs()), "rms": self.rm_digests(),
                "rounds": a.rounds, "local_epochs": a.local_epochs, "lr": a.router_lr, "batch": a.router_batch,
                "pairs": a.router_pairs, "route_on": a.route_on, "hidden": a.router_hidden,
                "fraction": a.client_fraction, "seed": a.seed, "aggregate": a.aggregate, "withheld": a.router_withhold,
                "warm_start": provenance.file_digest(a.router_from) if a.router_from else None}

    def policy_inputs(self, method: str, seed: int) -> dict:
        a = self.args
        out = {"stage": "grpo", "method": method, "seed": seed, "reference": provenance.digest(self.sft_inputs()),
               "prompts": self.data_source("prompts"), "steps": a.grpo_steps, "prompts_per_step": a.grpo_prompts,
               "group": a.group, "lr": a.grpo_lr, "beta": a.beta, "format_guard": a.format_guard,
               "max_new_tokens": a.max_new_tokens, "train_vision": a.train_vision}
        if self.lora_r(None):
            out["lora_r"] = self.lora_r(None)
        if method == "oracle":
            out["reward"] = "gold answers of the prompt pool"
        else:
            out["rms"] = self.rm_digests()
        if method in ROUTED or method == "central_router":  # the central one: the same flags, pooled
            out["router"] = provenance.digest(self.router_inputs()) + ("-central" if method == "central_router" else "")
        if method == "fedavg_rm":
            out["fedavg_rm_rounds"] = a.fedavg_rm_rounds
        if method == "mor":
            out["nts"] = {k: v for k, v in sorted(vars(a).items()) if k.startswith("nts_")}
        return out

    def grpo_inputs(self) -> dict:
        return {"stage": "grpo", "policies": {f"{m}/seed{s}": provenance.digest(self.policy_inputs(m, s))
                                              for m in methods(self) for s in self.seeds(m)}}

    def seeds(self, method: str) -> list[int]:
        """A method's GRPO seeds: every --seeds seed; a single client's RM alone (rm_*) and the
        reference rows (EXTRA_METHODS), on which no claim of the paper rests, the first
        --single-rm-seeds of them (default 3, 5 for the rest)."""
        s = list(self.args.seeds)
        few = method.startswith("rm_") or method in EXTRA_METHODS or method == "fedavg_rm_oneshot"
        return s[: self.args.single_rm_seeds] if few else s

    def test_signature(self) -> dict:
        """What the test split is made of and how it is judged: an evaluation cached under another
        signature is redone."""
        a = self.args
        return {"seed": a.seed, "per_domain": a.test_per_domain, "source": self.data_source("eval"),
                "n": self.fed_test_size(), "judge": a.judge, "max_new_tokens": a.max_new_tokens}

    def eval_inputs(self) -> dict:
        return {"stage": "eval", "reference": provenance.digest(self.sft_inputs()), "test": self.test_signature(),
                "matrix": provenance.digest(self.matrix_inputs()) if self.output("reward").exists() else None,
                "grpo": provenance.digest(self.grpo_inputs()) if self.output("grpo").exists() else None,
                "methods": self.args.methods, "seeds": self.args.seeds,
                # a weak-client table sets each method beside the main table's
                "main_table": (provenance.file_digest(self.dir / "results.json")
                               if weak_client(self.args.setting) and (self.dir / "results.json").exists() else None),
                # a many-client table sets itself beside the smaller K's (MANY_K)
                "smaller_k": {f: provenance.file_digest(self.dir / f) for f in self.smaller_k_tables()}}

    def smaller_k_tables(self) -> list[str]:
        """The results files of the smaller federations a many-client evaluation reads."""
        if self.args.setting not in MANY:
            return []
        mine = [s for s, _ in MANY_K].index(self.args.setting)
        return [f for _, f in MANY_K[:mine] if (self.dir / f).exists()]

    def fresh(self, output: Path, inputs: dict, what: str) -> bool:
        """True when `output` exists and was made from `inputs`; else False, with one line saying
        which input changed (unless the output is simply missing)."""
        output = Path(output)
        if not output.exists():
            return False
        diff = provenance.changed(provenance.stored(output, self.dir), inputs)
        if diff:
            print(f"[{what}] {output} is stale, redoing it: " + "; ".join(diff[:4])
                  + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""), flush=True)
        return not diff

    def stage_inputs(self, stage: str) -> dict:
        return {"base": self.base_inputs, "sft": self.sft_inputs, "reward": self.matrix_inputs,
                "router": self.router_inputs, "grpo": self.grpo_inputs, "eval": self.eval_inputs}[stage]()

    def stage_fresh(self, stage: str) -> bool:
        """A stage is done when its output and every per-client / per-(method, seed) output under
        it are fresh."""
        if stage == "reward" and not all(self.fresh(self.rm_dir(k), self.rm_inputs(k), f"reward {k}")
                                         for k in self.fed.clients):
            return False
        if stage == "grpo" and not all(self.fresh(policy_dir(self, m, s), self.policy_inputs(m, s), f"grpo {m} s{s}")
                                       for m in methods(self) for s in self.seeds(m)):
            return False
        return self.fresh(self.output(stage), self.stage_inputs(stage), stage)

    def stale(self, stage: str) -> bool:
        """True when an output of `stage` exists but was made from other inputs (a missing output is
        not stale: the stage that needs it names it). For the grpo stage only its policies count:
        its summary lists whichever methods the last invocation asked for."""
        if stage == "grpo":
            return any(policy_dir(self, m, s).exists() and not self.fresh(policy_dir(self, m, s),
                                                                           self.policy_inputs(m, s), f"grpo {m} s{s}")
                       for m in methods(self) for s in self.seeds(m))
        if stage == "reward" and any(self.rm_dir(k).exists() and not self.fresh(self.rm_dir(k), self.rm_inputs(k),
                                                                                 f"reward {k}")
                                     for k in self.fed.clients):
            return True
        return self.output(stage).exists() and not self.fresh(self.output(stage), self.stage_inputs(stage), stage)

    def record(self, stage: str) -> None:
        """After a stage: its file output's provenance, and what it ran with into config.json."""
        inputs = self.stage_inputs(stage)
        if self.output(stage).is_file():
            provenance.record_file(self.output(stage), self.dir, inputs)
        if stage == "reward":
            inputs = dict(inputs, clients={k: self.rm_inputs(k) for k in self.fed.clients})
        if stage == "grpo":
            inputs = dict(inputs, policies={f"{m}/seed{s}": self.policy_inputs(m, s)
                                            for m in methods(self) for s in self.seeds(m)})
        cfg_path = self.dir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg.setdefault("stages", {})[stage + ("" if stage in ("base", "sft") else f"-{self.args.setting}")] = inputs
        atomic_write_json(cfg_path, cfg)

    def output(self, stage: str) -> Path:
        # results.json is the main table's (heterogeneous); other settings get results-<setting>.json
        tag = "" if self.args.setting == "heterogeneous" else f"-{self.args.setting}"
        return self.dir / STAGE_OUTPUT[stage].format(setting=self.args.setting, tag=tag)

    def clients(self) -> dict[str, federated.Client]:
        """The federation's members, each handed its own pairs and nothing else.
        The pairs are a pure function of the data seed, so every stage rebuilds identical
        clients (and identical held-out splits) instead of storing private data on the server."""
        def pairs(name, exs):
            if name in self.user_data:  # validated row by row: errors name file:line:field
                return data.pairs_from_rows(self.rows(self.user_data[name], "pairs"), name)
            p = data.make_pairs(exs, self.args.seed)
            return data.flip_pairs(p, WEAK_FLIP, self.args.seed) if name == "noisy" == weak_client(self.args.setting) else p

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
        """The VLM a client starts from: --client-model NAME=DIR; else, for a client of the
        embedded base's family (Qwen2-VL), the pre-trained base (base_init), as a real client
        would download the same public checkpoint the server starts from; else the tiny
        checkpoint of its family, built once per run (every client of one family starts from the
        same weights). Why the base: a Qwen2-VL client trained from random weights learned the
        position domain on one machine and sat at chance on another (SFT loss stuck at 0.355 for
        300 steps, RM 80.7% in-domain against 100%); from the base its SFT loss is 0.03 within
        30 steps (docs/benchmark.md)."""
        given = dict(kv.split("=", 1) for kv in self.args.client_model)
        if client in given:
            return Path(given[client])
        if self.from_base(client):
            return self.dir / "base_init"
        return self.tiny_dir(self.family(client))

    def from_base(self, client: str) -> bool:
        """Does this client start from the embedded pre-trained base (client_init)?"""
        given = dict(kv.split("=", 1) for kv in self.args.client_model)
        return client not in given and not self.args.base and self.family(client) == BASE_FAMILY

    def tiny_dir(self, family: str) -> Path:
        """The tiny checkpoint of a family, built once per run and data seed."""
        out = self.dir / "models" / family
        inputs = {"tiny": family, "seed": self.args.seed}
        if not self.fresh(out, inputs, f"models {family}"):
            with atomic_dir(out) as tmp:
                provenance.record_dir(tmp, inputs)
                models.build_tiny(family, tmp, seed=self.args.seed)
        return out

    def rm_config(self, client: str | None = None) -> reward.RMConfig:
        # the local RM recipe every client follows (warm-up SFT sizes keep RMConfig's defaults);
        # the bucket setting's weak client runs a fraction of it (never more than the flags ask)
        a = self.args
        sft, steps = a.rm_sft_steps, a.rm_steps
        if client is not None and client == weak_client(a.setting) == "weak":
            sft, steps = min(sft, WEAK_RM_STEPS[0]), min(steps, WEAK_RM_STEPS[1])
        if client in MANY.get(a.setting, ()):
            # as many epochs as its domain's expert: steps scaled by its share of the expert's questions
            share = len(self.fed.clients[client]) / max(len(self.fed.clients[NARROW[client][0]]), 1)
            sft, steps = (min(x, max(NARROW_MIN_STEPS, round(x * share))) for x in (sft, steps))
        return reward.RMConfig(sft_steps=sft, steps=steps, batch=a.rm_batch, lr=a.rm_lr,
                               sft_lr=getattr(a, "rm_sft_lr", None) or TINY["rm_sft_lr"],
                               sft_batch=getattr(a, "rm_sft_batch", None) or TINY["rm_sft_batch"],
                               lora_r=self.lora_r(client))

    def record_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(seconds, 2)
        atomic_write_json(self.timings_path, self.timings)


# Methods that read the federated router (their policies depend on the router stage), and the
# reference rows beyond the default table: run by --full and on request (--methods), on the first
# --single-rm-seeds seeds like the single-RM rows (no claim of the paper rests on them).
ROUTED = ("mor", "mor_soft", "mor_hard")
EXTRA_METHODS = ("min_rm", "uwo_rm", "random_hard", "central_router")
RENAMED = {"mor_nts": "mor"}  # old name -> the paper's name: an old --methods gets a one-line error


def methods(run: Run) -> list[str]:
    """E8's methods in table order; --methods picks a subset ('all': every row).

      oracle         exact match with the gold answer: the upper bound the server never has
      mor            the paper's MoR: the federated router as the prior of a Neural Thompson
                     Sampling bandit, one RM per prompt, updated online during GRPO (E6-E7)
      mor_soft       the frozen router's soft mixture of the K client RMs (E3)
      mor_hard       the frozen router's argmax RM per prompt (the paper's frozen-router ablation)
      avg_rm         w_k = 1/K;   weighted_rm   w_k = n_k / sum n
      rm_<client>    one client's RM alone (how far a single expert carries)
      fedavg_rm      multi-round parameter FedAvg of one RM over the clients (homogeneous only:
                     the baseline MoR replaces); fedavg_rm_oneshot: the one-shot average of the
                     K trained client RMs (on request)
    Reference rows, --full and on request (EXTRA_METHODS):
      min_rm         min_k of the standardised rewards (worst case over the ensemble)
      uwo_rm         mean_k - UWO_PENALTY * var_k (uncertainty-weighted ensemble)
      random_hard    one uniformly drawn RM per prompt (routing without a router)
      central_router the same router trained centrally on every client's pooled pairs: its soft
                     mixture, what federating the router costs"""
    names = list(run.fed.clients)
    out = ["oracle", *ROUTED, "avg_rm", "weighted_rm"] + [f"rm_{k}" for k in names]
    if run.args.setting == "homogeneous":
        out.append("fedavg_rm")
    if run.fed.pool_gold is None:  # no gold answers in the user's prompt pool: no oracle
        out.remove("oracle")
    full = out + list(EXTRA_METHODS) + (["fedavg_rm_oneshot"] if run.args.setting == "homogeneous" else [])
    if run.args.setting in MANY and not run.args.methods:  # 12 single-RM rows would be 36 jobs of no use
        return [m for m in out if m in MANY_METHODS.split(",")]
    if run.args.methods == "all":  # every row, the reference rows included (--full's main table)
        return full
    if run.args.methods:
        want = run.args.methods.split(",")
        old = [m for m in want if m in RENAMED]
        if old:
            raise SystemExit(f"--methods {old[0]}: renamed to {RENAMED[old[0]]} (the paper's names)")
        if "oracle" in want and "oracle" not in full:
            raise SystemExit("--methods oracle: the prompt pool has no gold answers (every --prompts row "
                             "needs an 'answer' for the oracle reward)")
        bad = sorted(set(want) - set(full))
        if bad:
            raise SystemExit(f"--methods: unknown {bad} for the {run.args.setting} setting; choose from {full}")
        out = [m for m in full if m in want]
    return out


def policy_dir(run: Run, method: str, seed: int) -> Path:
    # one directory per (setting, method, seed): the unit of resumption of the grpo stage
    return run.dir / "policies" / run.args.setting / method / f"seed{seed}"


def grpo_config(run: Run) -> grpo.GRPOConfig:
    # CLI flags -> the loop's config (clip eps and mu keep grpo.GRPOConfig's defaults)
    a = run.args
    return grpo.GRPOConfig(steps=a.grpo_steps, prompts=a.grpo_prompts, group=a.group, lr=a.grpo_lr, beta=a.beta,
                           format_guard=a.format_guard, max_new_tokens=a.max_new_tokens,
                           train_vision=a.train_vision)


def weight_sources(run: Run, router_state: dict | None = None) -> dict:
    """Every reward a policy can be aligned with, as a weight source over the K client RMs
    (router.py): MoR's router, Avg RM, Weighted RM, and each client's RM alone (E8)."""
    names = list(run.fed.clients)
    # n_k as the clients reported them in the reward stage (Weighted RM needs nothing more)
    counts = json.loads(run.output("reward").read_text())["n_pairs"]
    out = {"avg_rm": router.avg_rm(len(names)), "weighted_rm": router.weighted_rm([counts[k] for k in names])}
    out.update({f"rm_{k}": router.single_rm(i, len(names)) for i, k in enumerate(names)})
    if router_state is not None:
        out = {"mor_soft": make_router(run)(), **out}  # the federated router's weights (E3)
        out["mor_soft"].load_state_dict(router_state)
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
        for s in run.seeds(m):
            d = policy_dir(run, m, s)
            if not (d / "grpo_log.json").exists():
                raise SystemExit(f"eval: {d} holds no GRPO policy; run --stages grpo with --methods {m} "
                                 f"--seeds {s} (or name in --methods only the methods trained)")
    return ms
