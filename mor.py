"""mor: Mixture-of-Rewards federated alignment of VLMs -- the command line.

  python mor.py [--quick] [--run-dir runs/default] [--stages base,sft,...] [--full]

runs the stages of harness/stages.py in order (base, sft, reward, router, grpo, eval) into one run
directory. Every flag is range-checked and every user file read before any work starts. Each stage
writes its outputs atomically with the inputs that made them (harness/provenance.py): a killed run resumes
at the first missing output, and a rerun with other flags, clients or data redoes exactly what they
change. One invocation holds a run directory at a time (--wait queues behind it); --plan prints
what a rerun would redo, --config FILE repeats a run's flags (harness/runs.py, docs/own-task.md).
`python mor.py --help` lists every flag; docs/method.md has the method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import federated
import models
import nts
import router
import safe_io
from harness import memory, runs
from harness.pipeline import (BUCKET_METHODS, CLIENT_NAME, DEFAULT, EXTRA_METHODS, MANY_METHODS, QUICK, REAL,
                              REAL_LORA_R, RENAMED, ROUTED, SETTINGS, STAGE_OUTPUT, TINY, USER_FAMILY, Run, methods)
from harness.report import results_markdown
from harness.stages import STAGES, preflight
from judge import JUDGES
from safe_io import atomic_write_json, atomic_write_text

# The stages whose outputs each stage reads.
UPSTREAM = {"base": [], "sft": ["base"], "reward": ["base"], "router": ["sft", "reward"],
            "grpo": ["sft", "reward", "router"], "eval": ["sft", "reward", "grpo"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # -- the run: where, which stages, how many processes ---------------------------------------
    p.add_argument("--config", default=None, metavar="FILE",
                   help="take the flags of a run's config.json (its last invocation) or of a JSON / YAML object "
                        "of flags as defaults; flags on the command line override them")
    p.add_argument("--plan", action="store_true",
                   help="print what each stage would do (kept: fresh; runs: stale, with the input that changed, "
                        "or missing) and exit without doing it")
    p.add_argument("--wait", action="store_true",
                   help="when another invocation holds the run directory, wait for it instead of stopping")
    p.add_argument("--run-dir", default="runs/default", help="where every stage writes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the init and every sampler")
    p.add_argument("--quick", action="store_true",
                   help="smoke-run sizes: small steps, 96 test questions/domain (a check, not a result)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    p.add_argument("--force", action="store_true",
                   help="redo the named stages (every client's RM and every (method, seed) policy in them) "
                        "even if their outputs are fresh")
    p.add_argument("--base", default=None, help="a local Qwen2-VL/Qwen2.5-VL checkpoint dir to use as the base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (cuda loads in bf16); default: cuda when available")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MOR_THREADS", "0")) or None,
                   help="torch CPU threads (default: torch's own, or $MOR_THREADS); compare speeds at one fixed count")
    p.add_argument("--workers", type=int, default=None,
                   help="client RMs and GRPO jobs (method x seed) run side by side, one torch thread each "
                        "(default: 2 on a CPU with >= 2 cores, 1 on CUDA; results depend on it, "
                        "as on --threads)")
    # -- the server's reference policy: caption pre-training of the tiny base, then SFT on the
    #    public split (a real --base checkpoint skips the pre-training) --------------------------
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="caption pre-training steps of the tiny base (default 600, --quick 5; 0: none)")
    p.add_argument("--sft-steps", type=int, default=None, help="reference SFT steps (default 300, --quick 40)")
    p.add_argument("--sft-batch", type=int, default=None,
                   help=f"questions per SFT step, split evenly over domains (also the pre-training batch; default "
                        f"{TINY['sft_batch']}, {REAL['sft_batch']} for a real --base)")
    p.add_argument("--sft-lr", type=float, default=None,
                   help=f"AdamW learning rate of the reference SFT (default {TINY['sft_lr']}, {REAL['sft_lr']} with "
                        "LoRA on a real --base; 1e-3 collapsed shape onto 'rectangle' in one of two runs, "
                        "docs/benchmark.md)")
    p.add_argument("--lora-r", type=int, default=None,
                   help=f"LoRA rank of the adapters trained instead of every weight (policy and RMs; gradient "
                        f"checkpointing on, adapters in fp32, the reference = the base with adapters off). Default: "
                        f"{REAL_LORA_R} for a real checkpoint (--base, --client-model), off for the tiny ones; 0: off")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="AdamW learning rate of the caption pre-training")
    p.add_argument("--test-per-domain", type=int, default=None, help="cap on test questions per domain")
    # -- the federation: who the clients are, which VLM each holds, what data they bring --------
    p.add_argument("--setting", choices=list(SETTINGS), default="heterogeneous",
                   help="the federation: heterogeneous (the benchmark's three clients on LLaVA-OV / "
                        "Qwen2.5-VL / Qwen2-VL), homogeneous (all Qwen2-VL, adds FedAvg-RM), bucket "
                        "(heterogeneous + a weak but honest fourth client: the paper's bucket effect), noisy "
                        "(heterogeneous + a fourth client with half its labels reversed: a stress test), many6 / "
                        "many12 (the three experts + 3 / 9 narrow clients: K = 6 / 12), or own (only the "
                        "clients of --client-data)")
    p.add_argument("--full", action="store_true",
                   help="the main table with the reference rows (--methods all), then the homogeneous setting, "
                        "then the bucket and noisy settings "
                        f"({BUCKET_METHODS}), then many6 and many12 ({MANY_METHODS}), then FedVPA-GP's table (experiments/fedvpa_table.py)")
    # -- your own task: the server-side data that replaces the embedded benchmark's ------------
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="your own GRPO prompt pool: JSONL with image, prompt (optional: domain, answer; "
                        "answers on every row enable the oracle row), image paths relative to the file")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="your own evaluation set: JSONL with image, prompt, answer (optional: domain)")
    p.add_argument("--sft-data", default=None, metavar="FILE",
                   help="your own public SFT examples for the server's reference: JSONL with image, prompt, "
                        "answer (optional: domain)")
    p.add_argument("--judge", choices=sorted(JUDGES), default="exact",
                   help="E9's judge: exact (one well-formed word equal to the answer) or contains (the "
                        "answer's words appear in order in the response); see judge.py")
    p.add_argument("--max-new-tokens", type=int, default=4,
                   help="tokens a policy may write per answer, in GRPO and in evaluation (default %(default)s: "
                        "the benchmark's one-word answers)")
    p.add_argument("--client-model", action="append", default=[], metavar="NAME=DIR",
                   help="start client NAME's RM from a local checkpoint dir (repeatable)")
    p.add_argument("--client-data", action="append", default=[], metavar="NAME=FILE",
                   help="add client NAME with its own preference pairs: a JSONL file with image, prompt, "
                        "chosen, rejected per line, image paths relative to the file (repeatable); its RM "
                        f"starts from --client-model NAME=DIR or the tiny {USER_FAMILY}")
    # -- E1: each client's reward model, trained on its own pairs only --------------------------
    p.add_argument("--rm-sft-steps", type=int, default=None, help="client SFT warm-up steps (default 300, --quick 20)")
    p.add_argument("--rm-steps", type=int, default=None, help="client Bradley-Terry steps (default 300, --quick 20)")
    p.add_argument("--rm-batch", type=int, default=None,
                   help=f"pairs per BT step (default {TINY['rm_batch']}, {REAL['rm_batch']} with a real --client-model)")
    p.add_argument("--rm-sft-lr", type=float, default=None,
                   help=f"AdamW learning rate of a client's SFT warm-up (default {TINY['rm_sft_lr']}, "
                        f"{REAL['rm_sft_lr']} with a real --client-model)")
    p.add_argument("--rm-sft-batch", type=int, default=None,
                   help=f"examples per SFT warm-up step (default {TINY['rm_sft_batch']}, {REAL['rm_sft_batch']} "
                        "with a real --client-model)")
    p.add_argument("--format-share", type=float, default=0.0,
                   help="format-only pairs on public questions per own pair in each client's BT data "
                        "(default %(default).2f; 0: none); see data.format_pairs")
    p.add_argument("--rm-lr", type=float, default=None,
                   help=f"AdamW learning rate of the BT phase (default {TINY['rm_lr']}, {REAL['rm_lr']} with a real "
                        "--client-model)")
    p.add_argument("--fedavg-rm-rounds", type=int, default=10,
                   help="FedAvg-RM (homogeneous setting): rounds R of parameter FedAvg per phase (warm-up, BT); each "
                        "client takes 1/R of its own RM recipe's steps per round (default %(default)s)")
    # -- E2-E4: the router, trained by federated rounds ------------------------------------------
    p.add_argument("--rounds", type=int, default=None, help="federated router rounds R (default 30, --quick 5)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs E per client per round")
    p.add_argument("--router-lr", type=float, default=1e-3, help="AdamW learning rate of a client's router step")
    p.add_argument("--router-batch", type=int, default=64, help="pairs per router step")
    p.add_argument("--router-pairs", type=int, default=None,
                   help="training pairs per client used to fit the router (default 600, --quick 128)")
    p.add_argument("--route-on", choices=list(router.CONTEXTS), default="prompt+response",
                   help="what of e(x, y) the router reads: E2's prompt+response, or the prompt only")
    p.add_argument("--router-hidden", type=int, default=64, help="router MLP width")
    p.add_argument("--aggregate", choices=list(federated.RULES), default=federated.DEFAULT_RULE,
                   help="how a round's router uploads are combined (E4): fedavg (weights n_k), median or trimmed "
                        "(coordinate-wise), crossval (uploads that raise the other clients' routing loss are "
                        "left out); see federated.py")
    p.add_argument("--router-withhold", default=None, metavar="NAME",
                   help="the shift scenario: client NAME's RM stays one of the K arms, but NAME takes no part "
                        "in the router's rounds (as if it joined after the router was trained), so the router "
                        "starts wrong on NAME's prompts and online routing (mor) must recover them")
    p.add_argument("--router-from", default=None, metavar="FILE",
                   help="clients that join and leave: start the router's rounds from a trained router "
                        "(a router-<setting>.safetensors, its .json beside it names its clients) instead of "
                        "from scratch; a client that left loses its row, one that joined gets a new row it "
                        "fits on its own pairs first (federated.warm_start); then --rounds rounds")
    p.add_argument("--client-fraction", type=float, default=1.0, help="share of clients sampled per round")
    # -- E5/E8: GRPO of a copy of the reference for every method and seed ------------------------
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of E8's methods (default: all of the default table; the reference "
                        f"rows {','.join(EXTRA_METHODS)} run only when named here, by 'all' or with --full)")
    p.add_argument("--seeds", default=None, help="GRPO seeds, comma-separated (default 0,1,2,3,4; --quick 0)")
    p.add_argument("--single-rm-seeds", type=int, default=3,
                   help="a single client's RM alone (rm_*) runs only the first N of --seeds (default %(default)s)")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per method and seed (default 40, --quick 3)")
    p.add_argument("--grpo-prompts", type=int, default=None,
                   help=f"prompts N per GRPO step (default {TINY['grpo_prompts']}, {REAL['grpo_prompts']} for a real --base)")
    p.add_argument("--group", type=int, default=8, help="samples G per prompt")
    p.add_argument("--grpo-lr", type=float, default=None,
                   help=f"AdamW learning rate of GRPO (default {TINY['grpo_lr']}, {REAL['grpo_lr']} with LoRA on a real --base)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight of GRPO")
    p.add_argument("--no-format-guard", dest="format_guard", action="store_false",
                   help="let malformed samples keep their reward (default: they rank last in their group, "
                        "grpo.format_guard)")
    p.add_argument("--train-vision", action="store_true",
                   help="let GRPO train the policy's vision tower too (default: frozen, the paper's design, "
                        "and each image's features computed once per job, grpo.ImageFeatures)")
    # -- E6-E7: online routing by Neural Thompson Sampling (mor, the paper's method) --------------
    p.add_argument("--nts-lambda", type=float, default=1.0,
                   help="NTS prior precision lambda (E6): pulls the residual back to the router")
    p.add_argument("--nts-nu", type=float, default=0.3, help="NTS exploration scale nu (E6); 0: no exploration")
    p.add_argument("--nts-update-steps", type=int, default=10,
                   help="NTS optimizer steps on the replayed feedback after each GRPO step (E6); 0: never learns")
    p.add_argument("--nts-feedback", choices=list(nts.FEEDBACK), default="probe",
                   help="E7's bandit feedback: probe (on a share --nts-probe of prompts every RM scores the "
                        "group and the router's soft mixture referees), improvement (the paper's: the GRPO "
                        "objective's change on a probed prompt after the step, measured with the other RMs' "
                        "consensus advantages against the arm's running baseline) or median (the old "
                        "objective-gain rule, an ablation); see nts.py")
    p.add_argument("--nts-probe", type=float, default=0.08,
                   help="share of prompts probed by every RM for --nts-feedback probe or improvement (RM rows per sample: "
                        "1 + p (K - 1); default %(default)s: with K = 3, (1 + 2p) / 3 = 39%% of the soft "
                        "mixture's rows, under the 40%% budget; 0.25 measured 49%%)")
    # --config first: its values become the parser's defaults, so the command line overrides them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    cfg_file = pre.parse_known_args(argv)[0].config
    if cfg_file:
        p.set_defaults(**runs.config_defaults(p, cfg_file))
    a = p.parse_args(argv)
    size = QUICK if a.quick else DEFAULT
    for k, v in size.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.workers is None:
        a.workers = 1 if a.device.startswith("cuda") else min(2, os.cpu_count() or 1)
    # the training recipe (harness/pipeline.py): the server's flags follow --base, the clients' RM
    # flags follow --client-model; a flag given explicitly always wins
    for k in ("sft_lr", "sft_batch", "grpo_lr", "grpo_prompts", "rm_sft_lr", "rm_sft_batch", "rm_lr", "rm_batch"):
        real = bool(a.client_model) if k.startswith("rm_") else bool(a.base)
        if getattr(a, k) is None:
            setattr(a, k, (REAL if real else TINY)[k])
    check_args(p, a)
    if a.base:
        a.stages = ",".join(s for s in a.stages.split(",") if s != "base")
    return a


# Range of every numeric flag: (lowest allowed, whether the lowest is excluded). Checked before any
# work starts, so a nonsense value is a one-line error naming the flag, never a run that "works".
INT_AT_LEAST = {"max_new_tokens": 1, "seed": 0, "threads": 1, "workers": 1, "pretrain_steps": 0, "sft_steps": 1, "sft_batch": 1,
                "test_per_domain": 1, "rm_sft_steps": 0, "rm_steps": 1, "rm_batch": 1, "rounds": 1,
                "local_epochs": 1, "router_batch": 1, "router_pairs": 1, "router_hidden": 1, "grpo_steps": 1,
                "grpo_prompts": 1, "group": 2, "nts_update_steps": 0, "single_rm_seeds": 1, "lora_r": 0,
                "rm_sft_batch": 1, "fedavg_rm_rounds": 1}
# group >= 2: E5's advantage divides by the std of the group's rewards, undefined for one sample.
POSITIVE_FLOAT = ["sft_lr", "pretrain_lr", "rm_lr", "rm_sft_lr", "router_lr", "grpo_lr", "nts_lambda"]
NONNEGATIVE_FLOAT = ["beta", "nts_nu", "nts_probe", "format_share"]


def check_args(p: argparse.ArgumentParser, a) -> None:
    """Every flag's value against its range, and the lists (seeds, stages, clients) for form and
    uniqueness; p.error exits with one line naming the flag."""
    def flag(k):
        return "--" + k.replace("_", "-")

    for k, lo in INT_AT_LEAST.items():
        v = getattr(a, k)
        if v is not None and v < lo:
            p.error(f"{flag(k)} {v}: must be >= {lo}")
    for k in POSITIVE_FLOAT:
        v = getattr(a, k)
        if not (math.isfinite(v) and v > 0):
            p.error(f"{flag(k)} {v}: must be a finite number > 0")
    for k in NONNEGATIVE_FLOAT:
        v = getattr(a, k)
        if not (math.isfinite(v) and v >= 0):
            p.error(f"{flag(k)} {v}: must be a finite number >= 0")
    if a.nts_probe > 1:
        p.error(f"--nts-probe {a.nts_probe}: must be in [0, 1]")
    if a.format_share > 10:
        p.error(f"--format-share {a.format_share}: must be in [0, 10]")
    if not (math.isfinite(a.client_fraction) and 0 < a.client_fraction <= 1):
        p.error(f"--client-fraction {a.client_fraction}: must be in (0, 1]")
    if not a.device.startswith(("cpu", "cuda")):
        p.error(f"--device {a.device!r}: expected cpu or cuda[:N]")
    names = [x.strip() for x in a.stages.split(",")]
    unknown = [x for x in names if x not in STAGES]
    if unknown or not names:
        p.error(f"--stages {a.stages!r}: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if len(set(names)) != len(names):
        p.error(f"--stages {a.stages!r}: a stage is named twice")
    a.stages = ",".join(n for n in STAGES if n in names)  # always run in the pipeline's order
    seeds = [x.strip() for x in str(a.seeds).split(",")]
    if not all(x.isdigit() for x in seeds):
        p.error(f"--seeds {a.seeds!r}: expected comma-separated integers >= 0, e.g. 0,1,2")
    a.seeds = [int(x) for x in seeds]  # "0,1,2" -> [0, 1, 2]
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds {','.join(seeds)}: a seed is given twice (each seed trains its own policy)")
    if a.methods is not None:
        ms = [m.strip() for m in a.methods.split(",")]
        if not all(ms) or len(set(ms)) != len(ms):
            p.error(f"--methods {a.methods!r}: expected distinct comma-separated method names")
        for m in ms:
            if m in RENAMED:
                p.error(f"--methods {m}: renamed to {RENAMED[m]} (the paper's MoR: NTS online routing); "
                        "the frozen router's soft mixture is mor_soft, its argmax mor_hard")
        a.methods = ",".join(ms)
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
        name, _, path = kv.partition("=")
        if not path or name not in [*SETTINGS[a.setting], *user]:
            p.error(f"--client-model {kv!r}: expected NAME=DIR with NAME one of {[*SETTINGS[a.setting], *user]}")
        if name in seen:
            p.error(f"--client-model: client {name!r} given twice")
        seen.add(name)
    for kv in a.client_data:  # the names first (above), then the files they point to
        if not os.path.isfile(kv.partition("=")[2]):
            p.error(f"--client-data {kv!r}: file not found: {kv.partition('=')[2]}")
    for kv in a.client_model:
        if not os.path.isdir(kv.partition("=")[2]):
            p.error(f"--client-model {kv!r}: directory not found: {kv.partition('=')[2]}")
    for k in ("prompts", "eval", "sft_data"):
        if getattr(a, k) and not os.path.isfile(getattr(a, k)):
            p.error(f"{flag(k)} {getattr(a, k)}: file not found")
    if a.router_withhold is not None and a.router_withhold not in [*SETTINGS[a.setting], *user]:
        p.error(f"--router-withhold {a.router_withhold!r}: not a client of the {a.setting} setting "
                f"({[*SETTINGS[a.setting], *user]})")
    if a.router_from is not None:
        side = os.path.splitext(a.router_from)[0] + ".json"
        if not a.router_from.endswith(".safetensors") or not os.path.isfile(a.router_from):
            p.error(f"--router-from {a.router_from}: expected an existing router-<setting>.safetensors")
        if not os.path.isfile(side):
            p.error(f"--router-from {a.router_from}: {side} (its clients' names) not found beside it")
        try:
            old_names = json.load(open(side))["rms"]
        except (OSError, ValueError, KeyError, TypeError):
            p.error(f"--router-from {a.router_from}: {side} holds no list 'rms' of client names")
        if not set(old_names) & {*SETTINGS[a.setting], *user}:
            p.error(f"--router-from {a.router_from}: none of its clients {old_names} is in this federation "
                    f"({[*SETTINGS[a.setting], *user]}); train the router from scratch")
    if a.setting == "own" and not user:
        p.error("--setting own: the federation is the clients you bring; give at least one --client-data NAME=FILE")
    # A checkpoint directory is checked in full now (config, safetensors headers, no remote code,
    # tokenizer, chat tokens), not when its job comes up last in the queue minutes later.
    for flag_name, path in [("--base", a.base)] + [("--client-model", kv.partition("=")[2]) for kv in a.client_model]:
        if path:
            try:
                models.check_model_dir(path)
            except (ValueError, FileNotFoundError, OSError) as e:
                p.error(f"{flag_name} {path}: {e}")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.plan:  # reads the run directory, writes nothing: no lock needed
        try:
            print("\n".join(runs.plan(Run(a))))
        except safe_io.DataError as e:
            raise SystemExit(f"error: {e}") from None
        return 0
    # One invocation per run directory at a time (harness/runs.py); --full's settings re-enter here
    # one after the other in this process, which already holds it.
    with runs.locked(a.run_dir, a.wait):
        return _main(a, argv)


def _main(a, argv) -> int:
    if a.full:
        # One run directory, six settings: sft and the RMs of shared families are reused (the
        # many-client settings keep the heterogeneous experts' RMs and add the narrow clients').
        argv = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--full"]
        for setting, extra in (("heterogeneous", ["--methods", "all"]), ("homogeneous", []), ("bucket", ["--methods", BUCKET_METHODS]),
                              ("noisy", ["--methods", BUCKET_METHODS]), ("many6", ["--methods", MANY_METHODS]),
                              ("many12", ["--methods", MANY_METHODS])):
            print(f"=== --full: {setting} setting ===", flush=True)
            main([*argv, "--setting", setting, *(extra if a.methods is None else [])])
        # FedVPA-GP's table (docs/vpa.md) on the same reference: 5 training seeds, ~13 min on
        # one thread. Kept when its results are newer than the base they were computed on.
        from experiments import fedvpa_table as vpa

        res, base = Path(a.run_dir) / "vpa-results.json", Path(a.run_dir) / "base"
        if a.quick:
            print("=== --full --quick: FedVPA-GP's table skipped (13 min; run python -m experiments.fedvpa_table) ===", flush=True)
        elif not base.exists():
            print(f"=== --full: FedVPA-GP needs {base}, which is missing; skipped ===", flush=True)
        elif a.force or not res.exists() or res.stat().st_mtime < base.stat().st_mtime:
            print("=== --full: FedVPA-GP (experiments/fedvpa_table.py) ===", flush=True)
            vpa.pipeline_step(a.run_dir)
        else:
            print(f"=== --full: FedVPA-GP: {res} is newer than the base, kept ===", flush=True)
        return 0
    # An explicit thread count: torch's default spins badly when another process shares the
    # two cores (docs/method.md, implementation notes), and speeds are only comparable at one fixed count.
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a)
    # Live per-step metrics of every loop (safe_io.Progress.log): <run>/metrics/<setting>/<loop>.jsonl,
    # TensorBoard event files beside them when tensorboard is installed; workers inherit it.
    before = os.environ.get(safe_io.METRICS_ENV)
    os.environ[safe_io.METRICS_ENV] = str(run.dir / "metrics" / a.setting)
    try:
        return _stages(run, a)
    finally:  # an in-process caller (the tests, --full's next setting) gets its own folder
        if before is None:
            os.environ.pop(safe_io.METRICS_ENV, None)
        else:
            os.environ[safe_io.METRICS_ENV] = before


def _stages(run: Run, a) -> int:
    # The flags of the latest invocation; what each stage actually ran with is added under
    # "stages" as it completes (Run.record), so config.json never claims a flag a stage ignored.
    cfg_path = run.dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg = {"invocation": vars(a), "stages": cfg.get("stages", {})}
    atomic_write_json(cfg_path, cfg)
    try:
        preflight(run)
    except safe_io.DataError as e:  # bad user data: one line naming file:line and the field
        raise SystemExit(f"error: {e}") from None
    names = a.stages.split(",")
    # A stage runs when --force names it or its output is missing or stale (harness/provenance.py): made
    # from other flags, another client set or other data than this invocation asks for.
    pending = [n for n in names if a.force or not run.stage_fresh(n)]
    gap = runs.missing_upstream(run, pending)  # an input nobody here makes: one line, not a traceback
    if gap:
        raise SystemExit(gap)
    for name in pending:  # a stage never reads a stale upstream output that this run will not redo
        ups = UPSTREAM[name]
        if name == "grpo" and not set(methods(run)) & {*ROUTED, "central_router"}:
            ups = [u for u in ups if u != "router"]  # only the routed methods read the router
        for up in ups:
            if up not in names and (up != "base" or not a.base) and run.stale(up):
                raise SystemExit(f"[{name}] reads the {up} stage's output, which is stale (the line above "
                                 f"says why): add {up} to --stages, or use a new --run-dir")
    memory.report(run, pending)  # each pending stage's memory against the device's; refused if it cannot fit
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
        for k in beside if name == "reward" else []:
            run.record(k)
        run.record(name)
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

