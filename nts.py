"""Neural Thompson Sampling over the client reward models (E6) and its bandit feedback (E7).

During GRPO the router becomes a contextual bandit: the arms are the K client RMs, the context is
a prompt's routing feature e (E2, averaged over its G samples), and the chosen arm's RM alone
scores the prompt's G samples (hard routing: one RM per prompt whatever K is).

E6. The posterior is centred on the federated router g_phi, which stays frozen (it is the prior
mean); what the bandit learns is a residual r_theta that reads the router's hidden layer
h_phi(e) [m] and starts at exactly zero (its last layer is zero-initialised, theta_0):

  f_k(e)    = softmax(g_phi(e))_k + r_theta(h_phi(e))_k      arm score on the feedback's [0, 1] scale
  g_k(e)    = grad_theta f_k(e) = grad_theta r_theta(.)_k    [P] (P: the residual's parameters)
  sigma_k^2 = lambda nu^2 sum_p g_k,p^2 / U_p / m            U: diagonal [P], initialised lambda
  s_k ~ N(f_k(e), sigma_k^2),   k* = argmax_k s_k
  per feedback triple (e, k, b):  U <- U + g_k(e)^2 / m
  then a few Adam steps on  sum_{(e, k, b) in replay} (f_k(e) - b)^2 / 2 + m lambda ||theta - theta_0||^2 / 2

m is the residual's width (the router's hidden size), as in Zhang et al. (2021) "Neural Thompson
Sampling"; the diagonal U is their practical approximation of the design matrix, and the replay
(the last `buffer` triples) stands for their fit on all past triples (Algorithm 1).

Why this form: the router's logits are defined up to a constant per context and lie several
units apart, so fitting the chosen logit to b in {0, 1} flipped argmaxes the router had right;
softmax weights are on b's scale, and a zero residual makes a fresh bandit with nu = 0 exactly
the router's argmax (static hard routing). The residual reads h_phi(e), the features FedAvg
learned to tell domains apart, so P is ~m^2 (4k at m = 64) rather than ~m * 2H, and the
Jacobian and the replay fit cost nothing next to a GRPO step.

E7. The feedback b, one rule per name in FEEDBACK:

  probe (default)  on a share p of the prompts, drawn by a seeded generator, every RM scores the
                   group and the soft mixture R^mix = sum_k w_k(e) r_k (E3, the federated
                   router's weights) is the referee; for EVERY arm k
                     rho_k = Pearson( r^k, R^mix ) over the group's well-formed samples
                     b_k   = 1[ rho_k >= tau ]        skipped where r^k or R^mix is tied in the group
                   Pearson of rewards = Pearson of E5's advantages (affine within a group): rho_k
                   asks whether arm k pushes the group's samples the way the mixture does. Other
                   prompts give no feedback. RM rows per prompt: (1 + p (K - 1)) G on average.
                   Depends on: the frozen router (its mixture is the referee), so it can re-rank
                   arms only where the mixture and the router's argmax disagree; it cannot
                   overrule the router where the router is confidently wrong.
  improvement      the paper's "binary feedback based on GRPO objective improvement". On a share
                   p of the prompts every RM scores the group, but the policy steps on the drawn
                   arm k's reward alone. After the step, the GRPO objective of the prompt is
                   re-evaluated (one no-grad forward of the updated policy) with advantages the
                   arm did not produce: those of the leave-one-out consensus of the other arms,
                     R^-k_i = sum_{j != k} r^j_i / (K - 1),   A^-k = E5's advantages of R^-k
                     J_i(A) = A_i mean_t(ratio_t) - beta mean_t KL_t         (E5, unclipped)
                     Delta  = mean_i [ J_i^after(A^-k) - J_i^before(A^-k) ]
                            = mean_i [ A^-k_i (mean_t ratio^after_t - 1) - beta dKL_i ]
                   and judged against arm k's own running baseline (BayesianRouter's z-scored EMA):
                     z = (Delta - mu_k) / sigma_k,   b = 1[ z > 0 ]
                     mu_k <- (1 - alpha) mu_k + alpha Delta,  s2_k likewise on (Delta - mu_k)^2
                   no feedback until arm k has `warmup` observations (they seed mu_k, sigma_k),
                   nor where A^-k or r^k is tied in the group. Only the drawn arm is graded.
                   Depends on: the other RMs' errors being independent of arm k's (a consensus of
                   honest but different experts ranks the group closer to the truth than a wrong
                   arm does; RMs that share a shortcut can outvote it), on the policy's step (the
                   ratio change tells which samples the step raised), and on arm k's own history
                   (the baseline removes what the arm gains everywhere: an arm grades each
                   context against its other contexts, never against its own advantages). It reads
                   neither the router nor its mixture, so it can overrule the router.
  median           b = 1[ gain >= median over the batch's prompts ], gain = J_after - J_before of
                   the prompt's GRPO objective over the step with the drawn arm's own advantages
                   (kept as an ablation). Depends on: the arm itself (see below).

Why not median: it grades an RM against itself (the step climbed the chosen RM's own
advantages, so every RM "improves its objective"), and a group with tied rewards has gain
~ -beta dKL, below the median, so a domain the policy already answers punishes its own expert.
The probe grades an RM against a referee on the same samples, and a tied group (no ranking to
compare) gives no feedback instead of b = 0. Every arm gets b on a probe prompt: its K scores are
paid anyway, and K unselected observations remove the selection bias of chosen-arm-only feedback.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap

FEEDBACK = ("probe", "improvement", "median")


class NeuralTS:
    """Thompson sampling around a frozen router with a zero-initialised residual (E6).

    network: maps contexts [B, D] -> logits [B, K] and ends with an nn.Linear (a trained Router);
        it is copied and frozen, so the caller's router is left as it was.
    lam (lambda): prior precision, U's initial value and the weight of the pull towards theta_0.
    nu: scale of the exploration noise (sigma is proportional to nu); 0: no exploration.
    width: m; default network.hidden when the network has it, else the last layer's input size.
    lr, update_steps: Adam on the replay objective after each round of feedback; update_steps
        = 0 never moves theta (with nu = 0: static hard routing).
    buffer: how many past (context, arm, feedback) triples the fit replays.
    Adam rather than SGD: its steps do not scale with the router's hidden activations, whose
    magnitude the federated training decides.
    Defaults, from a synthetic run of the probe rule (3 context clusters, a router 99.99% right,
    b ~ Bernoulli(0.95) for the right arm and 0.3 for the others on 4 of 16 prompts, 60 steps):
    lambda = 1e-3 (m lambda = 0.064) let the 4k-parameter residual memorise each context's noise,
    and the right-arm share fell to 0.85 at nu = 0; lambda = 1 fits the arm means (0.93 / 0.28)
    and keeps it at 1.0. nu = 1 spends 30% of prompts on exploration there, nu = 0.3 2%; with
    every arm graded on probe prompts, exploration buys little.
    """

    def __init__(self, network: nn.Module, lam: float = 1.0, nu: float = 0.3, width: int | None = None,
                 lr: float = 1e-2, update_steps: int = 10, buffer: int = 4096, seed: int = 0):
        self.router = copy.deepcopy(network).float().eval()
        self.router.requires_grad_(False)
        last = [mod for mod in self.router.modules() if isinstance(mod, nn.Linear)]
        if not last:
            raise ValueError("NeuralTS: the network must end with an nn.Linear (its input is h_phi)")
        self._feat = None  # h_phi(e) of the latest router forward, captured by the hook below
        last[-1].register_forward_hook(lambda mod, inp, out: setattr(self, "_feat", inp[0]))
        hid, K = last[-1].in_features, last[-1].out_features
        self.lam, self.nu, self.update_steps, self.buffer = lam, nu, update_steps, buffer
        self.m = width or getattr(network, "hidden", hid)
        with torch.random.fork_rng():  # the residual's first layer is drawn from the seed alone
            torch.manual_seed(seed)
            self.res = nn.Sequential(nn.Linear(hid, self.m), nn.GELU(), nn.Linear(self.m, K))
        nn.init.zeros_(self.res[2].weight)
        nn.init.zeros_(self.res[2].bias)  # r_theta_0 = 0: f starts as the router's softmax
        self.theta0 = {n: p.detach().clone() for n, p in self.res.named_parameters()}
        self.U = torch.full((sum(p.numel() for p in self.theta0.values()),), float(lam))  # [P]
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam(self.res.parameters(), lr=lr)
        # replay: h_phi(e) [n, hid], router softmax of the arm [n], arm [n], feedback [n]
        self.replay = (torch.empty(0, hid), torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0))
        self.last_variance = float("nan")  # mean sigma^2 of the latest `select`, for the logs

    def _prior(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """contexts [B, D] -> (router softmax [B, K], h_phi [B, hid]) from one frozen forward."""
        with torch.no_grad():
            w = torch.softmax(self.router(contexts.float()), -1)
        return w, self._feat.detach()

    def scores(self, contexts: torch.Tensor) -> torch.Tensor:
        """f(e) [B, K] = softmax(g_phi(e)) + r_theta(h_phi(e))."""
        w, h = self._prior(contexts)
        with torch.no_grad():
            return w + self.res(h)

    def _grads(self, h: torch.Tensor) -> torch.Tensor:
        """h_phi [B, hid] -> g [B, K, P]: per-context, per-arm gradients of r_theta, one
        vectorised Jacobian (no Python loop over B or K), parameters in named order."""
        params = {n: p.detach() for n, p in self.res.named_parameters()}

        def r(p, x):  # one feature vector [hid] -> residual scores [K]
            return functional_call(self.res, p, (x.unsqueeze(0),)).squeeze(0)

        jac = vmap(jacrev(r), in_dims=(None, 0))(params, h)  # {name: [B, K, *shape]}
        return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], -1)

    def posterior(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean f [B, K], variance sigma^2 [B, K]) of every arm for every context."""
        w, h = self._prior(contexts)
        with torch.no_grad():
            f = w + self.res(h)
        var = self.lam * self.nu ** 2 * (self._grads(h) ** 2 / self.U).sum(-1) / self.m
        return f, var

    def select(self, contexts: torch.Tensor) -> torch.Tensor:
        """contexts [B, D] -> arm per context [B]: argmax of one Thompson draw per arm."""
        f, var = self.posterior(contexts)
        self.last_variance = var.mean().item()
        if self.nu == 0:
            return f.argmax(-1)
        return (f + var.sqrt() * torch.randn(f.shape, generator=self.gen)).argmax(-1)  # s_k ~ N(f_k, sigma_k^2)

    def update(self, contexts: torch.Tensor, arms: torch.Tensor, feedback: torch.Tensor) -> float:
        """Triples (contexts [B, D], arms [B], feedback [B]; NaN feedback = none, dropped):
        U <- U + g_{k}^2 / m for each, append them to the replay, then `update_steps` Adam steps
        on the replay objective. Returns the objective after the steps (0 without triples)."""
        keep = torch.isfinite(feedback.float())
        if not keep.any():
            return 0.0
        x, arms, b = contexts[keep], arms[keep].long(), feedback.float()[keep]
        w, h = self._prior(x)
        g = self._grads(h)[torch.arange(len(arms)), arms]  # [n, P]
        self.U += (g ** 2).sum(0) / self.m
        old = self.replay
        new = (h, w.gather(1, arms.unsqueeze(1)).squeeze(1), arms, b)
        self.replay = tuple(torch.cat([o, n])[-self.buffer:] for o, n in zip(old, new))
        for _ in range(self.update_steps):
            loss = self._objective()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            return self._objective().item()

    def _objective(self) -> torch.Tensor:
        """E6's regularised squared loss over the replay."""
        h, prior, arms, b = self.replay
        f = prior + self.res(h).gather(1, arms.unsqueeze(1)).squeeze(1)  # f_{k}(e) [n]
        reg = sum(((p - self.theta0[n]) ** 2).sum() for n, p in self.res.named_parameters())
        return ((f - b) ** 2).sum() / 2 + self.m * self.lam * reg / 2

    def squared_loss(self, contexts: torch.Tensor, arms: torch.Tensor, feedback: torch.Tensor) -> float:
        """sum (f_{k}(e) - b)^2 / 2 (no regulariser) on the given triples."""
        f = self.scores(contexts).gather(1, arms.long().unsqueeze(1)).squeeze(1)
        return (((f - feedback.float()) ** 2).sum() / 2).item()


# ----------------------------------------------------------------------------------------------
# E7: the feedback rules
# ----------------------------------------------------------------------------------------------


def probe_feedback(r_arms: torch.Tensor, r_mix: torch.Tensor, valid: torch.Tensor | None = None,
                   tau: float = 0.5, eps: float = 1e-4) -> torch.Tensor:
    """E7 probe. r_arms [n, K, G]: every RM's standardised rewards of a probe prompt's G samples;
    r_mix [n, G]: the referee's (E3 mixture); valid [n, G] bool: the samples to compare (the
    well-formed ones: format_guard ranks the rest last whatever an RM says). Returns b [n, K]:
    1 where Pearson(r^k, R^mix) >= tau, 0 below, NaN (no feedback) where r^k or R^mix spans
    less than eps over the valid samples (tied group, or fewer than two valid samples).

    Pearson rather than "same best sample": groups of one-word answers repeat, so the best
    sample is often a tie between copies, while Pearson reads the whole ranking and is +-1 when
    the group holds two distinct answers. tau = 0.5: an arm must explain a quarter of the
    referee's within-group variance (rho^2 >= 0.25)."""
    v = (torch.ones_like(r_mix, dtype=torch.bool) if valid is None else valid.bool()).unsqueeze(1)  # [n, 1, G]
    vf = v.float()
    mix = r_mix.unsqueeze(1)  # [n, 1, G]

    def centred(x):  # masked centring over the group: [n, *, G]
        return (x - (x * vf).sum(-1, keepdim=True) / vf.sum(-1, keepdim=True).clamp(min=1)) * vf

    def span(x):  # max - min over the valid samples, -inf when none
        inf = torch.tensor(float("inf"))
        return torch.where(v, x, -inf).amax(-1) - torch.where(v, x, inf).amin(-1)

    a, m = centred(r_arms), centred(mix)
    rho = (a * m).sum(-1) / (a.norm(dim=-1) * m.norm(dim=-1)).clamp_min(1e-12)  # [n, K]
    tied = (span(r_arms) < eps) | (span(mix) < eps)  # [n, K]
    b = (rho >= tau).float()
    return torch.where(tied, torch.full_like(b, float("nan")), b)


def median_feedback(gain: torch.Tensor) -> torch.Tensor:
    """E7 median (the first rule, an ablation). gain [N]: per prompt, J_after - J_before of its
    GRPO objective over the step it was routed for (J = mean over the group of ratio * A -
    beta * KL, from one extra no-grad forward of the updated policy). b = 1 where the gain is at
    least the batch median, else 0; a tied group (A = 0) gets gain ~ -beta dKL, hence b = 0."""
    return (gain >= gain.median()).float()


class ArmBaseline:
    """Per-arm running baseline of the improvement rule (E7): an EMA of the arm's Delta and of its
    squared deviation, z = (Delta - mu_k) / sigma_k, b = 1[z > 0]. The first `warmup` Delta of an
    arm seed mu_k and sigma_k and give no feedback (BayesianRouter waits for 5 as well)."""

    def __init__(self, num_arms: int, alpha: float = 0.05, warmup: int = 5):
        self.alpha, self.warmup = alpha, warmup
        self.seen: list[list[float]] = [[] for _ in range(num_arms)]  # the warm-up values per arm
        self.mu = torch.zeros(num_arms)
        self.var = torch.zeros(num_arms)

    def __call__(self, arms: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """arms [n], Delta [n] (NaN: no observation) -> (b [n], z [n]); NaN where no feedback.
        The observations of one call are judged in order, each against the baseline before it."""
        b, z = torch.full((len(arms),), float("nan")), torch.full((len(arms),), float("nan"))
        for i, (k, d) in enumerate(zip(arms.tolist(), delta.tolist())):
            if d != d:  # tied group: nothing to judge, nothing to learn
                continue
            if len(self.seen[k]) < self.warmup:
                self.seen[k].append(d)
                if len(self.seen[k]) == self.warmup:
                    xs = torch.tensor(self.seen[k])
                    self.mu[k], self.var[k] = xs.mean(), xs.var(unbiased=False)
                continue
            z[i] = ((d - self.mu[k]) / self.var[k].clamp_min(1e-12).sqrt()).clamp(-2.0, 2.0)
            b[i] = float(z[i] > 0)
            self.var[k] = (1 - self.alpha) * self.var[k] + self.alpha * (d - self.mu[k]) ** 2
            self.mu[k] = (1 - self.alpha) * self.mu[k] + self.alpha * d
        return b, z


def improvement_delta(r_arms: torch.Tensor, arms: torch.Tensor, ratio_gain: torch.Tensor, kl_change: torch.Tensor,
                      beta: float, valid: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """E7 improvement, the objective's change. r_arms [n, K, G]: every RM's standardised rewards
    of a probe prompt's G samples; arms [n]: the drawn arm (the step used its reward);
    ratio_gain [n, G]: mean_t(ratio after the step) - 1 per sample; kl_change [n, G]: the change
    of mean_t KL_t; valid [n, G] bool: the well-formed samples (the others rank last, as in E5's
    format guard). -> Delta [n], NaN where the consensus or the arm is tied over the group.

    The referee's advantages come from the other K - 1 arms only (leave-one-out mean), so the
    arm's own rewards never enter its grade; E5's group standardisation, then J's change is
    linear in them: Delta = mean_i A^-k_i u_i - beta mean_i dKL_i."""
    n, K, G = r_arms.shape
    if K < 2:
        raise ValueError("improvement feedback needs K >= 2 arms (a consensus of the others)")
    own = r_arms.gather(1, arms.view(n, 1, 1).expand(n, 1, G)).squeeze(1)  # [n, G]
    loo = (r_arms.sum(1) - own) / (K - 1)  # [n, G] the consensus of the other arms
    v = torch.ones(n, G, dtype=torch.bool) if valid is None else valid.bool()
    lo = loo.masked_fill(~v, float("inf")).amin(1, keepdim=True)  # format guard: malformed rank last
    ref = torch.where(v, loo, lo - 1.0)
    adv = (ref - ref.mean(1, keepdim=True)) / (ref.std(1, keepdim=True) + 1e-4)  # E5 [n, G]

    def span(x):
        return torch.where(v, x, -float("inf")).amax(1) - torch.where(v, x, float("inf")).amin(1)

    delta = (adv * ratio_gain).mean(1) - beta * kl_change.mean(1)
    tied = (span(loo) < eps) | (span(own) < eps)
    return torch.where(tied, torch.full_like(delta, float("nan")), delta)
