"""The reward source of every method (E8), and the baselines that need training of their own.

  reward_source   method name -> the callable GRPO aligns with (grpo.py's reward classes)
  fedavg_rm       FedAvg-RM, multi-round parameter FedAvg of one RM over the clients
                  (federated.fedavg_rm_rounds; homogeneous setting), and its one-shot variant
                  fedavg_rm_oneshot (the n_k-average of the K trained client RMs)
  central_router  the router trained centrally on every client's pooled pairs
                  (federated.pooled_client): what federating the router costs

The stages (harness/stages.py) call these; nothing here reads a client's pairs outside the
federated.Client boundary.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import federated
import grpo
import mixture
import models
import nts
import reward
import safe_io
from harness import provenance
from harness.pipeline import Run, make_router, weight_sources
from safe_io import atomic_dir, atomic_save_file, atomic_write_json

FEDAVG_RM = {"fedavg_rm": "clients/fedavg_rm", "fedavg_rm_oneshot": "clients/fedavg_rm_oneshot"}


def reward_source(run: Run, method: str, seed: int, gold: dict, cache: dict):
    """The reward GRPO aligns a policy with for `method` (E8). `cache` keeps the K client RMs and
    the router between the jobs of one process."""
    a, fed = run.args, run.fed
    if method == "oracle":
        return mixture.OracleReward(gold)
    if method in FEDAVG_RM:
        return mixture.SingleReward(reward.RewardModel.load(run.dir / FEDAVG_RM[method], device=run.device))
    if "rms" not in cache:  # the K client uploads, loaded once for every RM method
        cache["rms"] = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in fed.clients]
        for rm in cache["rms"]:  # frozen here: each image's features once per worker (reward.RewardModel.score)
            rm.image_features = grpo.ImageFeatures().bind(rm.vlm)
        cache["router"] = safe_io.load_router_state(run.output("router"), make_router(run)())
    rms, src = cache["rms"], weight_sources(run, cache["router"])
    # the prompt's domain, for the routing logs only (the evaluator's view; the bandit never reads it)
    domains = {e.prompt: e.domain for e in fed.pool}
    if method == "mor":  # the paper's MoR: the federated router as NTS's prior, updated online
        ts = nts.NeuralTS(src["mor_soft"], lam=a.nts_lambda, nu=a.nts_nu, update_steps=a.nts_update_steps, seed=seed)
        return mixture.NTSReward(rms, ts, a.group, feedback=a.nts_feedback, probe=a.nts_probe,
                              format_guard=a.format_guard, domains=domains, seed=seed)
    if method == "mor_hard":
        return mixture.HardReward(rms, src["mor_soft"], a.group, domains=domains)
    if method == "random_hard":
        return mixture.RandomHardReward(rms, a.group, domains=domains, seed=seed)
    if method in ("min_rm", "uwo_rm"):
        return mixture.EnsembleReward(rms, method)
    if method == "central_router":
        central = make_router(run)()
        central.load_state_dict(safe_io.load_router_state(central_path(run), central))
        return mixture.MixedReward(rms, central)
    return mixture.MixedReward(rms, src[method])  # mor_soft, avg_rm, weighted_rm, rm_<client>


# ----------------------------------------------------------------------------------------------
# FedAvg-RM
# ----------------------------------------------------------------------------------------------


def fedavg_inputs(run: Run, method: str) -> dict:
    if method == "fedavg_rm_oneshot":
        return {"stage": "fedavg_rm_oneshot", "rms": run.rm_digests()}
    # the clients' own recipe and data (their RMs' inputs, less the upload), the rounds R
    return {"stage": "fedavg_rm", "clients": {k: run.rm_inputs(k) for k in run.fed.clients},
            "rounds": run.args.fedavg_rm_rounds}


def fedavg_rm(run: Run, clients: dict[str, federated.Client], method: str = "fedavg_rm") -> Path:
    """E8's parameter-sharing baseline, written to clients/<method>/. fedavg_rm: R rounds of
    FedAvg from the common checkpoint, each client taking its share of its own recipe's steps on
    its own pairs per round (federated.fedavg_rm_rounds); fedavg_rm_oneshot: theta = sum_k n_k /
    sum n theta_k of the K trained client RMs, once. Either way the reward statistics are pooled
    from the moments each client computes locally (count, sum, sum of squares)."""
    out, inputs = run.dir / FEDAVG_RM[method], fedavg_inputs(run, method)
    if not run.args.force and run.fresh(out, inputs, f"reward {method}"):
        return out
    t, names = time.time(), list(clients)
    if method == "fedavg_rm_oneshot":
        rm = federated.fedavg_reward_model([reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in names],
                                           [clients[k].n for k in names])
        log = []
    else:
        inits = {str(run.client_init(k)) for k in names}
        if len(inits) != 1:
            raise SystemExit(f"fedavg_rm: the clients start from different checkpoints {sorted(inits)}; parameter "
                             "FedAvg needs one common initialisation (the homogeneous setting)")
        # the global model: the clients' common checkpoint with a fresh head
        vlm, proc = models.load_vlm(inits.pop(), device=run.device)
        torch.manual_seed(run.args.seed)
        rm = reward.RewardModel(vlm, proc)
        log = federated.fedavg_rm_rounds(rm, [clients[k] for k in names], run.rm_config(), run.args.fedavg_rm_rounds,
                                         run.args.seed)
    n, s, ss = map(sum, zip(*(c.reward_moments(rm) for c in clients.values())))
    rm.mean = s / n
    rm.std = max(((ss - n * rm.mean ** 2) / max(n - 1, 1)) ** 0.5, 1e-6)
    rm.info = {"client": method, "family": rm.vlm.config.model_type, "n_pairs": int(sum(c.n for c in clients.values())),
               "rounds": log, "seconds": round(time.time() - t, 1)}
    with atomic_dir(out) as tmp:
        provenance.record_dir(tmp, inputs)
        rm.save(tmp)
    return out


# ----------------------------------------------------------------------------------------------
# The centrally trained router
# ----------------------------------------------------------------------------------------------


def central_path(run: Run) -> Path:
    return run.dir / f"router-central-{run.args.setting}.safetensors"


def central_inputs(run: Run) -> dict:
    return dict(run.router_inputs(), stage="central router", pooled=True)


def central_router(run: Run, routing_setup) -> Path:
    """The central_router row's router: the same network, rounds, epochs and learning rate as
    E4, trained on the union of every client's routing pairs in one place (no averaging). Kept
    when fresh; the server's copy of the pooled pairs is exactly what federation avoids.
    routing_setup: stages.routing_setup, the federated router's own precompute."""
    out = central_path(run)
    if not run.args.force and run.fresh(out, central_inputs(run), "central router"):
        return out
    a = run.args
    clients, model, _ = routing_setup(run)
    pooled = federated.pooled_client(list(clients.values()))
    log = federated.run_rounds(model, make_router(run), [pooled], a.rounds, a.local_epochs, a.router_lr,
                               a.router_batch, 1.0, a.seed, desc="central router")
    atomic_save_file(out, model.state_dict())
    provenance.record_file(out, run.dir, central_inputs(run))
    atomic_write_json(out.with_suffix(".json"), {"rounds": log, "heldout_pair_accuracy": {
        k: c.mixed_accuracy(model) for k, c in clients.items()}})
    return out
