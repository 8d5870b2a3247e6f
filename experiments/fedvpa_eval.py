"""FedVPA-GP's evaluation, split from experiments/fedvpa_table.py: what a trained VPA is measured by (held-out pair
accuracy under a client's posterior, -ELBO, group purity, collapse), and the answer styles of
the conflict benchmark in a *policy's* answers, for GRPO with a VPA client RM (experiments/fedvpa_table.py --grpo):
which convention an answer follows, a judge that accepts both, the server's format guard with
both conventions well-formed, and the log-probability the policy gives each style.

experiments/fedvpa_table.py re-exports the metrics (vpa.evaluate, vpa.heldout_accuracy, vpa.neg_elbo, ...).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import grpo
import models
from fedvpa import VPA, ClientFeatures, entropy, episode_terms, episodes
from judge import generate as generate_answers  # E9's generate (vpa_eval.evaluate is the VPA metrics)


def _ms(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "values": xs}


def _pct(d: dict) -> str:
    return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"


# Student t, two-sided 95%, by degrees of freedom 1..9 (paired intervals over 2-10 seeds)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def paired(a: list[float], b: list[float]) -> dict:
    """Paired difference a - b over seeds (same seed, same data): mean and the 95% t-interval
    mean ± t_{n-1} sd / sqrt(n); `holds` when the interval excludes 0 on a's side."""
    d = [x - y for x, y in zip(a, b)]
    m = _ms(d)
    half = T95[len(d) - 2] * m["std"] / len(d) ** 0.5 if 2 <= len(d) <= 10 else float("nan")
    return {"mean": m["mean"], "lo": m["mean"] - half, "hi": m["mean"] + half, "values": d}


# ----------------------------------------------------------------------------------------------
# Evaluation: posterior, accuracy, purity, collapse
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def client_posterior(model: VPA, client: ClientFeatures, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's posterior from S context sets of C of its own training pairs:
    (q_k [P] = mean of the S posteriors, q_s [S, P] each set's posterior)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ctx, _ = episodes(client.n, cfg.eval_contexts, cfg.context, 1, g)
    q = F.softmax(model.posterior_logits(client.train_w[ctx], client.train_l[ctx]), -1)  # [S, P]
    return q.mean(0), q


@torch.no_grad()
def neg_elbo(model: VPA, clients: list[ClientFeatures], prior: torch.Tensor, seed: int = 0, held: bool = False) -> float:
    """-ELBO per target pair (V4, exact expectation over q), n_k-weighted over clients, on fixed
    episodes: comparable across rounds. held=True draws the targets from held-out pairs (context
    still from training pairs)."""
    tot, n = 0.0, 0
    cfg = model.cfg
    for k, c in enumerate(clients):
        g = torch.Generator().manual_seed(seed * 7919 + k)
        ctx, tgt = episodes(c.n, cfg.eval_contexts, cfg.context, cfg.targets, g)
        if held:
            if c.held_w.shape[0] == 0:
                continue
            tgt = torch.randint(c.held_w.shape[0], tgt.shape, generator=g)
        w = torch.cat([c.train_w, c.held_w]) if held else c.train_w
        l = torch.cat([c.train_l, c.held_l]) if held else c.train_l
        o = episode_terms(model, w, l, ctx, tgt + (c.n if held else 0), prior, None)
        tot += c.n * (-(o["loglik"] - model.cfg.beta * o["kl"]) / cfg.targets).mean().item()
        n += c.n
    return tot / n


@torch.no_grad()
def heldout_accuracy(model: nn.Module, client: ClientFeatures, q: torch.Tensor | None = None) -> float:
    """Share of the client's held-out pairs where r(chosen) > r(rejected). VPA: the posterior-mean
    reward E_q[r(x, y, z)] under the client's q [P] (from its training pairs only)."""
    if client.held_w.shape[0] == 0:
        return float("nan")
    if isinstance(model, VPA):
        rw, rl = model.reward_all(client.held_w) @ q, model.reward_all(client.held_l) @ q
    else:
        rw, rl = model(client.held_w), model(client.held_l)
    return (rw > rl).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, clients: list[ClientFeatures], prior: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Per-client held-out accuracy; for VPA also the latent's structure:
    client purity  = mean over clients of the share of its S context sets whose MAP prototype is
                     the client's most frequent one (1: the client always lands on one z);
    group purity   = cluster purity of the MAP prototypes against the true groups (sum over z of
                     its majority group's count / all sets; 1: z separates the groups, 1/G: no info);
    used           = prototypes holding >= 5% of all MAP assignments; H(qbar) = entropy of the
                     n-weighted aggregate posterior; H(q) = mean entropy of single posteriors.
    Collapse (the failure the orthogonal loss and the mixture prior target) = used 1, group
    purity at its floor; `collapsed` = group purity < 0.9 or fewer than 2 prototypes used."""
    out = {"accuracy": {}}
    if not isinstance(model, VPA):
        for c in clients:
            out["accuracy"][c.name] = heldout_accuracy(model, c)
        return out
    P = model.cfg.prototypes
    groups = sorted({c.group for c in clients})
    counts = torch.zeros(P, len(groups))  # MAP assignments per prototype and group
    client_purity, q_ent, qbars, ns, assign = [], [], [], [], {}
    for k, c in enumerate(clients):
        qk, qs = client_posterior(model, c, seed * 31 + k)
        out["accuracy"][c.name] = heldout_accuracy(model, c, qk)
        m = torch.bincount(qs.argmax(-1), minlength=P).float()  # [P]
        counts[:, groups.index(c.group)] += m
        client_purity.append((m.max() / m.sum()).item())
        q_ent.append(entropy(qs).mean().item())
        qbars.append(qk * c.n)
        ns.append(c.n)
        assign[c.name] = int(m.argmax())
    qbar = torch.stack(qbars).sum(0) / sum(ns)
    share = counts.sum(1) / counts.sum()
    v = F.normalize(model.prototypes.detach(), dim=-1)
    cos = (v @ v.T).abs()
    purity, used = (counts.max(1).values.sum() / counts.sum()).item(), int((share >= 0.05).sum())
    out.update({
        "client_purity": sum(client_purity) / len(client_purity),
        "group_purity": purity,
        "used": used,
        "collapsed": bool(purity < 0.9 or used < 2) if len(groups) > 1 else None,
        "H_qbar": entropy(qbar).item(),
        "H_q": sum(q_ent) / len(q_ent),
        "max_cos": (cos - torch.eye(P)).max().item(),
        "assignment": assign,
        "prior": prior.tolist() if prior is not None else None,
    })
    return out


# ----------------------------------------------------------------------------------------------
# The two answer styles in a policy's answers (GRPO with a VPA client RM)
# ----------------------------------------------------------------------------------------------


def full_answer(prompt: str, answer: str) -> str:
    """The "full sentence" style of an answer, in the benchmark's vocabulary:
    colour/shape -> "the shape is red", position -> "the shape is on the left" / "at the top".
    (The prompt is not read: the answer word fixes the sentence.)"""
    if answer in ("left", "right"):
        return f"the shape is on the {answer}"
    if answer in ("top", "bottom"):
        return f"the shape is at the {answer}"
    return f"the shape is {answer}"


_FULL = re.compile(r"the shape is (?:on the |at the )?([a-z]+)")
STYLES = ("terse", "full", "other")


def answer_style(response: str) -> tuple[str, str | None]:
    """(style, answer word) of a response in either convention of the conflict benchmark:
      ("terse", "red")  "red<|im_end|>"                (data.extract_answer's well-formed answer)
      ("full", "red")   "the shape is red<|im_end|>"   (exactly full_answer(., w) + end token)
      ("other", None)   anything else: malformed in both conventions."""
    w = data.extract_answer(response)
    if w is not None:
        return "terse", w
    body = response[: -len(data.EOS)].strip() if response.endswith(data.EOS) else None
    m = _FULL.fullmatch(body) if body else None
    if m and body == full_answer("", m[1]):
        return "full", m[1]
    return "other", None


class StyleJudge:
    """evaluate.evaluate's judge when both conventions are legitimate: right iff the answer word,
    in either style, is the gold one (exact_match would count every full sentence wrong). It
    tallies the style of every response it judges: `shares()` -> {terse, full, other} of the
    policy's greedy answers, from the same generate pass as the accuracy."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, response: str, gold: str) -> bool:
        style, w = answer_style(response)
        self.counts[style] += 1
        return w == gold.strip().lower()

    def shares(self) -> dict:
        n = max(sum(self.counts.values()), 1)
        return {s: self.counts[s] / n for s in STYLES}


class StyleGuard:
    """A reward callable for grpo.train_grpo around another one (a SingleReward of a client RM):
    the server's format guard (grpo.format_guard: a malformed sample scores one below the lowest
    well-formed one of its group) with *either* convention well-formed. GRPOConfig.format_guard's
    rule (one word + end token) would rank every full sentence last, for every RM alike, and so
    decide the style before the RM is asked; run it with GRPOConfig(format_guard=False).

    `log`: per step the share of each style among the N*G samples and, when `gold` {(image,
    prompt): answer} is given (the evaluator's; never part of the reward), their accuracy in
    either style. `calls` is the inner reward's (RM rows scored)."""

    def __init__(self, inner, group: int, gold: dict | None = None):
        self.inner, self.group, self.gold = inner, group, gold
        self.log: list[dict] = []

    @property
    def calls(self):
        return getattr(self.inner, "calls", None)

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        r = self.inner(images, prompts, responses, e)  # [N*G] standardised client-RM rewards
        parsed = [answer_style(o) for o in responses]
        n = len(parsed)
        entry = {s: sum(p[0] == s for p in parsed) / n for s in STYLES}
        if self.gold is not None:
            entry["accuracy"] = sum(w == self.gold[(i, q)] for (_, w), i, q in zip(parsed, images, prompts)) / n
        self.log.append(entry)
        return grpo.format_guard(r, torch.tensor([s != "other" for s, _ in parsed]), self.group)


@torch.no_grad()
def style_logprobs(vlm, encoder: models.Encoder, examples: list[data.Example]) -> dict:
    """Mean log pi(y | x) over `examples` (gold answers) of the terse and the full answer, by
    teacher forcing through grpo's own scoring path (response_batch, token_logprobs, the same
    banned tokens as sampling): can GRPO's sampling reach a style at all? {"terse": nats,
    "full": nats}."""
    tok = encoder.tok
    pb = encoder([e.image for e in examples], [e.prompt for e in examples])  # [B, Tp] left-padded
    feats = models.image_features(vlm, pb, list(range(len(examples))))
    out = {}
    for style in ("terse", "full"):
        texts = [(e.answer if style == "terse" else full_answer(e.prompt, e.answer)) + data.EOS for e in examples]
        ids = [tok.convert_tokens_to_ids(tok.tokenize(t)) for t in texts]
        new = torch.full((len(ids), max(map(len, ids))), encoder.pad_id)  # [B, Tn], right-padded
        for i, x in enumerate(ids):
            new[i, :len(x)] = torch.tensor(x)
        rb = grpo.response_batch(pb, new, 1, encoder.eos_id)
        lp = grpo.token_logprobs(vlm, rb, feats, encoder.banned_ids)  # [B, T-1], 0 off the response
        out[style] = lp.sum(1).mean().item()
    return out


@torch.no_grad()
def sampled_styles(vlm, encoder: models.Encoder, examples: list[data.Example], max_new_tokens: int,
                   samples: int = 8) -> dict:
    """Share of each style among `samples` temperature-1 samples per question, drawn as GRPO draws
    them (evaluate.generate, no top-k/top-p, banned tokens suppressed); seed the global RNG first.
    {terse, full, other, n}."""
    out = generate_answers(vlm, encoder, [e.image for e in examples], [e.prompt for e in examples],
                            max_new_tokens, greedy=False, num_return_sequences=samples)
    c = Counter(answer_style(r)[0] for r in out)
    return {**{s: c[s] / len(out) for s in STYLES}, "n": len(out)}


def _ci(p: dict) -> str:
    return f"{100 * p['mean']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]"


def latent_rows_markdown(res: dict) -> list[str]:
    """The latent rows' structure figures (experiments/fedvpa_table.py's grid): prototypes used,
    H(q) of the last round, the final prior of the first two seeds, prototype cosines, -ELBO, KL."""
    lines = ["\n| latent row | prototypes used per seed | H(q) nats | final prior | max abs cos | "
              "-ELBO/pair (held-out) | KL(q‖N(0,I)) |", "|---|---|---|---|---|---|---|"]
    for m, e in res.items():
        if "group_purity" not in e:
            continue
        ps = e["per_seed"]
        used = " ".join(str(x["used"]) for x in ps) if ps[0].get("used") is not None else "-"
        hq = f"{_ms([x['rounds'][-1]['H_q'] for x in ps])['mean']:.2f}"
        prior = " / ".join(" ".join(f"{v:.2f}" for v in x["prior"]) for x in ps[:2]) + " ..." if ps[0].get("prior") else "-"
        lines.append(f"| {m} | {used} | {hq} | {prior} | {e['max_cos']['mean']:.2f} | "
                     + (f"{e['neg_elbo_heldout']['mean']:.3f}" if "neg_elbo_heldout" in e else "-") + " | "
                     + (f"{e['kl_normal']['mean']:.2f}" if "kl_normal" in e else "-") + " |")
    return lines


def rounds_markdown(ev: dict, title: str) -> list[str]:
    """The per-round figures of one run: prior, hard-sample usage, H(q), KL (the collapse trace)."""
    lines = [f"\n{title}\n", "| round | prior pi | usage of hard samples | H(q) | KL(q‖pi) | train acc |", "|---|---|---|---|---|---|"]
    for e in ev["rounds"]:
        lines.append(f"| {e['round']} | {' '.join(f'{x:.2f}' for x in e.get('prior', []))} | "
                     f"{' '.join(f'{x:.2f}' for x in e.get('usage', []))} | {e['H_q']:.3f} | {e['kl']:.3f} | {e['acc']:.3f} |")
    return lines


@torch.no_grad()
def rm_diagnostics(rm, members: list[ClientFeatures], is_style: dict, e_style: torch.Tensor, e_answers: torch.Tensor,
                   gold: torch.Tensor) -> dict:
    """What a client RM (any FeatureRewardModel) prefers, on the client's own features:
      heldout_accuracy {group}: its held-out pairs (members: one ClientFeatures per group), split into
        answer_pairs: right answer + end token vs one wrong / malformed response (both groups agree),
        style_pairs {group}: the group's style pairs (is_style {group: [N_h] bool}, held_w's row order);
      answer_top1: share of the client's questions whose right answer the RM ranks first among all
        the domain's answer words (e_answers [Q, K, D], gold [Q] indices), what GRPO's terse samples
        compete on (a pair holds one wrong answer, a GRPO group several);
      prefers_full: share of questions with r(full sentence) > r(terse answer) (e_style [Q, 2, D])."""
    r = rm.rewards(e_style.flatten(0, 1)).view(-1, 2)  # [Q, 2]
    ra = rm.rewards(e_answers.flatten(0, 1)).view(e_answers.shape[:2])  # [Q, K]
    right = {c.group: rm.rewards(c.held_w) > rm.rewards(c.held_l) for c in members}  # [N_h] per group
    return {"prefers_full": (r[:, 0] > r[:, 1]).float().mean().item(),
            "answer_top1": (ra.argmax(1) == gold).float().mean().item(),
            "answer_pairs": torch.cat([right[g][~is_style[g]] for g in right]).float().mean().item(),
            "style_pairs": {g: right[g][is_style[g]].float().mean().item() for g in right},
            "heldout_accuracy": {g: right[g].float().mean().item() for g in right}}


def grpo_markdown(res: dict) -> list[str]:
    """The "GRPO with a VPA client RM" section of vpa-results.md from grpo_experiment's result."""
    d, g = res["domain"], res["grpo_config"]
    n = len(next(iter(next(iter(res["runs"].values())).values())))
    lines = ["\n## GRPO with a VPA client RM\n",
             f"Regenerate: `{res.get('command', 'python -m experiments.fedvpa_table --grpo')}` ({res.get('seconds', 0):.0f} s on "
             f"{res.get('threads', 1)} CPU thread(s)). The {d} client holds both groups ({res['pairs']['terse']} terse "
             f"and {res['pairs']['full']} full pairs); GRPO (E5, unchanged) on {d} prompts of the pool with one client "
             f"RM as mixture.SingleReward: *VPA full* / *VPA terse* = its VPA client RM fixed to that group's posterior, "
             f"*BT* = MonolithicBT on the same features and the same mixed pairs. {g['steps']} steps x "
             f"{g['prompts']} prompts x G={g['group']}, lr {g['lr']}, beta {g['beta']}, max_new_tokens "
             f"{g['max_new_tokens']} (a full {d} answer takes {res['full_tokens']} tokens; the pipeline's default 4 "
             "cannot hold it); the format guard counts both conventions well-formed. Accuracy: greedy test answers, "
             "right in either style. Mean ± std over the training seeds (the RMs' and GRPO's) "
             f"{res['seeds'][:n]}.\n",
             "Can GRPO sample the full style? (log pi of the gold answer in each style, mean over 32 pool "
             "questions; style shares of 8 samples at temperature 1 on 64 questions; greedy test answers)\n",
             "| start policy | log pi(terse) | log pi(full) | sampled terse / full / other | test accuracy | "
             "greedy full share |", "|---|---|---|---|---|---|"]
    for name, st in res["starts"].items():
        sm = st["sampled"]
        lines.append(f"| {name} | {st['logp']['terse']:.1f} | {st['logp']['full']:.1f} | {100 * sm['terse']:.1f} / "
                     f"{100 * sm['full']:.1f} / {100 * sm['other']:.1f} | {100 * st['accuracy']:.1f} | "
                     f"{100 * st['greedy']['full']:.1f} |")
    lines += ["\nThe client RMs (%): on its held-out pairs, the answer pairs both groups agree on and each group's "
              "style pairs; on its questions, *right answer first* = the right answer word ranked first among all the "
              "domain's answer words, *prefers full* = r(full sentence) > r(terse answer); VPA: group purity of the "
              "client's local run (0.50: collapsed, both posteriors on one prototype):\n",
              "| RM | answer pairs | style pairs, full group | style pairs, terse group | right answer first | "
              "prefers full | group purity per seed |", "|---|---|---|---|---|---|---|"]
    for arm, per in res["rms"].items():
        pur = " ".join("-" if x["group_purity"] is None else f"{x['group_purity']:.2f}" for x in per)
        lines.append(f"| {arm} | {_pct(_ms([x['answer_pairs'] for x in per]))} | "
                     + " | ".join(_pct(_ms([x["style_pairs"][g] for x in per])) for g in ("full", "terse"))
                     + "".join(f" | {_pct(_ms([x[k] for x in per]))}" for k in ("answer_top1", "prefers_full"))
                     + f" | {pur} |")
    lines += ["\nAfter GRPO (full share: of greedy test answers; sampled: of the last 10 steps' samples):\n",
              "| start | client RM | test accuracy | full share | terse share | other | sampled full | KL | "
              "full share per seed | s per run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for start, arms in res["runs"].items():
        for arm, per in arms.items():
            full = [x["greedy"]["full"] for x in per]
            lines.append(
                f"| {start} | {arm} | {_pct(_ms([x['accuracy'] for x in per]))} | {_pct(_ms(full))} | "
                f"{_pct(_ms([x['greedy']['terse'] for x in per]))} | {_pct(_ms([x['greedy']['other'] for x in per]))} | "
                f"{_pct(_ms([x['sampled_last10']['full'] for x in per]))} | "
                f"{_ms([x['kl_last10'] for x in per])['mean']:.3f} | {' '.join(f'{100 * f:.0f}' for f in full)} | "
                f"{_ms([x['seconds'] for x in per])['mean']:.0f} |")
    return lines
