"""FedVPL, FedVPA-GP's baseline: variational preference learning (Poddar et al. 2024, VPL) with a
Gaussian latent, federated by FedAvg exactly like FedVPA-GP (fedvpa.train_federated), with the same
encoder, reward trunk, data and budget; and the ablations between the two, which change one piece
at a time.

  G1 posterior   q(z | C) = N(mu, diag sigma^2),  [mu, log sigma^2] = heads( mean_{c in C} phi(e_w^c - e_l^c) )   [P] each
  G2 sample      z = mu + sigma * eps,  eps ~ N(0, I)                                  (reparameterisation)
  G3 reward      r(x, y, z) = h(e(x, y)) . (w0 + z @ V) + b0                           V [P, H]: fedvpa's prototypes
  G4 ELBO        ELBO_k = E_q[ sum_t log sigmoid(r(x_t, y_w, z) - r(x_t, y_l, z)) ] - beta KL(q || p)
  G5 prior       VPL:           p(z) = N(0, I),  KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
                 + mixture:     p(z) = sum_p pi_p N(z; e_p, s^2 I),  pi = softmax(rho) learned (fedvpa V9),
                                KL by one sample: log q(z) - log p(z) at G2's z (no closed form)
  +orth          lambda * L_orth(V)  (fedvpa V7, on the same parameter)
  loss_k = -ELBO_k / T + lambda L_orth;  everything FedAvg'd (E4) every round

Where z and the prototypes live: z in R^P, decoded to the readout offset z @ V in R^H. FedVPA-GP's
z is the one-hot vertex e_p (offset v_p), so both models' latents are points of one space R^P and
the prototypes are its vertices e_p; the mixture prior puts its components there. P = the
prototype count keeps the latent as small as FedVPA-GP's (VPL's own latent is wider; departures in
docs/vpa.md). The reward is linear in z, so E_q[r] = r(mu): evaluation scores with the posterior
mean, as FedVPA-GP scores with E_q[r].

Why a module of its own: its encoder heads, sampler, KL and evaluation (k-means purity, there is no
MAP prototype) differ from fedvpa.py's at every step but the trunk, which it reuses by import; the
method's module stays the paper's model (and under its size limit). The latent plot of both models
is here too: it is drawn in the space this docstring defines.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedvpa import VPA, ClientFeatures, VPAConfig, _Standardise, episodes, kl_weight, orthogonal_loss

COMPONENT_STD = 0.5  # s of G5: components at the vertices e_p (sqrt 2 apart) overlap at ~1.4 s


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """G5, VPL: KL(N(mu, diag e^logvar) || N(0, I)); mu, logvar [..., Z] -> [...]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag e^logvar) summed over the last dim (broadcasting)."""
    return -0.5 * ((z - mean).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


def mixture_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, pi: torch.Tensor,
               std: float = COMPONENT_STD) -> torch.Tensor:
    """G5, mixture: one-sample KL estimate log q(z) - log p(z). z, mu, logvar [M, P]; pi [P];
    components N(e_p, std^2 I) at the vertices. -> [M]."""
    P = pi.numel()
    comps = torch.eye(P, dtype=z.dtype)  # [P(component), P(dim)]
    lv = torch.full((P,), 2 * math.log(std), dtype=z.dtype)
    log_p = torch.logsumexp(pi.clamp_min(1e-12).log() + log_normal(z.unsqueeze(-2), comps, lv), -1)  # [M]
    return log_normal(z, mu, logvar) - log_p


class VPL(_Standardise):
    """G1-G5 on features of dim D; the encoder's trunk phi, the reward trunk h and readout w0 are
    fedvpa.VPA's, layer for layer; `prototypes` is the decoder V (the name VPA gives the same
    parameter, so V7 acts on the same thing). cfg.mixture_prior: G5's mixture; cfg.orth: V7."""

    def __init__(self, dim: int, cfg: VPAConfig):
        super().__init__(dim)
        cfg.validate()
        self.dim, self.cfg = dim, cfg
        H, P = cfg.hidden, cfg.prototypes
        self.phi = nn.Sequential(nn.Linear(dim, H), nn.GELU(), nn.Linear(H, H), nn.GELU())  # per context pair
        self.to_mu, self.to_logvar = nn.Linear(H, P), nn.Linear(H, P)  # G1's heads
        self.prototypes = nn.Parameter(torch.randn(P, H) / math.sqrt(H))  # V: latent axis p -> readout offset
        self.trunk = nn.Sequential(nn.Linear(dim, H), nn.GELU())
        self.w0 = nn.Linear(H, 1)
        if cfg.mixture_prior:
            self.rho = nn.Parameter(torch.zeros(P))  # G5's mixture logits, uniform at the start

    def learned_prior(self) -> torch.Tensor | None:
        """pi = softmax(rho) [P] of the mixture prior, None for N(0, I)."""
        return F.softmax(self.rho, -1) if hasattr(self, "rho") else None

    def posterior(self, ctx_w: torch.Tensor, ctx_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G1. ctx_w, ctx_l [M, C, D] -> (mu [M, P], logvar [M, P]); VPA.posterior_logits' pooling."""
        pooled = self.phi(self.norm(ctx_w) - self.norm(ctx_l)).mean(-2)  # [M, H]
        return self.to_mu(pooled), self.to_logvar(pooled).clamp(-8.0, 4.0)  # clamp: exp() stays finite

    def reward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """G3. e [M, T, D], z [M, P] -> r [M, T]."""
        h = self.trunk(self.norm(e))  # [M, T, H]
        readout = self.w0.weight[0] + z @ self.prototypes  # [M, H]
        return (h * readout.unsqueeze(-2)).sum(-1) + self.w0.bias

    def train_terms(self, w: torch.Tensor, l: torch.Tensor, ctx: torch.Tensor, tgt: torch.Tensor,
                    prior, step: int, total: int, g: torch.Generator) -> dict:
        """One local step (G2, G4, G5, V7); `prior` (the server's) is unused: p is N(0, I) or the
        learned mixture. Same keys as VPA.train_terms, without the hard-sample z."""
        cfg = self.cfg
        mu, logvar = self.posterior(w[ctx], l[ctx])  # [M, P]
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g, dtype=mu.dtype)  # G2
        margin = self.reward(w[tgt], z) - self.reward(l[tgt], z)  # [M, T]
        pi = self.learned_prior()
        kl = gaussian_kl(mu, logvar) if pi is None else mixture_kl(z, mu, logvar, pi)  # [M]
        neg_elbo = -(F.logsigmoid(margin).sum(-1) - kl_weight(cfg, step, total) * kl) / cfg.targets
        h_q = 0.5 * (logvar.detach() + 1 + math.log(2 * math.pi)).sum(-1).mean().item()  # differential entropy
        return {"loss": neg_elbo.mean() + cfg.orth * orthogonal_loss(self.prototypes),
                "acc": (margin > 0).float().mean(), "q": mu, "kl": kl, "h_q": h_q}


# ----------------------------------------------------------------------------------------------
# Evaluation: accuracy under the posterior mean, k-means group purity; the latent of either model
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_points(model: nn.Module, client: ClientFeatures, seed: int) -> torch.Tensor:
    """[S, P]: the client's position in the latent space R^P for S context sets of C of its own
    training pairs (fedvpa_eval.client_posterior's draw): VPA E_q[z] = q, FedVPL mu."""
    cfg = model.cfg
    ctx, _ = episodes(client.n, cfg.eval_contexts, cfg.context, 1, torch.Generator().manual_seed(seed))
    if isinstance(model, VPA):
        return F.softmax(model.posterior_logits(client.train_w[ctx], client.train_l[ctx]), -1)
    return model.posterior(client.train_w[ctx], client.train_l[ctx])[0]


def kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means on x [N, P] from a farthest-point start (deterministic) -> labels [N]."""
    cent = [x[0]]
    for _ in range(1, min(k, x.shape[0])):
        d = torch.cdist(x, torch.stack(cent)).min(1).values  # [N]
        cent.append(x[d.argmax()])
    c = torch.stack(cent)  # [k, P]
    for _ in range(iters):
        lab = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(c.shape[0])])
    return torch.cdist(x, c).argmin(1)


@torch.no_grad()
def evaluate_vpl(model: VPL, clients: list[ClientFeatures], seed: int = 0) -> dict:
    """fedvpa_eval.evaluate's figures for FedVPL: held-out accuracy with r(mu_k) (= E_q[r], G3 is
    linear in z), mu_k the mean of the client's S posterior means (seeds as evaluate's);
    group purity = cluster purity against the true groups of a k-means (k = P) of all S x K
    posterior means (what the MAP prototype is for VPA); client purity likewise per client;
    `collapsed` = group purity < 0.9 (a Gaussian latent has no prototype count); kl = mean
    KL(q || p) of those posteriors (near 0: the posterior ignores the context)."""
    P = model.cfg.prototypes
    groups = sorted({c.group for c in clients})
    pts = [latent_points(model, c, seed * 31 + k) for k, c in enumerate(clients)]  # [S, P] each
    out = {"accuracy": {}}
    for c, mu in zip(clients, pts):
        if c.held_w.shape[0] == 0:
            out["accuracy"][c.name] = float("nan")
            continue
        z = mu.mean(0, keepdim=True)  # [1, P]
        rw, rl = model.reward(c.held_w.unsqueeze(0), z)[0], model.reward(c.held_l.unsqueeze(0), z)[0]
        out["accuracy"][c.name] = (rw > rl).float().mean().item()
    lab = kmeans(torch.cat(pts), P)
    counts = torch.zeros(P, len(groups))
    cl_pur, i = [], 0
    for c, mu in zip(clients, pts):
        m = torch.bincount(lab[i:i + len(mu)], minlength=P).float()
        counts[:, groups.index(c.group)] += m
        cl_pur.append((m.max() / m.sum()).item())
        i += len(mu)
    purity = (counts.max(1).values.sum() / counts.sum()).item()
    ctx_kl = []
    for k, c in enumerate(clients):
        ctx, _ = episodes(c.n, model.cfg.eval_contexts, model.cfg.context, 1, torch.Generator().manual_seed(seed * 31 + k))
        mu, lv = model.posterior(c.train_w[ctx], c.train_l[ctx])
        ctx_kl.append(gaussian_kl(mu, lv).mean().item())
    pi = model.learned_prior()
    out.update({"client_purity": sum(cl_pur) / len(cl_pur), "group_purity": purity, "used": None,
                "collapsed": bool(purity < 0.9) if len(groups) > 1 else None,
                "kl_normal": sum(ctx_kl) / len(ctx_kl), "prior": pi.tolist() if pi is not None else None,
                "max_cos": (lambda v: ((v @ v.T).abs() - torch.eye(P)).max().item())(F.normalize(model.prototypes, dim=-1))})
    return out


# ----------------------------------------------------------------------------------------------
# The paper's figure: every client's latent over the rounds, the prototypes marked
# ----------------------------------------------------------------------------------------------


def latent_plot(path: str | Path, rounds: list[dict], points: dict, groups: dict, title: str) -> None:
    """Two panels in one 2-D projection of the latent space R^P (PCA of everything drawn):
    left, each client's mean latent per round (the log's qbar: VPA's mean posterior, FedVPL's mean
    posterior mean), a line from round 0 (circle) to the last (square), coloured by its true
    group; right, the trained model's latent for each of the client's S context sets. The
    prototypes (the vertices e_p; FedVPL: the decoder's axes, the mixture's component means) are
    black stars. points {client: [S, P]}, groups {client: group}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points)
    traj = torch.tensor([[e["qbar"][n] for n in names] for e in rounds])  # [R, K, P]
    P = traj.shape[-1]
    pts = {n: torch.as_tensor(points[n], dtype=torch.float32) for n in names}
    allp = torch.cat([traj.reshape(-1, P), *pts.values(), torch.eye(P)])
    mean = allp.mean(0)
    basis = torch.linalg.svd(allp - mean, full_matrices=False).Vh[:2].T  # [P, 2]
    proj = lambda x: ((x - mean) @ basis).numpy()  # noqa: E731
    colours = {g: c for g, c in zip(sorted(set(groups.values())), ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax in axes:
        v = proj(torch.eye(P))
        ax.scatter(v[:, 0], v[:, 1], marker="*", s=220, c="black", zorder=3)
        for p in range(P):
            ax.annotate(f"e{p}", v[p], textcoords="offset points", xytext=(6, 6))
    for k, n in enumerate(names):
        t = proj(traj[:, k])
        c = colours[groups[n]]
        axes[0].plot(t[:, 0], t[:, 1], "-", color=c, alpha=0.6)
        axes[0].scatter(t[0, 0], t[0, 1], marker="o", color=c, s=25)
        axes[0].scatter(t[-1, 0], t[-1, 1], marker="s", color=c, s=40)
        s = proj(pts[n])
        axes[1].scatter(s[:, 0], s[:, 1], color=c, s=10, alpha=0.6)
    for g, c in colours.items():
        axes[1].scatter([], [], color=c, label=g)
    axes[1].legend(title="group")
    axes[0].set_title(f"per-round mean latent, rounds 0-{len(rounds) - 1}")
    axes[1].set_title("trained: one point per context set")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
