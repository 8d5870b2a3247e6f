"""Reporting: the tables, the benchmark's gates and the plots, from what the stages wrote.

Nothing here trains or evaluates a model: every function reads results (dicts from results.json,
router-<setting>.json, the GRPO logs) and writes markdown or PNG. The CLI (mor.py) and the eval
stage (harness/stages.py) import this module; it imports neither.
"""

from __future__ import annotations

import json

import data
from harness import stats
from harness.pipeline import MANY, MANY_K, MANY_METHODS, WEAK_CLIENTS, Run, policy_dir, trained_methods
from safe_io import atomic_savefig


def matrix_markdown(matrix: dict[str, dict[str, float]], cols: list[str] | None = None,
                    corner: str = "RM \\ domain") -> str:
    """{row: {col: value in [0, 1]}} -> a markdown table in %."""
    cols = cols or list(next(iter(matrix.values())))
    lines = [f"| {corner} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows = [k for k in cols if k in matrix] + [k for k in matrix if k not in cols]  # domains first
    lines += [f"| {k} | " + " | ".join(f"{100 * matrix[k][c]:.1f}" for c in cols) + " |" for k in rows]
    return "\n".join(lines)


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


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plots(run: Run) -> None:
    """grpo-<setting>.png: reward and on-the-fly sampled accuracy over GRPO steps per method
    (10-step moving average, seeds averaged); routing-share-<setting>.png: hard routing's
    own-domain share per step; routing-<setting>.png: the router's mean weight per (domain, RM).
    matplotlib is a requirement, but a stripped environment without it prints one line."""
    plt = _pyplot()
    if plt is None:
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
            logs = [json.loads((policy_dir(run, method, s) / "grpo_log.json").read_text()) for s in run.seeds(method)]
            for ax, key in zip(axes, ("reward", "accuracy")):
                if logs and logs[0][key]:
                    n = min(len(lg[key]) for lg in logs)
                    mean = [sum(lg[key][i] for lg in logs) / len(logs) for i in range(n)]
                    ax.plot(smooth(mean), label=method)
        axes[0].set(title="reward of the method's own source (standardised)", xlabel="GRPO step")
        axes[1].set(title="sampled accuracy (gold, evaluator only)", xlabel="GRPO step")
        # a prompt pool without gold answers has no sampled accuracy: the legend goes with the rewards
        (axes[1] if axes[1].lines else axes[0]).legend(fontsize=7)
        fig.tight_layout()
        atomic_savefig(fig, run.dir / f"grpo-{setting}.png")
        plt.close(fig)
    # routing-share-<setting>.png: for each hard-routing method, the share of each domain's
    # prompts sent to that domain's own client RM at every GRPO step (seeds pooled, 5-step moving
    # average): does online routing keep, lose or recover what the federated router knows?
    if run.output("grpo").exists():
        own = {d: k for k, d in enumerate(run.fed.clients) if d in run.fed.test}
        curves = {}
        for method in trained_methods(run):
            logs = [policy_dir(run, method, s) / "routing_log.jsonl" for s in run.seeds(method)]
            if own and all(f.exists() for f in logs):
                rows = [json.loads(x) for f in logs for x in f.read_text().splitlines()]
                for d, k in own.items():
                    steps = sorted({x["step"] for x in rows if x["domain"] == d})
                    hits = [[x["arm"] == k for x in rows if x["domain"] == d and x["step"] == s] for s in steps]
                    curves[method, d] = [sum(h) / len(h) for h in hits]
        if curves:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            for (method, d), ys in curves.items():
                ax.plot(smooth(ys, 5), label=f"{method}: {d}")
            ax.set(title=f"share of a domain's prompts routed to its own RM ({setting})", xlabel="GRPO step",
                   ylim=(-0.02, 1.02))
            ax.legend(fontsize=7)
            fig.tight_layout()
            atomic_savefig(fig, run.dir / f"routing-share-{setting}.png")
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


def gates(r: dict) -> dict:
    """The benchmark's soundness gates (docs/benchmark.md, "the six gates"): {name: {pass, value, threshold}}. A failed gate is reported, never hidden.
      1 blind baseline: max over domains of (blind - chance) <= 0.05
      2 reference: min over domains of (reference - blind) >= 0.10, and overall <= 0.80
      3 client RMs: min over the domain experts (the clients named after a domain) of their RM's
        held-out pair accuracy on their own pairs >= 0.90; the scenario clients (bucket's weak,
        noisy's noisy, the narrow clients of many6 / many12) are what those settings study, and
        the noisy one cannot pass by construction: the RM matrix reports them
      4 oracle GRPO: min over domains of (oracle policy - reference), mean over seeds, >= 0.05
      5 no reward hacking: max over methods *and seeds* of the largest 10-step moving share of
        malformed samples during GRPO < 0.05: one hacked seed fails it, however clean the
        others (the final KL of each method is in the table)"""
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
        # per seed when the table has it (older results.json: the mean over seeds, all they kept)
        v = max(max(m["per_seed"]["malformed"]) if "malformed" in m.get("per_seed", {}) else m["malformed_share"]["mean"]
                for m in ms.values())
        out["5_no_reward_hacking"] = {"pass": v < 0.05, "value": v, "threshold": 0.05}
    return out


def _chance(exs: list[data.Example]) -> float:
    """Accuracy of a uniform guess among the answers the question admits (position questions
    name their two candidates, "left or right?", so chance is 1/2 there)."""
    d = exs[0].domain if exs else ""
    return 0.5 if d == "position" else 1.0 / len(data.DOMAIN_ANSWERS.get(d, [None]))


# The comparisons, (A, B) for "A - B", paired by seed: the paper's MoR (mor) against every
# baseline and reference row, then the frozen router's two forms against Avg RM and each other.
PAIRS = [("mor", "avg_rm"), ("mor", "weighted_rm"), ("mor", "best_single_rm"), ("mor", "fedavg_rm"),
         ("mor", "mor_hard"), ("mor", "mor_soft"), ("mor", "central_router"), ("mor", "random_hard"),
         ("mor", "min_rm"), ("mor", "uwo_rm"), ("mor", "fedavg_rm_oneshot"), ("mor_soft", "avg_rm"),
         ("mor_hard", "mor_soft")]
# Methods whose reward reads every client's RM, hence the weak client's (the change table's rows);
# the oracle, a single client's RM and FedAvg-RM never read it: their change is 0 by construction.
READS_EVERY_RM = ("mor", "mor_soft", "mor_hard", "avg_rm", "weighted_rm", "central_router", "random_hard",
                  "min_rm", "uwo_rm")


def _best_single(ms: dict) -> str | None:
    """The single client RM with the highest mean overall accuracy (E8's strongest single expert)."""
    singles = [k for k in ms if k.startswith("rm_")]
    return max(singles, key=lambda k: sum(ms[k]["per_seed"]["overall"]) / len(ms[k]["per_seed"]["overall"]),
               default=None)


def paired_comparisons(r: dict) -> dict:
    """{"A-B": {"overall": stats.paired(...), "<domain>": ...}} for every pair of PAIRS whose two
    methods were trained, on the seeds both share (docs/method.md, E9; harness/stats.py)."""
    ms, out = r["methods"], {}
    best = _best_single(ms)
    for a, b in PAIRS:
        b_name = best if b == "best_single_rm" else b
        if a not in ms or b_name not in ms or "per_seed" not in ms[a] or "per_seed" not in ms[b_name]:
            continue
        sa, sb = ms[a]["per_seed"], ms[b_name]["per_seed"]
        common = [s for s in sa["seeds"] if s in sb["seeds"]]
        ia, ib = [sa["seeds"].index(s) for s in common], [sb["seeds"].index(s) for s in common]
        entry = {"vs": b_name, "seeds": common,
                 "overall": stats.paired([sa["overall"][i] for i in ia], [sb["overall"][i] for i in ib])}
        for d in r["domains"]:
            entry[d] = stats.paired([sa["accuracy"][d][i] for i in ia], [sb["accuracy"][d][i] for i in ib])
        entry["crn"] = stats.crn_widths([sa["overall"][i] for i in ia], [sb["overall"][i] for i in ib])
        out[f"{a}-{b}"] = entry
    return out


def weak_client_effect(results: dict, without: dict) -> tuple[dict, dict]:
    """The weak-client settings against the main table, seed by seed on the seeds both ran, for
    the methods whose reward reads the weak client's RM (READS_EVERY_RM):
    table    {"without" | "with": {method: {domain: {mean, std}}}}  accuracy on those seeds;
    effect   {"<m>": paired(with, without), "<m>-<b>": paired(change of m, change of b)} overall,
             where change = with - without per seed (stats.paired; "mor-avg_rm" >= 0: MoR loses
             no more from the weak client than Avg RM does)."""
    doms, out, with_, change = results["domains"], {}, {}, {}
    effect = {}
    for m, r in results["methods"].items():
        if m not in READS_EVERY_RM or m not in without or "per_seed" not in without[m] or "per_seed" not in r:
            continue
        w1, w0 = r["per_seed"], without[m]["per_seed"]
        common = [s for s in w1["seeds"] if s in w0["seeds"]]
        if not common:  # nothing to pair: the two tables ran different seeds
            continue
        i1, i0 = [w1["seeds"].index(s) for s in common], [w0["seeds"].index(s) for s in common]
        out[m] = {d: _mean_std([w0["accuracy"][d][i] for i in i0]) for d in doms}
        with_[m] = {d: _mean_std([w1["accuracy"][d][i] for i in i1]) for d in doms}
        a, b = [w1["overall"][i] for i in i1], [w0["overall"][i] for i in i0]
        effect[m] = dict(stats.paired(a, b), seeds=common)
        change[m] = dict(zip(common, (x - y for x, y in zip(a, b))))
    for m in change:
        for base in ("avg_rm", "weighted_rm"):
            common = [s for s in change[m] if s in change.get(base, {})]
            if m != base and common and not m.endswith("_rm"):
                effect[f"{m}-{base}"] = dict(stats.paired([change[m][s] for s in common],
                                                          [change[base][s] for s in common]), seeds=common)
    return {"without": out, "with": with_}, effect


def many_clients(run_dir, setting: str, results: dict) -> dict:
    """{"seeds": the GRPO seeds every K's table ran, "K": [{setting, K, methods: {m: {overall
    {mean, std}, seconds_per_step, reward_seconds_per_step, rm_rows_per_step}}, "mor-avg_rm":
    stats.paired overall, router {rounds, seconds}, memory {peak_rss_mb, rm_params_mb}}]} for this
    setting's table and the smaller K's before it. Accuracies and the paired MoR - Avg RM are on
    the common seeds, so every K is measured on the same prompt orders and sampler streams."""
    tables = []
    for name, file in MANY_K:
        r = results if name == setting else (json.loads((run_dir / file).read_text())
                                             if (run_dir / file).exists() else None)
        if r and r.get("methods"):
            tables.append((name, r))
        if name == setting:
            break
    want = MANY_METHODS.split(",")
    seeds = None
    for _, r in tables:
        for m in want:
            if m in r["methods"]:
                s = set(r["methods"][m]["seeds"])
                seeds = s if seeds is None else seeds & s
    seeds = sorted(seeds or [])
    out = {"seeds": seeds, "K": []}
    for name, r in tables:
        K = len(r["rm_pair_accuracy"]) if "rm_pair_accuracy" in r else None
        on = {}
        for m in want:
            if m not in r["methods"]:
                continue
            x, idx = r["methods"][m], [r["methods"][m]["seeds"].index(s) for s in seeds]
            on[m] = [x["per_seed"]["overall"][i] for i in idx]
        row = {"setting": name, "K": K,
               "methods": {m: {"overall": _mean_std(v), **{k: r["methods"][m].get(k) for k in (
                   "seconds_per_step", "reward_seconds_per_step", "rm_rows_per_step")}} for m, v in on.items()}}
        if "mor" in on and "avg_rm" in on and seeds:
            row["mor-avg_rm"] = stats.paired(on["mor"], on["avg_rm"])
        rs = run_dir / f"router-{name}.json"
        if rs.exists():
            x = json.loads(rs.read_text())
            row["router"] = {"rounds": len(x["rounds"]), "seconds": x["seconds"]}
        row["memory"] = {k: max((m.get(k) or 0.0) for m in r["methods"].values())
                         for k in ("peak_rss_mb", "rm_params_mb")}
        out["K"].append(row)
    return out


def many_clients_markdown(t: dict) -> list[str]:
    if not t.get("K") or not t["seeds"]:
        return []
    ms = [m for m in MANY_METHODS.split(",") if any(m in row["methods"] for row in t["K"])]

    def cell(x, key, fmt):
        v = x.get(key)
        return "n/a" if not v else fmt(v)

    out = ["", f"Many clients: the federation grows (pipeline.MANY). Overall accuracy (%) mean +/- std on the seeds "
           f"every K ran ({','.join(map(str, t['seeds']))}); MoR - Avg RM paired by seed with its 95% interval", "",
           "| K | setting | " + " | ".join(ms) + " | MoR - Avg RM |", "|---|---|" + "---|" * (len(ms) + 1)]
    for row in t["K"]:
        acc = [f"{100 * row['methods'][m]['overall']['mean']:.1f} +/- {100 * row['methods'][m]['overall']['std']:.1f}"
               if m in row["methods"] else "n/a" for m in ms]
        d = row.get("mor-avg_rm")
        out.append(f"| {row['K']} | {row['setting']} | " + " | ".join(acc) + f" | {_ci(d) if d else 'n/a'} |")
    out += ["", "Cost per GRPO step as K grows: seconds per step (mean over seeds; the reward call's part in "
            "brackets), RM rows scored per step; router rounds and wall time (precompute + rounds); the GRPO "
            "workers' peak memory and the K RMs' parameters", "",
            "| K | " + " | ".join(f"{m} s/step [reward]" for m in ms) + " | " + " | ".join(f"{m} rows" for m in ms)
            + " | router rounds, s | peak RSS MB | RM params MB |", "|---|" + "---|" * (2 * len(ms) + 3)]
    for row in t["K"]:
        x = row["methods"]
        sec = [f"{x[m]['seconds_per_step']['mean']:.2f} [{x[m]['reward_seconds_per_step']['mean']:.2f}]"
               if m in x and x[m].get("reward_seconds_per_step") else
               cell(x.get(m, {}), "seconds_per_step", lambda v: f"{v['mean']:.2f}") for m in ms]
        rows = [cell(x.get(m, {}), "rm_rows_per_step", lambda v: f"{v['mean']:.0f}") for m in ms]
        rt = row.get("router")
        rt = f"{rt['rounds']}, {rt['seconds']['precompute']:.0f} + {rt['seconds']['rounds']:.0f}" if rt else "n/a"
        out.append(f"| {row['K']} | " + " | ".join(sec) + " | " + " | ".join(rows) + f" | {rt} "
                   f"| {row['memory']['peak_rss_mb']:.0f} | {row['memory']['rm_params_mb']:.0f} |")
    return out


def many_clients_plot(t: dict, path) -> None:
    """Accuracy and seconds per GRPO step against K, one line per method (the K table's numbers)."""
    plt = _pyplot()
    if plt is None:  # plots() says so, once
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in MANY_METHODS.split(","):
        pts = [(row["K"], row["methods"][m]) for row in t["K"] if m in row["methods"]]
        if not pts:
            continue
        ks = [k for k, _ in pts]
        a1.errorbar(ks, [100 * x["overall"]["mean"] for _, x in pts], yerr=[100 * x["overall"]["std"] for _, x in pts],
                    marker="o", capsize=3, label=m)
        if all(x.get("seconds_per_step") for _, x in pts):
            a2.plot(ks, [x["seconds_per_step"]["mean"] for _, x in pts], marker="o", label=m)
    ks = sorted({row["K"] for row in t["K"]})
    a1.set(xlabel="K client RMs", ylabel="test accuracy (%)", title=f"accuracy (seeds {t['seeds']})", xticks=ks)
    a2.set(xlabel="K client RMs", ylabel="seconds per GRPO step", title="step time", xticks=ks)
    a2.set_ylim(bottom=0)  # ratios, not differences, are the claim: the axis starts at zero
    a1.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


# The paper's claims, each on the paper's method (mor), and ours, labelled: (text, pair key, source).
# A claim "A beats B" holds when the 95% interval of A - B lies above 0, does not hold when it lies
# below 0, and is not settled otherwise (stats.verdict); no claim is one-sided "within N points".
CLAIMS = [("MoR beats the plain average of the client RMs (Avg RM)", "mor-avg_rm", "paper"),
          ("MoR beats the sample-weighted average (Weighted RM)", "mor-weighted_rm", "paper"),
          ("MoR beats the best single client RM", "mor-best_single_rm", "paper"),
          ("MoR beats parameter FedAvg of one RM (FedAvg-RM, homogeneous setting)", "mor-fedavg_rm", "paper"),
          ("Updating the router online beats the frozen router (mor - mor_hard)", "mor-mor_hard", "paper"),
          ("ours: MoR beats the frozen router's soft mixture (mor_soft)", "mor-mor_soft", "ours"),
          ("ours: the frozen router's soft mixture beats Avg RM", "mor_soft-avg_rm", "ours")]
PREMISE = 0.03  # the bucket claim's premise: Avg RM loses at least this much to the weak client, at 95%


def claims(r: dict) -> list[dict]:
    """[{claim, source, comparison, mean, ci95_low, ci95_high, p, wins, n, verdict}] for the
    claims whose methods ran; in a weak-client setting also the bucket claim (bucket_claim)."""
    out = []
    for text, key, source in CLAIMS:
        c = r.get("paired", {}).get(key)
        if c:
            o = c["overall"]
            out.append({"claim": text, "source": source, "comparison": f"{key.split('-')[0]} - {c['vs']}",
                        **{k: o[k] for k in ("mean", "ci95_low", "ci95_high", "p", "wins", "n")},
                        "verdict": stats.verdict(o)})
    bucket = bucket_claim(r.get("weak_client_effect", {}))
    return out + ([bucket] if bucket else [])


def bucket_claim(effect: dict) -> dict | None:
    """The paper's bucket effect on the weak-client setting's paired table: "MoR loses less than
    Avg RM to a weak client", i.e. change(mor) - change(avg_rm) > 0 at 95% (change = with -
    without the weak client, per seed). Its premise is that the weak client hurts the average:
    Avg RM's change lies below -PREMISE at 95%; when it does not, the verdict is "premise fails"
    whatever MoR did (a weak client that does not hurt cannot show that routing resists it)."""
    c, avg = effect.get("mor-avg_rm"), effect.get("avg_rm")
    if not c or not avg:
        return None
    held = avg["ci95_high"] is not None and avg["ci95_high"] < -PREMISE
    verdict = stats.verdict(c) if held else (f"premise fails (Avg RM's change {_ci(avg)}, needs < "
                                             f"{-100 * PREMISE:.0f} points at 95%)")
    return {"claim": "MoR loses less than Avg RM to a weak client (bucket effect)", "source": "paper",
            "comparison": "change(mor) - change(avg_rm)", "premise": held,
            **{k: c[k] for k in ("mean", "ci95_low", "ci95_high", "p", "wins", "n")}, "verdict": verdict}


def _ci(c: dict) -> str:
    pct = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    if c["ci95_low"] is None:
        return f"{pct(c['mean'])} (1 seed)"
    return f"{pct(c['mean'])} [{pct(c['ci95_low'])}, {pct(c['ci95_high'])}]"


def paired_markdown(r: dict) -> list[str]:
    """The paired differences table and the claims table, as markdown lines."""
    if not r.get("paired"):
        return []
    doms = r["domains"]
    out = ["", "Paired differences A - B by seed, accuracy points: mean [95% interval]; p of the paired "
           "t-test; wins = seeds where A is ahead; CRN = width of the overall interval paired by seed "
           "(common prompt order and sampler stream) / its mean width with the seeds mismatched, i.e. "
           "as independent runs would give (harness/stats.py)", "",
           "| A - B | overall | " + " | ".join(doms) + " | p | wins | CRN width |", "|---|" + "---|" * (len(doms) + 4)]
    for key, c in r["paired"].items():
        p = "n/a" if c["overall"]["p"] is None else f"{c['overall']['p']:.3f}"
        crn = c.get("crn")
        w = f"{100 * crn['paired']:.1f} / {100 * crn['mismatched']:.1f}" if crn else "n/a"
        out.append(f"| {key.split('-')[0]} - {c['vs']} | {_ci(c['overall'])} | "
                   + " | ".join(_ci(c[d]) for d in doms)
                   + f" | {p} | {c['overall']['wins']}/{c['overall']['n']} | {w} |")
    if r.get("claims"):
        out += ["", "Claims: the paper's, each on the paper's MoR (mor), and ours, labelled; a verdict at 95% "
                "from the paired intervals (generated by the eval stage; seeds = the seeds both methods ran)", "",
                "| claim | source | comparison | seeds | difference [95% interval] | verdict |", "|---|---|---|---|---|---|"]
        out += [f"| {c['claim']} | {c.get('source', 'paper')} | {c['comparison']} | {c['n']} | {_ci(c)} "
                f"| {c['verdict']} |" for c in r["claims"]]
    return out


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

    if r.get("chance"):  # the embedded benchmark's soundness rows (not defined on an own task)
        lines += [row("chance", r["chance"]), row("blind (question only)", r["blind"])]
    lines += [row("reference (SFT)", r["reference"])]
    out = ["# mor results", "", f"Test questions per domain: {r['eval_questions_per_domain']}; "
           f"data seed {r.get('data_seed')}, GRPO seeds {r['seeds']}. Accuracy in %, greedy answers, exact match.", ""] + lines
    if r.get("methods"):
        out += ["", f"GRPO-aligned policies: accuracy (%) mean +/- std over seeds {r['seeds']}; "
                "win rate vs the reference (%); max 10-step malformed share of samples during training (%); "
                "final KL; RM rows scored per step (distinct samples x RMs run); seconds per GRPO step", "",
                "| method | " + " | ".join(doms) + " | overall | win rate | malformed | KL | RM rows/step | s/step |",
                "|---|" + "---|" * (len(doms) + 6)]
        n = r["eval_questions_per_domain"]  # overall = question-weighted mean of the domains
        # table order = E8's order (results.json stores its keys sorted)
        order = ["oracle", "mor", "mor_soft", "mor_hard", "avg_rm", "weighted_rm", "fedavg_rm", "fedavg_rm_oneshot",
                 "central_router", "random_hard", "min_rm", "uwo_rm"]
        names = sorted(r["methods"], key=lambda k: (order.index(k) if k in order else len(order), k))
        for name, m in ((k, r["methods"][k]) for k in names):
            acc = {d: m["accuracy"][d]["mean"] for d in doms}
            if m.get("seeds") and m["seeds"] != r["seeds"]:  # the single-RM rows keep fewer seeds
                name = f"{name} (seeds {','.join(map(str, m['seeds']))})"
            overall = sum(acc[d] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
            wr = sum(m["win_rate"][d]["mean"] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)
            out.append(f"| {name} | " + " | ".join(f"{100 * m['accuracy'][d]['mean']:.1f} +/- "
                                                  f"{100 * m['accuracy'][d]['std']:.1f}" for d in doms)
                       + f" | {100 * overall:.1f} | {100 * wr:.1f} | {100 * m['malformed_share']['mean']:.1f} "
                       f"| {m['final_kl']['mean']:.3f} | {m.get('rm_rows_per_step', {}).get('mean', 0):.0f} "
                       f"| {m.get('seconds_per_step', {}).get('mean', 0):.2f} |")
    out += paired_markdown(r)
    own = {k: m["routing_own_share"] for k, m in r.get("methods", {}).items() if m.get("routing_own_share")}
    if own:  # hard routing: does each domain's prompt go to its own client's RM, first vs last 10 steps?
        doms_own = list(next(iter(own.values())))
        out += ["", "Hard routing: share of each domain's prompts routed to its own client's RM (%), "
                "first -> last 10 GRPO steps, mean over seeds", "",
                "| method | " + " | ".join(doms_own) + " |", "|---|" + "---|" * len(doms_own)]

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}"

        for k, sh in own.items():
            out.append(f"| {k} | " + " | ".join(f"{pct(sh[d]['start'])} -> {pct(sh[d]['end'])}" for d in doms_own) + " |")
    for name, m in r.get("methods", {}).items():
        if "nts_arm_share" in m:
            share = m["nts_arm_share"]
            out += ["", f"{name}: share of prompts routed to each RM (rows: domain of the prompt), final "
                    f"mean posterior variance {m['nts_final_variance']['mean']:.3f}", "",
                    matrix_markdown(share, list(next(iter(share.values()))), "domain \\ RM")]
    if r.get("without_weak_client", {}).get("without"):
        # overall accuracy (question-weighted) with and without the weak client, same seeds
        def overall(acc):
            return sum(acc[d]["mean"] * n[d] for d in doms) / max(sum(n[d] for d in doms), 1)

        weak, what = WEAK_CLIENTS.get(r.get("setting"), ("weak", "a fourth client"))
        out += ["", f"Weak client: accuracy (%) without and with the fourth client `{weak}` "
                f"({what}), mean over the seeds both tables ran", "",
                "| method | " + " | ".join(f"{d} without / with" for d in doms) + " | overall without | with | change |",
                "|---|" + "---|" * (len(doms) + 3)]
        for name, acc0 in r["without_weak_client"]["without"].items():
            acc1 = r["without_weak_client"]["with"][name]
            eff = r.get("weak_client_effect", {}).get(name)
            out.append(f"| {name} | " + " | ".join(f"{100 * acc0[d]['mean']:.1f} / {100 * acc1[d]['mean']:.1f}"
                                                  for d in doms)
                       + f" | {100 * overall(acc0):.1f} | {100 * overall(acc1):.1f} "
                       f"| {_ci(eff) if eff else f'{100 * (overall(acc1) - overall(acc0)):+.1f}'} |")
        diffs = {k: e for k, e in r.get("weak_client_effect", {}).items() if "-" in k}
        if diffs:  # does MoR lose less than the averages? paired by seed: change(A) - change(B)
            out += ["", "Change from the weak client, A's minus B's, paired by seed (accuracy points, 95% interval; "
                    ">= 0: A loses no more than B)", "", "| A - B | change difference | verdict |", "|---|---|---|"]
            out += [f"| {k.replace('-', ' - ')} | {_ci(e)} | {stats.verdict(e)} |" for k, e in diffs.items()]
        avg = r.get("weak_client_effect", {}).get("avg_rm")
        if avg:  # the bucket claim's premise, in the setting's own table
            held = avg["ci95_high"] is not None and avg["ci95_high"] < -PREMISE
            out += ["", f"Premise of the bucket claim (Avg RM loses >= {100 * PREMISE:.0f} points at 95%): Avg RM's "
                    f"change {_ci(avg)}: {'holds' if held else 'premise fails'}"]
    out += many_clients_markdown(r.get("many_clients", {}))
    if "rm_pair_accuracy" in r:
        # columns: the domains' experts' held-out pairs, then any other client's (a narrow client's
        # pairs are its subset of a domain; a user client's its own task)
        have = next(iter(r["rm_pair_accuracy"].values()))
        order = doms + MANY.get(r.get("setting"), [])  # results.json sorts its keys: the federation's order
        cols = [c for c in order if c in have] + sorted(k for k in have if k not in order)
        out += ["", f"Client reward models ({r.get('setting', '')} setting), held-out pair accuracy (%): "
                "row = reward model, column = the client whose held-out pairs (the domains' experts first)", "",
                matrix_markdown(r["rm_pair_accuracy"], cols, corner="RM \\ pairs of")]
    if r.get("own_task"):
        out += ["", "Own task (--prompts / --eval / --sft-data): the embedded benchmark's gates, chance and "
                "blind rows are not computed" + ("" if "oracle" in r.get("methods", {}) else
                                                 ", and there is no oracle row (the prompt pool has no gold "
                                                 "answers)") + f". Judge: {r.get('judge', 'exact')}."]
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
