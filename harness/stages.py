"""The stages of the pipeline, in the order they run (each writes its output atomically):

  base    build the tiny Qwen2-VL checkpoint and pre-train it to caption synthetic images
          (or take --base DIR, a real checkpoint)                                  -> base_init/
  sft     short supervised fine-tune on the public split: the server's reference policy -> base/
  reward  every client trains its Bradley-Terry RM on its own pairs with its own VLM family (E1);
          FedAvg-RM in the homogeneous setting (E8); the client x domain pair-accuracy matrix,
          each entry computed by the client that owns the domain        -> clients/, rm_matrix-*.json
  router  the router trained by FedAvg over the clients (E2-E4)         -> router-<setting>.safetensors
  grpo    a copy of the reference aligned with each method's reward, per seed (E5-E8) -> policies/
  eval    greedy answers on the test split, judged (E9), the gates and the tables -> results.json/.md

Jobs that need nothing from each other (the clients' RMs and the server's base; the GRPO runs of
every method and seed) run side by side in --workers processes of one torch thread each.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

import data
import federated
import grpo
import mixture
import models
import reward
import router
import safe_io
from harness import baselines, provenance
from harness.pipeline import (BASE_FAMILY, MANY, PRETRAIN_IMAGES, SETTINGS, Run, grpo_config, make_router, methods,
                              policy_dir, set_seed, trained_methods, weak_client, weight_sources)
from harness.report import (_chance, _mean_std, _moving_max, claims, gates, many_clients, many_clients_plot,
                            matrix_markdown, paired_comparisons, plots, results_markdown, router_markdown,
                            weak_client_effect)
from judge import JUDGES, evaluate, win_rate
from reward import train_sft
from safe_io import PLAIN_ENV, Progress, atomic_dir, atomic_save_file, atomic_write_json, atomic_write_text


def preflight(run: Run) -> None:
    """Every file the user handed in, read and checked before any stage starts: each row of each
    JSONL file (safe_io.load_jsonl: fields, UTF-8, every image decoded in full) and its length
    against the context of the model that will read it (models.check_lengths). An error names
    file:line and the field; nothing has been trained yet."""
    a = run.args
    for name, path in run.user_data.items():
        rows = run.rows(path, "pairs")
        given = dict(kv.split("=", 1) for kv in a.client_model)
        init = given.get(name) or run.tiny_dir(run.family(name))  # its tokenizer and context (the base has the same)
        models.check_lengths(rows, path, AutoProcessor.from_pretrained(init), models.context_length(init))
    files = [(f, getattr(a, f)) for f in ("sft_data", "prompts", "eval") if getattr(a, f)]
    if files:
        # the server's model reads these: the user's --base, else the tiny Qwen2-VL the base is built as
        base = Path(a.base) if a.base else run.tiny_dir(BASE_FAMILY)
        proc, ctx = AutoProcessor.from_pretrained(base), models.context_length(base)
        kinds = {"sft_data": "sft", "prompts": "prompts", "eval": "eval"}
        for flag, path in files:
            reserve = a.max_new_tokens if flag in ("prompts", "eval") else 0  # room to answer
            models.check_lengths(run.rows(path, kinds[flag]), path, proc, ctx, reserve=reserve)
        run.fed  # builds the federation from the files: a domain-less or empty split fails here


def stage_base(run: Run) -> None:
    """The embedded default's base: a tiny Qwen2-VL from a config, pre-trained to caption
    synthetic easy-VQA-style images (data.pretrain_examples), the stand-in for a downloaded
    pre-trained VLM. Skipped when --base is given: a real checkpoint arrives pre-trained."""
    a = run.args
    set_seed(a.seed)
    with atomic_dir(run.dir / "base_init") as tmp:
        provenance.record_dir(tmp, run.base_inputs())
        models.build_tiny(BASE_FAMILY, tmp, seed=a.seed)
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
    if run.lora_r(None):  # a real base: adapters, merged into base/ (kept in base/adapter/ for peft)
        models.add_lora(model, run.lora_r(None))
    enc = models.Encoder(proc)
    # Public split only: the server never sees a client's questions (those stay in clients/).
    losses = train_sft(model, enc, run.fed.public, a.sft_steps, a.sft_batch, a.sft_lr, a.seed)
    with atomic_dir(run.dir / "base") as tmp:
        provenance.record_dir(tmp, run.sft_inputs())
        models.merge_lora(model, tmp / "adapter")
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
        if not a.force and run.fresh(run.rm_dir(name), run.rm_inputs(name), f"reward {name}"):  # resume
            tqdm.write(f"reward {name}: {run.rm_dir(name)} is fresh, kept")
        else:
            run.client_init(name)  # built here, once: two workers must not race for one family dir
            todo.append(name)
    # Clients of the base's family start from the pre-trained base (Run.client_init), so their
    # RMs wait for it: two waves, [base + the other clients' RMs], then [sft + those RMs].
    from_base = [n for n in todo if run.from_base(n)]
    if from_base and "base" not in beside and not run.fresh(run.dir / "base_init", run.base_inputs(), "base"):
        raise SystemExit(f"[reward] clients {from_base} start from the pre-trained base, which is missing or "
                         "was made from other flags: add base to --stages")
    server = [(a, None, [s]) for s in beside]
    if "base" in beside:  # two waves: what needs the base runs after it
        waves = [server[:1] + [(a, n, []) for n in todo if n not in from_base],
                 server[1:] + [(a, n, []) for n in from_base]]
    else:  # the base is there already (or not needed): one wave
        waves = [server + [(a, n, []) for n in todo]]
    times = {}
    for jobs in waves:  # the server's stage first in each wave: the longest job
        if a.workers > 1 and len(jobs) > 1:
            for t in in_workers(_reward_worker, jobs, a.workers):
                times.update(t)
        else:
            for _, name, chain in jobs:
                if name is None:
                    times.update(server_job(run, chain)[1])
                else:
                    tqdm.write(reward_job(run, clients[name]))
    uploads = {name: run.rm_dir(name) for name in clients}
    # FedAvg-RM is only defined between copies of one architecture and one initialisation: the
    # homogeneous setting. In the heterogeneous one, sharing parameters is impossible, which is
    # the paper's point: rewards are the common currency, weights are not.
    if a.setting == "homogeneous":  # multi-round parameter FedAvg, and the one-shot average
        for m in baselines.FEDAVG_RM:
            uploads[m] = baselines.fedavg_rm(run, clients, m)
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
    print(f"\nHeld-out pair accuracy (%), {a.setting} setting: row = reward model, column = the client "
          "whose held-out pairs\n")
    print(matrix_markdown(matrix, corner="RM \\ pairs of"))
    return times


def in_workers(fn, jobs: list, workers: int) -> list:
    """Run fn(job) for every job in `workers` spawned processes, in the order given (a long job
    first keeps the pool busy); fn returns (line, extra): each line is printed as its job
    finishes, and the extras come back in order of completion. spawn: a fresh
    interpreter per worker (no forked torch thread pool); each job rebuilds its Run from the
    args it carries, so its work is a pure function of the job."""
    import multiprocessing as mp

    extras = []
    with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
        for line, extra in pool.imap_unordered(fn, jobs):
            tqdm.write(line)
            extras.append(extra)
        pool.close()  # let the workers exit cleanly (the with-block alone would terminate them)
        pool.join()
    return extras


def _worker_init() -> None:
    """Each worker: one torch thread (two 1-thread jobs beat one 2-thread job on 2 cores) and
    plain progress lines, since two workers' live bars would overwrite each other."""
    os.environ[PLAIN_ENV] = "1"
    torch.set_num_threads(1)


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
        provenance.record_dir(tmp, run.rm_inputs(client.name))
        m = client.train_reward_model(run.client_init(client.name), tmp, run.rm_config(client.name), run.device)
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


def routing_setup(run: Run, on_client=None) -> tuple[dict, torch.nn.Module, float]:
    """What every router run starts from, in-process (stage_router) or over Flower
    (flower_fed.prepare): each client downloads the public reference (features, E2) and the K RM
    uploads (E3) and precomputes its pairs' features and RM scores once (rounds then cost ms);
    the server's initial router is seeded, then standardised with the pooled feature moments
    (count, sum [D], sum of squares [D]) the clients report in one extra exchange before round 0.
    `on_client(client)` runs after each client's precompute (Flower writes its cache there).
    -> (clients {name: Client}, initial router, precompute seconds)."""
    a = run.args
    clients = run.clients()
    t = time.time()
    if a.workers > 1 and len(clients) > 2 and on_client is None:
        # K clients x K RMs: the precompute grows as K^2 (the many-client settings). The clients
        # are independent, so --workers processes share them, each loading the reference and the
        # K RMs once; the largest clients go first.
        order = sorted(clients, key=lambda k: -len(clients[k]._train))
        shares = [order[i::a.workers] for i in range(a.workers)]
        for done in in_workers(_routing_worker, [(a, names) for names in shares if names], a.workers):
            for name, cache in done.items():
                clients[name]._routing, clients[name]._routing_pairs = cache
    else:
        ref, proc = models.load_vlm(run.dir / "base", device=run.device)
        rms = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in clients]
        for c in Progress(clients.values(), desc="router: clients precompute features and RM scores"):
            c.prepare_routing(ref, models.Encoder(proc), rms, a.router_pairs)
            if on_client is not None:
                on_client(c)
        del ref, rms
    prep = time.time() - t
    set_seed(a.seed)
    model = make_router(run)()
    model.set_feature_stats(*router.pooled_stats([c.feature_moments() for c in clients.values()]))
    return clients, model, prep


def _routing_worker(job) -> tuple[str, dict]:
    """Some clients' routing precompute in a worker: {client: (its cache, its pairs)}."""
    args, names = job
    run = Run(args)
    clients = run.clients()
    ref, proc = models.load_vlm(run.dir / "base", device=run.device)
    rms = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in clients]
    t, out = time.time(), {}
    for name in names:
        clients[name].prepare_routing(ref, models.Encoder(proc), rms, args.router_pairs)
        out[name] = (clients[name]._routing, clients[name]._routing_pairs)
    return f"router: {', '.join(names)} precomputed features and {len(rms)} RM scores, {time.time() - t:.0f}s", out


def stage_router(run: Run) -> None:
    """E4: the router trained by FedAvg over the clients, each with the K frozen RMs."""
    a = run.args
    clients, model, prep = routing_setup(run)
    names = list(clients)
    make = make_router(run)

    def held_out(m):  # each client reports the mixed reward's accuracy on its held-out pairs
        return {"heldout_acc": {k: c.mixed_accuracy(m) for k, c in clients.items()}}

    t = time.time()
    joined = []
    if a.router_from:  # clients that joined or left since that router was trained: no retraining
        model, joined = warm_start_router(run, a.router_from, clients, make)
    # the shift scenario: the withheld client's RM is an arm, but its pairs never train the router
    members = [c for k, c in clients.items() if k != a.router_withhold]
    log = federated.run_rounds(model, make, members, a.rounds, a.local_epochs, a.router_lr,
                               a.router_batch, a.client_fraction, a.seed, on_round=held_out, aggregate=a.aggregate)
    rounds_s = time.time() - t
    for e in log:
        tqdm.write(f"round {e['round']:3d}: routing loss {e['loss']:.4f}, held-out pair accuracy "
                   + ", ".join(f"{k} {100 * v:.1f}" for k, v in e["heldout_acc"].items())
                   + (f"; left out: {', '.join(e['rejected'])}" if e.get("rejected") else ""))
    # The comparison that matters: held-out pair accuracy of the mixed reward per domain for
    # MoR and every fixed-weight baseline, each number computed by the client owning the domain.
    sources = weight_sources(run, model.state_dict())
    acc = {s: {k: c.mixed_accuracy(src) for k, c in clients.items()} for s, src in sources.items()}
    w = {k: c.routing_weights(model) for k, c in clients.items()}  # [2N_k, K] per domain
    weights = {k: dict(zip(names, wk.mean(0).tolist())) for k, wk in w.items()}
    entropy = {k: router.routing_entropy(wk) for k, wk in w.items()}
    summary = {"setting": a.setting, "aggregate": a.aggregate, "withheld": a.router_withhold, "rms": names,
               "warm_start": {"from": a.router_from, "joined": joined} if a.router_from else None,
               "heldout_pair_accuracy": acc, "routing_weights": weights,
               "routing_entropy": entropy, "max_entropy": math.log(len(names)), "rounds": log,
               "seconds": {"precompute": round(prep, 1), "rounds": round(rounds_s, 2)}}
    atomic_write_json(run.dir / f"router-{a.setting}.json", summary)
    atomic_save_file(run.output("router"), model.state_dict())
    print(router_markdown(summary))


def warm_start_router(run: Run, path: str, clients: dict, make) -> tuple[torch.nn.Module, list[str]]:
    """--router-from: the trained router of an earlier federation, rows moved to this one's
    clients (federated.warm_start); each joining client then fits its own new row on its own
    pairs (Client.fit_new_rm, one exchange). -> (router, names of the joining clients)."""
    old_names = json.loads(Path(path).with_suffix(".json").read_text())["rms"]
    new = make()
    old = router.Router(new.dim, len(old_names), new.hidden, new.context)
    try:  # an upload like any other: safetensors only, the expected keys and shapes, finite values
        old.load_state_dict(safe_io.load_router_state(path, old))
        model, rows = federated.warm_start(old, old_names, list(clients))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--router-from {path}: {e}") from None
    names = list(clients)
    a = run.args
    for i in rows:
        if names[i] == a.router_withhold:  # the shift scenario: its pairs never train the router
            continue
        st, _, loss = clients[names[i]].fit_new_rm(model.state_dict(), make, federated.JOIN_FIT_EPOCHS, a.router_lr,
                                                   a.router_batch, a.seed, row=i)
        model.load_state_dict(st)
        tqdm.write(f"router: {names[i]} joined, fitted its row on its own pairs (routing loss {loss:.4f})")
    left = [n for n in old_names if n not in clients]
    if left:
        tqdm.write(f"router: {', '.join(left)} left, row(s) removed")
    return model, [names[i] for i in rows]


def stage_grpo(run: Run) -> None:
    """Align a copy of the reference with each method's reward, for each seed (E5, E8).

    Every (method, seed) is an independent job with its own output directory (the unit of
    resumption). With --workers W > 1 they run in W processes of one torch thread each: the tiny
    models do not keep two threads busy, and two 1-thread GRPO runs side by side took 18.6 s per
    25 steps each where one 2-thread run took 12.6 s (0.37 vs 0.50 s per step of throughput)."""
    a = run.args
    jobs = [(m, s) for m in methods(run) for s in run.seeds(m)]
    todo = [(m, s) for m, s in jobs
            if a.force or not run.fresh(policy_dir(run, m, s), run.policy_inputs(m, s), f"grpo {m} s{s}")]
    for m, s in sorted(set(jobs) - set(todo), key=jobs.index):
        tqdm.write(f"grpo {m} seed {s}: {policy_dir(run, m, s)} is fresh, kept")
    if any(m == "central_router" for m, _ in todo):  # its router first, once, in this process
        baselines.central_router(run, routing_setup)
    if a.workers > 1 and len(todo) > 1:
        # the costliest jobs first (they score with the most RMs), so the pool does not end on
        # one long job with the other worker idle
        todo.sort(key=lambda ms: -JOB_COST.get(ms[0], 1))
        in_workers(_grpo_worker, [(a, m, s) for m, s in todo], a.workers)
    else:
        cache: dict = {}
        for m, s in todo:
            tqdm.write(grpo_job(run, m, s, cache))
    summary = {m: [str(policy_dir(run, m, s).relative_to(run.dir)) for s in run.seeds(m)] for m in methods(run)}
    atomic_write_json(run.output("grpo"), summary)


_WORKER_CACHE: dict = {}  # per worker process: the K RMs and the router, loaded by its first job


# Relative cost of a GRPO job (training + test eval, 1 thread, measured on the default run with
# 100 steps): Avg/Weighted RM and the soft mixture score with every RM (77-89 s), MoR (NTS)
# adds a bandit update and a policy forward per step (82-87 s), single RMs take 67-73 s and the
# oracle about 62 s; the every-RM reference rows cost as the averages.
JOB_COST = {"avg_rm": 1.3, "weighted_rm": 1.3, "mor_soft": 1.2, "mor": 1.2, "central_router": 1.2, "min_rm": 1.3,
            "uwo_rm": 1.3}


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
    # logs, never by the trainer's update (MoR's server has no labels). None: a --prompts file
    # without answers (pipeline.methods has left the oracle out; the logs carry no accuracy).
    gold = data.pool_gold(fed)
    out = policy_dir(run, method, seed)
    fn = baselines.reward_source(run, method, seed, gold, cache)
    # Every method starts from the same reference weights; only the reward differs. The seed
    # drives the prompt order and the sampling, so seeds measure RL noise.
    set_seed(seed)
    policy, proc = models.load_vlm(run.dir / "base", device=run.device)
    if run.lora_r(None):  # LoRA: pi_ref (E5) is the policy with its adapters off, no second copy
        models.add_lora(policy, run.lora_r(None))
        ref = None
    else:
        ref, _ = models.load_vlm(run.dir / "base", device=run.device)  # frozen pi_ref (E5)
    t = time.time()
    # the image features of the base's frozen tower serve every job of this process (ImageFeatures.bind
    # empties the cache if a job's tower differs)
    log = grpo.train_grpo(policy, ref, models.Encoder(proc), fed.pool, fn, grpo_config(run), seed, gold=gold,
                          desc=f"grpo {method} s{seed}", features=cache.setdefault("features", grpo.ImageFeatures()))
    t_train = time.time() - t
    if len(set(log["skipped"])) >= a.grpo_steps:  # never report a policy that was not trained
        raise RuntimeError(f"grpo {method} seed {seed}: all {a.grpo_steps} steps were skipped (non-finite "
                           "rewards, loss or gradient; the lines above say which); no policy is written")
    # E9 on the test split here, in the worker, rather than in the single-process eval stage:
    # the two workers then share it. Stored with the policy; eval adds the win rate.
    r = evaluate(policy, models.Encoder(proc), fed.test, desc=f"eval {method} s{seed}", judge=JUDGES[a.judge],
                 max_new_tokens=a.max_new_tokens, features=None if a.train_vision else cache["features"])
    # The policy appears under its final name only when complete: a kill here costs this one
    # (method, seed), and the rerun resumes with it.
    with atomic_dir(out) as tmp:
        provenance.record_dir(tmp, run.policy_inputs(method, seed))
        models.merge_lora(policy, tmp / "adapter")  # adapters for peft in adapter/, merged weights beside
        policy.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        live = Path(os.environ.get(safe_io.METRICS_ENV) or "/nonexistent") / f"grpo-{method}-s{seed}.jsonl"
        if live.is_file():  # the per-step metrics the loop appended live (safe_io.Progress.log)
            shutil.copyfile(live, tmp / "metrics.jsonl")
        atomic_write_json(tmp / "test_eval.json", {"accuracy": r["accuracy"], "correct": r["correct"],
                                                   "malformed_share": r["malformed_share"],
                                                   "n": run.test_signature()})
        extra = {"nts": nts_summary(fn, fed)} if isinstance(fn, mixture.NTSReward) else {}
        if isinstance(fn, mixture.HardReward):  # NTSReward too: per-prompt routing log and own-domain share
            own = {d: k for k, d in enumerate(fed.clients) if d in fed.test}
            extra["routing_own_share"] = mixture.own_share(fn.log, own)
            atomic_write_text(tmp / "routing_log.jsonl", "".join(json.dumps(x) + "\n" for x in fn.log))
        # memory with the K RMs loaded (it grows with K): this worker's peak so far, and
        # the RMs' own parameters
        rms_mb = sum(p.numel() * p.element_size() for rm in cache.get("rms", []) for p in rm.parameters()) / 2 ** 20
        memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rm_params_mb": round(rms_mb, 1) if method != "oracle" else 0.0}
        atomic_write_json(tmp / "grpo_log.json", dict(log, **extra, rm_calls=getattr(fn, "calls", None),
                                                      seconds=round(t_train, 1), memory=memory,
                                                      config=vars(grpo_config(run))))
    w = min(10, len(log["reward"])) or 1
    acc = f"sampled accuracy {sum(log['accuracy'][-w:]) / w:.3f}" if log["accuracy"] else "no gold answers"
    return (f"grpo {method} seed {seed}: reward {sum(log['reward'][-w:]) / w:.3f}, "
            f"kl {sum(log['kl'][-w:]) / w:.3f}, {acc}, {time.time() - t:.0f}s")


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
    ref = evaluate(model, models.Encoder(proc), fed.test, desc="eval reference", judge=JUDGES[run.args.judge],
                   max_new_tokens=run.args.max_new_tokens)
    # Gate 1 of the benchmark: a question-only guesser fitted on the public split must sit at
    # chance, else the table would measure the text shortcut rather than vision. On the user's own
    # task neither chance nor the gates are defined: they are the embedded benchmark's checks.
    own = run.own_task
    results = {
        "domains": list(fed.test),
        "eval_questions_per_domain": {d: len(v) for d, v in fed.test.items()},
        "seeds": run.args.seeds,  # the GRPO seeds every method's mean +/- std is taken over
        "data_seed": run.args.seed,  # split, reference SFT, client RMs and router
        "own_task": own,
        "judge": run.args.judge,
        "chance": None if own else {d: _chance(fed.test[d]) for d in fed.test},
        "blind": None if own else data.blind_baseline(fed.public, fed.test),
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
    results["gates"] = {} if own else gates(results)
    main_table = run.dir / "results.json"
    if weak_client(run.args.setting) and main_table.exists() and "methods" in results:
        # the bucket effect: the same methods and seeds without the weak client (the main table)
        without = json.loads(main_table.read_text()).get("methods", {})
        results["without_weak_client"], results["weak_client_effect"] = weak_client_effect(results, without)
    if results.get("methods"):  # the claims read the paired table and, here, the weak-client effect
        results["paired"] = paired_comparisons(results)
        results["claims"] = claims(results)
    if run.args.setting in MANY and "methods" in results:
        # the federation as it grows: this K beside the smaller K's tables in the run directory
        results["many_clients"] = many_clients(run.dir, run.args.setting, results)
        many_clients_plot(results["many_clients"], run.dir / f"many-clients-{run.args.setting}.png")
    atomic_write_json(run.dir / "reference_correct.json", ref["correct"])
    atomic_write_json(run.output("eval"), results)
    plots(run)
    md = results_markdown(results)
    atomic_write_text(run.output("eval").with_suffix(".md"), md)
    print("\n" + md)


def evaluate_methods(run: Run, ref_correct: dict) -> dict:
    """E9 for every aligned policy: greedy test accuracy and win rate vs the reference per domain,
    as mean and std over the GRPO seeds; plus the training-time malformed share (gate 5) and
    the final KL. A policy's evaluation is cached in its directory (eval.json)."""
    fed, out = run.fed, {}
    for method in trained_methods(run):
        per_seed = []  # one dict per GRPO seed: test accuracy, win rate, malformed share, KL
        for seed in run.seeds(method):
            d = policy_dir(run, method, seed)
            cache = d / "eval.json"
            # cached evaluations are reused only for the same test set (--test-per-domain may differ)
            done = d / "test_eval.json"  # written by the GRPO job on the same test set, if it was
            if cache.exists() and json.loads(cache.read_text()).get("n") == run.test_signature():
                ev = json.loads(cache.read_text())
            else:
                r = json.loads(done.read_text()) if done.exists() else {}
                if r.get("n") != run.test_signature():
                    model, proc = models.load_vlm(d, device=run.device)
                    r = evaluate(model, models.Encoder(proc), fed.test, desc=f"eval {method} s{seed}",
                                 judge=JUDGES[run.args.judge], max_new_tokens=run.args.max_new_tokens)
                ev = {"accuracy": r["accuracy"], "malformed_share": r["malformed_share"], "n": run.test_signature(),
                      "win_rate": {k: win_rate(r["correct"][k], ref_correct[k]) for k in fed.test}}
                atomic_write_json(cache, ev)
            log = json.loads((d / "grpo_log.json").read_text())
            ev["train_malformed"] = _moving_max(log["malformed"])
            ev["final_kl"] = sum(log["kl"][-10:]) / max(len(log["kl"][-10:]), 1)
            # RM rows scored per GRPO step (distinct samples x RMs run): soft mixtures pay K, hard
            # routing (NTS) and single RMs pay 1; the oracle pays none
            ev["rm_rows_per_step"] = sum(log.get("rm_calls") or [0]) / max(len(log["reward"]), 1)
            ev["seconds_per_step"] = log.get("seconds", 0.0) / max(len(log["reward"]), 1)
            # the reward call alone (what K changes) and the worker's memory with the RMs loaded
            ev["reward_seconds_per_step"] = sum(log.get("reward_seconds") or [0.0]) / max(len(log["reward"]), 1)
            ev["memory"] = log.get("memory", {})
            if "routing_own_share" in log:
                ev["routing_own_share"] = log["routing_own_share"]
            if "nts" in log:  # the bandit's choices: arm counts per domain, final variance, feedback rate
                ev["nts"] = {"arm_counts": log["nts"]["arm_counts"], "rms": log["nts"]["rms"],
                             "final_variance": log["nts"]["steps"][-1]["variance"],
                             "feedback_rate": sum(x["feedback"] or 0 for x in log["nts"]["steps"]) / len(log["nts"]["steps"])}
            per_seed.append(ev)
        doms = list(fed.test)
        n_q = {k: len(fed.test[k]) for k in doms}  # overall = question-weighted over domains
        out[method] = {
            "accuracy": {k: _mean_std([e["accuracy"][k] for e in per_seed]) for k in doms},
            "win_rate": {k: _mean_std([e["win_rate"][k] for e in per_seed]) for k in doms},
            "malformed_share": _mean_std([e["train_malformed"] for e in per_seed]),
            "eval_malformed_share": _mean_std([e["malformed_share"] for e in per_seed]),
            "final_kl": _mean_std([e["final_kl"] for e in per_seed]),
            "rm_rows_per_step": _mean_std([e["rm_rows_per_step"] for e in per_seed]),
            "seconds_per_step": _mean_std([e["seconds_per_step"] for e in per_seed]),
            "reward_seconds_per_step": _mean_std([e["reward_seconds_per_step"] for e in per_seed]),
            "peak_rss_mb": max((e["memory"].get("peak_rss_mb", 0.0) for e in per_seed), default=0.0),
            "rm_params_mb": max((e["memory"].get("rm_params_mb", 0.0) for e in per_seed), default=0.0),
            # per seed, in run.seeds(method) order: what the paired comparisons (harness/stats.py) read
            "seeds": run.seeds(method),
            "per_seed": {"seeds": run.seeds(method),
                         "accuracy": {k: [e["accuracy"][k] for e in per_seed] for k in doms},
                         "overall": [sum(e["accuracy"][k] * n_q[k] for k in doms) / sum(n_q.values())
                                     for e in per_seed],
                         "malformed": [e["train_malformed"] for e in per_seed]},  # gate 5: max over seeds
        }
        if "routing_own_share" in per_seed[0]:  # hard routing: share of a domain's prompts sent to its own RM
            share = {}
            for d in per_seed[0]["routing_own_share"]:
                share[d] = {}
                for w in ("start", "end"):
                    xs = [e["routing_own_share"][d][w] for e in per_seed if e["routing_own_share"][d][w] is not None]
                    share[d][w] = sum(xs) / len(xs) if xs else None
            out[method]["routing_own_share"] = share
        if "nts" in per_seed[0]:  # arm choices summed over seeds: share of prompts per (domain, RM)
            rms = per_seed[0]["nts"]["rms"]
            counts = {d: [sum(e["nts"]["arm_counts"].get(d, [0] * len(rms))[k] for e in per_seed)
                          for k in range(len(rms))] for d in doms}
            out[method]["nts_arm_share"] = {d: {rm: c / max(sum(counts[d]), 1) for rm, c in zip(rms, counts[d])}
                                            for d in doms}
            out[method]["nts_final_variance"] = _mean_std([e["nts"]["final_variance"] for e in per_seed])
    return out


# Stage name -> function, and the path whose existence marks it finished (see `Run`).
# Stages run in this order.
STAGES = {"base": stage_base, "sft": stage_sft, "reward": stage_reward, "router": stage_router,
          "grpo": stage_grpo, "eval": stage_eval}
