"""MoR's reward inside another trainer: a run directory's K client RMs and its federated router as
a reward function with the signature TRL's GRPOTrainer calls (prompts, completions,
completion_ids and the dataset's columns), for when this project's GRPO loop is outgrown
(several GPUs, vLLM generation, DeepSpeed/FSDP):

    from harness.trl_reward import mor_reward
    reward = mor_reward("runs/default", setting="heterogeneous")
    trainer = trl.GRPOTrainer(model="runs/default/base", reward_funcs=[reward], train_dataset=ds,
                              args=GRPOConfig(..., generation_kwargs={"suppress_tokens": reward.banned_ids}))

Each completion is scored as grpo.train_grpo scores it (E2, E3):

  y      the completion's token ids decoded by models.Encoder.decode (pad dropped, the end token
         kept as text: it tells a well-formed answer from a cut one); each RM reads this text
  e      [prompt mean ; response mean] of the reference's final hidden states over the sampled
         ids (router.pool_features), pi_ref = the run's base/ (the public reference)
  R      soft (method mor's E3): sum_k w_k(e) (r_k(x, y) - mean_k) / std_k, w = softmax(router(e));
         hard (mor_hard): the router's argmax RM of each prompt's group (num_generations
         consecutive rows, as TRL orders them)

The dataset needs an `image` column (a path or a PIL image) and a conversational `prompt` whose
user turn's text is the question; TRL repeats both per completion. Nothing here trains: the RMs,
the router and the reference are frozen, and the reward is deterministic for the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

import grpo
import mixture
import models
import reward
import router
import safe_io


def load_router(path: Path, hidden_size: int) -> router.Router:
    """The router of router-<setting>.safetensors, its widths read from the state's shapes."""
    import safetensors.torch

    state = safetensors.torch.load_file(str(path))
    width, in_dim = state["net.0.weight"].shape
    K = state["net.2.weight"].shape[0]
    context = "prompt+response" if in_dim == 2 * hidden_size else "prompt"
    model = router.Router(2 * hidden_size, K, width, context)
    model.load_state_dict(safe_io.load_router_state(path, model))
    return model.eval()


class MoRReward:
    """callable(prompts, completions, completion_ids=None, image=None, **columns) -> [float]."""

    def __init__(self, run_dir: str | Path, setting: str = "heterogeneous", routing: str = "soft",
                 group: int | None = None, device: str = "cpu"):
        run = Path(run_dir)
        if routing not in ("soft", "hard") or (routing == "hard" and not group):
            raise ValueError(f"routing {routing!r}: 'soft', or 'hard' with group = TRL's num_generations")
        matrix = run / f"rm_matrix-{setting}.json"  # the reward stage's record: client -> its VLM family
        side = run / f"router-{setting}.json"
        for f in (matrix, side, run / f"router-{setting}.safetensors", run / "base" / "config.json"):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; run the sft, reward and router stages of {setting} first")
        families = json.loads(matrix.read_text())["families"]
        names = json.loads(side.read_text())["rms"]  # the router's arm order
        self.ref, proc = models.load_vlm(run / "base", device=device)
        self.ref.eval()
        self.encoder = models.Encoder(proc)
        self.banned_ids = self.encoder.banned_ids  # for TRL's generation_kwargs["suppress_tokens"]
        H = self.ref.config.get_text_config().hidden_size
        self.router = load_router(run / f"router-{setting}.safetensors", H)
        self.rms = [reward.RewardModel.load(run / "clients" / k / f"reward-{families[k]}", device=device)
                    for k in names]
        self.source = (mixture.MixedReward(self.rms, self.router) if routing == "soft"
                       else mixture.HardReward(self.rms, self.router, group))
        self._tmp = None  # where in-memory images are written (image_paths)
        self.__name__ = f"mor_{routing}"  # TRL logs a reward function under its __name__

    def features(self, images: list[str], texts: list[str], new_ids: torch.Tensor) -> torch.Tensor:
        """e [B, 2H] (E2) as train_grpo computes it: from the sampled token ids themselves (no
        re-tokenised text, which can differ: decoding drops special tokens), in rows
        [prompt | response] built by grpo.response_batch, each distinct image encoded once."""
        device = next(self.ref.parameters()).device
        pb = self.encoder(images, texts, device=device)  # [B, Tp] left-padded prompts
        rb = grpo.response_batch(pb, new_ids.to(device), 1, self.encoder.eos_id)  # [B, Tp + Tn]
        first: dict = {}
        src = [first.setdefault(im, i) for i, im in enumerate(images)]
        uniq = sorted(set(src))
        feats = models.image_features(self.ref, pb, uniq)
        feats = tuple(feats[uniq.index(s)] for s in src)
        b = models.with_image_features({k: v for k, v in rb.items() if k != "response_mask"}, feats)
        h = self.ref.model(**b).last_hidden_state  # [B, T, H]
        return router.pool_features(h, rb["attention_mask"], rb["response_mask"]).cpu()

    def image_paths(self, images) -> list[str]:
        """Image files, as train_grpo's rewards see them (load_image then sizes each to the
        processor's budget, and equal paths share one vision-tower pass): a path as is; a PIL
        image decoded by `datasets` from a file by its filename; an in-memory one written once
        to a temporary PNG named by its content."""
        out = []
        for im in images:
            if isinstance(im, (str, os.PathLike)) or getattr(im, "filename", ""):
                out.append(str(getattr(im, "filename", "") or im))
                continue
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="mor_reward_")
            f = Path(self._tmp.name) / (hashlib.sha256(im.tobytes()).hexdigest()[:24] + ".png")
            if not f.exists():
                im.save(f)
            out.append(str(f))
        return out

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, image=None, **columns) -> list[float]:
        if image is None:
            raise ValueError("mor_reward: the dataset needs an 'image' column (path or PIL image) per prompt")
        if completion_ids is None:
            raise ValueError("mor_reward: needs completion_ids (TRL passes them): the response's end token "
                             "and its tokens are read from them, as train_grpo does")
        images, texts = self.image_paths(image), [_question(p) for p in prompts]
        T = max(len(ids) for ids in completion_ids)
        new = torch.full((len(completion_ids), T), self.encoder.pad_id)  # [B, Tn], padded as generate pads
        for i, ids in enumerate(completion_ids):
            new[i, :len(ids)] = torch.as_tensor(list(ids))
        ys = self.encoder.decode(new)  # the response text every RM reads (end token kept)
        return self.source(images, texts, ys, self.features(images, texts, new)).float().tolist()


def mor_reward(run_dir: str | Path, setting: str = "heterogeneous", routing: str = "soft",
               group: int | None = None, device: str = "cpu") -> MoRReward:
    """MoR's reward of a finished run (sft, reward and router stages), for TRL's GRPOTrainer."""
    return MoRReward(run_dir, setting, routing, group, device)


def _question(prompt) -> str:
    """The user's question: a plain string, or the text blocks of a conversational prompt's last
    user turn (TRL puts an image block in front of them)."""
    if isinstance(prompt, str):
        return prompt
    turn = [m for m in prompt if m.get("role") == "user"][-1]["content"]
    if isinstance(turn, str):
        return turn
    return " ".join(c["text"] for c in turn if c.get("type") == "text")
