"""FedVPA-GP, the method: federated variational preference learning with a Gumbel-Softmax latent
and a federated mixture prior (arXiv 2605.30873), on frozen reward features e(x, y) [D].

A client's few context preference pairs C = {(x, y_w, y_l)} are encoded into a discrete latent z
over P prototypes, and the reward is conditioned on the prototype vector v_z. Equations (tags
V1..V8 are this code's):

  V1 posterior   q(z | C)  = softmax( f_enc( mean_{c in C} phi(e_w^c - e_l^c) ) )        [P]
  V2 sample      z = onehot(argmax(l + g)) - sg(s) + s,   s = softmax((l + g) / tau)       Gumbel-Softmax,
                 g ~ Gumbel(0, 1), straight-through (hard forward, soft backward); tau annealed
                 tau(t) = tau0 * (tau_min / tau0) ^ min(1, t / (anneal * steps))
  V3 reward      r(x, y, z) = h(e(x, y)) . (w0 + v_z) + b0          h: shared MLP trunk [H], v_z in R^H
  V4 ELBO        ELBO_k = E_q[ sum_{t in targets} log sigmoid(r(x_t, y_w, z) - r(x_t, y_l, z)) ]
                          - beta * KL( q(z | C) || pi )           reported per target pair
  V5 KL          KL(q || pi) = sum_p q_p (log q_p - log pi_p)
  V6 mixture     pibar <- sum_k n_k * qbar_k / sum_k n_k   (server, each round; qbar_k: the mean
     prior        posterior of client k over its round's episodes)
  V7 orthogonal  L_orth = sum_{p < p'} cos(v_p, v_p')^2     zero iff the prototypes are orthogonal
  V8 prior       pi_r = u = 1/P                          for r < w R  (burn-in, and always round 0)
     burn-in     pi_r = (1 - eps) * pibar_{r-1} + eps / P   after;  w = cfg.prior_warmup, eps = cfg.prior_floor
                 ablations: w = 0 (the mixture from round 1, as first implemented); pi = u, fixed
  V9 learned     pi = softmax(rho), rho [P] a parameter of the model (cfg.learned_prior): the paper's
     prior       "learnable Gumbel-Softmax mixture weights". rho gets the gradient of the KL in V4
                 (d/d rho of beta KL(q || softmax(rho)) = beta (pi - q)) at every local step and is
                 FedAvg'd with the rest, so pi drifts toward the clients' mean posterior at the
                 optimiser's pace instead of being replaced by it each round (V6)
  loss_k = -ELBO_k / T + lambda * L_orth;   shared parameters (encoder, trunk, readout,
  prototypes, rho) aggregated with federated.fedavg (E4) each round.

Where z and the prototypes live: z = s @ V in R^H, s the one-hot (Gumbel-Softmax) sample over the
P prototypes V [P, H]; the same space R^H is the reward's readout offset (V3). A Gaussian latent
(FedVPL, experiments/fedvpl.py) uses the same decoder: z in R^P, offset z @ V, so s and a Gaussian
z are points of one space whose prototypes are the vertices e_p of the simplex.

Why V8 (ours: the paper's mixture prior has learnable Gumbel-Softmax weights; its schedule is not
in what we could read, so the burn-in is labelled as this code's). In V5, KL(q || pi) =
-H(q) - sum_p q_p log pi_p. With the uniform prior the second term is a constant; with pi = pibar
it pulls every client's posterior toward the prototypes that are popular *now*, whose share then
grows in the next pibar: a rich-get-richer loop (equivalently, sum_k n_k KL(qbar_k || pibar) is
the information z carries about the client, which one prototype for everybody sets to 0).
Measured on the conflict benchmark, seed 1 (experiments/fedvpa_table.py; docs/vpa.md): the full-style clients of two
domains started on prototype 0 (qbar 0.57, 0.38 after round 1) while the terse clients and one
full client went to prototype 2; the prior of prototype 2 rose 0.31 -> 0.41 -> 0.64 -> 0.82 ->
0.92 over rounds 1-5, and by round 6 every client sat on it (usage 0.99, H(q) 0.03): one
prototype, group purity 0.50, accuracy 74.5 vs 84.5 with the uniform prior. A mixture of
posteriors that have not found the groups yet is noise fed back as a prior; V8 publishes it only
after the burn-in, when it describes the groups (pibar ~ 0.5 / 0.5 on two prototypes), and then
sharpens the posteriors (H(q) 0.19 vs 0.47 uniform). The floor eps / P keeps V5 finite.
What V8 does not remove: a likelihood-driven collapse the uniform prior has too (docs/vpa.md).

`VPARewardModel` (bottom) fixes the posterior of one client (or one labeller group) and has
reward.RewardModel's scoring interface (`FeatureRewardModel`), so it can stand in for a client RM
in MoR; `BTFeatureRewardModel` gives MonolithicBT the same interface, the plain-BT baseline of
GRPO with a VPA client RM (experiments/fedvpa_table.py --grpo).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import federated
import models
import router as routing

# ----------------------------------------------------------------------------------------------
# V2: Gumbel-Softmax, V5: KL, V7: orthogonal loss
# ----------------------------------------------------------------------------------------------


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V2. logits [..., P] -> (sample [..., P], q [..., P]).

    `sample` is one-hot in the forward pass when `hard` (straight-through: its gradient is the
    relaxed sample's), else the relaxed sample itself; `q` = softmax(logits), the posterior the
    KL and the mixture prior use. Own implementation (not F.gumbel_softmax) so a Generator makes
    the noise reproducible independently of the global RNG."""
    if tau <= 0:
        raise ValueError(f"gumbel_softmax: temperature must be > 0, got {tau}")
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))  # Gumbel(0, 1)
    soft = F.softmax((logits + g) / tau, dim=-1)
    if hard:
        one = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
        sample = one - soft.detach() + soft  # forward: one-hot; backward: d soft
    else:
        sample = soft
    return sample, F.softmax(logits, dim=-1)


def temperature(step: int, total: int, tau0: float = 1.0, tau_min: float = 0.3, anneal: float = 0.7) -> float:
    """V2 schedule: exponential decay from tau0 to tau_min over the first `anneal` share of
    `total` steps, then flat. Early: soft samples, every prototype gets gradient; late: nearly
    discrete, train and test (argmax / posterior mean) agree."""
    frac = min(1.0, step / max(1.0, anneal * total))
    return tau0 * (tau_min / tau0) ** frac


def categorical_kl(q: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """V5. q [..., P], prior [P] (or broadcastable) -> KL(q || prior) [...]. 0 log 0 = 0; a prior
    with a zero where q has mass would be infinite, which the floor of V8 prevents."""
    q = q.clamp_min(0)
    return (q * (q.clamp_min(1e-12).log() - prior.clamp_min(1e-12).log())).sum(-1)


def orthogonal_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """V7. prototypes [P, H] -> sum over pairs p < p' of cos(v_p, v_p')^2 (scalar)."""
    v = F.normalize(prototypes, dim=-1, eps=1e-8)
    cos = v @ v.T  # [P, P], ones on the diagonal
    return torch.triu(cos, diagonal=1).pow(2).sum()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """p [..., P] -> H(p) [...] in nats."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


# ----------------------------------------------------------------------------------------------
# The models: VPA (V1, V3) and the monolithic BT head it is compared with
# ----------------------------------------------------------------------------------------------


@dataclass
class VPAConfig:
    prototypes: int = 4       # P
    hidden: int = 64          # H of the encoder and of the reward trunk
    context: int = 16         # C: context pairs per episode (conflict benchmark, beta 0: with 8
                              # every client stayed on one prototype, 16 separated the groups)
    targets: int = 16         # T: target pairs per episode
    episodes: int = 16        # M: episodes per local step (one per row of a batch)
    local_steps: int = 20     # local AdamW steps per round
    rounds: int = 20          # R
    lr: float = 2e-3
    beta: float = 0.1         # KL weight in V4 (1 = the plain ELBO: every variant collapses)
    kl_warmup: float = 0.0    # beta ramps linearly from 0 over this share of all steps (0: off)
    orth: float = 1.0         # lambda of V7; 0 = ablation
    mixture_prior: bool = True  # V6; False = fixed uniform prior (ablation)
    prior_warmup: float = 0.5   # V8 w: share of rounds with the uniform prior before the mixture (0: off)
    prior_floor: float = 0.01   # V8 eps: pi keeps eps / P of the uniform on every prototype
    learned_prior: bool = False  # V9 (with mixture_prior): pi = softmax(rho), rho learned by the ELBO
    tau0: float = 1.0
    tau_min: float = 0.3
    eval_contexts: int = 32   # S: context sets drawn per client for its posterior and purity

    def validate(self) -> None:
        if self.prototypes < 2:
            raise ValueError(f"VPA needs at least 2 prototypes (got P={self.prototypes}): one prototype is a monolithic RM")
        for k in ("hidden", "context", "targets", "episodes", "local_steps", "rounds", "eval_contexts"):
            if getattr(self, k) < 1:
                raise ValueError(f"VPAConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.tau0 <= 0 or self.tau_min <= 0 or self.beta < 0 or self.orth < 0 or self.lr <= 0:
            raise ValueError(f"VPAConfig: tau0, tau_min, lr must be > 0 and beta, orth >= 0 (got tau0={self.tau0}, "
                             f"tau_min={self.tau_min}, lr={self.lr}, beta={self.beta}, orth={self.orth})")
        if not 0 <= self.prior_floor < 1:
            raise ValueError(f"VPAConfig.prior_floor must be in [0, 1), got {self.prior_floor}")
        for k in ("prior_warmup", "kl_warmup"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"VPAConfig.{k} must be in [0, 1] (a share of training), got {getattr(self, k)}")


class _Standardise(nn.Module):
    """Per-coordinate (e - mean) / std with the federation's pooled feature stats (buffers, like
    the router's: the pooled hidden states share a large common component)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-6))

    def norm(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.feat_mean) / self.feat_std


class VPA(_Standardise):
    """Encoder (V1) + prototypes + prototype-conditioned reward (V3) on features of dim D."""

    def __init__(self, dim: int, cfg: VPAConfig):
        super().__init__(dim)
        cfg.validate()
        self.dim, self.cfg = dim, cfg
        H, P = cfg.hidden, cfg.prototypes
        self.phi = nn.Sequential(nn.Linear(dim, H), nn.GELU(), nn.Linear(H, H), nn.GELU())  # per context pair
        self.to_logits = nn.Linear(H, P)  # pooled context -> logits over prototypes
        # v_p [P, H]: each prototype IS its readout's offset from the shared w0, so the orthogonal
        # loss (V7) acts on the readouts themselves: prototypes that cannot align cannot make
        # r(x, y, z) independent of z, the state in which the encoder gets no gradient (collapse).
        self.prototypes = nn.Parameter(torch.randn(P, H) / math.sqrt(H))
        self.trunk = nn.Sequential(nn.Linear(dim, H), nn.GELU())  # h(e): [.., H], shared by all z
        self.w0 = nn.Linear(H, 1)  # w0, b0 of V3
        if cfg.mixture_prior and cfg.learned_prior:
            self.rho = nn.Parameter(torch.zeros(P))  # V9: logits of the prior, uniform at the start

    def learned_prior(self) -> torch.Tensor | None:
        """V9: softmax(rho) [P] (with its gradient), or None when the prior is the server's."""
        return F.softmax(self.rho, -1) if hasattr(self, "rho") else None

    def train_terms(self, w: torch.Tensor, l: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                    prior: torch.Tensor, step: int, total: int, g: torch.Generator) -> dict:
        """One local step's loss (V4 sampled with V2, V7): -ELBO / T + lambda L_orth, averaged
        over the M episodes; with V9 the prior is softmax(rho) and the KL trains rho.
        -> {loss, acc, q [M, P], z [M, P], kl [M], h_q}: what local_update logs and uploads."""
        cfg = self.cfg
        learned = self.learned_prior()
        o = episode_terms(self, w, l, ctx, tgt, prior if learned is None else learned,
                          temperature(step, total, cfg.tau0, cfg.tau_min), g)
        neg_elbo = -(o["loglik"] - kl_weight(cfg, step, total) * o["kl"]) / cfg.targets  # [M], per target pair
        o["loss"] = neg_elbo.mean() + cfg.orth * orthogonal_loss(self.prototypes)
        o["acc"], o["h_q"] = o["acc"].mean(), entropy(o["q"].detach()).mean().item()
        return o

    def posterior_logits(self, ctx_w: torch.Tensor, ctx_l: torch.Tensor) -> torch.Tensor:
        """V1. ctx_w, ctx_l [M, C, D] features of the context pairs -> logits [M, P]. The pair
        enters as the difference of its standardised features: what a labeller preferred, not
        which image it was about. Mean pooling makes q permutation-invariant and defined for any
        context size (a client may use all its pairs at test time)."""
        d = self.norm(ctx_w) - self.norm(ctx_l)  # [M, C, D]
        return self.to_logits(self.phi(d).mean(-2))  # [M, H] -> [M, P]

    def reward(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """V3. e [M, T, D], v [M, H] (one prototype vector per episode) -> r [M, T]."""
        h = self.trunk(self.norm(e))  # [M, T, H]
        readout = self.w0.weight[0] + v  # [M, H]
        return (h * readout.unsqueeze(-2)).sum(-1) + self.w0.bias  # [M, T]

    def reward_all(self, e: torch.Tensor) -> torch.Tensor:
        """e [..., D] -> r [..., P]: the reward under every prototype, for exact expectations over
        q (evaluation, V4 without sampling, the posterior-mean reward of VPARewardModel)."""
        h = self.trunk(self.norm(e))  # [..., H]
        readouts = self.w0.weight[0] + self.prototypes  # [P, H]
        return h @ readouts.T + self.w0.bias  # [..., P]


class MonolithicBT(_Standardise):
    """The baseline: the same trunk and a single readout, one reward for everybody (E1 on
    frozen features), trained by FedAvg exactly like VPA's shared parameters."""

    def __init__(self, dim: int, cfg: VPAConfig):
        super().__init__(dim)
        self.trunk = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU())
        self.head = nn.Linear(cfg.hidden, 1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e [..., D] -> r [...]"""
        return self.head(self.trunk(self.norm(e))).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Clients on features, episodes, local updates, the server's prior
# ----------------------------------------------------------------------------------------------


@dataclass
class ClientFeatures:
    """One client's private data, as frozen features of its pairs: train_w/train_l [N, D] (the
    chosen / rejected response of each training pair), held_w/held_l [N_h, D] (held-out pairs,
    never trained on). `group` is the ground-truth convention, used only to score purity."""

    name: str
    group: str
    train_w: torch.Tensor
    train_l: torch.Tensor
    held_w: torch.Tensor
    held_l: torch.Tensor

    def __post_init__(self):
        if self.train_w.shape[0] == 0:
            raise ValueError(f"client {self.name!r}: no training pairs (a VPA client needs context pairs)")
        if self.train_w.shape != self.train_l.shape or self.held_w.shape != self.held_l.shape:
            raise ValueError(f"client {self.name!r}: chosen/rejected feature shapes differ "
                             f"({tuple(self.train_w.shape)} vs {tuple(self.train_l.shape)})")

    @property
    def n(self) -> int:
        return self.train_w.shape[0]


def kl_weight(cfg: VPAConfig, step: int, total: int) -> float:
    """beta of V4 at a step: cfg.beta, ramped linearly from 0 over cfg.kl_warmup of all steps."""
    return cfg.beta * min(1.0, step / (cfg.kl_warmup * total)) if cfg.kl_warmup > 0 else cfg.beta


def episodes(n: int, m: int, c: int, t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(context idx [m, c], target idx [m, t]) into a client's n training pairs, drawn with
    replacement (a client with fewer pairs than c + t still works)."""
    return torch.randint(n, (m, c), generator=generator), torch.randint(n, (m, t), generator=generator)


def episode_terms(model: VPA, w: torch.Tensor, l: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                  prior: torch.Tensor, tau: float | None, generator: torch.Generator | None = None) -> dict:
    """V4 per episode. w, l [N, D]; ctx [M, C], tgt [M, T] indices; prior [P].
    tau=None: exact expectation over q (no sampling), for evaluation.
    Returns loglik [M] (summed over targets), kl [M], q [M, P], acc [M], and with sampling the
    hard sample z [M, P]."""
    logits = model.posterior_logits(w[ctx], l[ctx])  # [M, P]
    if tau is None:
        q = F.softmax(logits, -1)
        margin = model.reward_all(w[tgt]) - model.reward_all(l[tgt])  # [M, T, P]
        loglik = (F.logsigmoid(margin) * q.unsqueeze(1)).sum(-1).sum(-1)  # E_q, summed over T
        acc = ((margin * q.unsqueeze(1)).sum(-1) > 0).float().mean(-1)
        return {"loglik": loglik, "kl": categorical_kl(q, prior), "q": q, "acc": acc}
    z, q = gumbel_softmax(logits, tau, hard=True, generator=generator)  # [M, P] each
    v = z @ model.prototypes  # [M, H]: exactly one prototype per episode in the forward
    margin = model.reward(w[tgt], v) - model.reward(l[tgt], v)  # [M, T]
    return {"loglik": F.logsigmoid(margin).sum(-1), "kl": categorical_kl(q, prior), "q": q,
            "acc": (margin > 0).float().mean(-1), "z": z}


@dataclass
class Upload:
    """What a client sends the server after a round: parameters, n_k, its mean posterior and
    scalars (the sample histogram and the entropies are diagnostics of the same kind as qbar).
    No pair and no feature leaves."""

    state: dict
    n: int
    qbar: torch.Tensor | None          # [P] mean posterior over the round's episodes (V6)
    loss: float
    acc: float
    usage: torch.Tensor | None = None  # [P] hard samples per prototype over the round's episodes
    h_q: float = float("nan")          # mean entropy of the round's episode posteriors
    kl: float = float("nan")           # mean KL(q || pi) over the round's episodes


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_update(model: nn.Module, state: dict, client: ClientFeatures, cfg: VPAConfig, prior: torch.Tensor | None,
                 step0: int, total_steps: int, seed: int) -> Upload:
    """One round at one client: cfg.local_steps AdamW steps from the server's `state`.
    A latent model (VPA, or any module with `train_terms`: FedVPL) takes its loss from
    `model.train_terms` (VPA: -ELBO / T + lambda * L_orth, V4, V7); MonolithicBT: BT on the same
    target pairs. `model` is a scratch module of the right class (its parameters are overwritten)."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    M, C, T = cfg.episodes, cfg.context, cfg.targets
    latent = hasattr(model, "train_terms")
    losses, accs, qs, usage, ents, kls = [], [], [], 0, [], []
    for i in range(cfg.local_steps):
        ctx, tgt = episodes(client.n, M, C, T, g)
        if latent:
            o = model.train_terms(client.train_w, client.train_l, ctx, tgt, prior, step0 + i, total_steps, g)
            loss, acc = o["loss"], o["acc"]
            qs.append(o["q"].detach().mean(0))  # VPA: the mean posterior; FedVPL: the mean posterior mean
            if "z" in o:
                usage = usage + o["z"].detach().sum(0)
            ents.append(o["h_q"])
            kls.append(o["kl"].detach().mean().item())
        else:
            tgt = tgt.reshape(-1)  # the monolithic RM ignores contexts: M*T pairs per step
            margin = model(client.train_w[tgt]) - model(client.train_l[tgt])
            loss = -F.logsigmoid(margin).mean()
            acc = (margin > 0).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(acc.item())
    loss, acc = sum(losses) / len(losses), sum(accs) / len(accs)
    if not qs:
        return Upload(_state(model), client.n, None, loss, acc)
    return Upload(_state(model), client.n, torch.stack(qs).mean(0), loss, acc,
                  usage if torch.is_tensor(usage) else None, sum(ents) / len(ents), sum(kls) / len(kls))


def mixture_prior(uploads: list[Upload]) -> torch.Tensor:
    """V6 on the server: pibar = sum_k n_k qbar_k / sum_k n_k [P], computed by the same FedAvg
    that averages the parameters (it is the n_k-weighted mean of one tensor)."""
    pi = federated.fedavg([{"pi": u.qbar} for u in uploads], [u.n for u in uploads])["pi"]
    return pi / pi.sum()


def prior_for_round(pibar: torch.Tensor, r: int, cfg: VPAConfig) -> torch.Tensor:
    """V8: the prior the clients use in round r (0-based), given the mixture pibar [P] of the
    round before: the uniform during the burn-in (r < w R, and always round 0), then
    (1 - eps) pibar + eps / P. w = 0: the mixture from round 1, the method as first implemented."""
    P = pibar.numel()
    if r < max(1.0, cfg.prior_warmup * cfg.rounds):
        return torch.full((P,), 1.0 / P)
    return (1 - cfg.prior_floor) * pibar + cfg.prior_floor / P


def pooled_feature_stats(clients: list[ClientFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature mean/std [D] from each client's (count, sum, sum of squares): router.pooled_stats."""
    moments = []
    for c in clients:
        e = torch.cat([c.train_w, c.train_l]).double()
        moments.append((e.shape[0], e.sum(0), (e * e).sum(0)))
    return routing.pooled_stats(moments)


def _round_log(r: int, ups: list[Upload], clients: list[ClientFeatures], prior: torch.Tensor | None) -> dict:
    """One line of the per-round log (n_k-weighted over clients). A latent model adds the prior
    weights the round used [P] (when it has any), the hard-sample usage [P] (VPA), the posterior's
    entropy, KL(q || pi) and every client's qbar [P] (VPA: mean posterior; FedVPL: mean posterior
    mean, a point of the same latent space): the figures that show a collapse forming."""
    n = sum(u.n for u in ups)
    entry = {"round": r, "loss": sum(u.n * u.loss for u in ups) / n, "acc": sum(u.n * u.acc for u in ups) / n}
    if ups[0].qbar is not None:
        if prior is not None:
            entry["prior"] = [round(x, 4) for x in prior.tolist()]
        if ups[0].usage is not None:
            usage = sum(u.usage for u in ups)
            entry["usage"] = [round(x, 4) for x in (usage / usage.sum()).tolist()]
        entry.update({"H_q": round(sum(u.n * u.h_q for u in ups) / n, 4),
                      "kl": round(sum(u.n * u.kl for u in ups) / n, 4),
                      "qbar": {c.name: [round(x, 3) for x in u.qbar.tolist()] for c, u in zip(clients, ups)}})
    return entry


def train_federated(kind, clients: list[ClientFeatures], cfg: VPAConfig, seed: int,
                    desc: str | None = None, init: dict | None = None) -> tuple[nn.Module, torch.Tensor | None, list[dict]]:
    """R rounds of FedAvg (E4) of a VPA (`kind="vpa"`), a MonolithicBT (`kind="mono"`) or any
    latent model class with VPA's `train_terms` / `learned_prior` (`kind=` the class: FedVPL) over
    `clients`; every client reports every round. Returns (model, prior pi [P] or None, log): pi is
    the prior of a round after the last (V8 at r = R, V9's softmax(rho), the uniform), the one
    evaluation and the client RMs' KL use. Same seed, same result: the init comes from `seed` (or
    `init`, a state dict to start from; its feature stats are replaced by the clients' pooled
    ones), each client-round's episodes and latent noise from a generator seeded by (seed, round,
    client index)."""
    if not clients:
        raise ValueError("train_federated: no clients")
    cfg.validate()
    D = clients[0].train_w.shape[1]
    for c in clients:
        if c.train_w.shape[1] != D:
            raise ValueError(f"client {c.name!r}: feature dim {c.train_w.shape[1]}, client 0 has {D}")
    torch.manual_seed(seed)
    make = kind if isinstance(kind, type) else {"vpa": VPA, "mono": MonolithicBT}.get(kind)
    if make is None:
        raise ValueError(f"train_federated: kind must be 'vpa', 'mono' or a model class, got {kind!r}")
    model, scratch = make(D, cfg), make(D, cfg)
    if init is not None:
        model.load_state_dict(init)
    model.set_feature_stats(*pooled_feature_stats(clients))
    P = cfg.prototypes
    uniform = torch.full((P,), 1.0 / P)
    server = make is VPA and cfg.mixture_prior and not cfg.learned_prior  # V6 / V8 on the server
    pibar, prior = uniform, (uniform if make is VPA else None)
    total = cfg.rounds * cfg.local_steps
    log = []
    bar = tqdm(range(cfg.rounds), desc=desc or getattr(kind, "__name__", kind), dynamic_ncols=True, disable=None, leave=False)
    for r in bar:
        if server:
            prior = prior_for_round(pibar, r, cfg)  # V8; the ablation keeps the uniform
        state = _state(model)
        ups = [local_update(scratch, state, c, cfg, prior, r * cfg.local_steps, total, seed * 100_003 + r * 101 + k)
               for k, c in enumerate(clients)]
        learned = model.learned_prior() if hasattr(model, "learned_prior") else None  # V9: the round's prior
        model.load_state_dict(federated.fedavg([u.state for u in ups], [u.n for u in ups]))
        if server:
            pibar = mixture_prior(ups)  # V6
        log.append(_round_log(r, ups, clients, prior if learned is None else learned.detach()))
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", acc=f"{log[-1]['acc']:.3f}")
    if server:
        prior = prior_for_round(pibar, cfg.rounds, cfg)
    learned = model.learned_prior() if hasattr(model, "learned_prior") else None
    if learned is not None:
        prior = learned.detach()
    model.eval()
    return model, prior, log


# ----------------------------------------------------------------------------------------------
# MoR interface: a reward head on the reference's features, scored like reward.RewardModel
# ----------------------------------------------------------------------------------------------


class FeatureRewardModel(nn.Module):
    """What MoR calls on a client RM (reward.RewardModel's scoring interface), for any reward
    head on the frozen reference's E2 features: mixture.score_unique / SingleReward / MixedReward,
    reward.pair_scores / pair_accuracy / reward_stats use only these.
      score(images, prompts, responses) -> raw rewards [B]  (one reference forward, router.features)
      standardized(r) -> (r - mean) / std                     (E3)
      pair_rewards(pairs) -> (r_chosen [B], r_rejected [B]); mean, std, info
    Subclasses define rewards(e [B, D]) -> [B]."""

    def __init__(self, ref_vlm=None, processor=None, mean: float = 0.0, std: float = 1.0, info: dict | None = None):
        super().__init__()
        self.ref_vlm, self.processor = ref_vlm, processor
        self.encoder = models.Encoder(processor) if processor is not None else None
        self.mean, self.std = float(mean), float(std)
        self.info = dict(info or {})

    def rewards(self, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images, prompts, responses) -> torch.Tensor:
        """Raw rewards [B] for (image, prompt, response) triples, RewardModel.score's contract."""
        if self.ref_vlm is None:
            raise RuntimeError(f"{type(self).__name__}.score needs the reference VLM and processor (pass ref_vlm, processor)")
        return self.rewards(routing.features(self.ref_vlm, self.encoder, images, prompts, responses))

    def standardized(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.mean) / self.std

    def pair_rewards(self, pairs: list, lm_loss: bool = False):
        """(r_chosen [B], r_rejected [B]) like RewardModel.pair_rewards (for reward.pair_scores)."""
        if lm_loss:
            raise ValueError(f"{type(self).__name__} has no language-model head (lm_loss=True is not supported)")
        B = len(pairs)
        r = self.score([p.image for p in pairs] * 2, [p.prompt for p in pairs] * 2,
                       [p.chosen for p in pairs] + [p.rejected for p in pairs])
        return r[:B], r[B:]

    def calibrate(self, e: torch.Tensor) -> None:
        """E3's mean/std from the features [N, D] of the client's own training responses (chosen
        and rejected alike, as reward.reward_stats)."""
        r = self.rewards(e)
        self.mean, self.std = r.mean().item(), max(r.std().item(), 1e-6)


class BTFeatureRewardModel(FeatureRewardModel):
    """A trained MonolithicBT as a client RM: the plain Bradley-Terry baseline of the same kind
    as VPARewardModel (same features, same trunk, one readout), for GRPO beside it (experiments/fedvpa_table.py
    --grpo). In memory only: the experiment trains it where it uses it."""

    def __init__(self, bt: MonolithicBT, ref_vlm=None, processor=None, **kw):
        super().__init__(ref_vlm, processor, **kw)
        self.bt = bt.eval()

    @property
    def device(self):
        return self.bt.feat_mean.device

    @torch.no_grad()
    def rewards(self, e: torch.Tensor) -> torch.Tensor:
        """e [B, D] reference features -> raw rewards [B] (E1's head on frozen features)."""
        return self.bt(e.to(self.device).float())


class VPARewardModel(FeatureRewardModel):
    """A trained VPA fixed to one posterior q [P] (from a client's, or a labeller group's, own
    context pairs); reward r(x, y) = E_q[r(x, y, z)] = sum_p q_p r(x, y, p) (V3), with
    FeatureRewardModel's (= reward.RewardModel's) scoring interface, so it stands in for a
    client RM in MoR; save(dir) / load(dir) make it an upload. The features are the frozen
    reference policy's (router.features, E2), so scoring costs one reference forward;
    `rewards(e)` skips it when the features are at hand.

    On disk: <dir>/vpa.safetensors (parameters + "posterior" [P]) and <dir>/vpa.json (config, D,
    mean, std, info). Loading refuses anything else (no pickle)."""

    FILES = ("vpa.safetensors", "vpa.json")

    def __init__(self, vpa: VPA, q: torch.Tensor, ref_vlm=None, processor=None, mean: float = 0.0, std: float = 1.0,
                 info: dict | None = None):
        super().__init__(ref_vlm, processor, mean, std, info)
        if q.shape != (vpa.cfg.prototypes,) or not torch.isfinite(q).all() or (q < 0).any() or q.sum() <= 0:
            raise ValueError(f"VPARewardModel: posterior must be a finite non-negative [{vpa.cfg.prototypes}], "
                             f"got {tuple(q.shape)}")
        self.vpa = vpa
        self.register_buffer("q", q.detach().float() / q.sum())

    @property
    def device(self):
        return self.q.device

    @classmethod
    @torch.no_grad()
    def from_context(cls, vpa: VPA, ctx_w: torch.Tensor, ctx_l: torch.Tensor, ref_vlm=None, processor=None,
                     **kw) -> "VPARewardModel":
        """q from context pairs ctx_w, ctx_l [N, D] (mean pooling accepts any count: all of a
        client's pairs at once)."""
        if ctx_w.shape[0] == 0:
            raise ValueError("VPARewardModel.from_context: empty context (a client needs >= 1 preference pair)")
        q = F.softmax(vpa.posterior_logits(ctx_w.unsqueeze(0), ctx_l.unsqueeze(0)), -1)[0]
        return cls(vpa, q, ref_vlm, processor, **kw)

    @torch.no_grad()
    def rewards(self, e: torch.Tensor) -> torch.Tensor:
        """e [B, D] reference features -> raw rewards [B] = r(e, .) [B, P] @ q [P]."""
        return self.vpa.reward_all(e.to(self.q.device).float()) @ self.q

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.vpa.state_dict().items()}
        t["posterior"] = self.q.cpu().contiguous()
        save_file(t, str(out / "vpa.safetensors"))
        meta = {**self.info, "config": asdict(self.vpa.cfg), "dim": self.vpa.dim, "mean": self.mean, "std": self.std}
        (out / "vpa.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, ref_vlm=None, processor=None) -> "VPARewardModel":
        path = Path(path)
        for need in cls.FILES:
            if not (path / need).exists():
                raise FileNotFoundError(f"{path}: not a VPA reward-model directory (missing {need})")
        stray = sorted(f.name for f in path.iterdir() if f.name not in cls.FILES)
        if stray:
            raise ValueError(f"{path}: unexpected file(s) {stray} in a VPA reward-model directory; refused")
        meta = json.loads((path / "vpa.json").read_text())
        for key in ("mean", "std"):
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{path}/vpa.json: field '{key}' must be a finite number, got {v!r}")
        if meta["std"] <= 0:
            raise ValueError(f"{path}/vpa.json: field 'std' must be positive, got {meta['std']}")
        vpa = VPA(int(meta.pop("dim")), VPAConfig(**meta.pop("config")))
        try:
            t = load_file(str(path / "vpa.safetensors"))
        except Exception as e:  # a pickle or garbage renamed to .safetensors lands here, unexecuted
            raise ValueError(f"{path}/vpa.safetensors: not a valid safetensors file ({e}); refused") from None
        if not all(torch.isfinite(v).all() for v in t.values()):
            raise ValueError(f"{path}/vpa.safetensors: holds NaN/inf; refused")
        q = t.pop("posterior", None)
        if q is None:
            raise ValueError(f"{path}/vpa.safetensors: no 'posterior' tensor")
        vpa.load_state_dict(t)  # strict: a missing or extra key, or a wrong shape, raises
        vpa.eval()
        return cls(vpa, q, ref_vlm, processor, meta.pop("mean"), meta.pop("std"), meta)
