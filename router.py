"""The router of Mixture-of-Rewards (docs/method.md, E2-E4) and the fixed-weight baselines (E8).

  e(x, y)  = [ mean_{t in prompt} h_t ; mean_{t in response} h_t ]       h: frozen reference VLM  (E2)
  w(x, y)  = softmax( g_phi(e(x, y)) )                                    w: [K]                  (E3)
  R(x, y)  = sum_k w_k(x, y) * (r_k(x, y) - mu_k) / sigma_k               standardised RMs         (E3)
  L_route  = - mean log sigmoid( R(x, y_w) - R(x, y_l) )                  only phi is trained      (E4)

Every reward source GRPO can use is a `WeightSource`: a module mapping features [B, D] to mixing
weights [B, K]. The router is one; Avg RM (w_k = 1/K) and Weighted RM (w_k = n_k / sum n) are
the others, so the mixed reward R is computed by one function whatever the method. An individual
RM k is the one-hot source e_k.

Why features from the *reference* model: it is frozen, so e(x, y) does not drift while the
policy trains, it is public (every client computes the same e with the same weights), and GRPO
runs its forward anyway for the KL term (E5), so routing costs one pooling, not a forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import models

# ----------------------------------------------------------------------------------------------
# E2: routing features
# ----------------------------------------------------------------------------------------------


def pool_features(h: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """h [B, T, H], masks [B, T] -> e [B, 2H]: mean over prompt tokens (image tokens included)
    and mean over response tokens, concatenated. A response of zero tokens pools to 0."""
    resp = response_mask.to(h.dtype)
    prompt = attention_mask.to(h.dtype) - resp  # attended and not response
    def mean(m):  # noqa: E306  masked mean over T: [B, T] x [B, T, H] -> [B, H]
        return (m.unsqueeze(-1) * h).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    return torch.cat([mean(prompt), mean(resp)], dim=-1).float()


@torch.no_grad()
def features(ref_vlm, encoder: models.Encoder, images: list, prompts: list[str], responses: list[str],
             batch_size: int = 256) -> torch.Tensor:
    """e(x, y) [B, 2H] from the frozen reference VLM, batched, each distinct image encoded once
    per batch (sort inputs by image for the best sharing)."""
    ref_vlm.eval()
    device = next(ref_vlm.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        b = encoder.encode_shared(ref_vlm, images[i:i + batch_size], prompts[i:i + batch_size],
                                  responses[i:i + batch_size], device)
        resp = b.pop("response_mask")
        h = ref_vlm.model(**b).last_hidden_state
        out.append(pool_features(h, b["attention_mask"], resp).cpu())
    return torch.cat(out) if out else torch.empty(0, 2 * ref_vlm.config.get_text_config().hidden_size)


# ----------------------------------------------------------------------------------------------
# E3: weight sources and the mixed reward
# ----------------------------------------------------------------------------------------------


# What the router reads of e(x, y) = [prompt mean ; response mean] (E2).
CONTEXTS = ("prompt", "prompt+response")


class Router(nn.Module):
    """g_phi: e [B, D] -> logits [B, K]; `weights` applies the softmax (E3), NTS (E6) reads the
    logits as arm scores.

    The input is standardised per coordinate with the federation's feature mean and std (buffers,
    set once before training from moments the clients report, `set_feature_stats`). Measured on
    the embedded default: without it, FedAvg of the router collapses onto one RM (entropy 0.06,
    colour held-out accuracy 63%). The pooled hidden states of all domains share a large common
    component; a client that holds one domain only learns "always route to my RM" through that
    component, and averaging such clients lets the biggest one win. Centred features leave the
    domain differences as the signal, and the same FedAvg routes every domain to its expert."""

    def __init__(self, dim: int, num_rms: int, hidden: int = 64, context: str = "prompt+response"):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"router context {context!r}: one of {CONTEXTS}")
        # "prompt": route on the prompt half of e(x, y) only, so all G samples of a prompt get the
        # same weights (see CONTEXTS); "prompt+response": E2's full e(x, y).
        self.dim, self.num_rms, self.hidden, self.context = dim, num_rms, hidden, context
        self.in_dim = dim // 2 if context == "prompt" else dim
        self.register_buffer("feat_mean", torch.zeros(self.in_dim))
        self.register_buffer("feat_std", torch.ones(self.in_dim))
        self.net = nn.Sequential(nn.Linear(self.in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_rms))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std: [dim] over the full e(x, y); the router keeps the part it reads."""
        self.feat_mean.copy_(mean[: self.in_dim])
        self.feat_std.copy_(std[: self.in_dim].clamp_min(1e-6))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e [B, dim] -> logits [B, K]"""
        return self.net((e[:, : self.in_dim] - self.feat_mean) / self.feat_std)

    def weights(self, e: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(e), dim=-1)


def pooled_stats(moments: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and std [D] of the union of the clients' features, from each client's
    (count, sum [D], sum of squares [D]): no feature vector leaves a client."""
    n = sum(m[0] for m in moments)
    s = sum(m[1].double() for m in moments)
    ss = sum(m[2].double() for m in moments)
    mean = s / n
    var = (ss - n * mean ** 2) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


class FixedWeights(nn.Module):
    """A weight source that ignores the context: Avg RM, Weighted RM, or one RM alone (E8)."""

    def __init__(self, w: list[float]):
        super().__init__()
        w = torch.tensor(w, dtype=torch.float32)
        if w.dim() != 1 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"fixed weights must be a non-negative, non-zero vector, got {w.tolist()}")
        self.register_buffer("w", w / w.sum())

    def weights(self, e: torch.Tensor) -> torch.Tensor:
        return self.w.expand(e.shape[0], -1)


def avg_rm(num_rms: int) -> FixedWeights:
    """E8 Avg RM: w_k = 1/K."""
    return FixedWeights([1.0] * num_rms)


def weighted_rm(counts: list[int]) -> FixedWeights:
    """E8 Weighted RM: w_k = n_k / sum_j n_j (the clients' training-pair counts)."""
    return FixedWeights([float(n) for n in counts])


def single_rm(k: int, num_rms: int) -> FixedWeights:
    """E8 Individual RM_k: all weight on RM k."""
    return FixedWeights([1.0 if j == k else 0.0 for j in range(num_rms)])


def mixed_reward(weights: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """E3. weights [B, K] (rows sum to 1), rewards [B, K] standardised -> R [B]."""
    if weights.shape != rewards.shape:
        raise ValueError(f"mixed_reward: weights {tuple(weights.shape)} and rewards {tuple(rewards.shape)} differ")
    return (weights * rewards).sum(-1)


def routing_loss(source, e_chosen: torch.Tensor, e_rejected: torch.Tensor, r_chosen: torch.Tensor,
                 r_rejected: torch.Tensor) -> torch.Tensor:
    """E4. e_* [B, D] features of (x, y_w) / (x, y_l); r_* [B, K] standardised RM rewards.
    The weights are computed per response: the router may trust a different RM for each."""
    R_w = mixed_reward(source.weights(e_chosen), r_chosen)
    R_l = mixed_reward(source.weights(e_rejected), r_rejected)
    return -F.logsigmoid(R_w - R_l).mean()


def routing_entropy(weights: torch.Tensor) -> float:
    """Mean entropy (nats) of the routing distributions [B, K]; log K is uniform, 0 is a
    collapse onto one RM (the failure signature the paper names)."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean().item()
