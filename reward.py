"""Client reward models (DESIGN E1): a VLM backbone of any family plus a scalar Bradley-Terry head.

  r_k(x, y) = w^T h_T(x, y) + b       h_T: final hidden state of the last non-pad token
  L_BT      = - mean log sigmoid( r_k(x, y_w) - r_k(x, y_l) )                         (E1)

Chosen and rejected responses go through the backbone in one forward pass (a batch of 2B rows).
After training, the reward's mean and std over the client's own training pairs are stored with the
model: the router standardises every r_k with them before mixing (E3), because heads trained
separately live on different scales.

On disk (an "upload": the only thing that leaves a client):
  <dir>/backbone/        save_pretrained checkpoint (model.safetensors, config, processor)
  <dir>/head.safetensors head weight [1, H] and bias [1]
  <dir>/reward.json      {"family", "mean", "std", "n_pairs", ...}
Loading refuses anything that is not safetensors/JSON (no pickle, no remote code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import data


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """E1. r_chosen, r_rejected: [B] -> scalar. logsigmoid is the stable form of log(sigmoid)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class RewardModel(nn.Module):
    """backbone (the VLM's decoder with its vision tower, no LM head) + linear head -> rewards [B]."""

    def __init__(self, vlm, processor, mean: float = 0.0, std: float = 1.0, info: dict | None = None):
        super().__init__()
        # The whole VLM is kept so the upload is a normal checkpoint that loads with the Auto
        # classes; only `.model` (vision tower + decoder) runs: the LM head's [T, V] logits would
        # be wasted work, and at a real vocabulary (152k) the largest tensor of the forward.
        self.vlm = vlm
        self.processor = processor
        self.encoder = data.Encoder(processor)
        hidden = vlm.config.get_text_config().hidden_size
        # w: [1, H], b: [1]; small init so the first BT gradients come from the backbone's
        # features rather than from a large random head.
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / hidden ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(device=next(vlm.parameters()).device, dtype=next(vlm.parameters()).dtype)
        self.mean, self.std = float(mean), float(std)
        self.info = dict(info or {})

    @property
    def device(self):
        return next(self.vlm.parameters()).device

    def forward(self, **batch) -> torch.Tensor:
        """batch: Encoder output (response_mask optional, ignored) -> rewards [B]."""
        batch = {k: v for k, v in batch.items() if k != "response_mask"}
        h = self.vlm.model(**batch).last_hidden_state  # [B, T, H]
        # last non-pad token: the highest position whose attention mask is 1 (left or right padding)
        T = h.shape[1]
        pos = torch.arange(T, device=h.device).unsqueeze(0) * batch["attention_mask"]
        last = pos.argmax(1)  # [B]
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # [B, H]
        return self.head(h_last).squeeze(-1).float()

    def score(self, images, prompts, responses) -> torch.Tensor:
        """Raw rewards [B] for (image, prompt, response) triples, one forward pass."""
        return self(**self.encoder(images, prompts, responses, self.device))

    def standardized(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the stats of the client's own training pairs (E3)."""
        return (rewards - self.mean) / self.std

    def pair_rewards(self, pairs: list[data.Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B]) from ONE forward over the 2B rows."""
        imgs = [p.image for p in pairs] * 2
        prompts = [p.prompt for p in pairs] * 2
        resp = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        r = self.score(imgs, prompts, resp)
        return r[: len(pairs)], r[len(pairs):]

    # -- save / load ---------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.vlm.save_pretrained(out / "backbone", safe_serialization=True)
        self.processor.save_pretrained(out / "backbone")
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous(),
                   "bias": self.head.bias.detach().float().cpu().contiguous()}, str(out / "head.safetensors"))
        (out / "reward.json").write_text(json.dumps(dict(self.info, mean=self.mean, std=self.std), indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        path = Path(path)
        for need in ("backbone", "head.safetensors", "reward.json"):
            if not (path / need).exists():
                raise FileNotFoundError(f"{path}: not a reward-model directory (missing {need})")
        stray = [f.name for f in path.iterdir() if f.name not in ("backbone", "head.safetensors", "reward.json")]
        if stray:
            raise ValueError(f"{path}: unexpected file(s) {sorted(stray)} in a reward-model upload; refused")
        info = json.loads((path / "reward.json").read_text())
        for key in ("mean", "std"):
            if not isinstance(info.get(key), (int, float)):
                raise ValueError(f"{path}/reward.json: field '{key}' must be a number")
        vlm, proc = data.load_vlm(path / "backbone", dtype=dtype, device=device)
        rm = cls(vlm, proc, info.pop("mean"), info.pop("std"), info)
        try:
            head = load_file(str(path / "head.safetensors"))
        except Exception as e:  # a pickle or garbage renamed to .safetensors lands here, unexecuted
            raise ValueError(f"{path}/head.safetensors: not a valid safetensors file ({e}); refused") from None
        H = rm.head.in_features
        if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (1, H) or tuple(head["bias"].shape) != (1,):
            raise ValueError(f"{path}/head.safetensors: expected weight [1, {H}] and bias [1], got "
                             f"{ {k: tuple(v.shape) for k, v in head.items()} }")
        rm.head.load_state_dict({k: v.to(rm.head.weight.dtype) for k, v in head.items()})
        rm.eval()
        return rm


# ----------------------------------------------------------------------------------------------
# Local training (runs inside a client: it sees only that client's pairs)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def pair_accuracy(rm: RewardModel, pairs: list[data.Pair], batch_size: int = 128) -> float:
    """Share of pairs where r(chosen) > r(rejected)."""
    if not pairs:
        return float("nan")
    rm.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        rc, rr = rm.pair_rewards(pairs[i:i + batch_size])
        hits += (rc > rr).sum().item()
    return hits / len(pairs)


@torch.no_grad()
def reward_stats(rm: RewardModel, pairs: list[data.Pair], batch_size: int = 128) -> tuple[float, float]:
    """Mean and std of the raw reward over all chosen and rejected responses of `pairs`."""
    rm.eval()
    rs = []
    for i in range(0, len(pairs), batch_size):
        rc, rr = rm.pair_rewards(pairs[i:i + batch_size])
        rs += [rc, rr]
    r = torch.cat(rs)  # [2N]: chosen and rejected alike, the distribution GRPO samples will span
    return r.mean().item(), max(r.std().item(), 1e-6)  # floor: a constant RM must not divide by 0


def train_reward_model(rm: RewardModel, pairs: list[data.Pair], steps: int, batch_size: int, lr: float,
                       seed: int, desc: str = "reward") -> list[float]:
    """AdamW on the BT loss over shuffled epochs of the client's pairs; sets rm.mean/std at the end.
    tqdm shows the running loss and the running pair accuracy on the training batches."""
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    batches = data.balanced_batches(pairs, batch_size, seed)  # one domain: shuffled epochs
    losses, accs = [], []
    rm.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, disable=None)
    for _ in bar:
        rc, rr = rm.pair_rewards(next(batches))  # [B], [B] from one [2B, T] forward
        loss = bradley_terry_loss(rc, rr)  # E1
        if not data.guarded_step(opt, loss, rm.parameters(), desc):
            continue
        losses.append(loss.item())
        accs.append((rc > rr).float().mean().item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        acc=f"{sum(accs[-20:]) / len(accs[-20:]):.3f}")
    # Stats over the training pairs only (never another client's data), shipped in reward.json.
    rm.mean, rm.std = reward_stats(rm, pairs)
    rm.eval()
    return losses
