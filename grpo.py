"""GRPO on a routed reward (docs/method.md, E5): the server aligns its policy with any reward source.

For a batch of N prompts x, sample G responses o_1..o_G each from pi_old, then

  A_i     = (R_i - mean_j R_j) / (std_j R_j + 1e-4)            per group of G (unbiased std)   (E5)
  ratio_t = exp( log pi_theta(o_t) - log pi_old(o_t) )
  KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          k3 estimator, ref = log pi_ref  (E5)
  l_t     = - ( min(ratio_t A_i, clip(ratio_t, 1-eps, 1+eps) A_i) - beta KL_t )
  L       = mean over sequences of ( mean over that sequence's response tokens of l_t )

Before E5, `format_guard` ranks every malformed sample (not one word + end token) last in its
group, for every reward source alike (GRPOConfig.format_guard, --no-format-guard to measure
without it).

pi_ref is the frozen reference policy (the SFT model the run started from). With mu = 1 inner
update, pi_old = pi_theta at the time of sampling, so the ratio is 1 in value and only its
gradient matters; with mu > 1 the old log-probs are computed once before the updates.

The policy's vision tower is frozen (the paper's design; --train-vision trains it): E5's gradient
reaches the language model only, and an image's features v(x) are the same in every pass of the
job (pi_ref is the starting policy), so `ImageFeatures` computes each once for rollout, reference
and policy. What else keeps a step cheap (bench/profile_run.py, docs/profile.md): one `generate`
call for all N x G samples; the G samples of a prompt share its features (`_expand`) and, in the
reference and policy forwards, its prompt computation (`token_logprobs` group=G); the reference's
log-probs once per batch, before the mu updates; e(x, o) pooled from the reference forward.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import data
import models
import router
from safe_io import Progress

# ----------------------------------------------------------------------------------------------
# E5: the three pieces, exactly as the equations
# ----------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N*G] (groups contiguous) -> A [N*G], zero-mean within each group of G."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} is not a flat batch of groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [N, G]
    # torch.std's default is the unbiased estimator (divides by G-1), as E5 states; the 1e-4
    # keeps a group whose G rewards are all equal at A = 0 instead of 0/0.
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return a.view(-1)


def format_guard(rewards: torch.Tensor, well_formed: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N*G], well_formed [N*G] bool -> rewards where every malformed sample scores one
    below the lowest well-formed sample of its group (a group with none keeps its rewards: A = 0
    there either way, since E5 only compares within a group).

      R'_i = R_i                                      o_i well-formed (one word + end token)
      R'_i = min_{j well-formed} R_j - 1               otherwise

    Why: a client RM used alone scores prompts of domains it never saw, and measured on the
    default run its policy learned to answer them with what it happened to score high there (an
    empty response, "blue rectangle rectangle"): 29.8% and 29.9% malformed samples for the colour
    and shape RMs alone. The rule is the server's, applied the same way to every reward source
    (the oracle's included), so the table compares the rewards' content, not their blind spots
    on form. Scale-free: the rewards' units never matter, only the order inside a group."""
    r = rewards.float().view(-1, group_size)  # [N, G]
    ok = well_formed.view(-1, group_size)
    floor = torch.where(ok, r, torch.full_like(r, float("inf"))).min(1, keepdim=True).values - 1  # [N, 1]
    return torch.where(ok | torch.isinf(floor), r, floor.expand_as(r)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp.
    Non-negative, 0 exactly where the two policies agree on the token."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float) -> torch.Tensor:
    """E5. logp, old_logp, ref_logp, mask: [N*G, T]; advantages [N*G] -> scalar loss.
    mask is 1 on response tokens (the end token included) and 0 on prompt and padding."""
    A = advantages.unsqueeze(1)  # [N*G, 1]: one advantage for every token of a sequence
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    per_token = -(surrogate - beta * kl_k3(logp, ref_logp))  # l_t
    mask = mask.to(per_token.dtype)
    # mean over each sequence's own response tokens, then over sequences: a long response does
    # not weigh more than a short one (E5's "mean over sequences of the mean over tokens")
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_seq.mean()


# ----------------------------------------------------------------------------------------------
# Batches of sampled responses and their token log-probabilities
# ----------------------------------------------------------------------------------------------


def response_batch(prompts: dict, new_ids: torch.Tensor, group: int, eos_id: int) -> dict:
    """Prompt batch [N, Tp] (left-padded Encoder output) + sampled tokens [N*G, Tn] -> the rows
    [N*G, Tp+Tn] the policy and the reference score, without re-tokenising any text:

      [pad .. pad | prompt (image tokens incl.) | o_1 .. o_k <|im_end|> | pad .. pad]

    response_mask marks o_1..o_k and the first end token (the tokens the policy chose; what
    follows the end token is generate's padding, not a choice). Image inputs are repeated G times
    by row; the pixels themselves are not: callers pass features encoded once per prompt."""
    NG, Tn = new_ids.shape
    rep = {k: v.repeat_interleave(group, 0) for k, v in prompts.items()
           if torch.is_tensor(v) and k not in ("pixel_values",) and v.shape[0] * group == NG}
    is_eos = new_ids == eos_id
    # keep position t if no end token came strictly before t: cumsum of end tokens shifted by one
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    resp = (before == 0).long()  # [N*G, Tn]
    out = dict(rep)
    out["input_ids"] = torch.cat([rep["input_ids"], new_ids], 1)
    out["attention_mask"] = torch.cat([rep["attention_mask"], resp], 1)
    if "mm_token_type_ids" in rep:
        out["mm_token_type_ids"] = torch.cat([rep["mm_token_type_ids"], torch.zeros_like(new_ids)], 1)
    out["response_mask"] = torch.cat([torch.zeros_like(rep["input_ids"]), resp], 1)
    return out


def token_logprobs(vlm, batch: dict, feats: tuple, banned_ids: list[int], hidden: bool = False, group: int = 1):
    """log pi(token_{t+1} | prefix) at response positions, 0 elsewhere: [B, T-1] (and the final
    hidden states [B, T, H] when hidden=True, for the routing features). `feats`: per-row image
    features. `batch` needs response_mask (response_batch makes it).

    The banned tokens (vision placeholders, pad) were suppressed while sampling, so the policy
    that produced the samples is the renormalised one without them: score with the same mask.
    Targets at padded positions are replaced by a legal id before the gather (their -inf
    log-prob would turn 0 * -inf into NaN in the masked mean).

    group = G > 1: rows in groups of G samples of one prompt; each prompt runs once (below)."""
    # (activation checkpointing in training turns the KV cache off: then every row runs in full)
    checkpointed = vlm.training and getattr(vlm, "is_activation_checkpointing", False)
    if group > 1 and hasattr(vlm.model, "get_rope_index") and not checkpointed:
        return _shared_prompt_logprobs(vlm, batch, feats, banned_ids, hidden, group)
    b = models.with_image_features({k: v for k, v in batch.items() if k != "response_mask"}, feats)
    out = vlm(**b, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()  # [B, T-1, V]: position t predicts token t+1
    logits[..., banned_ids] = float("-inf")
    # only response tokens are scored; every other target (prompt, image placeholders, pad) is
    # swapped for a legal id and its log-prob zeroed
    scored = batch["response_mask"][:, 1:].bool()
    targets = torch.where(scored, batch["input_ids"][:, 1:], _first_legal(logits, banned_ids))
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(scored, logp, torch.zeros_like(logp))
    return (logp, out.hidden_states[-1]) if hidden else logp


def _shared_prompt_logprobs(vlm, batch: dict, feats: tuple, banned_ids: list[int], hidden: bool, G: int):
    """token_logprobs for rows [pad | prompt | response] in groups of G rows with one prompt.
    The G rows agree on every position t < Tp and, under causal attention, so do their hidden
    states there: the N prompts run once [N, Tp], their keys/values are repeated G times, and only
    the responses [N*G, Tn] run on top. Same logits and gradients (each sample's flows into the
    prompt through the repeated cache); M-RoPE positions are the full rows' (get_rope_index)."""
    B, T = batch["input_ids"].shape
    Tp = int(batch["response_mask"].any(0).nonzero()[0])  # every response starts right after the prompt
    b = {k: v for k, v in batch.items() if k != "response_mask"}
    pos, _ = vlm.model.get_rope_index(b["input_ids"], b.get("mm_token_type_ids"), image_grid_thw=b.get("image_grid_thw"),
                                      attention_mask=b["attention_mask"])  # [3, B, T]
    first = {k: (v[::G, :Tp] if v.dim() == 2 and v.shape[1] == T else v[::G]) for k, v in b.items() if torch.is_tensor(v)}
    pre = vlm(**models.with_image_features(first, feats[::G]), position_ids=pos[:, ::G, :Tp], use_cache=True,
              output_hidden_states=hidden, logits_to_keep=1)  # logits [N, 1, V]: the prompt's last position
    cache = pre.past_key_values
    cache.batch_repeat_interleave(G)  # [N, ...] -> [N*G, ...]: keys/values of each prompt for its G samples
    post = vlm(input_ids=b["input_ids"][:, Tp:], attention_mask=b["attention_mask"], position_ids=pos[:, :, Tp:],
               past_key_values=cache, output_hidden_states=hidden)  # [N*G, Tn, V]
    # position Tp-1 (the prompt's last) predicts the first response token, Tp+j the (j+2)-th
    logits = torch.cat([pre.logits[:, -1:].repeat_interleave(G, 0), post.logits[:, :-1]], 1).float()
    logits[..., banned_ids] = float("-inf")
    scored = batch["response_mask"][:, Tp:].bool()  # [B, Tn]
    targets = torch.where(scored, b["input_ids"][:, Tp:], _first_legal(logits, banned_ids))
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.cat([lp.new_zeros(B, Tp - 1), torch.where(scored, lp, torch.zeros_like(lp))], 1)  # [B, T-1]
    if not hidden:
        return logp
    return logp, torch.cat([pre.hidden_states[-1].repeat_interleave(G, 0), post.hidden_states[-1]], 1)


def _first_legal(logits: torch.Tensor, banned_ids: list[int]) -> int:
    banned = set(banned_ids)
    return next(i for i in range(logits.shape[-1]) if i not in banned)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """Defaults: the embedded default's main table (mor.py passes every one as a flag: --grpo-steps
    40, --quick 3)."""

    steps: int = 40
    prompts: int = 16  # N prompts per step
    group: int = 8  # G samples per prompt
    max_new_tokens: int = 4
    lr: float = 2e-4
    beta: float = 0.04  # KL weight
    clip_eps: float = 0.2
    mu: int = 1  # inner updates per batch of samples
    temperature: float = 1.0
    format_guard: bool = True  # malformed samples rank last in their group (`format_guard`)
    train_vision: bool = False  # False: the policy's vision tower is frozen and its features cached


def train_grpo(policy, ref, encoder, pool: list, reward_fn, cfg: GRPOConfig, seed: int,
               gold: dict | None = None, on_step=None, desc: str = "grpo", features=None) -> dict:
    """Align `policy` with `reward_fn` on prompts from `pool` (data.Example, answer unused).
    `ref` is the frozen reference (its forward gives the KL term and the routing features); None:
    the policy with its LoRA adapters off (`reference`).
    `gold` {(image, prompt): answer} is for logging on-the-fly accuracy only; the trainer never
    reads it. `on_step(step, batch_info)` lets NTS (E6) see each step. `features`: an
    ImageFeatures cache to reuse across jobs that start from the same checkpoint (a new one
    otherwise). Returns per-step logs: reward, kl, accuracy, malformed share, loss."""
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    if ref is not None:
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    frozen = not cfg.train_vision
    if frozen:
        for p in vision_parameters(policy):
            p.requires_grad_(False)  # out of the optimizer below: no gradient, no AdamW update
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    # v(x) of the reference: always fixed. The policy's: fixed too while its tower is frozen, and
    # the reference's when both towers hold the same weights (pi_ref = the starting policy): one
    # cache then serves every pass; a reference with another tower gets a cache of its own. With
    # LoRA (ref None) pi_ref is the policy with its adapters off, and the adapters live in the
    # language model only: the policy's own tower is pi_ref's.
    ref_vlm = ref if ref is not None else policy
    ref_feats = (features if features is not None else ImageFeatures()).bind(ref_vlm)
    pol_feats = None
    if frozen:
        pol_feats = ref_feats if torch.equal(ImageFeatures.signature(policy), ref_feats.sig) else ImageFeatures().bind(policy)
    pol_vlm = ref_vlm if pol_feats is ref_feats else policy  # the module whose tower fills pol_feats
    batches = models.balanced_batches(pool, cfg.prompts, seed)
    G = cfg.group
    log = {k: [] for k in ("reward", "kl", "accuracy", "malformed", "loss")}
    log["skipped"] = []  # steps whose batch was dropped: non-finite rewards, loss or gradient
    log["reward_seconds"] = []  # wall time of each step's reward call
    bar = Progress(range(cfg.steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        exs = next(batches)
        images, prompts = [e.image for e in exs], [e.prompt for e in exs]
        pb = encoder(images, prompts, device=device)  # [N, Tp] left-padded prompts
        rows = list(range(len(exs)))
        # v(x) per prompt: a tuple of N [tokens_i, H] tensors, from the caches (no tower run for an
        # image seen before) or, with a trained tower, from this step's weights
        v_ref = ref_feats(ref_vlm, pb, images)
        v_pol = (lambda: pol_feats(pol_vlm, pb, images)) if frozen else (lambda: models.image_features(policy, pb, rows))
        # -- 1. sample G responses per prompt: one generate call for the whole batch ----------
        policy.eval()
        with torch.no_grad():
            gen_in = models.with_image_features(pb, v_pol()) if frozen else pb  # trained: generate encodes
            out = policy.generate(**gen_in, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                  temperature=cfg.temperature, top_k=None, top_p=None,
                                  num_return_sequences=G, suppress_tokens=encoder.banned_ids,
                                  pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id)
        new_ids = out[:, pb["input_ids"].shape[1]:]  # [N*G, Tn]
        responses = encoder.decode(new_ids)
        rb = response_batch(pb, new_ids, G, encoder.eos_id)
        mask = rb["response_mask"][:, 1:]  # [N*G, T-1], aligned with the log-prob targets
        # -- 2. reference: log-probs for the KL term, hidden states for the routing features --
        # once per batch: pi_ref does not move, so the mu inner updates below all reuse ref_logp
        with torch.no_grad(), reference(policy, ref) as pi_ref:
            ref_logp, h = token_logprobs(pi_ref, rb, _expand(v_ref, G), encoder.banned_ids, hidden=True, group=G)
            e = router.pool_features(h, rb["attention_mask"], rb["response_mask"]).cpu()  # E2 [N*G, 2H]
        # -- 3. rewards and group-normalised advantages (E5) ----------------------------------
        imgs_g = [i for i in images for _ in range(G)]
        prompts_g = [p for p in prompts for _ in range(G)]
        t_reward = time.perf_counter()
        rewards = reward_fn(imgs_g, prompts_g, responses, e).float()
        # the part of a step that grows with K (soft mixtures run every RM; hard routing one a prompt)
        log["reward_seconds"].append(time.perf_counter() - t_reward)
        if not torch.isfinite(rewards).all():
            # Caught where it arises: one NaN reward would make its whole group's advantages NaN
            # (E5 divides by the group's std) and the step's loss NaN. The batch is dropped; the
            # policy, the optimiser and a bandit router (no feedback for this step) are untouched.
            bad = (~torch.isfinite(rewards)).sum().item()
            tqdm.write(f"{desc} step {step}: {bad} non-finite reward(s) from the reward source, batch skipped")
            log["skipped"].append(step)
            continue
        answers = [data.extract_answer(r) for r in responses]  # None: malformed
        shaped = format_guard(rewards, torch.tensor([a is not None for a in answers]), G) if cfg.format_guard else rewards
        adv = group_advantages(shaped, G).to(device)  # the log keeps the reward source's own values
        # -- 4. mu clipped policy-gradient updates --------------------------------------------
        policy.train()
        old_logp = None
        if cfg.mu > 1:
            with torch.no_grad():
                old_logp = token_logprobs(policy, rb, _expand(v_pol(), G), encoder.banned_ids, group=G)
        for _ in range(cfg.mu):
            logp = token_logprobs(policy, rb, _expand(v_pol(), G), encoder.banned_ids, group=G)
            old = logp.detach() if old_logp is None else old_logp  # mu = 1: pi_old = pi_theta
            loss = grpo_loss(logp, old, ref_logp, adv, mask, cfg.clip_eps, cfg.beta)
            if not models.guarded_step(opt, loss, policy.parameters(), f"{desc} step {step}"):
                log["skipped"].append(step)
        # -- 4b. E7: feedback for a bandit router; the median and improvement rules need the
        # step's change of the objective (one extra no-grad forward), the probe rule has its b
        if hasattr(reward_fn, "feedback"):
            change = None
            if getattr(reward_fn, "needs_gain", True):
                with torch.no_grad():
                    new_logp = token_logprobs(policy, rb, _expand(v_pol(), G), encoder.banned_ids, group=G)
                change = step_change(logp.detach(), new_logp, ref_logp, adv, mask, cfg.beta, G)
            reward_fn.feedback(change)
        # -- 5. what the bar and the logs show -------------------------------------------------
        m = mask.float()
        kl = ((kl_k3(logp.detach(), ref_logp) * m).sum(1) / m.sum(1).clamp(min=1)).mean().item()
        log["reward"].append(rewards.mean().item())
        log["kl"].append(kl)
        log["loss"].append(loss.item())
        log["malformed"].append(sum(a is None for a in answers) / len(answers))
        if gold is not None:
            log["accuracy"].append(sum(a == gold[(i, p)] for a, i, p in zip(answers, imgs_g, prompts_g)) / len(answers))
        bar.log(step, reward=log["reward"][-1], kl=kl, loss=log["loss"][-1], malformed=log["malformed"][-1],
                accuracy=log["accuracy"][-1] if gold is not None else None,
                reward_seconds=log["reward_seconds"][-1])  # live metrics (safe_io.Progress.log)
        if on_step is not None:
            on_step(step, {"e": e, "rewards": rewards, "advantages": adv.cpu(), "logp": logp.detach(),
                           "ref_logp": ref_logp, "mask": mask, "group": G})
        w = min(len(log["reward"]), 10)
        post = {"reward": f"{sum(log['reward'][-w:]) / w:.3f}", "kl": f"{sum(log['kl'][-w:]) / w:.3f}",
                "malformed": f"{sum(log['malformed'][-w:]) / w:.2f}"}
        if log["accuracy"]:
            post["acc"] = f"{sum(log['accuracy'][-w:]) / w:.3f}"
        bar.set_postfix(post)
    policy.eval()
    return log


@contextmanager
def reference(policy, ref):
    """pi_ref of E5: `ref`, a frozen copy; or, ref None, the policy with its LoRA adapters off
    (models.add_lora): only the adapters train, so the base weights are pi_ref and no second
    copy of the model is held."""
    if ref is not None:
        yield ref
        return
    if not getattr(policy, "_hf_peft_config_loaded", False):
        raise ValueError("train_grpo: ref=None needs a policy with LoRA adapters (models.add_lora)")
    policy.disable_adapters()
    try:
        yield policy
    finally:
        policy.enable_adapters()


def _objective(logp, old_logp, ref_logp, advantages, mask, beta) -> torch.Tensor:
    """Per-sequence GRPO objective J = mean_t( ratio * A - beta * KL_t ) [N*G] (the unclipped
    surrogate: E7 asks how much a step moved the objective, not how the step was clipped)."""
    m = mask.to(logp.dtype)
    j = torch.exp(logp - old_logp) * advantages.unsqueeze(1) - beta * kl_k3(logp, ref_logp)
    return (j * m).sum(1) / m.sum(1).clamp(min=1.0)


def step_change(logp, new_logp, ref_logp, advantages, mask, beta: float, group: int) -> dict:
    """What one policy step did to each sample's objective (E7), from the log-probs before (logp,
    pi_old = pi_theta at sampling) and after it. J_i is linear in A_i, J_i(A) = A_i mean_t ratio_t
    - beta mean_t KL_t, so the change under ANY advantages A is A_i u_i - beta dKL_i:
      gain        [N]     mean over the group of J_after - J_before with the step's own A (median)
      ratio_gain  [N, G]  u_i = mean_t(ratio after) - 1        (ratio before = 1)
      kl_change   [N, G]  mean_t KL_t after - before
      beta                the KL weight, for a rule that re-evaluates J with other advantages"""
    m = mask.to(logp.dtype)
    tmean = lambda x: (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # noqa: E731  per sequence [N*G]
    before = _objective(logp, logp, ref_logp, advantages, mask, beta)
    after = _objective(new_logp, logp, ref_logp, advantages, mask, beta)
    return {"gain": (after - before).view(-1, group).mean(1).cpu(),
            "ratio_gain": (tmean(torch.exp(new_logp - logp)) - 1).view(-1, group).cpu(),
            "kl_change": (tmean(kl_k3(new_logp, ref_logp)) - tmean(kl_k3(logp, ref_logp))).view(-1, group).cpu(),
            "beta": beta}


def _expand(feats: tuple, group: int) -> tuple:
    """Per-prompt image features -> per-sample: each of the G samples of a prompt reuses the
    same tensor (no copy; gradients from all G rows add up in the vision tower)."""
    return tuple(f for f in feats for _ in range(group))


# ----------------------------------------------------------------------------------------------
# Image features of a frozen vision tower: computed once per image, reused by every pass
# ----------------------------------------------------------------------------------------------

# What get_image_features runs: Qwen2-VL / 2.5-VL's `visual` (patch embedding, blocks, patch
# merger), LLaVA-OneVision's SigLIP tower, projector and row-newline vector.
VISION_PARTS = ("visual", "vision_tower", "multi_modal_projector", "image_newline")


def vision_parameters(vlm) -> list:
    """The parameters of `vlm`'s image encoder (VISION_PARTS of its body), in a fixed order."""
    out = []
    for name in VISION_PARTS:
        part = getattr(vlm.model, name, None)
        out += [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters()) if part is not None else []
    if not out:
        raise ValueError(f"{type(vlm).__name__}: no vision tower among {VISION_PARTS}")
    return out


class ImageFeatures:
    """image -> v(x) [tokens, H], its vision-tower output, computed on first sight and kept
    (detached) while the tower is frozen. Keys: image paths (a PIL image: its id, the image kept
    alive with the entry). `bind(vlm)` ties the cache to a tower's weights (another tower empties
    it: a cache shared by a worker's jobs never serves another model's features). Least recently
    used entries leave beyond `max_bytes`. `computed` / `reused` count images encoded / served."""

    def __init__(self, max_bytes: int = 2 ** 30):
        self.store: OrderedDict = OrderedDict()  # key -> (image object or None, features)
        self.max_bytes, self.bytes, self.sig = max_bytes, 0, None
        self.computed = self.reused = 0

    @staticmethod
    def signature(vlm) -> torch.Tensor:
        """A checksum of the tower's weights: float64 sums, one cheap pass, equal for equal weights."""
        return torch.stack([p.detach().double().sum() for p in vision_parameters(vlm)]).cpu()

    def bind(self, vlm) -> "ImageFeatures":
        sig = self.signature(vlm)
        if self.sig is None or not torch.equal(sig, self.sig):
            self.store.clear()
            self.bytes, self.sig = 0, sig
        return self

    @torch.no_grad()
    def __call__(self, vlm, batch: dict, images: list) -> tuple:
        """Features of the images of an Encoder batch's rows (row i shows images[i]): one tensor
        [tokens_i, H] per row; the tower runs on the distinct images not cached yet, in one call."""
        keys = [str(im) if isinstance(im, (str, os.PathLike)) else id(im) for im in images]
        todo = {}  # key -> first row that shows it
        for i, k in enumerate(keys):
            if k not in self.store:
                todo.setdefault(k, i)
        if todo:
            fresh = models.image_features(vlm, batch, list(todo.values()))
            for (k, i), f in zip(todo.items(), fresh):
                keep = None if isinstance(images[i], (str, os.PathLike)) else images[i]
                self.store[k] = (keep, f.detach())
                self.bytes += f.numel() * f.element_size()
            self.computed += len(todo)
        self.reused += len(keys) - len(todo)
        for k in keys:
            self.store.move_to_end(k)  # most recently used last
        out = tuple(self.store[k][1] for k in keys)
        while self.bytes > self.max_bytes and len(self.store) > len(set(keys)):  # this batch's stay
            _, (_, f) = self.store.popitem(last=False)
            self.bytes -= f.numel() * f.element_size()
        return out

