"""Neural Thompson Sampling over the client reward models (DESIGN E6, E7).

During GRPO the router becomes a contextual bandit: the arms are the K reward models, the context
is the routing feature e(x, y) (or its prompt half), and only the chosen arm's RM is evaluated, so
the reward costs one RM forward whatever K is (hard routing).

  f_k(e)    network score of arm k (initialised from the trained router: f = its logits)
  g_k       = grad_theta f_k(e)                                   [P]  (P: number of parameters)
  sigma_k^2 = lambda * nu^2 * sum( g_k^2 / U ) / m               U: diagonal [P], init lambda * 1
  s_k       ~ N( f_k(e), sigma_k^2 ),   k* = argmax_k s_k                                     (E6)
  after the step:  U <- U + g_{k*}^2 / m
                   a few gradient steps on  sum (f_{k*}(e) - b)^2 / 2 + m lambda ||theta - theta_0||^2 / 2

m is the network width (the router's hidden size), as in Zhang et al. (2021) "Neural Thompson
Sampling"; the diagonal U is their practical approximation of the design matrix.

E7, the bandit feedback b in {0, 1}, lives in `grpo_feedback`: one function, so it can be swapped.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, jacrev, vmap


class NeuralTS:
    """Thompson sampling with a neural network's gradient features (E6).

    network: maps contexts [B, D] -> arm scores [B, K] (a trained router, or any MLP); it is
        copied, so the caller's router is left as it was.
    lam (lambda): prior precision, U's initial value and the weight of the pull towards theta_0.
        Larger: smaller posterior variance, less exploration, slower drift from the router.
    nu: scale of the exploration noise (sigma is proportional to nu).
    width: m; default network.hidden when the network has it, else 64.
    lr, update_steps: the regularised squared-loss fit after each round of feedback (SGD).
    Defaults: the best of a small grid on the synthetic bandit of tests/test_nts.py (lambda in
    {1e-3, 1e-2, 1}, nu in {0.3, 1}); lambda = 1 pinned f to theta_0 and NTS did no better than
    uniform-random there.
    """

    def __init__(self, network: torch.nn.Module, lam: float = 1e-3, nu: float = 1.0, width: int | None = None,
                 lr: float = 0.05, update_steps: int = 10, seed: int = 0):
        self.net = copy.deepcopy(network).float()
        self.lam, self.nu, self.lr, self.update_steps = lam, nu, lr, update_steps
        self.m = width or getattr(network, "hidden", 64)
        self.names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.theta0 = {n: p.detach().clone() for n, p in self.net.named_parameters() if n in self.names}
        P = sum(p.numel() for p in self.theta0.values())
        self.U = torch.full((P,), float(lam))  # diagonal of the design matrix, [P]
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.SGD([p for n, p in self.net.named_parameters() if n in self.names], lr=lr)
        self._last, self._version = None, 0  # gradient cache, invalidated by every update

    # -- per-sample, per-arm gradients: one vectorised Jacobian, no Python loop over B or K ----
    def _grads(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """contexts [B, D] -> (scores f [B, K], gradients g [B, K, P]). The last result is kept:
        `update` on the contexts just passed to `select` (the usual call order) reuses it, since
        theta has not changed in between."""
        if self._last is not None and self._last[0] is contexts and self._last[1] == self._version:
            return self._last[2]
        params = {n: p.detach() for n, p in self.net.named_parameters() if n in self.names}
        buffers = dict(self.net.named_buffers())

        def f(p, x):  # one context [D] -> scores [K]
            return functional_call(self.net, {**p, **buffers}, (x.unsqueeze(0),)).squeeze(0)

        jac = vmap(jacrev(f), in_dims=(None, 0))(params, contexts)  # {name: [B, K, *shape]}
        g = torch.cat([jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1) for n in self.names], -1)
        with torch.no_grad():
            scores = self.net(contexts)
        self._last = (contexts, self._version, (scores, g))
        return scores, g

    def posterior(self, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean f [B, K], variance sigma^2 [B, K]) of every arm for every context."""
        f, g = self._grads(contexts)
        var = self.lam * self.nu ** 2 * (g ** 2 / self.U).sum(-1) / self.m  # [B, K]
        return f, var

    def select(self, contexts: torch.Tensor, per_batch: bool = False) -> torch.Tensor:
        """Arm index per context [B] (per query), or the same arm for every row (per batch: one
        draw on the batch's mean context)."""
        x = contexts.float().mean(0, keepdim=True) if per_batch else contexts
        f, var = self.posterior(x)
        s = f + var.sqrt() * torch.randn(f.shape, generator=self.gen)  # s_k ~ N(f_k, sigma_k^2)
        arms = s.argmax(-1)
        return arms.expand(contexts.shape[0]).clone() if per_batch else arms

    def update(self, contexts: torch.Tensor, arms: torch.Tensor, feedback: torch.Tensor) -> float:
        """U <- U + g_{k*}^2 / m for every (context, chosen arm), then `update_steps` of SGD on
        sum (f_{k*}(e) - b)^2 / 2 + m lam ||theta - theta_0||^2 / 2. Returns the final loss."""
        x, arms, b = contexts, arms.long(), feedback.float()
        _, g = self._grads(x)
        g_star = g[torch.arange(len(arms)), arms]  # [B, P]
        self.U += (g_star ** 2).sum(0) / self.m
        loss = torch.tensor(0.0)
        for _ in range(self.update_steps):
            f_star = self.net(x).gather(1, arms.unsqueeze(1)).squeeze(1)
            reg = sum(((p - self.theta0[n]) ** 2).sum() for n, p in self.net.named_parameters() if n in self.names)
            loss = ((f_star - b) ** 2).sum() / 2 + self.m * self.lam * reg / 2
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            # The trained router's logits are several units from b in {0, 1}, and the loss is a
            # sum over the batch: unclipped SGD at lr 0.05 diverged to NaN on the first update.
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
        self._version += 1
        return loss.item()

    def squared_loss(self, contexts: torch.Tensor, arms: torch.Tensor, feedback: torch.Tensor) -> float:
        """sum (f_{k*}(e) - b)^2 / 2 (no regulariser): what `update` is meant to lower."""
        with torch.no_grad():
            f = self.net(contexts.float()).gather(1, arms.long().unsqueeze(1)).squeeze(1)
        return (((f - feedback.float()) ** 2).sum() / 2).item()


def grpo_feedback(gain: torch.Tensor) -> torch.Tensor:
    """E7 (ours; the paper says "binary feedback based on GRPO objective improvement").

    gain [N]: per prompt, the change of its GRPO objective over the step it was routed for,
    J_after - J_before, with J = mean over the group of (ratio * A) - beta * KL (grpo.py computes
    it from one extra no-grad forward of the updated policy). b = 1 where the prompt's gain is at
    least the batch median, else 0: the arm is credited when its reward moved the policy more than
    a typical prompt did. Swap this function to try another feedback."""
    return (gain >= gain.median()).float()
