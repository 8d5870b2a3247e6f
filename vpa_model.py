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
  V8 prior       pi_r = (1 - a_r) * u + a_r * pibar,   a_r = (1 - eps) * min(1, r / (w * R))
     warm-up     u = 1/P uniform, R rounds, w = cfg.prior_warmup (ours, see below), eps = cfg.prior_floor
                 ablation: pi = u, fixed
  loss_k = -ELBO_k / T + lambda * L_orth;   shared parameters (encoder, trunk, readout,
  prototypes) aggregated with federated.fedavg (E4) each round.

Why V8 (ours; the paper's mixture prior has learnable Gumbel-Softmax weights, whose schedule we
could not read, so the warm-up is labelled as this code's). With pi = pibar exactly, the KL term
summed over clients is the mutual information I(z; C) between the latent and the context: it is
minimised by using one prototype, and nothing pulls the population toward using more. With the
uniform prior, E KL(q || u) = I(z; C) + KL(pibar || u): the second term makes every prototype be
sampled early, so each gets a likelihood gradient while the groups are still undecided. Measured
on the conflict benchmark (vpa.py): with pi = pibar from round 1 the prior follows
whichever prototype the random init favours (round 1: pi_max 0.5, then a rich-get-richer loop),
hard samples of the other prototypes stop, they receive no likelihood gradient, and the encoder
never learns to leave the winner: one prototype, group purity 0.5. V8 keeps the uniform's
exploration while the groups are found and hands over to the mixture prior after that; a floor
eps / P stays so that no prototype's prior is ever 0 (V5 would be infinite).

`VPARewardModel` (bottom) fixes the posterior of one client (or one labeller group) and has
reward.RewardModel's scoring interface, so it can stand in for a client RM in MoR.
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
    """V7. prototypes [P, Dz] -> sum over pairs p < p' of cos(v_p, v_p')^2 (scalar)."""
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
    prior_warmup: float = 0.5   # V8 w: share of rounds over which pi moves from u to pibar (0: pibar at once)
    prior_floor: float = 0.01   # V8 eps: pi keeps eps / P of the uniform on every prototype
    revive: float = 0.0       # V9: a prototype with a smaller share of a round's samples is re-seeded (0: off)
    revive_until: float = 0.5  # V9 acts in the first share of the rounds only (time left to train the copies)
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
    VPA: loss = -ELBO / T + lambda * L_orth (V4, V7); MonolithicBT: BT on the same target pairs.
    `model` is a scratch module of the right class (its parameters are overwritten)."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    M, C, T = cfg.episodes, cfg.context, cfg.targets
    losses, accs, qs, usage, ents, kls = [], [], [], 0, [], []
    for i in range(cfg.local_steps):
        ctx, tgt = episodes(client.n, M, C, T, g)
        if isinstance(model, VPA):
            tau = temperature(step0 + i, total_steps, cfg.tau0, cfg.tau_min)
            o = episode_terms(model, client.train_w, client.train_l, ctx, tgt, prior, tau, g)
            beta = cfg.beta * min(1.0, (step0 + i) / (cfg.kl_warmup * total_steps)) if cfg.kl_warmup > 0 else cfg.beta
            neg_elbo = -(o["loglik"] - beta * o["kl"]) / T  # [M], per target pair
            loss = neg_elbo.mean() + cfg.orth * orthogonal_loss(model.prototypes)
            qs.append(o["q"].detach().mean(0))
            usage = usage + o["z"].detach().sum(0)
            ents.append(entropy(o["q"].detach()).mean().item())
            kls.append(o["kl"].detach().mean().item())
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
    loss, acc = sum(losses) / len(losses), sum(accs) / len(accs)
    if not qs:
        return Upload(_state(model), client.n, None, loss, acc)
    return Upload(_state(model), client.n, torch.stack(qs).mean(0), loss, acc, usage,
                  sum(ents) / len(ents), sum(kls) / len(kls))


def mixture_prior(uploads: list[Upload]) -> torch.Tensor:
    """V6 on the server: pibar = sum_k n_k qbar_k / sum_k n_k [P], computed by the same FedAvg
    that averages the parameters (it is the n_k-weighted mean of one tensor)."""
    pi = federated.fedavg([{"pi": u.qbar} for u in uploads], [u.n for u in uploads])["pi"]
    return pi / pi.sum()


def prior_for_round(pibar: torch.Tensor, r: int, cfg: VPAConfig) -> torch.Tensor:
    """V8: the prior the clients use in round r (0-based) given the mixture pibar [P] of the
    rounds before. a_r = (1 - eps) * min(1, r / (w R)): round 0 is uniform; the uniform's share
    decays linearly to eps over the first w R rounds (w = 0: pibar from round 1, the method as
    first implemented)."""
    P = pibar.numel()
    if getattr(cfg, "prior_hold", False):
        ramp = 1.0 if r >= max(1.0, cfg.prior_warmup * cfg.rounds) else 0.0
    else:
        ramp = min(1.0, r / (cfg.prior_warmup * cfg.rounds)) if cfg.prior_warmup > 0 else (1.0 if r > 0 else 0.0)
    a = (1 - cfg.prior_floor) * ramp
    return (1 - a) / P + a * pibar


def revive_dead(state: dict, pibar: torch.Tensor, usage: torch.Tensor, threshold: float,
                generator: torch.Generator) -> tuple[dict, torch.Tensor, tuple[int, int] | None]:
    """V9 on the server (ours): the least-used prototype, if its share of the round's hard
    samples `usage` [P] is below `threshold`, is re-seeded as a copy of the most-used one: its
    vector v_p <- v_dom + small noise, its encoder row (to_logits weight, bias) <- dom's, and the
    two share dom's prior mass. The copies then split dom's episodes at random; an episode whose
    group one copy fits better raises that copy's logit for contexts like it, so a collapsed
    population can still split by group (k-means' empty-cluster re-seeding, VQ's dead-code
    reset). Returns (state, pibar [P], (p, dom) or None)."""
    share = usage / usage.sum()
    p, dom = int(share.argmin()), int(share.argmax())
    if share[p] >= threshold or p == dom:
        return state, pibar, None
    state = {k: v.clone() for k, v in state.items()}
    v = state["prototypes"][dom]  # [H]
    state["prototypes"][p] = v + 0.1 * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=generator)
    for k in ("to_logits.weight", "to_logits.bias"):
        state[k][p] = state[k][dom]
    pibar = pibar.clone()
    pibar[p] = pibar[dom] = (pibar[p] + pibar[dom]) / 2
    return state, pibar, (p, dom)


def pooled_feature_stats(clients: list[ClientFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature mean/std [D] from each client's (count, sum, sum of squares): router.pooled_stats."""
    moments = []
    for c in clients:
        e = torch.cat([c.train_w, c.train_l]).double()
        moments.append((e.shape[0], e.sum(0), (e * e).sum(0)))
    return routing.pooled_stats(moments)


def _round_log(r: int, ups: list[Upload], clients: list[ClientFeatures], prior: torch.Tensor | None) -> dict:
    """One line of the per-round log (n_k-weighted over clients). VPA adds the prior the round
    used [P], the hard-sample usage [P], H(q), KL(q || pi) and every client's qbar [P]: the
    figures that show a collapse forming."""
    n = sum(u.n for u in ups)
    entry = {"round": r, "loss": sum(u.n * u.loss for u in ups) / n, "acc": sum(u.n * u.acc for u in ups) / n}
    if ups[0].qbar is not None:
        usage = sum(u.usage for u in ups)
        entry.update({"prior": [round(x, 4) for x in prior.tolist()],
                      "usage": [round(x, 4) for x in (usage / usage.sum()).tolist()],
                      "H_q": round(sum(u.n * u.h_q for u in ups) / n, 4),
                      "kl": round(sum(u.n * u.kl for u in ups) / n, 4),
                      "qbar": {c.name: [round(x, 3) for x in u.qbar.tolist()] for c, u in zip(clients, ups)}})
    return entry


def train_federated(kind: str, clients: list[ClientFeatures], cfg: VPAConfig, seed: int,
                    desc: str | None = None, init: dict | None = None) -> tuple[nn.Module, torch.Tensor | None, list[dict]]:
    """R rounds of FedAvg (E4) of a VPA (`kind="vpa"`) or MonolithicBT (`kind="mono"`) over
    `clients`; every client reports every round. Returns (model, prior pi [P] or None, log): pi
    is the prior of a round after the last (V8 at r = R), the one evaluation and the client RMs'
    KL use. Same seed, same result: the init comes from `seed` (or `init`, a state dict to start
    from; its feature stats are replaced by the clients' pooled ones), each client-round's
    episodes and Gumbel noise from a generator seeded by (seed, round, client index)."""
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
    if init is not None:
        model.load_state_dict(init)
    model.set_feature_stats(*pooled_feature_stats(clients))
    P = cfg.prototypes
    uniform = torch.full((P,), 1.0 / P)
    pibar, prior = uniform, (uniform if kind == "vpa" else None)
    total = cfg.rounds * cfg.local_steps
    log = []
    bar = tqdm(range(cfg.rounds), desc=desc or kind, dynamic_ncols=True, disable=None, leave=False)
    for r in bar:
        split = None
        if kind == "vpa" and cfg.mixture_prior:
            prior = prior_for_round(pibar, r, cfg)  # V8; the ablation keeps the uniform
        state = _state(model)
        ups = [local_update(scratch, state, c, cfg, prior, r * cfg.local_steps, total, seed * 100_003 + r * 101 + k)
               for k, c in enumerate(clients)]
        model.load_state_dict(federated.fedavg([u.state for u in ups], [u.n for u in ups]))
        if kind == "vpa":
            pibar = mixture_prior(ups)  # V6
            if cfg.revive > 0 and r < cfg.revive_until * cfg.rounds:
                state, pibar, split = revive_dead(_state(model), pibar, sum(u.usage for u in ups), cfg.revive,
                                                  torch.Generator().manual_seed(seed * 7919 + r))
                model.load_state_dict(state)
        log.append(_round_log(r, ups, clients, prior))
        if kind == "vpa" and split is not None:
            log[-1]["split"] = split  # (dead prototype, the one it was copied from)
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", acc=f"{log[-1]['acc']:.3f}")
    if kind == "vpa" and cfg.mixture_prior:
        prior = prior_for_round(pibar, cfg.rounds, cfg)
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
# MoR interface: a VPA reward model fixed to one client (or one labeller group)
# ----------------------------------------------------------------------------------------------


class VPARewardModel(nn.Module):
    """A trained VPA fixed to one posterior q [P] (from a client's, or a labeller group's, own
    context pairs); reward r(x, y) = E_q[r(x, y, z)] = sum_p q_p r(x, y, p) (V3). It has
    reward.RewardModel's scoring interface, which is all MoR calls on a client RM
    (grpo.score_unique / MixedReward, reward.pair_scores / pair_accuracy / reward_stats):
      score(images, prompts, responses) -> raw rewards [B]; standardized(r) -> (r - mean) / std;
      pair_rewards(pairs) -> (r_chosen [B], r_rejected [B]); mean, std, info; save(dir) / load(dir).
    The features are the frozen reference policy's (router.features, E2), so scoring costs one
    reference forward; `rewards(e)` skips it when the features are at hand.

    On disk: <dir>/vpa.safetensors (parameters + "posterior" [P]) and <dir>/vpa.json (config, D,
    mean, std, info). Loading refuses anything else (no pickle)."""

    FILES = ("vpa.safetensors", "vpa.json")

    def __init__(self, vpa: VPA, q: torch.Tensor, ref_vlm=None, processor=None, mean: float = 0.0, std: float = 1.0,
                 info: dict | None = None):
        super().__init__()
        if q.shape != (vpa.cfg.prototypes,) or not torch.isfinite(q).all() or (q < 0).any() or q.sum() <= 0:
            raise ValueError(f"VPARewardModel: posterior must be a finite non-negative [{vpa.cfg.prototypes}], "
                             f"got {tuple(q.shape)}")
        self.vpa = vpa
        self.register_buffer("q", q.detach().float() / q.sum())
        self.ref_vlm, self.processor = ref_vlm, processor
        self.encoder = models.Encoder(processor) if processor is not None else None
        self.mean, self.std = float(mean), float(std)
        self.info = dict(info or {})

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
        """e [B, D] reference features -> raw rewards [B]."""
        return self.vpa.reward_all(e.to(self.q.device).float()) @ self.q

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
        """E3's mean/std from the features [N, D] of the client's own training responses (chosen
        and rejected alike, as reward.reward_stats)."""
        r = self.rewards(e)
        self.mean, self.std = r.mean().item(), max(r.std().item(), 1e-6)

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
