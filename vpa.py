"""FedVPA-GP (DESIGN 2): federated variational preference learning with a Gumbel-Softmax mixture prior.

A personalised reward model: a client's few context preference pairs C = {(x, y_w, y_l)} are
encoded into a discrete latent z over P prototypes, and the reward is conditioned on the
prototype vector v_z. Equations (tags V1..V7 are ours, like DESIGN's E1..E9):

  V1 posterior   q(z | C)  = softmax( f_enc( mean_{c in C} phi(e_w^c - e_l^c) ) )        [P]
  V2 sample      z = onehot(argmax(l + g)) - sg(s) + s,   s = softmax((l + g) / tau)       Gumbel-Softmax,
                 g ~ Gumbel(0, 1), straight-through (hard forward, soft backward); tau annealed
                 tau(t) = tau0 * (tau_min / tau0) ^ min(1, t / (anneal * steps))
  V3 reward      r(x, y, z) = h(e(x, y)) . (w0 + v_z) + b0          h: shared MLP trunk [H], v_z in R^H
                 each prototype owns a readout over the shared features (bilinear head)
  V4 ELBO        ELBO_k = E_q[ sum_{t in targets} log sigmoid(r(x_t, y_w, z) - r(x_t, y_l, z)) ]
                          - beta * KL( q(z | C) || pi )           reported per target pair
  V5 KL          KL(q || pi) = sum_p q_p (log q_p - log pi_p)
  V6 mixture     pi <- sum_k n_k * qbar_k / sum_k n_k   (server, each round; qbar_k: the mean
     prior        posterior of client k over its round's episodes; floored at eps / P)
                 ablation: pi = uniform, fixed
  V7 orthogonal  L_orth = sum_{p < p'} cos(v_p, v_p')^2     zero iff the prototypes are orthogonal
  loss_k = -ELBO_k / T + lambda * L_orth;   shared parameters (encoder, trunk, readout,
  prototypes) aggregated with federated.fedavg (E4) each round.

Everything runs on frozen E2 features e(x, y) [D] of the reference policy (router.features), so a
whole federated run costs seconds on CPU; the features are computed once and cached as
safetensors. The benchmark here is a *conflicting-preference* variant of the easy-VQA federation
(`conflict_clients`): each domain's client is split in two by image, a "terse" and a "full"
group; both keep the benchmark's pairs (correct answer + end token beats everything else) and get
one extra style pair per question whose direction is the group's convention:
  terse:  "red<|im_end|>"  beats  "the shape is red<|im_end|>"
  full:   "the shape is red<|im_end|>"  beats  "red<|im_end|>"
A third of every client's pairs conflict across groups and nothing in x tells the groups apart,
so one monolithic BT reward (FedAvg) cannot fit both; a client latent can.

Measured (runs/vpa/results.md, 3 training seeds, P=4, C=16): at beta 0.1 the latent puts the
terse and the full clients on two different prototypes (group purity 1.00 for every ablation) and
held-out accuracy is 85.5 vs 69.6 for the monolithic RM; the orthogonal loss and the mixture
prior each keep the posteriors sharper (H(q) 0.04 full vs 0.58 with neither) but none of the
ablations collapses. At beta 1 (the plain ELBO) every variant collapses (H(q) ~ log P: the
posterior is the prior, accuracy at the monolithic level); with C=8 context pairs the groups were
not separated even at beta 0. On the plain 3-client federation (no conflict) every variant uses one
prototype and matches the monolithic RM.

As a client's reward model inside MoR: `VPARewardModel` has RewardModel's scoring interface
(`score(images, prompts, responses) -> [B]`, `standardized`, `pair_rewards`); its posterior q is
fixed from the client's own context pairs, and its reward is the posterior mean E_q[r(x, y, z)].
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import data
import models
import federated
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
    with a zero where q has mass would be infinite, which the server's floor (V6) prevents."""
    q = q.clamp_min(0)
    return (q * (q.clamp_min(1e-12).log() - prior.clamp_min(1e-12).log())).sum(-1)


def orthogonal_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """V7. prototypes [P, Dz] -> sum over pairs p < p' of cos(v_p, v_p')^2 (scalar)."""
    v = F.normalize(prototypes, dim=-1, eps=1e-8)
    cos = v @ v.T  # [P, P], ones on the diagonal
    return torch.triu(cos, diagonal=1).pow(2).sum()


# ----------------------------------------------------------------------------------------------
# The models: VPA (V1, V3) and the monolithic BT head it is compared with
# ----------------------------------------------------------------------------------------------


@dataclass
class VPAConfig:
    prototypes: int = 4       # P
    hidden: int = 64          # H of the encoder and of the reward trunk
    context: int = 16         # C: context pairs per episode (measured, conflict variant, beta 0:
                              # with 8 every client stayed on one prototype, 16 separated the groups)
    targets: int = 16         # T: target pairs per episode
    episodes: int = 16        # M: episodes per local step (one per row of a batch)
    local_steps: int = 20     # local AdamW steps per round
    rounds: int = 20          # R
    lr: float = 2e-3
    beta: float = 0.1         # KL weight in V4 (1 = the plain ELBO; measured: every variant collapses)
    kl_warmup: float = 0.0    # beta ramps linearly from 0 over this share of all steps (0: off)
    orth: float = 1.0         # lambda of V7; 0 = ablation
    mixture_prior: bool = True  # V6; False = fixed uniform prior (ablation)
    prior_floor: float = 0.01   # pi <- (1 - eps) pi + eps / P: no prototype gets prior 0
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
# Clients on features, episodes, local updates
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


def episodes(n: int, m: int, c: int, t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(context idx [m, c], target idx [m, t]) into a client's n training pairs, drawn with
    replacement (a client with fewer pairs than c + t still works)."""
    return torch.randint(n, (m, c), generator=generator), torch.randint(n, (m, t), generator=generator)


def episode_terms(model: VPA, w: torch.Tensor, l: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                  prior: torch.Tensor, tau: float | None, generator: torch.Generator | None = None) -> dict:
    """V4 per episode. w, l [N, D]; ctx [M, C], tgt [M, T] indices; prior [P].
    tau=None: exact expectation over q (no sampling), for evaluation.
    Returns loglik [M] (summed over targets), kl [M], q [M, P], acc [M]."""
    logits = model.posterior_logits(w[ctx], l[ctx])  # [M, P]
    if tau is None:
        q = F.softmax(logits, -1)
        margin = model.reward_all(w[tgt]) - model.reward_all(l[tgt])  # [M, T, P]
        loglik = (F.logsigmoid(margin) * q.unsqueeze(1)).sum(-1).sum(-1)  # E_q, summed over T
        acc = ((margin * q.unsqueeze(1)).sum(-1) > 0).float().mean(-1)
    else:
        z, q = gumbel_softmax(logits, tau, hard=True, generator=generator)  # [M, P] each
        v = z @ model.prototypes  # [M, Dz]: exactly one prototype per episode in the forward
        margin = model.reward(w[tgt], v) - model.reward(l[tgt], v)  # [M, T]
        loglik = F.logsigmoid(margin).sum(-1)
        acc = (margin > 0).float().mean(-1)
    return {"loglik": loglik, "kl": categorical_kl(q, prior), "q": q, "acc": acc}


@dataclass
class Upload:
    """What a client sends the server after a round: parameters, n_k, its mean posterior and
    scalars. No pair and no feature leaves."""

    state: dict
    n: int
    qbar: torch.Tensor | None
    loss: float
    acc: float


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_update(model: nn.Module, state: dict, client: ClientFeatures, cfg: VPAConfig, prior: torch.Tensor | None,
                 step0: int, total_steps: int, seed: int) -> Upload:
    """One round at one client: cfg.local_steps AdamW steps from the server's `state`.
    VPA: loss = -ELBO / T + lambda * L_orth (V4, V7); MonolithicBT: BT on the same target pairs.
    `model` is a scratch module of the right class (its parameters are overwritten)."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    M, C, T = cfg.episodes, cfg.context, cfg.targets
    losses, accs, qs = [], [], []
    for i in range(cfg.local_steps):
        ctx, tgt = episodes(client.n, M, C, T, g)
        if isinstance(model, VPA):
            tau = temperature(step0 + i, total_steps, cfg.tau0, cfg.tau_min)
            o = episode_terms(model, client.train_w, client.train_l, ctx, tgt, prior, tau, g)
            beta = cfg.beta * min(1.0, (step0 + i) / (cfg.kl_warmup * total_steps)) if cfg.kl_warmup > 0 else cfg.beta
            neg_elbo = -(o["loglik"] - beta * o["kl"]) / T  # [M], per target pair
            loss = neg_elbo.mean() + cfg.orth * orthogonal_loss(model.prototypes)
            qs.append(o["q"].detach().mean(0))
            acc = o["acc"].mean()
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
    qbar = torch.stack(qs).mean(0) if qs else None  # [P]
    return Upload(_state(model), client.n, qbar, sum(losses) / len(losses), sum(accs) / len(accs))


def mixture_prior(uploads: list[Upload], floor: float) -> torch.Tensor:
    """V6 on the server: pi = sum_k n_k qbar_k / sum_k n_k, computed by the same FedAvg that
    averages the parameters (it is the n_k-weighted mean of one tensor), then floored."""
    pi = federated.fedavg([{"pi": u.qbar} for u in uploads], [u.n for u in uploads])["pi"]
    pi = pi / pi.sum()
    return (1 - floor) * pi + floor / pi.numel()


def pooled_feature_stats(clients: list[ClientFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature mean/std [D] from each client's (count, sum, sum of squares): router.pooled_stats."""
    moments = []
    for c in clients:
        e = torch.cat([c.train_w, c.train_l]).double()
        moments.append((e.shape[0], e.sum(0), (e * e).sum(0)))
    return routing.pooled_stats(moments)


def train_federated(kind: str, clients: list[ClientFeatures], cfg: VPAConfig, seed: int,
                    desc: str | None = None) -> tuple[nn.Module, torch.Tensor | None, list[dict]]:
    """R rounds of FedAvg (E4) of a VPA (`kind="vpa"`) or MonolithicBT (`kind="mono"`) over
    `clients`; every client reports every round. Returns (model, prior pi [P] or None, log).
    Same seed, same result: the init comes from `seed`, each client-round's episodes and Gumbel
    noise from a generator seeded by (seed, round, client index)."""
    if not clients:
        raise ValueError("train_federated: no clients")
    cfg.validate()
    D = clients[0].train_w.shape[1]
    for c in clients:
        if c.train_w.shape[1] != D:
            raise ValueError(f"client {c.name!r}: feature dim {c.train_w.shape[1]}, client 0 has {D}")
    torch.manual_seed(seed)
    make = {"vpa": VPA, "mono": MonolithicBT}.get(kind)
    if make is None:
        raise ValueError(f"train_federated: kind must be 'vpa' or 'mono', got {kind!r}")
    model, scratch = make(D, cfg), make(D, cfg)
    model.set_feature_stats(*pooled_feature_stats(clients))
    P = cfg.prototypes
    prior = torch.full((P,), 1.0 / P) if kind == "vpa" else None  # round 0: uniform
    total = cfg.rounds * cfg.local_steps
    log = []
    bar = tqdm(range(cfg.rounds), desc=desc or kind, dynamic_ncols=True, disable=None, leave=False)
    for r in bar:
        state = _state(model)
        ups = [local_update(scratch, state, c, cfg, prior, r * cfg.local_steps, total, seed * 100_003 + r * 101 + k)
               for k, c in enumerate(clients)]
        model.load_state_dict(federated.fedavg([u.state for u in ups], [u.n for u in ups]))
        if kind == "vpa" and cfg.mixture_prior:
            prior = mixture_prior(ups, cfg.prior_floor)
        n = sum(u.n for u in ups)
        entry = {"round": r, "loss": sum(u.n * u.loss for u in ups) / n, "acc": sum(u.n * u.acc for u in ups) / n}
        if prior is not None:
            entry["prior"] = [round(x, 4) for x in prior.tolist()]
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['acc']:.3f}")
    model.eval()
    return model, prior, log


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


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


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
    purity at its floor."""
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
        q_ent.append(_entropy(qs).mean().item())
        qbars.append(qk * c.n)
        ns.append(c.n)
        assign[c.name] = int(m.argmax())
    qbar = torch.stack(qbars).sum(0) / sum(ns)
    share = counts.sum(1) / counts.sum()
    v = F.normalize(model.prototypes.detach(), dim=-1)
    cos = (v @ v.T).abs()
    out.update({
        "client_purity": sum(client_purity) / len(client_purity),
        "group_purity": (counts.max(1).values.sum() / counts.sum()).item(),
        "used": int((share >= 0.05).sum()),
        "H_qbar": _entropy(qbar).item(),
        "H_q": sum(q_ent) / len(q_ent),
        "max_cos": (cos - torch.eye(P)).max().item(),
        "assignment": assign,
        "prior": prior.tolist() if prior is not None else None,
    })
    return out


# ----------------------------------------------------------------------------------------------
# MoR interface: a client's VPA reward model
# ----------------------------------------------------------------------------------------------


class VPARewardModel(nn.Module):
    """A trained VPA fixed to one client: q [P] from its context pairs, reward
    r_k(x, y) = E_q[r(x, y, z)] = sum_p q_p r(x, y, p) (V3). Stands in for reward.RewardModel
    wherever MoR scores responses (grpo.score_unique, reward.pair_scores / pair_accuracy, the
    router's per-RM rewards): `score(images, prompts, responses) -> [B]`, `standardized`,
    `pair_rewards`. The features come from the frozen reference policy (router.features, E2),
    so scoring costs one reference forward; `rewards(e)` skips it when GRPO already has e.

    Use as client k's RM: vpa_rm = VPARewardModel.from_context(vpa, ctx_w, ctx_l, ref_vlm, processor)
    with ctx_* [N, D] the client's own pair features, then set mean/std with `calibrate` on its
    training pairs (E3 standardisation), and put it in the list of RMs MoR mixes."""

    def __init__(self, vpa: VPA, q: torch.Tensor, ref_vlm=None, processor=None, mean: float = 0.0, std: float = 1.0,
                 info: dict | None = None):
        super().__init__()
        if q.shape != (vpa.cfg.prototypes,):
            raise ValueError(f"VPARewardModel: posterior must be [{vpa.cfg.prototypes}], got {tuple(q.shape)}")
        self.vpa = vpa
        self.register_buffer("q", q.detach().float() / q.sum())
        self.ref_vlm, self.processor = ref_vlm, processor
        self.encoder = models.Encoder(processor) if processor is not None else None
        self.mean, self.std = float(mean), float(std)
        self.info = dict(info or {})

    @classmethod
    @torch.no_grad()
    def from_context(cls, vpa: VPA, ctx_w: torch.Tensor, ctx_l: torch.Tensor, ref_vlm=None, processor=None,
                     **kw) -> "VPARewardModel":
        """q from all of a client's context pairs at once (mean pooling accepts any count)."""
        if ctx_w.shape[0] == 0:
            raise ValueError("VPARewardModel.from_context: empty context (a client needs >= 1 preference pair)")
        q = F.softmax(vpa.posterior_logits(ctx_w.unsqueeze(0), ctx_l.unsqueeze(0)), -1)[0]
        return cls(vpa, q, ref_vlm, processor, **kw)

    @torch.no_grad()
    def rewards(self, e: torch.Tensor) -> torch.Tensor:
        """e [B, D] reference features -> raw rewards [B]."""
        return self.vpa.reward_all(e.float()) @ self.q

    @torch.no_grad()
    def score(self, images, prompts, responses) -> torch.Tensor:
        """Raw rewards [B] for (image, prompt, response) triples, RewardModel.score's contract."""
        if self.ref_vlm is None:
            raise RuntimeError("VPARewardModel.score needs the reference VLM and processor (pass ref_vlm, processor)")
        return self.rewards(routing.features(self.ref_vlm, self.encoder, images, prompts, responses))

    def standardized(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.mean) / self.std

    def pair_rewards(self, pairs: list, lm_loss: bool = False):
        """(r_chosen [B], r_rejected [B]) like RewardModel.pair_rewards (for reward.pair_scores)."""
        if lm_loss:
            raise ValueError("VPARewardModel has no language-model head (lm_loss=True is not supported)")
        B = len(pairs)
        r = self.score([p.image for p in pairs] * 2, [p.prompt for p in pairs] * 2,
                       [p.chosen for p in pairs] + [p.rejected for p in pairs])
        return r[:B], r[B:]

    def calibrate(self, e: torch.Tensor) -> None:
        """E3's mean/std from the features [N, D] of the client's own training responses."""
        r = self.rewards(e)
        self.mean, self.std = r.mean().item(), max(r.std().item(), 1e-6)

    def save(self, out_dir: str | Path) -> None:
        """vpa.safetensors (parameters + q) and vpa.json (config, D, mean/std, info)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t = {k: v.detach().cpu().contiguous() for k, v in self.vpa.state_dict().items()}
        t["posterior"] = self.q.cpu().contiguous()
        save_file(t, str(out / "vpa.safetensors"))
        meta = {"config": asdict(self.vpa.cfg), "dim": self.vpa.dim, "mean": self.mean, "std": self.std, **self.info}
        (out / "vpa.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, ref_vlm=None, processor=None) -> "VPARewardModel":
        path = Path(path)
        for need in ("vpa.safetensors", "vpa.json"):
            if not (path / need).exists():
                raise FileNotFoundError(f"{path}: not a VPA reward-model directory (missing {need})")
        meta = json.loads((path / "vpa.json").read_text())
        vpa = VPA(meta.pop("dim"), VPAConfig(**meta.pop("config")))
        t = load_file(str(path / "vpa.safetensors"))
        q = t.pop("posterior")
        vpa.load_state_dict(t)
        vpa.eval()
        return cls(vpa, q, ref_vlm, processor, meta.pop("mean"), meta.pop("std"), meta)


# ----------------------------------------------------------------------------------------------
# The benchmark: easy-VQA pairs, the conflicting-preference variant, cached features
# ----------------------------------------------------------------------------------------------


def full_answer(prompt: str, answer: str) -> str:
    """The "full sentence" style of an answer, in the benchmark's vocabulary:
    colour/shape -> "the shape is red", position -> "the shape is on the left" / "at the top"."""
    if answer in ("left", "right"):
        return f"the shape is on the {answer}"
    if answer in ("top", "bottom"):
        return f"the shape is at the {answer}"
    return f"the shape is {answer}"


def heldout_split(pairs: list[data.Pair], name: str, seed: int, heldout: float = 0.1):
    """federated.Client's split (same seeded rule, by image): (train pairs, held-out pairs)."""
    images = sorted({p.image for p in pairs})
    random.Random(f"heldout-{name}-{seed}").shuffle(images)
    held = set(images[: max(1, round(heldout * len(images)))]) if len(images) > 1 else set()
    return [p for p in pairs if p.image not in held], [p for p in pairs if p.image in held]


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


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def feature_table(triples: list[tuple[str, str, str]], ref_dir: Path, cache: Path) -> dict[tuple, torch.Tensor]:
    """E2 features of every (image, prompt, response) triple from the frozen reference at
    `ref_dir`, cached in `cache` (.safetensors: e [U, D]; .json: the triples in row order and a
    fingerprint of the reference weights). Each client would compute its own rows with the public
    reference; one table for all is the simulation's shortcut. Missing triples are computed and
    the cache rewritten; a changed reference invalidates it."""
    weights = sorted(ref_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{ref_dir}: no reference checkpoint (run `python mor.py --stages sft` first)")
    fp = hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights).encode()).hexdigest()[:16]
    table: dict[tuple, torch.Tensor] = {}
    side = cache.with_suffix(".json")
    if cache.exists() and side.exists():
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
        keys = sorted(table)
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic(cache, lambda p: save_file({"e": torch.stack([table[k] for k in keys]).contiguous()}, str(p)))
        _atomic(side, lambda p: p.write_text(json.dumps({"reference": fp, "triples": [list(k) for k in keys]})))
    return table


def client_features(clients: dict[str, tuple[str, list[data.Pair]]], seed: int, ref_dir: Path,
                    cache: Path) -> list[ClientFeatures]:
    """Pairs -> ClientFeatures (train / held-out split by image as in federated.Client)."""
    splits = {name: heldout_split(pairs, name, seed) for name, (_, pairs) in clients.items()}
    triples = [(p.image, p.prompt, y) for tr, he in splits.values() for p in tr + he for y in (p.chosen, p.rejected)]
    table = feature_table(triples, ref_dir, cache)
    D = next(iter(table.values())).shape[0]

    def stack(pairs, side):  # [N, D]
        return torch.stack([table[(p.image, p.prompt, getattr(p, side))] for p in pairs]) if pairs else torch.empty(0, D)
    return [ClientFeatures(name, clients[name][0], stack(tr, "chosen"), stack(tr, "rejected"),
                           stack(he, "chosen"), stack(he, "rejected")) for name, (tr, he) in splits.items()]


# ----------------------------------------------------------------------------------------------
# Experiment and CLI
# ----------------------------------------------------------------------------------------------

ABLATIONS = {  # name -> (mixture prior, orthogonal loss)
    "full (mixture prior + orth)": (True, True),
    "no mixture prior (uniform)": (False, True),
    "no orthogonal loss": (True, False),
    "neither": (False, False),
}


def _ms(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "values": xs}


def run_experiment(clients: list[ClientFeatures], cfg: VPAConfig, seeds: list[int], desc: str = "") -> dict:
    """Monolithic BT and the four VPA ablations, each over `seeds`; mean +/- std per figure."""
    res = {}
    runs = [("monolithic BT (FedAvg)", "mono", cfg)]
    for name, (mix, orth) in ABLATIONS.items():
        runs.append((name, "vpa", VPAConfig(**{**asdict(cfg), "mixture_prior": mix, "orth": cfg.orth if orth else 0.0})))
    for name, kind, c in runs:
        per_seed = []
        for s in seeds:
            t0 = time.time()
            model, prior, log = train_federated(kind, clients, c, s, desc=f"{desc} {name} s{s}")
            ev = evaluate(model, clients, prior, s)
            ev["seconds"] = round(time.time() - t0, 2)
            ev["final_loss"] = log[-1]["loss"]
            if kind == "vpa":
                ev["neg_elbo_heldout"] = neg_elbo(model, clients, prior, s, held=True)
            per_seed.append(ev)
        entry = {"accuracy": {c_.name: _ms([e["accuracy"][c_.name] for e in per_seed]) for c_ in clients},
                 "mean_accuracy": _ms([sum(e["accuracy"].values()) / len(e["accuracy"]) for e in per_seed]),
                 "min_accuracy": _ms([min(e["accuracy"].values()) for e in per_seed]),
                 "seconds": _ms([e["seconds"] for e in per_seed])}
        for k in ("client_purity", "group_purity", "used", "H_qbar", "H_q", "max_cos", "neg_elbo_heldout"):
            if k in per_seed[0]:
                entry[k] = _ms([float(e[k]) for e in per_seed])
        entry["per_seed"] = per_seed
        res[name] = entry
        tqdm.write(f"{desc} {name}: mean acc {entry['mean_accuracy']['mean']:.3f}"
                   + (f", group purity {entry['group_purity']['mean']:.2f}, used {entry['used']['mean']:.1f}"
                      if "group_purity" in entry else ""))
    return res


def results_markdown(all_res: dict, cfg: VPAConfig, seeds: list[int]) -> str:
    """Markdown of every (federation, beta) block in `all_res` (label -> run_experiment result)."""
    def f(d, pct=True, nd=1):
        return f"{100 * d['mean']:.{nd}f} ± {100 * d['std']:.{nd}f}" if pct else f"{d['mean']:.2f} ± {d['std']:.2f}"
    lines = ["# FedVPA-GP ablation (vpa.py)\n",
             f"P={cfg.prototypes}, context C={cfg.context}, targets T={cfg.targets}, {cfg.rounds} rounds x "
             f"{cfg.local_steps} local steps x {cfg.episodes} episodes, lr {cfg.lr}, lambda_orth {cfg.orth}, "
             f"tau {cfg.tau0} -> {cfg.tau_min}; training seeds {seeds} (data seed fixed); mean ± std over seeds. "
             "Accuracy: held-out pair accuracy (%); VPA scores with the posterior-mean reward E_q[r] under the "
             "client's posterior from its own training pairs.\n"]
    for label, res in all_res.items():
        names = list(next(iter(res.values()))["accuracy"])
        lines.append(f"\n## {label}\n")
        lines.append("| method | " + " | ".join(names) + " | mean | worst client |")
        lines.append("|---|" + "---|" * (len(names) + 2))
        for m, e in res.items():
            lines.append(f"| {m} | " + " | ".join(f(e["accuracy"][n]) for n in names)
                         + f" | {f(e['mean_accuracy'])} | {f(e['min_accuracy'])} |")
        lines.append("\n| VPA variant | client purity | group purity | prototypes used | H(q̄) nats | H(q) nats "
                     "| max abs cos | -ELBO/pair (held-out) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for m, e in res.items():
            if "group_purity" not in e:
                continue
            lines.append(f"| {m} | {f(e['client_purity'], False)} | {f(e['group_purity'], False)} | "
                         f"{f(e['used'], False)} | {f(e['H_qbar'], False)} | {f(e['H_q'], False)} | "
                         f"{f(e['max_cos'], False)} | {f(e['neg_elbo_heldout'], False)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/default", help="pipeline run dir: its base/ is the frozen reference")
    ap.add_argument("--out", default="runs/vpa", help="feature cache and results.md / results.json")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (comma separated)")
    ap.add_argument("--data-seed", type=int, default=None, help="federation/pairs seed (default: the run dir's)")
    ap.add_argument("--federations", default="conflict,plain", help="conflict (6 clients, terse vs full) and/or plain (3)")
    ap.add_argument("--betas", default="0.1,1", help="KL weights to run every ablation at (1 = the plain ELBO)")
    ap.add_argument("--fresh", action="store_true", help="drop earlier blocks of results.json instead of merging")
    ap.add_argument("--threads", type=int, default=1)
    for k, v in asdict(VPAConfig()).items():
        if isinstance(v, bool) or k == "beta":
            continue
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    return ap.parse_args(argv)


FEDERATIONS = {"conflict": (conflict_clients, "conflict: 6 clients (3 domains x terse/full)"),
               "plain": (plain_clients, "plain: the benchmark's 3 clients")}


def main(argv=None) -> int:
    """Blocks (federation x beta) are merged into results.json (unless --fresh), so a long
    table can be produced by several short invocations; results.md is rewritten from all blocks."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = VPAConfig(**{k: getattr(a, k) for k in asdict(VPAConfig()) if hasattr(a, k)})
    cfg.validate()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    betas = [float(b) for b in a.betas.split(",") if b.strip()]
    run_dir, out = Path(a.run_dir), Path(a.out)
    data_seed = a.data_seed
    if data_seed is None:
        conf = run_dir / "config.json"
        data_seed = json.loads(conf.read_text()).get("seed", 0) if conf.exists() else 0
    feds = [f.strip() for f in a.federations.split(",") if f.strip()]
    for name in feds:
        if name not in FEDERATIONS:
            raise SystemExit(f"--federations: unknown {name!r} (choose from {sorted(FEDERATIONS)})")
    fed = data.build_federation(data_seed)
    old = out / "results.json"
    merged = {} if a.fresh or not old.exists() else json.loads(old.read_text()).get("results", {})
    t0 = time.time()
    for name in feds:
        build, label = FEDERATIONS[name]
        clients = client_features(build(fed, data_seed), data_seed, run_dir / "base",
                                  out / f"features-seed{data_seed}.safetensors")
        print(f"{label}: train pairs {[c.n for c in clients]}, held-out {[c.held_w.shape[0] for c in clients]}")
        for beta in betas:
            c = VPAConfig(**{**asdict(cfg), "beta": beta})
            merged[f"{label}, beta {beta:g}"] = run_experiment(clients, c, seeds, desc=f"{name} b{beta:g}")
    md = results_markdown(merged, cfg, seeds)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "results.md", lambda p: p.write_text(md))
    _atomic(out / "results.json", lambda p: p.write_text(json.dumps(
        {"config": asdict(cfg), "seeds": seeds, "data_seed": data_seed, "results": merged}, indent=1)))
    print(md)
    print(f"wrote {out / 'results.md'} and results.json ({time.time() - t0:.0f} s this invocation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
