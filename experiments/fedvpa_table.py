"""FedVPA-GP on the conflicting-preference benchmark: the ablation table the pipeline regenerates,
a client's VPA reward model built from its own pairs, and GRPO with it. The method itself
(equations V1-V8, models, federated training, VPARewardModel) is fedvpa.py; the metrics
(accuracy, group purity, collapse, answer styles) experiments/fedvpa_eval.py; docs/vpa.md has the page, the
collapse diagnosis and the tables.

  python -m experiments.fedvpa_table --run-dir runs/default --seeds 0,1,2,3,4 --federations conflict --betas 0.1
      -> <run-dir>/vpa-results.md and vpa-results.json (every seed's per-round log included),
         <run-dir>/vpa-latent/conflict-beta0.1/*.png (the latent per run)
  python -m experiments.fedvpa_table --run-dir runs/default --client-rm --seeds 0,1,2,3,4
      -> adds the client-RM block: each domain's client holds both labeller groups, trains a
         VPA client RM (saved under <run-dir>/vpa-clients/) vs a plain BT RM on the same pairs
  python -m experiments.fedvpa_table --run-dir runs/default --grpo --seeds 0,1,2
      -> adds the GRPO block (no table): GRPO with the colour client's VPA RM vs its plain BT RM

Everything runs on frozen E2 features e(x, y) [D] of the reference policy (<run-dir>/base,
router.features), computed once and cached as safetensors, so a whole federated run costs seconds
on CPU. The benchmark (`conflict_clients`): each domain's client is split in two by image, a
"terse" and a "full" group; both keep the benchmark's pairs (correct answer + end token beats
everything else) and get one extra style pair per question whose direction is the group's:
  terse:  "red<|im_end|>"  beats  "the shape is red<|im_end|>"
  full:   "the shape is red<|im_end|>"  beats  "red<|im_end|>"
A third of every client's pairs conflict across groups and nothing in x tells the groups apart,
so one monolithic BT reward (FedAvg) cannot fit both; a client latent can.

Rows (GRID), the paper's ablation first: FedVPL (experiments/fedvpl.py: Gaussian latent, N(0, I)
prior), FedVPL + the orthogonal loss, FedVPL + the mixture prior, FedVPA-GP with the paper's
learned prior (V9); then FedVPA-GP with this code's priors: the posterior average after a uniform
burn-in (V8), from round 1 (V6, as first implemented), the uniform prior; and the monolithic BT
reward. A seed *collapses* when group purity < 0.9 (or < 2 prototypes are used); the table counts
collapses per row and pairs every row with FedVPA-GP by seed. Each run of FedVPL, FedVPA-GP and
its burn-in variant gets the latent plot (experiments/fedvpl.py:latent_plot) under
<out>/vpa-latent/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import data
import grpo
import mixture
import models
import reward
import router as routing
from experiments.fedvpa_eval import (StyleGuard, StyleJudge, _ci, _ms, _pct, answer_style,  # noqa: F401 (re-exported)
                                     client_posterior, evaluate, full_answer, grpo_markdown, heldout_accuracy,
                                     latent_rows_markdown, neg_elbo, paired, rm_diagnostics, rounds_markdown,
                                     sampled_styles, style_logprobs)
from experiments.fedvpl import VPL, evaluate_vpl, latent_plot, latent_points
from fedvpa import BTFeatureRewardModel, ClientFeatures, VPAConfig, VPARewardModel, train_federated
from judge import evaluate as evaluate_policy
from safe_io import Progress, atomic_dir, atomic_save_file, atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------------------------
# The benchmark: easy-VQA pairs, the conflicting-preference variant, cached features
# ----------------------------------------------------------------------------------------------


def heldout_split(pairs: list[data.Pair], name: str, seed: int, heldout: float = 0.1) -> tuple[list[int], list[int]]:
    """federated.Client's split (same seeded rule, by image): (train indices, held-out indices)."""
    images = sorted({p.image for p in pairs})
    random.Random(f"heldout-{name}-{seed}").shuffle(images)
    held = set(images[: max(1, round(heldout * len(images)))]) if len(images) > 1 else set()
    return ([i for i, p in enumerate(pairs) if p.image not in held], [i for i, p in enumerate(pairs) if p.image in held])


def conflict_clients(fed: data.Federation, seed: int) -> dict[str, tuple[str, list[data.Pair]]]:
    """The conflicting-preference federation: {client: (group, pairs)}, six clients.

    Each domain's benchmark client is split by image (seeded, half / half) into a "terse" and a
    "full" client. Both keep all of the benchmark's pairs for their images (data.make_pairs:
    correct answer + end token beats wrong answers, malformed ones, empty: agreed by everyone)
    and get one style pair per question: terse prefers "red<|im_end|>" over "the shape is
    red<|im_end|>", full the reverse. Deterministic in `seed`."""
    out = {}
    for d, exs in fed.clients.items():
        images = sorted({e.image for e in exs})
        random.Random(f"vpa-groups-{d}-{seed}").shuffle(images)
        full_imgs = set(images[: len(images) // 2])
        for group in ("terse", "full"):
            part = [e for e in exs if (e.image in full_imgs) == (group == "full")]
            pairs = data.make_pairs(part, seed)
            for e in part:
                terse, full = e.answer + data.EOS, full_answer(e.prompt, e.answer) + data.EOS
                w, l = (terse, full) if group == "terse" else (full, terse)
                pairs.append(data.Pair(e.image, e.prompt, w, l, e.domain))
            out[f"{d}/{group}"] = (group, pairs)
    return out


def plain_clients(fed: data.Federation, seed: int) -> dict[str, tuple[str, list[data.Pair]]]:
    """The benchmark's own three clients (no conflict): group = domain."""
    return {d: (d, data.make_pairs(exs, seed)) for d, exs in fed.clients.items()}


def reference_fingerprint(ref_dir: Path) -> str:
    """Names, sizes and mtimes of the reference's weight files: features (and every VPA trained on
    them) belong to one reference."""
    weights = sorted(Path(ref_dir).glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{ref_dir}: no reference checkpoint (run `python mor.py --stages sft` first)")
    return hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights).encode()).hexdigest()[:16]


def feature_table(triples: list[tuple[str, str, str]], ref_dir: Path, cache: Path | None) -> dict[tuple, torch.Tensor]:
    """E2 features of every (image, prompt, response) triple from the frozen reference at
    `ref_dir`, cached in `cache` (.safetensors: e [U, D]; .json: the triples in row order and the
    reference's fingerprint; None: no cache). Each client would compute its own rows with the
    public reference; one table for all is the simulation's shortcut. Missing triples are computed
    and the cache rewritten; a changed reference invalidates it."""
    fp = reference_fingerprint(ref_dir)
    table: dict[tuple, torch.Tensor] = {}
    side = cache.with_suffix(".json") if cache is not None else None
    if cache is not None and cache.exists() and side.exists():
        meta = json.loads(side.read_text())
        if meta.get("reference") == fp:
            e = load_file(str(cache))["e"]
            table = {tuple(k): e[i] for i, k in enumerate(meta["triples"])}
    todo = sorted({t for t in triples if t not in table})  # image-sorted: each image encoded once a batch
    if todo:
        torch.manual_seed(0)
        vlm, proc = models.load_vlm(ref_dir)
        enc = models.Encoder(proc)
        t0 = time.time()
        e_new = torch.cat([routing.features(vlm, enc, [t[0] for t in todo[i:i + 1024]], [t[1] for t in todo[i:i + 1024]],
                                            [t[2] for t in todo[i:i + 1024]])
                           for i in tqdm(range(0, len(todo), 1024), desc="reference features", disable=None)])
        print(f"features: {len(todo)} new rows in {time.time() - t0:.1f} s")
        table.update({t: e_new[i] for i, t in enumerate(todo)})
        if cache is not None:
            keys = sorted(table)
            atomic_save_file(cache, {"e": torch.stack([table[k] for k in keys])})
            atomic_write_text(side, json.dumps({"reference": fp, "triples": [list(k) for k in keys]}))
    return table


def _stack(table: dict, pairs: list[data.Pair], side: str, D: int) -> torch.Tensor:  # [N, D]
    return torch.stack([table[(p.image, p.prompt, getattr(p, side))] for p in pairs]) if pairs else torch.empty(0, D)


def group_features(name: str, pairs: list[data.Pair], groups: list[str], seed: int, ref_dir: Path,
                   cache: Path | None, table: dict | None = None) -> list[ClientFeatures]:
    """One client's pairs -> one ClientFeatures per labeller group (`groups[i]` tags pairs[i]),
    after the client's own held-out split by image (federated.Client's rule on all its pairs)."""
    if len(groups) != len(pairs):
        raise ValueError(f"client {name!r}: {len(groups)} group tags for {len(pairs)} pairs")
    tr, he = heldout_split(pairs, name, seed)
    if table is None:
        table = feature_table([(p.image, p.prompt, y) for p in pairs for y in (p.chosen, p.rejected)], ref_dir, cache)
    D = next(iter(table.values())).shape[0]
    out = []
    for g in sorted(set(groups)):
        a, b = [pairs[i] for i in tr if groups[i] == g], [pairs[i] for i in he if groups[i] == g]
        out.append(ClientFeatures(f"{name}/{g}" if len(set(groups)) > 1 else name, g, _stack(table, a, "chosen", D),
                                  _stack(table, a, "rejected", D), _stack(table, b, "chosen", D),
                                  _stack(table, b, "rejected", D)))
    return out


def client_features(clients: dict[str, tuple[str, list[data.Pair]]], seed: int, ref_dir: Path,
                    cache: Path) -> list[ClientFeatures]:
    """The federation's clients -> ClientFeatures (train / held-out split by image as in
    federated.Client), one feature table for all."""
    triples = [(p.image, p.prompt, y) for _, pairs in clients.values() for p in pairs for y in (p.chosen, p.rejected)]
    table = feature_table(triples, ref_dir, cache)
    return [group_features(name, pairs, [g] * len(pairs), seed, ref_dir, None, table)[0]
            for name, (g, pairs) in clients.items()]


# ----------------------------------------------------------------------------------------------
# A client's VPA reward model (MoR interface)
# ----------------------------------------------------------------------------------------------


GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def train_client_rm(name: str, pairs: list[data.Pair], groups: list[str], ref_dir: str | Path, out_dir: str | Path,
                    seed: int, cfg: VPAConfig | None = None, cache: Path | None = None) -> dict:
    """A client's VPA reward models from its own pairs, one per labeller group.

    `groups[i]` names who labelled pairs[i] (e.g. the terse and the full convention); the client
    runs FedVPA-GP *locally* with each group as a member (episodes within a group, the mixture
    prior over its groups; nothing leaves the client) on the reference's features, then fixes
    one posterior per group from that group's training pairs. Writes <out_dir>/<group>/
    (vpa.safetensors + vpa.json, loadable with VPARewardModel.load(dir, ref_vlm, processor)) and
    returns only numbers: {group: {n_pairs, heldout_pairs, heldout_accuracy, ...}}."""
    cfg = cfg or VPAConfig()
    ref_dir, out_dir = Path(ref_dir), Path(out_dir)
    bad = sorted({g for g in groups if not GROUP_NAME.fullmatch(g)})
    if bad:
        raise ValueError(f"client {name!r}: group tags {bad} (each becomes a directory: letters, digits, _ and - only)")
    members = group_features(name, pairs, groups, seed, ref_dir, cache)
    t0 = time.time()
    model, prior, log = train_federated("vpa", members, cfg, seed, desc=f"vpa client {name}")
    ev = evaluate(model, members, prior, seed) if len(members) > 1 else {}
    out = {}
    for m in members:
        rm = VPARewardModel.from_context(model, m.train_w, m.train_l)
        rm.calibrate(torch.cat([m.train_w, m.train_l]))
        metrics = {"client": name, "group": m.group, "n_pairs": m.n, "heldout_pairs": int(m.held_w.shape[0]),
                   "heldout_accuracy": heldout_accuracy(model, m, rm.q), "posterior": [round(x, 4) for x in rm.q.tolist()],
                   "group_purity": ev.get("group_purity"), "prototypes_used": ev.get("used"),
                   "reference": reference_fingerprint(ref_dir), "seconds": round(time.time() - t0, 1)}
        rm.info.update(metrics)
        rm.save(out_dir / m.group)
        out[m.group] = metrics
    return out


def load_client_rm(path: str | Path, ref_vlm=None, processor=None, device: str = "cpu"):
    """Either kind of client RM by its directory: a VPA RM (vpa.json; scores through the frozen
    reference `ref_vlm`, `processor`) or a reward.RewardModel (reward.json)."""
    path = Path(path)
    if (path / "vpa.json").exists():
        return VPARewardModel.load(path, ref_vlm, processor).to(device)
    return reward.RewardModel.load(path, device=device)


def client_rm_experiment(fed: data.Federation, data_seed: int, seeds: list[int], cfg: VPAConfig, run_dir: Path,
                         out: Path, cache: Path) -> dict:
    """Each domain's client holds both groups of the conflict benchmark (tagged terse / full):
    held-out pair accuracy per group of its VPA client RM (posterior fixed per group) vs a plain
    BT RM trained on the same pairs (MonolithicBT on the same features), over training seeds."""
    conf = conflict_clients(fed, data_seed)
    res: dict = {}
    for d in fed.clients:
        pairs = conf[f"{d}/terse"][1] + conf[f"{d}/full"][1]
        groups = ["terse"] * len(conf[f"{d}/terse"][1]) + ["full"] * len(conf[f"{d}/full"][1])
        members = group_features(d, pairs, groups, data_seed, run_dir / "base", cache)
        for s in seeds:
            t0 = time.time()
            m = train_client_rm(d, pairs, groups, run_dir / "base", out / "vpa-clients" / d / f"seed{s}", s, cfg, cache)
            bt, _, _ = train_federated("mono", members, cfg, s, desc=f"bt client {d}")
            for c in members:
                r = res.setdefault(c.name, {"vpa": [], "bt": []})
                r["vpa"].append(m[c.group]["heldout_accuracy"])
                r["bt"].append(heldout_accuracy(bt, c))
            tqdm.write(f"client RM {d} s{s}: " + ", ".join(f"{c.group} vpa {m[c.group]['heldout_accuracy']:.3f} "
                                                             f"bt {res[c.name]['bt'][-1]:.3f}" for c in members)
                       + f" ({time.time() - t0:.0f} s)")
    return {k: {"vpa": _ms(v["vpa"]), "bt": _ms(v["bt"])} for k, v in res.items()}


# ----------------------------------------------------------------------------------------------
# GRPO with a VPA client RM: E5 on one client's reward, the VPA RM against a plain BT RM
# ----------------------------------------------------------------------------------------------

# start policy -> the client RMs GRPO runs with from it ("VPA <group>": the VPA client RM fixed to
# that group's posterior; "BT": MonolithicBT on the same features and the same mixed pairs)
GRPO_ARMS = {"reference": ("VPA full", "BT"), "two-style start": ("VPA full", "VPA terse", "BT")}


def two_style_start(fed: data.Federation, domain: str, ref_dir: Path, out_dir: Path, steps: int, seed: int = 0,
                    lr: float = 3e-4, batch: int = 32) -> Path:
    """The reference after `steps` of SFT (reward.train_sft, the sft stage's loss) on the public
    split's `domain` questions, half of them (seeded, by image) answered in the full style: a
    start from which GRPO's samples hold both conventions. From the reference itself they hold
    none: its SFT answers were all terse and it puts about -41 nats on "the shape is red<|im_end|>"
    (vpa-results.md), so no reward can favour a full sentence it never sees. Public data only
    (the server's, as for the reference). Cached in out_dir with its recipe; rebuilt when the
    reference or the recipe changes."""
    recipe = {"domain": domain, "steps": steps, "seed": seed, "lr": lr, "batch": batch,
              "reference": reference_fingerprint(ref_dir)}
    stamp = out_dir / "two_style.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return out_dir
    pub = [e for e in fed.public if e.domain == domain]
    images = sorted({e.image for e in pub})
    random.Random(f"two-style-{domain}-{seed}").shuffle(images)
    full_imgs = set(images[: len(images) // 2])
    exs = [data.Example(e.image, e.prompt, full_answer(e.prompt, e.answer) if e.image in full_imgs else e.answer,
                        e.domain, e.image_id) for e in pub]  # train_sft appends the end token
    torch.manual_seed(seed)
    vlm, proc = models.load_vlm(ref_dir)
    losses = reward.train_sft(vlm, models.Encoder(proc), exs, steps, batch, lr, seed, desc=f"two-style sft {domain}")
    with atomic_dir(out_dir) as tmp:
        vlm.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        atomic_write_json(tmp / "two_style.json", {"recipe": recipe, "loss": losses, "examples": len(exs),
                                                   "full_examples": sum(e.image in full_imgs for e in pub)})
    return out_dir


def client_rms(domain: str, pairs: list[data.Pair], groups: list[str], probe: dict, ref_dir: Path,
               rm_dir: Path, seed: int, cfg: VPAConfig, table: dict, ref_vlm, ref_proc, cache: Path) -> tuple[dict, dict]:
    """grpo_experiment's client RMs from the client's own pairs, {"VPA full", "VPA terse", "BT"} ->
    RM scoring through ref_vlm, and their diagnostics on its held-out pairs: accuracy on the
    answer pairs (right answer + end token vs the rest: both groups agree) and on each group's
    style pairs, and on the client's questions (`probe`: vpa_eval.rm_diagnostics). Deterministic
    in `seed`."""
    m = train_client_rm(domain, pairs, groups, ref_dir, rm_dir, seed, cfg, cache)
    members = group_features(domain, pairs, groups, seed, ref_dir, None, table)  # train_client_rm's split
    bt, _, _ = train_federated("mono", members, cfg, seed, desc=f"bt client {domain}")
    rms = {f"VPA {g}": load_client_rm(rm_dir / g, ref_vlm, ref_proc) for g in ("full", "terse")}
    rms["BT"] = BTFeatureRewardModel(bt, ref_vlm, ref_proc)
    rms["BT"].calibrate(torch.cat([torch.cat([c.train_w, c.train_l]) for c in members]))  # E3 stats
    _, he = heldout_split(pairs, domain, seed)  # group_features' held-out rows, in its order
    is_style = {c.group: torch.tensor([answer_style(pairs[i].chosen)[0] == "full" or answer_style(pairs[i].rejected)[0]
                                       == "full" for i in he if groups[i] == c.group], dtype=torch.bool) for c in members}
    diag = {arm: {"seed": seed, **rm_diagnostics(rm, members, is_style, **probe),
                  "group_purity": m["full"]["group_purity"] if arm != "BT" else None} for arm, rm in rms.items()}
    return rms, diag


def grpo_experiment(fed: data.Federation, data_seed: int, seeds: list[int], cfg: VPAConfig, run_dir: Path, out: Path,
                    cache: Path, domain: str = "color", gcfg: grpo.GRPOConfig | None = None,
                    start_steps: int = 120, on_seed=None) -> dict:
    """GRPO (grpo.train_grpo, E5, unchanged) on one client's reward. The `domain` client holds both
    groups of the conflict benchmark (as in client_rm_experiment); its RMs (client_rms):
      "VPA <g>": its VPA client RM (train_client_rm, loaded from its upload directory like any
                 client RM, scoring through the frozen reference) fixed to group g's posterior;
      "BT":      a plain BT RM of the same kind: MonolithicBT on the same features and the same
                 mixed pairs (same split and seed), as BTFeatureRewardModel.
    Each runs as mixture.SingleReward (E3) inside StyleGuard (the format guard, both conventions
    well-formed) from each start of GRPO_ARMS: the reference, which never samples a full
    sentence, and two_style_start. Per seed s (the RMs' and GRPO's): test accuracy in either
    style (StyleJudge), style shares of the greedy test answers and of the last 10 steps'
    samples, KL, seconds; per start: log pi and sampled shares of each style, accuracy.
    `gcfg`: default 40 steps, answers of up to 6 tokens (its own format guard off).
    `on_seed(res)` after each seed."""
    gcfg = dataclasses.replace(gcfg or grpo.GRPOConfig(steps=40, max_new_tokens=6), format_guard=False)
    ref_dir, t_all = run_dir / "base", time.time()
    ref_vlm, ref_proc = models.load_vlm(ref_dir)  # the RMs' frozen feature extractor (E2), never trained here
    need = max(len(ref_proc.tokenizer.tokenize(full_answer("", a) + data.EOS)) for a in data.DOMAIN_ANSWERS[domain])
    if need > gcfg.max_new_tokens:  # the full style must fit in a sampled answer at all
        raise ValueError(f"max_new_tokens {gcfg.max_new_tokens}: a full-style {domain} answer takes {need} tokens")
    conf = conflict_clients(fed, data_seed)
    pairs = conf[f"{domain}/terse"][1] + conf[f"{domain}/full"][1]
    groups = ["terse"] * len(conf[f"{domain}/terse"][1]) + ["full"] * len(conf[f"{domain}/full"][1])
    # every client question's right answer in both styles, and every answer word of the domain
    # (terse): what each RM prefers among the responses GRPO samples (rm_diagnostics)
    qs, words = fed.clients[domain], data.DOMAIN_ANSWERS[domain]
    styles = [(e.image, e.prompt, y + data.EOS) for e in qs for y in (full_answer(e.prompt, e.answer), e.answer)]
    answers = [(e.image, e.prompt, w + data.EOS) for e in qs for w in words]
    table = feature_table(styles + answers + [(p.image, p.prompt, y) for p in pairs for y in (p.chosen, p.rejected)],
                          ref_dir, cache)
    probe_e = {"e_style": torch.stack([table[t] for t in styles]).view(len(qs), 2, -1),  # [Q, 2 (full, terse), D]
               "e_answers": torch.stack([table[t] for t in answers]).view(len(qs), len(words), -1),  # [Q, K, D]
               "gold": torch.tensor([words.index(e.answer) for e in qs])}  # [Q]
    pool = [e for e in fed.pool if e.domain == domain]
    gold = data.pool_gold(fed, domain)  # logs and the style probe only
    if gold is None:  # the probe scores gold answers in two styles: it needs them
        raise SystemExit("fedvpa_table: the prompt pool has no gold answers; the style probe needs them")
    probe = [data.Example(e.image, e.prompt, gold[(e.image, e.prompt)], domain) for e in pool[:64]]
    test = {domain: fed.test[domain]}
    starts = {"reference": ref_dir,
              "two-style start": two_style_start(fed, domain, ref_dir, out / "vpa-grpo" / f"two-style-{domain}", start_steps)}
    res = {"domain": domain, "grpo_config": asdict(gcfg), "start_steps": start_steps, "full_tokens": need,
           "seeds": seeds, "pairs": {g: groups.count(g) for g in ("terse", "full")}, "starts": {}, "rms": {}, "runs": {}}
    for name, d in starts.items():  # 1. can GRPO reach each style from this start?
        vlm, proc = models.load_vlm(d)
        enc, judge = models.Encoder(proc), StyleJudge()
        torch.manual_seed(0)
        res["starts"][name] = {"logp": style_logprobs(vlm, enc, probe[:32]),
                               "sampled": sampled_styles(vlm, enc, probe, gcfg.max_new_tokens)}
        ev = evaluate_policy(vlm, enc, test, judge=judge, max_new_tokens=gcfg.max_new_tokens, desc=f"eval {name}")
        res["starts"][name].update(accuracy=ev["accuracy"][domain], greedy=judge.shares())
    bar = Progress(total=len(seeds) * sum(map(len, GRPO_ARMS.values())), desc=f"grpo with client RMs ({domain})")
    for s in seeds:
        rms, diag = client_rms(domain, pairs, groups, probe_e, ref_dir, out / "vpa-clients" / domain / f"seed{s}", s,
                               cfg, table, ref_vlm, ref_proc, cache)  # 2. the client's RMs, from its own pairs
        for arm, x in diag.items():
            res["rms"].setdefault(arm, []).append(x)
        # 3. GRPO from each start with each RM; same seed: same prompt order and sampling noise
        for start, arms in GRPO_ARMS.items():
            for arm in arms:
                t0 = time.time()
                policy, proc = models.load_vlm(starts[start])
                kl_ref, _ = models.load_vlm(starts[start])  # pi_ref of E5: the start itself
                fn = StyleGuard(mixture.SingleReward(rms[arm]), gcfg.group, gold)
                log = grpo.train_grpo(policy, kl_ref, models.Encoder(proc), pool, fn, gcfg, s,
                                      desc=f"grpo {start} / {arm} s{s}")
                t_grpo, judge = time.time() - t0, StyleJudge()
                ev = evaluate_policy(policy, models.Encoder(proc), test, judge=judge,
                                     max_new_tokens=gcfg.max_new_tokens, desc=f"eval {start} / {arm} s{s}")
                last = fn.log[-10:]
                res["runs"].setdefault(start, {}).setdefault(arm, []).append({
                    "seed": s, "accuracy": ev["accuracy"][domain], "greedy": judge.shares(),
                    "sampled_last10": {k: sum(x[k] for x in last) / len(last) for k in (last[0] if last else ())},
                    "kl_last10": sum(log["kl"][-10:]) / max(len(log["kl"][-10:]), 1), "skipped": len(log["skipped"]),
                    "rm_rows": fn.calls[0], "grpo_seconds": round(t_grpo, 1), "seconds": round(time.time() - t0, 1)})
                bar.update(1)
                bar.set_postfix(acc=f"{ev['accuracy'][domain]:.3f}", full=f"{judge.shares()['full']:.2f}")
        res["seconds"] = round(time.time() - t_all, 1)
        if on_seed is not None:
            on_seed(res)
    bar.close()
    return res


# ----------------------------------------------------------------------------------------------
# Experiment and CLI
# ----------------------------------------------------------------------------------------------

MONO = "monolithic BT (FedAvg)"
VPL_ = "FedVPL: Gaussian z, N(0, I) prior"
FULL = "FedVPA-GP: learned Gumbel-Softmax prior (V9) + orth"
BURNIN = "FedVPA-GP, posterior-average prior after a burn-in (V8) + orth"
ORIG = "FedVPA-GP, posterior-average prior from round 1 (V6) + orth"
UNIFORM = "FedVPA-GP, uniform prior + orth"
GRID = {  # name -> (model, VPAConfig overrides): the paper's four rows, then the priors of this code
    VPL_: (VPL, {"orth": 0.0, "mixture_prior": False}),
    "FedVPL + orthogonal loss": (VPL, {"mixture_prior": False}),
    "FedVPL + mixture prior (learned weights)": (VPL, {"orth": 0.0}),
    FULL: ("vpa", {"learned_prior": True}),
    BURNIN: ("vpa", {}),
    ORIG: ("vpa", {"prior_warmup": 0.0}),
    UNIFORM: ("vpa", {"mixture_prior": False}),
}
PLOTTED = {VPL_: "fedvpl", FULL: "fedvpa-gp", BURNIN: "fedvpa-gp-burn-in"}  # row -> its latent plots' name


_CLIENTS: list[ClientFeatures] = []  # the federation a forked worker of run_experiment reads


def _run(job: tuple) -> dict:
    """One (row, seed) of the grid: train, evaluate, keep the per-round log, draw the latent."""
    name, kind, c, s, desc, plot_dir = job
    clients, t0 = _CLIENTS, time.time()
    torch.set_num_threads(1)
    model, prior, log = train_federated(kind, clients, c, s, desc=f"{desc} {name[:24]} s{s}")
    ev = evaluate_vpl(model, clients, s) if kind is VPL else evaluate(model, clients, prior, s)
    ev.update(seed=s, seconds=round(time.time() - t0, 2), final_loss=log[-1]["loss"])
    if kind != "mono":
        ev["rounds"] = log
    if kind == "vpa":
        ev["neg_elbo_heldout"] = neg_elbo(model, clients, prior, s, held=True)
    if plot_dir is not None and name in PLOTTED:
        pts = {cl.name: latent_points(model, cl, s * 31 + k).tolist() for k, cl in enumerate(clients)}
        latent_plot(plot_dir / f"{PLOTTED[name]}-seed{s}.png", log, pts, {cl.name: cl.group for cl in clients},
                    f"{name}, seed {s}: group purity {ev['group_purity']:.2f} "
                    f"({'collapsed' if ev['collapsed'] else 'separated'}), mean held-out accuracy "
                    f"{100 * sum(ev['accuracy'].values()) / len(clients):.1f}")
    return ev


def run_experiment(clients: list[ClientFeatures], cfg: VPAConfig, seeds: list[int], desc: str = "",
                   plot_dir: Path | None = None, workers: int = 1) -> dict:
    """The monolithic BT and every row of GRID, each over `seeds`; mean +/- std per figure,
    collapses counted, every seed's evaluation and per-round log kept, the paired difference of
    FULL's mean accuracy against every other row; the latent plot of PLOTTED's runs in plot_dir.
    `workers` > 1 runs the (row, seed) jobs in forked processes, one thread each: the same
    numbers as one process (every run seeds its own generators)."""
    global _CLIENTS
    _CLIENTS = clients
    runs = [(MONO, "mono", cfg)] + [(n, k, VPAConfig(**{**asdict(cfg), **o})) for n, (k, o) in GRID.items()]
    jobs = [(name, kind, c, s, desc, plot_dir) for name, kind, c in runs for s in seeds]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            evs = pool.map(_run, jobs, chunksize=1)
    else:
        evs = [_run(j) for j in jobs]
    res = {}
    for i, (name, kind, c) in enumerate(runs):
        per_seed = evs[i * len(seeds):(i + 1) * len(seeds)]
        entry = {"accuracy": {c_.name: _ms([e["accuracy"][c_.name] for e in per_seed]) for c_ in clients},
                 "mean_accuracy": _ms([sum(e["accuracy"].values()) / len(e["accuracy"]) for e in per_seed]),
                 "min_accuracy": _ms([min(e["accuracy"].values()) for e in per_seed]),
                 "seconds": _ms([e["seconds"] for e in per_seed])}
        for k in ("client_purity", "group_purity", "used", "H_qbar", "H_q", "max_cos", "neg_elbo_heldout", "kl_normal"):
            if per_seed[0].get(k) is not None:
                entry[k] = _ms([float(e[k]) for e in per_seed])
        if per_seed[0].get("collapsed") is not None:
            entry["collapsed_seeds"] = [e["seed"] for e in per_seed if e["collapsed"]]
        res[name] = {**entry, "per_seed": per_seed}
        tqdm.write(f"{desc} {name}: mean acc {entry['mean_accuracy']['mean']:.3f}"
                   + (f", group purity {entry['group_purity']['mean']:.2f}, collapsed {entry.get('collapsed_seeds')}"
                      if "group_purity" in entry else ""))
    for e in res.values():
        for ref in (FULL, BURNIN):
            e[f"vs {ref}"] = paired(res[ref]["mean_accuracy"]["values"], e["mean_accuracy"]["values"])
    return res


def results_markdown(all_res: dict, cfg: VPAConfig, seeds: list[int], command: str, seconds: float,
                     client_rm: dict | None = None, grpo_res: dict | None = None) -> str:
    """Markdown of every (federation, beta) block of `all_res`, the client-RM block and the GRPO block."""
    lines = ["# FedVPA-GP against FedVPL (experiments/fedvpa_table.py)\n",
             f"Regenerate: `{command}` ({seconds:.0f} s for the blocks it ran; other blocks merged from earlier runs).\n",
             f"P={cfg.prototypes}, context C={cfg.context}, targets T={cfg.targets}, {cfg.rounds} rounds x "
             f"{cfg.local_steps} local steps x {cfg.episodes} episodes, lr {cfg.lr}, lambda_orth {cfg.orth}, "
             f"tau {cfg.tau0} -> {cfg.tau_min}, uniform-prior burn-in {cfg.prior_warmup} of the rounds (V8), floor {cfg.prior_floor}; "
             f"training seeds {seeds} (data seed fixed); mean ± std over seeds. Accuracy: held-out pair accuracy (%); "
             "scored with E_q[r] under the client's posterior from its own training pairs (FedVPL: r at the posterior "
             "mean, the same thing). Collapsed: group purity < 0.9, or (FedVPA-GP) fewer than 2 prototypes used; "
             "FedVPA-GP's purity clusters by MAP prototype, FedVPL's by a k-means (k = P) of its posterior means. "
             "Paired: the named FedVPA-GP row minus this row, mean accuracy per seed, mean and 95% t-interval "
             "(points).\n"]
    for label, res in all_res.items():
        names = list(next(iter(res.values()))["accuracy"])
        lines += [f"\n## {label}\n", "| method | mean | worst client | collapsed | group purity per seed | "
                  "paired: FedVPA-GP (V9) minus row | paired: FedVPA-GP burn-in (V8) minus row |", "|---|---|---|---|---|---|---|"]
        for m, e in res.items():
            col = f"{len(e['collapsed_seeds'])}/{len(e['per_seed'])} {e['collapsed_seeds'] or ''}" if "collapsed_seeds" in e else ""
            pur = " ".join(f"{x['group_purity']:.2f}" for x in e["per_seed"]) if "group_purity" in e else ""
            pv = [_ci(e[f"vs {r}"]) if f"vs {r}" in e and m != r else "" for r in (FULL, BURNIN)]
            lines.append(f"| {m} | {_pct(e['mean_accuracy'])} | {_pct(e['min_accuracy'])} | {col} | {pur} | {pv[0]} | {pv[1]} |")
        lines += ["\nPer client (%):\n", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m, e in res.items():
            lines.append(f"| {m} | " + " | ".join(_pct(e["accuracy"][n]) for n in names) + " |")
        lines += latent_rows_markdown(res)
        # the collapse traces: each FedVPA-GP prior's first collapsed seed (the burn-in on the first
        # collapsed seed of the prior from round 1 beside it) and FedVPL's
        traces = []
        for m, other in ((ORIG, BURNIN), (FULL, None), (BURNIN, None), (UNIFORM, None), (VPL_, None)):
            if m in res and res[m].get("collapsed_seeds"):
                s = res[m]["collapsed_seeds"][0]
                traces += [(m, s)] + ([(other, s)] if other in res else [])
        for m, s in dict.fromkeys(traces):
            ev = next(x for x in res[m]["per_seed"] if x["seed"] == s)
            state = "collapsed" if ev["collapsed"] else f"group purity {ev['group_purity']:.2f}"
            lines += rounds_markdown(ev, f"Per round, {m}, seed {s} ({state}):")
    if client_rm:
        lines += ["\n## A client's VPA reward model vs its plain BT reward model\n",
                  "Each domain's client holds both labeller groups of the conflict benchmark; held-out pair accuracy "
                  "(%) per group, the VPA RM's posterior fixed from that group's training pairs (`train_client_rm`).\n",
                  "| client / group | VPA client RM | plain BT RM (same pairs) |", "|---|---|---|"]
        for k, v in client_rm.items():
            lines.append(f"| {k} | {_pct(v['vpa'])} | {_pct(v['bt'])} |")
        n = len(next(iter(client_rm.values()))["vpa"]["values"])  # the block's own seeds
        mv = _ms([sum(v["vpa"]["values"][i] for v in client_rm.values()) / len(client_rm) for i in range(n)])
        mb = _ms([sum(v["bt"]["values"][i] for v in client_rm.values()) / len(client_rm) for i in range(n)])
        lines.append(f"| mean | {_pct(mv)} | {_pct(mb)} |")
    if grpo_res and grpo_res.get("runs"):
        lines += grpo_markdown(grpo_res)
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="FedVPA-GP on the conflicting-preference benchmark (the method: fedvpa.py)")
    ap.add_argument("--run-dir", default="runs/default", help="pipeline run dir: its base/ is the frozen reference")
    ap.add_argument("--out", default=None, help="where vpa-results.md/.json go (default: the run dir)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (comma separated)")
    ap.add_argument("--data-seed", type=int, default=None, help="federation/pairs seed (default: the run dir's)")
    ap.add_argument("--federations", default=None,
                    help="conflict (6 clients, terse vs full) and/or plain (3); default conflict, none with --grpo")
    ap.add_argument("--betas", default="0.1", help="KL weights to run every variant at (1 = the plain ELBO)")
    ap.add_argument("--client-rm", action="store_true", help="also the client-RM block (VPA client RM vs plain BT)")
    ap.add_argument("--grpo", action="store_true", help="the GRPO block: a client's VPA RM vs plain BT RM in GRPO")
    ap.add_argument("--grpo-domain", default="color", choices=data.DOMAINS, help="the GRPO block's client")
    ap.add_argument("--grpo-steps", type=int, default=40, help="GRPO steps per run of the GRPO block")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="GRPO block: answer length (a full sentence is longer)")
    ap.add_argument("--two-style-steps", type=int, default=120, help="GRPO block: SFT steps of the two-style start")
    ap.add_argument("--fresh", action="store_true", help="drop earlier blocks of vpa-results.json instead of merging")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="processes for the table's runs (same numbers as 1)")
    for k, v in asdict(VPAConfig()).items():
        if isinstance(v, bool) or k == "beta":
            continue
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    return ap.parse_args(argv)


FEDERATIONS = {"conflict": (conflict_clients, "conflict: 6 clients (3 domains x terse/full)"),
               "plain": (plain_clients, "plain: the benchmark's 3 clients")}


def main(argv=None) -> int:
    """Blocks (federation x beta) are merged into vpa-results.json (unless --fresh), so a long
    table can be produced by several short invocations; vpa-results.md is rewritten from all."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = VPAConfig(**{k: getattr(a, k) for k in asdict(VPAConfig()) if hasattr(a, k)})
    cfg.validate()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    betas = [float(b) for b in a.betas.split(",") if b.strip()]
    run_dir = Path(a.run_dir)
    out = Path(a.out) if a.out else run_dir
    data_seed = a.data_seed
    if data_seed is None:
        conf = run_dir / "config.json"
        data_seed = json.loads(conf.read_text()).get("seed", 0) if conf.exists() else 0
    feds = [f.strip() for f in (a.federations if a.federations is not None else "" if a.grpo else "conflict").split(",")
            if f.strip()]
    for name in feds:
        if name not in FEDERATIONS:
            raise SystemExit(f"--federations: unknown {name!r} (choose from {sorted(FEDERATIONS)})")
    fed = data.build_federation(data_seed)
    cache = run_dir / "vpa-cache" / f"features-seed{data_seed}.safetensors"  # one per reference, whatever --out
    old = out / "vpa-results.json"
    prev = {} if a.fresh or not old.exists() else json.loads(old.read_text())
    merged, client_rm, grpo_res = prev.get("results", {}), prev.get("client_rm"), prev.get("grpo")
    t0 = time.time()
    for name in feds:
        build, label = FEDERATIONS[name]
        clients = client_features(build(fed, data_seed), data_seed, run_dir / "base", cache)
        print(f"{label}: train pairs {[c.n for c in clients]}, held-out {[c.held_w.shape[0] for c in clients]}")
        for beta in betas:
            c = VPAConfig(**{**asdict(cfg), "beta": beta})
            merged[f"{label}, beta {beta:g}"] = run_experiment(clients, c, seeds, desc=f"{name} b{beta:g}",
                                                               plot_dir=out / "vpa-latent" / f"{name}-beta{beta:g}",
                                                               workers=a.workers)
    command = "python -m experiments.fedvpa_table " + " ".join(argv if argv is not None else sys.argv[1:])
    # the header's command / seeds / seconds are the table's: a --grpo-only run keeps the earlier ones
    # (the GRPO block carries its own)
    table_run = bool(feds) or a.client_rm or not prev

    def write() -> str:  # after each block: a long invocation that dies keeps what it finished
        head = ({"seeds": seeds, "command": command, "seconds": round(time.time() - t0, 1)} if table_run else
                {k: prev.get(k) for k in ("seeds", "command", "seconds")})
        md = results_markdown(merged, cfg, head["seeds"], head["command"], head["seconds"], client_rm, grpo_res)
        atomic_write_text(out / "vpa-results.md", md)
        atomic_write_text(out / "vpa-results.json", json.dumps(
            {"config": asdict(cfg), "data_seed": data_seed, **head, "results": merged, "client_rm": client_rm,
             "grpo": grpo_res}, indent=1))
        return md
    md = write()
    if a.client_rm:
        client_rm = client_rm_experiment(fed, data_seed, seeds, cfg, run_dir, out, cache)
        md = write()
    if a.grpo:
        def on_seed(res: dict) -> None:
            nonlocal grpo_res, md
            grpo_res = dict(res, command=command, threads=a.threads)
            md = write()
        grpo_experiment(fed, data_seed, seeds, cfg, run_dir, out, cache, a.grpo_domain,
                        grpo.GRPOConfig(steps=a.grpo_steps, max_new_tokens=a.max_new_tokens), a.two_style_steps, on_seed)
    print(md)
    print(f"wrote {out / 'vpa-results.md'} and vpa-results.json ({time.time() - t0:.0f} s this invocation)")
    return 0


def pipeline_step(run_dir: str | Path, seeds: list[int] = (0, 1, 2, 3, 4), client_rm: bool = True) -> int:
    """The `vpa` step of the pipeline (after sft: it needs <run-dir>/base): the documented table."""
    argv = ["--run-dir", str(run_dir), "--seeds", ",".join(map(str, seeds)), "--federations", "conflict",
            "--betas", "0.1", "--fresh"] + (["--client-rm"] if client_rm else [])
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
