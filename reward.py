"""Client reward models (docs/method.md, E1): a VLM backbone of any family plus a scalar Bradley-Terry head.

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
  <dir>/adapter/         with LoRA (RMConfig.lora_r, real checkpoints): the adapters in peft's
                         format, already merged into backbone/
Loading refuses anything that is not safetensors/JSON (no pickle, no remote code).

Local training recipe (measured on the embedded default, docs/results.md): BT alone from a raw tiny VLM
plateaus at 75-80% held-out pair accuracy, because the pairwise signal is too thin to teach the
vision tower what the domain looks at. So a client first adapts its own VLM to its domain with a
short SFT on the chosen responses of its pairs (dense, token-level), then trains the BT head and
backbone on the pairs. Both phases see only the client's own data. The server's reference policy
is trained with the same `train_sft` on the public split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import models
from safe_io import Progress


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """E1. r_chosen, r_rejected: [B] -> scalar. logsigmoid is the stable form of log(sigmoid)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ----------------------------------------------------------------------------------------------
# SFT: the server's reference policy, and a client's warm-up of its own VLM (response tokens only)
# ----------------------------------------------------------------------------------------------


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over response tokens. batch: Encoder output with response_mask.

      L_SFT = - (1 / sum_t m_t) * sum_t m_t * log p_theta(y_t | x, y_<t)      m: response mask
    Prompt and image tokens carry no loss: the reference learns to answer, not to ask.
    """
    batch = dict(batch)
    resp = batch.pop("response_mask")  # [B, T]
    logits = model(**batch).logits[:, :-1]  # [B, T-1, V]: position t predicts token t+1
    targets = batch["input_ids"][:, 1:].masked_fill(resp[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_sft(model, encoder: models.Encoder, examples: list[data.Example], steps: int, batch_size: int,
              lr: float, seed: int, desc: str = "sft") -> list[float]:
    """AdamW on domain-balanced batches of `examples`; returns the loss per step."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = models.balanced_batches(examples, batch_size, seed)
    losses = []
    model.train()
    bar = Progress(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        b = next(batches)
        # chosen = gold answer + end token: the reference must learn to stop after one word,
        # or every later reward model sees malformed samples from the very first GRPO step.
        batch = encoder.encode_shared(model, [e.image for e in b], [e.prompt for e in b],
                                      [e.answer + data.EOS for e in b], device)
        loss = sft_loss(model, batch)
        if not models.guarded_step(opt, loss, model.parameters(), desc):
            continue
        losses.append(loss.item())
        bar.log(step, loss=losses[-1])  # live metrics (safe_io.Progress.log)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# E1: the reward model
# ----------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """backbone (the VLM's decoder with its vision tower, no LM head) + linear head -> rewards [B]."""

    def __init__(self, vlm, processor, mean: float = 0.0, std: float = 1.0, info: dict | None = None):
        super().__init__()
        # The whole VLM is kept so the upload is a normal checkpoint that loads with the Auto
        # classes; only `.model` (vision tower + decoder) runs: the LM head's [T, V] logits would
        # be wasted work, and at a real vocabulary (152k) the largest tensor of the forward.
        self.vlm = vlm
        self.processor = processor
        self.encoder = models.Encoder(processor)
        hidden = vlm.config.get_text_config().hidden_size
        # w: [1, H], b: [1]; small init so the first BT gradients come from the backbone's
        # features rather than from a large random head.
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / hidden ** 0.5)
        nn.init.zeros_(self.head.bias)
        # fp32 whatever the backbone's dtype: a trained parameter (as LoRA's, models.add_lora)
        self.head.to(device=next(vlm.parameters()).device, dtype=torch.float32)
        self.mean, self.std = float(mean), float(std)
        self.info = dict(info or {})

    @property
    def device(self):
        return next(self.vlm.parameters()).device

    def hidden(self, batch: dict) -> torch.Tensor:
        """Final hidden states [B, T, H] of the VLM body (no LM head); response_mask ignored."""
        batch = {k: v for k, v in batch.items() if k != "response_mask"}
        return self.vlm.model(**batch).last_hidden_state

    def head_on_last(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> rewards [B] from the last non-pad token: the highest position whose
        attention mask is 1 (correct for left and right padding alike)."""
        T = h.shape[1]
        last = (torch.arange(T, device=h.device).unsqueeze(0) * attention_mask).argmax(1)  # [B]
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # [B, H]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, **batch) -> torch.Tensor:
        """batch: Encoder output (pixel_values or shared mm_encoder_outputs) -> rewards [B]."""
        return self.head_on_last(self.hidden(batch), batch["attention_mask"])

    def score(self, images, prompts, responses) -> torch.Tensor:
        """Raw rewards [B] for (image, prompt, response) triples, one forward pass; each
        distinct image goes through the vision tower once. With `self.image_features` (a
        grpo.ImageFeatures bound to this frozen RM, as during GRPO) an image seen before costs
        no tower run at all."""
        if getattr(self, "image_features", None) is None:
            return self(**self.encoder.encode_shared(self.vlm, images, prompts, responses, self.device))
        batch = self.encoder(images, prompts, responses, self.device)
        return self(**models.with_image_features(batch, self.image_features(self.vlm, batch, images)))

    def standardized(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the stats of the client's own training pairs (E3)."""
        return (rewards - self.mean) / self.std

    def pair_rewards(self, pairs: list[data.Pair], lm_loss: bool = False):
        """(r_chosen [B], r_rejected [B]) from ONE forward over the 2B rows; the image of a pair
        is encoded once for both rows. With lm_loss=True also returns the token cross-entropy of
        the chosen responses (read from the same hidden states through the VLM's own LM head)."""
        B = len(pairs)
        batch = self.encoder.encode_shared(self.vlm, [p.image for p in pairs] * 2, [p.prompt for p in pairs] * 2,
                                           [p.chosen for p in pairs] + [p.rejected for p in pairs], self.device)
        h = self.hidden(batch)  # [2B, T, H]: rows 0..B-1 chosen, B..2B-1 rejected
        r = self.head_on_last(h, batch["attention_mask"])
        if not lm_loss:
            return r[:B], r[B:]
        logits = self.vlm.get_output_embeddings()(h[:B, :-1])  # [B, T-1, V]
        targets = batch["input_ids"][:B, 1:].masked_fill(batch["response_mask"][:B, 1:] == 0, -100)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return r[:B], r[B:], ce

    # -- save / load ---------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        # LoRA (a real checkpoint): the adapters kept in adapter/ (peft loads them), then merged,
        # so backbone/ is a full checkpoint every stage loads like any other
        models.merge_lora(self.vlm, out / "adapter")
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
        # provenance.json: what made the upload (harness/provenance.py), a JSON record read by no loader
        allowed = ("backbone", "head.safetensors", "reward.json", "provenance.json", "adapter")
        stray = [f.name for f in path.iterdir() if f.name not in allowed]
        if stray:
            raise ValueError(f"{path}: unexpected file(s) {sorted(stray)} in a reward-model upload; refused")
        info = json.loads((path / "reward.json").read_text())
        for key in ("mean", "std"):
            v = info.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{path}/reward.json: field '{key}' must be a finite number, got {v!r}")
        if info["std"] <= 0:
            raise ValueError(f"{path}/reward.json: field 'std' must be positive, got {info['std']}")
        vlm, proc = models.load_vlm(path / "backbone", dtype=dtype, device=device)
        rm = cls(vlm, proc, info.pop("mean"), info.pop("std"), info)
        try:
            head = load_file(str(path / "head.safetensors"))
        except Exception as e:  # a pickle or garbage renamed to .safetensors lands here, unexecuted
            raise ValueError(f"{path}/head.safetensors: not a valid safetensors file ({e}); refused") from None
        H = rm.head.in_features
        if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (1, H) or tuple(head["bias"].shape) != (1,):
            raise ValueError(f"{path}/head.safetensors: expected weight [1, {H}] and bias [1], got "
                             f"{ {k: tuple(v.shape) for k, v in head.items()} }")
        if not all(torch.isfinite(v).all() for v in head.values()):
            raise ValueError(f"{path}/head.safetensors: holds NaN/inf; refused")
        rm.head.load_state_dict({k: v.to(rm.head.weight.dtype) for k, v in head.items()})
        rm.eval()
        return rm


# ----------------------------------------------------------------------------------------------
# Local training (runs inside a client: it sees only that client's pairs)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def pair_scores(rm: RewardModel, pairs: list[data.Pair], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [N], r_rejected [N]) over `pairs`, in eval mode, image-sorted batches so that
    each image is encoded once per batch; returned in the order of `pairs`."""
    rm.eval()
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].image)
    rc, rr = torch.empty(len(pairs)), torch.empty(len(pairs))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        c, r = rm.pair_rewards([pairs[i] for i in idx])
        rc[idx], rr[idx] = c.float().cpu(), r.float().cpu()
    return rc, rr


def pair_accuracy(rm: RewardModel, pairs: list[data.Pair], batch_size: int = 128) -> float:
    """Share of pairs where r(chosen) > r(rejected)."""
    if not pairs:
        return float("nan")
    rc, rr = pair_scores(rm, pairs, batch_size)
    return (rc > rr).float().mean().item()


def reward_stats(rm: RewardModel, pairs: list[data.Pair], batch_size: int = 128) -> tuple[float, float]:
    """Mean and std of the raw reward over all chosen and rejected responses of `pairs`:
    chosen and rejected alike, the distribution GRPO samples will span."""
    r = torch.cat(pair_scores(rm, pairs, batch_size))  # [2N]
    return r.mean().item(), max(r.std().item(), 1e-6)  # floor: a constant RM must not divide by 0


@dataclass
class RMConfig:
    """Sizes of a client's local RM training. Defaults are the embedded default's measured recipe;
    mor.py --quick shrinks them to a smoke run."""

    sft_steps: int = 300  # phase 1: SFT warm-up on the chosen responses (batches of distinct questions)
    sft_batch: int = 64
    sft_lr: float = 1e-3
    steps: int = 300  # phase 2: Bradley-Terry on the pairs (E1)
    batch: int = 32  # pairs per BT step (whole image groups, so it can run a few over)
    lr: float = 3e-4  # lower than the SFT's: the warm-up features are to be kept, not relearned
    lm_weight: float = 0.0  # optional LM regulariser on the chosen rows during BT
    lora_r: int = 0  # > 0: LoRA adapters of this rank on the backbone (real checkpoints), models.add_lora


def warmup_examples(pairs: list[data.Pair]) -> list[data.Example]:
    """The distinct (image, prompt, chosen) triples of a client's pairs, as SFT examples: the
    chosen response is the answer the client's data endorses. The end token is re-added by
    `train_sft`, so it is stripped here."""
    seen, out = set(), []
    for p in pairs:
        key = (p.image, p.prompt, p.chosen)
        if key not in seen:
            seen.add(key)
            answer = p.chosen[: -len(data.EOS)] if p.chosen.endswith(data.EOS) else p.chosen
            out.append(data.Example(p.image, p.prompt, answer.strip(), p.domain))
    return out


def train_reward_model(rm: RewardModel, pairs: list[data.Pair], cfg: RMConfig, seed: int,
                       desc: str = "reward", format_pairs: list[data.Pair] = ()) -> dict:
    """Phase 1 (cfg.sft_steps > 0): SFT of the backbone on the chosen responses. Phase 2: AdamW on
    the BT loss over image-grouped batches of the pairs (every pair of an image in the same
    batch, so the vision tower encodes each image once per step). Sets rm.mean/std at the end
    from the training pairs. Returns the log {sft_loss, loss, train_acc} per step.
    `format_pairs` (data.format_pairs) join the BT batches only: the warm-up learns the client's
    own answers, and the reward statistics describe the client's own pairs.

    The progress bar shows the running BT loss and the running pair accuracy on the training batches."""
    log = {"sft_loss": [], "loss": [], "train_acc": []}
    if cfg.lora_r > 0:  # both phases train the same adapters (and the head); the backbone stays frozen
        models.add_lora(rm.vlm, cfg.lora_r)
    if cfg.sft_steps > 0:
        log["sft_loss"] = train_sft(rm.vlm, rm.encoder, warmup_examples(pairs), cfg.sft_steps, cfg.sft_batch,
                                    cfg.sft_lr, seed, desc=f"{desc} sft")
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
    batches = models.image_batches([*pairs, *format_pairs], cfg.batch, seed)
    rm.train()
    bar = Progress(range(cfg.steps), desc=f"{desc} bt", dynamic_ncols=True)
    for step in bar:
        b = next(batches)
        if cfg.lm_weight > 0:
            rc, rr, ce = rm.pair_rewards(b, lm_loss=True)
            loss = bradley_terry_loss(rc, rr) + cfg.lm_weight * ce
        else:
            rc, rr = rm.pair_rewards(b)  # [B], [B] from one [2B, T] forward
            loss = bradley_terry_loss(rc, rr)  # E1
        if not models.guarded_step(opt, loss, rm.parameters(), desc):
            continue
        log["loss"].append(loss.item())
        log["train_acc"].append((rc > rr).float().mean().item())
        bar.log(step, loss=log["loss"][-1], train_acc=log["train_acc"][-1])
        bar.set_postfix(loss=f"{sum(log['loss'][-20:]) / len(log['loss'][-20:]):.3f}",
                        acc=f"{sum(log['train_acc'][-20:]) / len(log['train_acc'][-20:]):.3f}")
    # Stats over the training pairs only (never another client's data), shipped in reward.json.
    rm.mean, rm.std = reward_stats(rm, pairs)
    rm.eval()
    return log
