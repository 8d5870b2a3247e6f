"""Mixture-of-Rewards: the reward sources GRPO aligns the policy with (docs/method.md, E3, E7, E8).

Each source is called on a step's N*G sampled responses with their routing features e [N*G, D]
(E2, pooled from the reference forward that E5's KL needs anyway) and returns rewards R [N*G]:

  mor_soft      R = sum_k w_k(e) (r_k - mu_k) / sigma_k        the frozen router's soft mixture (E3)
  mor_hard      R = (r_k* - mu_k*) / sigma_k*,  k* = argmax_k w_k(e_x)   one RM per prompt
  mor           k* drawn by Neural Thompson Sampling around the router (E6), its bandit fed by
                E7's rule after every GRPO step (nts.py): the paper's method
  avg_rm        w_k = 1/K;  weighted_rm  w_k = n_k / sum_j n_j;  rm_<k>  w = e_k          (E8)
  min_rm        R = min_k r~_k;  uwo_rm  R = mean_k r~_k - lambda var_k r~_k (ensembles, E8)
  random_hard   k* uniform per prompt (routing without a router, E8)
  oracle        R = 1[answer == gold] (the evaluator's upper bound, E8)

r~_k = (r_k - mu_k) / sigma_k: every client RM standardised by its own training moments before
any mixing, because heads trained separately live on different scales. A source runs only the
RMs that some row needs (`calls[k]` counts the distinct rows RM k scored): hard routing costs one
RM forward per prompt whatever K is, a soft mixture K.
"""

from __future__ import annotations

import torch

import data
import nts
import router


class OracleReward:
    """Upper bound (E8): 1 for a well-formed answer equal to the gold one, else 0. The gold answers
    are held by this closure (the evaluator), never by the trainer."""

    def __init__(self, gold_by_prompt: dict[tuple[str, str], str]):
        self.gold = gold_by_prompt
        self.calls = 0

    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        return torch.tensor([float(data.extract_answer(r) == self.gold[(i, p)])
                             for i, p, r in zip(images, prompts, responses)])


def score_unique(rm, images, prompts, responses) -> tuple[torch.Tensor, int]:
    """Standardised rewards [B] of rm for (image, prompt, response) rows, each distinct triple
    scored once: G samples of a prompt often repeat (a confident policy writes the same one-word
    answer several times), so the RM forward shrinks to the distinct rows. Returns (rewards,
    rows scored)."""
    index: dict = {}
    slot = [index.setdefault(t, len(index)) for t in zip(images, prompts, responses)]
    uniq = list(index)
    r = rm.standardized(rm.score([u[0] for u in uniq], [u[1] for u in uniq], [u[2] for u in uniq]).float().cpu())
    return r[torch.tensor(slot)], len(uniq)


class MixedReward:
    """R = sum_k w_k(e) * standardised r_k (E3) for any weight source (router, Avg, Weighted,
    one RM). Only the RMs with non-zero weight somewhere in the batch are run: an individual-RM
    baseline costs one RM forward, not K. `calls[k]` counts the (distinct) rows RM k scored."""

    def __init__(self, rms: list, source):
        self.rms, self.source = rms, source
        self.calls = [0] * len(rms)

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        w = self.source.weights(e)  # [B, K]
        r = torch.zeros_like(w)
        for k, rm in enumerate(self.rms):
            if w[:, k].any():
                # each RM re-encodes the text with its own processor: clients' VLMs differ in
                # tokenizer and image tokens, so text is the only common interface
                r[:, k], n = score_unique(rm, images, prompts, responses)
                self.calls[k] += n
        return router.mixed_reward(w, r)


class SingleReward:
    """One reward model on its own (FedAvg-RM), standardised with its own stats."""

    def __init__(self, rm):
        self.rm, self.calls = rm, [0]

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        r, n = score_unique(self.rm, images, prompts, responses)
        self.calls[0] += n
        return r


def score_routed(rms: list, need: torch.Tensor, images, prompts, responses, calls: list) -> torch.Tensor:
    """need [B, K] bool: which RM scores which row -> standardised rewards [B, K], NaN where an
    RM did not score. One batched `score_unique` call per RM that has rows; an RM with none
    costs nothing. `calls[k]` counts the distinct rows RM k scored."""
    r = torch.full(need.shape, float("nan"))
    for k in need.any(0).nonzero().flatten().tolist():  # only the RMs some row is routed to
        idx = need[:, k].nonzero().squeeze(1).tolist()
        r[idx, k], n = score_unique(rms[k], [images[i] for i in idx], [prompts[i] for i in idx],
                                    [responses[i] for i in idx])
        calls[k] += n
    return r


class HardReward:
    """mor_hard: static hard routing, each prompt scored by the router's argmax RM only (no
    exploration, no learning); the context is e averaged over the prompt's G samples. The
    baseline NTS must beat at the same O(1) cost in K. `log`: one entry per prompt per step (see
    NTSReward); `own_share` reads it."""

    def __init__(self, rms: list, source, group: int, domains: dict | None = None):
        self.rms, self.source, self.group, self.domains = rms, source, group, domains or {}
        self.calls = [0] * len(rms)
        self.log: list[dict] = []
        self.step = 0

    def _contexts(self, e: torch.Tensor) -> torch.Tensor:
        return e.float().view(-1, self.group, e.shape[-1]).mean(1)  # [N, D]: one context per prompt

    def _entries(self, prompts, arms, r, probe) -> list[dict]:
        """One log entry per prompt; r [N*G] the rewards GRPO receives."""
        G = self.group
        groups = r.view(-1, G)  # [N, G]
        spread = (groups.amax(1) - groups.amin(1)).tolist()
        out = [{"step": self.step, "prompt": p, "domain": self.domains.get(p), "arm": a, "b": None, "b_arms": None,
                "probe": q, "spread": s} for p, a, q, s in zip(prompts[::G], arms.tolist(), probe.tolist(), spread)]
        self.log += out
        self.step += 1
        return out

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        arms = self.source(self._contexts(e)).argmax(-1)  # [N]
        need = torch.nn.functional.one_hot(arms, len(self.rms)).bool().repeat_interleave(self.group, 0)
        r = score_routed(self.rms, need, images, prompts, responses, self.calls)[need]  # [N*G]
        self._entries(prompts, arms, r, torch.zeros(len(arms), dtype=torch.bool))
        return r


class NTSReward(HardReward):
    """MoR, the paper's method (E6-E7): hard routing by Neural Thompson Sampling (nts.NeuralTS)
    around the federated router, one arm per prompt drawn on the prompt's context, the same
    context its feedback updates.

    feedback="probe" (nts.probe_feedback): a share `probe` of each batch's prompts (stochastic
    rounding of probe * N, seeded) is scored by every RM in the same per-RM batched calls; those
    prompts are rewarded with the referee's mixture R^mix (E3: all K scores are paid, so the
    policy gets the best reward on hand) and give b_k to every arm (all_arms=True) or to the
    drawn arm only. feedback="improvement" (nts.improvement_delta, nts.ArmBaseline): the same
    probes, but the policy steps on the drawn arm's reward everywhere; after the step the
    prompt's objective is re-evaluated with the other arms' consensus advantages and judged
    against the arm's running baseline (the drawn arm only). feedback="median"
    (nts.median_feedback): no probes. The last two need the step's change of the objective
    (`needs_gain`: train_grpo passes `step_change`'s dict to `feedback`). The bandit learns in
    `feedback`, after the policy step, so a batch train_grpo drops teaches it nothing.

    referee: the soft mixture's weight source of the probe rule (default: the bandit's router).
    format_guard: compare RMs on well-formed samples only (GRPOConfig.format_guard).
    domains: {prompt text: domain} for the log (the question text fixes the domain).
    log: per prompt per step {step, prompt, domain, arm, b (drawn arm's, None without feedback),
    probe, spread (max - min of the group's rewards)}; history: per step {prompts, arms,
    variance, feedback (mean b or None)}.

    Per-batch routing (one arm for the whole batch) is gone: batches are domain-balanced
    (models.balanced_batches), so any single arm is the wrong expert for (K-1)/K of a batch's
    prompts and a batch-mean context is the same for every batch; measured 44.0% vs 88.7% soft."""

    def __init__(self, rms: list, ts, group: int, feedback: str = "probe", probe: float = 0.08, tau: float = 0.5,
                 all_arms: bool = True, referee=None, format_guard: bool = True, domains: dict | None = None,
                 seed: int = 0, per_batch: bool = False):
        if per_batch:
            raise ValueError("per-batch NTS is removed: domain-balanced batches need one RM per prompt")
        if feedback not in nts.FEEDBACK:
            raise ValueError(f"NTS feedback {feedback!r}: one of {nts.FEEDBACK}")
        super().__init__(rms, ts.router, group, domains)
        self.ts, self.rule, self.tau, self.all_arms, self.guard = ts, feedback, tau, all_arms, format_guard
        self.probe = probe if feedback in ("probe", "improvement") else 0.0
        self.referee = referee if referee is not None else ts.router
        self.needs_gain = feedback in ("median", "improvement")
        self.baseline = nts.ArmBaseline(len(rms)) if feedback == "improvement" else None
        self.gen = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []
        self._pending = None

    def _draw_probes(self, N: int) -> torch.Tensor:
        """[N] bool: floor(p N + u) prompts, u ~ U(0, 1), at random; E[count] = p N."""
        n = int(self.probe * N + torch.rand((), generator=self.gen).item())
        out = torch.zeros(N, dtype=torch.bool)
        out[torch.randperm(N, generator=self.gen)[:min(n, N)]] = True
        return out

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        G, K = self.group, len(self.rms)
        ctx = self._contexts(e)
        arms = self.ts.select(ctx)  # [N]
        probe = self._draw_probes(len(arms)) if self.probe > 0 else torch.zeros(len(arms), dtype=torch.bool)
        need = (torch.nn.functional.one_hot(arms, K).bool() | probe.unsqueeze(1)).repeat_interleave(G, 0)
        r_all = score_routed(self.rms, need, images, prompts, responses, self.calls)  # [N*G, K]
        r = r_all.gather(1, arms.repeat_interleave(G).unsqueeze(1)).squeeze(1)  # [N*G] drawn arm's
        b = probed = valid = None
        if probe.any():
            rows = probe.repeat_interleave(G)  # [N*G]
            if self.guard:
                valid = torch.tensor([data.extract_answer(o) is not None for o, q in zip(responses, rows) if q])
                valid = valid.view(-1, G)
            probed = r_all[rows].view(-1, G, K).transpose(1, 2)  # [n, K, G]
            if self.rule == "probe":
                mix = router.mixed_reward(self.referee.weights(e[rows].float()), r_all[rows])  # E3 [n*G]
                r[rows] = mix
                b = nts.probe_feedback(probed, mix.view(-1, G), valid, self.tau)
        entries = self._entries(prompts, arms, r, probe)
        self._pending = (ctx, arms, probe, b, entries, probed, valid)
        self.history.append({"prompts": prompts[::G], "arms": arms.tolist(), "variance": self.ts.last_variance,
                             "feedback": None})
        return r

    def feedback(self, change: dict | None = None) -> None:
        """E7 then E6: turn the pending step into (context, arm, b) triples and update the bandit.
        change: train_grpo's `step_change` of the step (median and improvement rules only)."""
        if self._pending is None:
            return
        ctx, arms, probe, b, entries, probed, valid = self._pending
        self._pending = None
        K = len(self.rms)
        if self.rule == "median":
            mine = nts.median_feedback(change["gain"])  # [N]
            self.ts.update(ctx, arms, mine)
        elif self.rule == "improvement":
            mine = torch.full((len(arms),), float("nan"))
            if probed is None:
                return
            idx = probe.nonzero().squeeze(1)  # [n] probe prompts: the K scores give the consensus
            delta = nts.improvement_delta(probed, arms[idx], change["ratio_gain"][idx], change["kl_change"][idx],
                                          change["beta"], valid)
            mine[idx], z = self.baseline(arms[idx], delta)
            self.ts.update(ctx[idx], arms[idx], mine[idx])
            for i, k in enumerate(idx.tolist()):
                entries[k]["delta"] = None if delta[i] != delta[i] else delta[i].item()
                entries[k]["z"] = None if z[i] != z[i] else z[i].item()
        elif b is None:
            return
        else:
            idx = probe.nonzero().squeeze(1)  # [n] prompts with b [n, K]
            mine = torch.full((len(arms),), float("nan"))
            mine[idx] = b.gather(1, arms[idx].unsqueeze(1)).squeeze(1)
            if self.all_arms:  # every (probe prompt, arm) pair: n*K triples
                self.ts.update(ctx[idx].repeat_interleave(K, 0), torch.arange(K).repeat(len(idx)), b.reshape(-1))
            else:
                self.ts.update(ctx[idx], arms[idx], mine[idx])
            for i, k in enumerate(idx.tolist()):
                entries[k]["b_arms"] = [None if x != x else x for x in b[i].tolist()]
        for ent, x in zip(entries, mine.tolist()):
            ent["b"] = None if x != x else x  # NaN: no feedback
        given = mine[torch.isfinite(mine)]
        self.history[-1]["feedback"] = given.mean().item() if len(given) else None


class RandomHardReward(HardReward):
    """random_hard (a reference row): one RM per prompt drawn uniformly at random (seeded), the
    hard-routing cost with no router: what the router's choice is worth over chance."""

    def __init__(self, rms: list, group: int, domains: dict | None = None, seed: int = 0):
        super().__init__(rms, None, group, domains)
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        arms = torch.randint(len(self.rms), (len(prompts) // self.group,), generator=self.gen)  # [N]
        need = torch.nn.functional.one_hot(arms, len(self.rms)).bool().repeat_interleave(self.group, 0)
        r = score_routed(self.rms, need, images, prompts, responses, self.calls)[need]  # [N*G]
        self._entries(prompts, arms, r, torch.zeros(len(arms), dtype=torch.bool))
        return r


UWO_PENALTY = 1.0  # uwo_rm's variance weight (Coste et al. 2024 tune it; 1 on standardised rewards)


class EnsembleReward:
    """Router-free ensembles of the K standardised RMs (reference rows, Coste et al. 2024):
      min_rm   R_i = min_k r^k_i                                   worst case over the members
      uwo_rm   R_i = mean_k r^k_i - UWO_PENALTY * var_k r^k_i      uncertainty-weighted (var: 1/K)
    Every RM scores every row (the soft mixtures' cost)."""

    def __init__(self, rms: list, rule: str, penalty: float = UWO_PENALTY):
        if rule not in ("min_rm", "uwo_rm"):
            raise ValueError(f"EnsembleReward: unknown rule {rule!r}; min_rm or uwo_rm")
        self.rms, self.rule, self.penalty = rms, rule, penalty
        self.calls = [0] * len(rms)

    @torch.no_grad()
    def __call__(self, images, prompts, responses, e) -> torch.Tensor:
        need = torch.ones(len(responses), len(self.rms), dtype=torch.bool)
        r = score_routed(self.rms, need, images, prompts, responses, self.calls)  # [B, K]
        if self.rule == "min_rm":
            return r.amin(1)
        return r.mean(1) - self.penalty * r.var(1, unbiased=False)


def own_share(log: list[dict], own_arm: dict, first: int = 10, last: int = 10) -> dict:
    """routing_own_share {domain: {"start", "end"}}: the share of a domain's prompts routed to
    that domain's own RM (own_arm {domain: arm index}) over the first `first` and the last
    `last` steps of a HardReward/NTSReward log. A domain with no prompt in a window gets None."""
    steps = sorted({x["step"] for x in log})
    windows = {"start": set(steps[:first]), "end": set(steps[-last:] if last else [])}
    out = {}
    for dom, k in own_arm.items():
        out[dom] = {}
        for name, win in windows.items():
            arms = [x["arm"] for x in log if x["domain"] == dom and x["step"] in win]
            out[dom][name] = sum(a == k for a in arms) / len(arms) if arms else None
    return out


