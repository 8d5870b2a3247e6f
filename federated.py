"""Federated averaging (DESIGN E4).

  phi <- sum_k (n_k / sum_j n_j) * phi_k          over the clients that reported this round  (E4)

Used twice in MoR: for the router's parameters each round (E4), and once for the FedAvg-RM
baseline (E8, homogeneous setting only: one reward model whose parameters are the sample-weighted
average of the client RMs, i.e. the parameter-sharing method MoR is compared against).

What may cross the boundary between a client and the server is deliberately narrow: state dicts
of tensors (safetensors on disk), reward-model directories, counts n_k and scalar metrics. The
`Client` class below is that boundary: it holds the private pairs in underscore attributes that
no code outside this class reads, and every public method returns only an upload, a count or a
number. The server side (mor.py) never sees a Pair of a client.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import models
import reward
import router as routing


def fedavg(state_dicts: list[dict[str, torch.Tensor]], num_examples: list[int]) -> dict[str, torch.Tensor]:
    """E4: the n_k-weighted mean of `state_dicts`, key by key.

    Refuses (ValueError, naming the client index and key) mismatched key sets, shapes, non-float
    tensors that differ, non-positive counts, and an empty round. Floating tensors are averaged in
    float64 and cast back to their dtype, so the result does not depend on the clients' order
    beyond float64 rounding; integer buffers (e.g. counters) must agree and are copied.
    """
    if not state_dicts:
        raise ValueError("fedavg: no client reported this round (nothing to average)")
    if len(state_dicts) != len(num_examples):
        raise ValueError(f"fedavg: {len(state_dicts)} state dicts but {len(num_examples)} example counts")
    if any(n <= 0 for n in num_examples):
        raise ValueError(f"fedavg: example counts must be positive, got {list(num_examples)}")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(ref):
            missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
            raise ValueError(f"fedavg: client {i} keys differ from client 0 (missing {missing}, unexpected {extra})")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"fedavg: client {i} '{k}' has shape {tuple(v.shape)}, "
                                 f"client 0 has {tuple(ref[k].shape)}")
    total = float(sum(num_examples))
    weights = [n / total for n in num_examples]  # n_k / sum_j n_j
    out = {}
    for k, v0 in ref.items():
        if not v0.is_floating_point():
            for i, sd in enumerate(state_dicts[1:], 1):
                if not torch.equal(sd[k], v0):
                    raise ValueError(f"fedavg: integer tensor '{k}' differs between client 0 and client {i}")
            out[k] = v0.clone()
            continue
        acc = torch.zeros(v0.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc += w * sd[k].detach().to("cpu", torch.float64)
        out[k] = acc.to(v0.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# The client/server boundary
# ----------------------------------------------------------------------------------------------


class Client:
    """One federation member: a hospital, a bank, a lab. Private: its preference pairs, split by
    image into a training part and a held-out part (`heldout` share of its images; the held-out
    pairs never train anything and give the client's in-domain pair accuracy).

    Public (what may leave): `name`, `n` (number of training pairs, the FedAvg weight n_k),
    reward-model directories written by `train_reward_model`, and scalar metrics."""

    def __init__(self, name: str, pairs: list[data.Pair], seed: int, heldout: float = 0.1,
                 format_pairs: list[data.Pair] | None = None):
        if not pairs:
            raise ValueError(f"client {name!r}: no preference pairs")
        self.name = name
        images = sorted({p.image for p in pairs})
        if len(images) < 2:  # more clients asked for than there is data to give them
            raise ValueError(f"client {name!r}: its {len(pairs)} pair(s) use {len(images)} image; needs pairs on "
                             "at least 2 images (whole images are held out for its pair accuracy)")
        random.Random(f"heldout-{name}-{seed}").shuffle(images)
        held = set(images[: max(1, round(heldout * len(images)))])
        self._train = [p for p in pairs if p.image not in held]
        self._heldout = [p for p in pairs if p.image in held]
        # Format-only pairs on public questions (data.format_pairs): extra Bradley-Terry rows for
        # the RM and nothing else. They are not the client's data, so they count in no n_k, no
        # held-out accuracy, no reward statistics and no routing feature.
        self._format = list(format_pairs or [])
        self._seed = seed

    @property
    def n(self) -> int:
        """n_k: training pairs, the client's FedAvg weight."""
        return len(self._train)

    def train_reward_model(self, init_dir: str | Path, out_dir: str | Path, cfg: reward.RMConfig,
                           device: str = "cpu") -> dict:
        """Load the client's own VLM from `init_dir`, train its RM on the training pairs (E1),
        write the upload to `out_dir` and return its metrics (only numbers)."""
        t = time.time()
        vlm, proc = models.load_vlm(init_dir, device=device)
        torch.manual_seed(self._seed)  # the head's init
        rm = reward.RewardModel(vlm, proc)
        log = reward.train_reward_model(rm, self._train, cfg, self._seed, desc=f"reward {self.name}",
                                        format_pairs=self._format)
        acc = self.pair_accuracy(rm)
        metrics = {"client": self.name, "family": vlm.config.model_type, "n_pairs": self.n,
                   "format_pairs": len(self._format),
                   "heldout_pairs": len(self._heldout), "heldout_accuracy": acc,
                   "final_bt_loss": sum(log["loss"][-20:]) / max(len(log["loss"][-20:]), 1),
                   "seconds": round(time.time() - t, 1)}
        rm.info.update(metrics)
        rm.save(out_dir)
        return metrics

    def pair_accuracy(self, rm: reward.RewardModel) -> float:
        """Held-out pair accuracy of any uploaded RM on this client's data (the cross-domain
        matrix is filled this way: client j scores RM k locally and reports one number)."""
        return reward.pair_accuracy(rm, self._heldout)

    def reward_moments(self, rm: reward.RewardModel) -> tuple[int, float, float]:
        """(count, sum, sum of squares) of rm's raw rewards over this client's training pairs:
        enough for the server to pool a mean and std without seeing a single reward value."""
        rc, rr = reward.pair_scores(rm, self._train)
        r = torch.cat([rc, rr]).double()
        return r.numel(), r.sum().item(), (r * r).sum().item()


    # -- routing (E4): precomputed once, then every round is a few small tensor ops ------------

    def prepare_routing(self, ref_vlm, ref_encoder: models.Encoder, rms: list[reward.RewardModel],
                        max_train_pairs: int | None = None) -> None:
        """Compute, once, what a router round needs and what never changes while it trains: the
        routing features e(x, y_w), e(x, y_l) [N, D] from the public reference model (E2) and
        the K downloaded RMs' standardised rewards r_k(x, y_w), r_k(x, y_l) [N, K] (E3), for
        the training and the held-out pairs. A router round then costs milliseconds.
        `max_train_pairs` caps the training pairs used for routing (a seeded subsample): the
        router has a few thousand parameters, and scoring every pair with all K RMs is the
        stage's whole cost. n_k stays the client's full pair count."""
        train = self._train
        if max_train_pairs and len(train) > max_train_pairs:
            train = random.Random(f"route-{self.name}-{self._seed}").sample(train, max_train_pairs)
        self._routing = {}
        for part, pairs in (("train", train), ("heldout", self._heldout)):
            pairs = sorted(pairs, key=lambda p: p.image)  # neighbours share an image: encoded once
            N = len(pairs)
            # chosen and rejected rows of a pair side by side in one call: the image is encoded once
            e = routing.features(ref_vlm, ref_encoder, [p.image for p in pairs for _ in (0, 1)],
                                 [p.prompt for p in pairs for _ in (0, 1)],
                                 [y for p in pairs for y in (p.chosen, p.rejected)]).view(N, 2, -1)
            scores = [reward.pair_scores(rm, pairs) for rm in rms]  # K x ([N], [N])
            r_w = torch.stack([rm.standardized(rc) for rm, (rc, _) in zip(rms, scores)], -1)
            r_l = torch.stack([rm.standardized(rr) for rm, (_, rr) in zip(rms, scores)], -1)
            self._routing[part] = (e[:, 0], e[:, 1], r_w, r_l)

    def feature_moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, sum [D], sum of squares [D]) of the routing features of the training pairs,
        for the router's input standardisation (router.pooled_stats)."""
        e = torch.cat(self._routing["train"][:2]).double()
        return e.shape[0], e.sum(0), (e * e).sum(0)

    def router_update(self, state: dict[str, torch.Tensor], make_router, epochs: int, lr: float,
                      batch_size: int, seed: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """E4 local step: E epochs of AdamW on L_route over the client's own training pairs,
        starting from the server's router `state`. Returns (new state dict, n_k, mean loss):
        the upload of one round."""
        model = make_router()
        model.load_state_dict(state)
        e_w, e_l, r_w, r_l = self._routing["train"]
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(epochs):
            perm = torch.randperm(len(e_w), generator=g)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                loss = routing.routing_loss(model, e_w[idx], e_l[idx], r_w[idx], r_l[idx])
                # a NaN/inf batch (e.g. an RM that returned inf) is skipped and logged here, where it
                # arises, instead of poisoning the AdamW moments and then the whole federation
                if models.guarded_step(opt, loss, model.parameters(), f"router client {self.name}", max_norm=None):
                    losses.append(loss.item())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, self.n, sum(losses) / max(len(losses), 1)

    @torch.no_grad()
    def mixed_accuracy(self, source) -> float:
        """Held-out pair accuracy of the mixed reward R (E3) under any weight source."""
        e_w, e_l, r_w, r_l = self._routing["heldout"]
        R_w = routing.mixed_reward(source.weights(e_w), r_w)
        R_l = routing.mixed_reward(source.weights(e_l), r_l)
        return (R_w > R_l).float().mean().item()

    @torch.no_grad()
    def routing_weights(self, source) -> torch.Tensor:
        """Routing weights [2N, K] on the client's held-out responses (chosen and rejected): the
        client reports their mean and entropy, never the pairs."""
        e_w, e_l, _, _ = self._routing["heldout"]
        return source.weights(torch.cat([e_w, e_l]))


def check_upload(upload, server_state: dict[str, torch.Tensor]) -> str | None:
    """Why a client's round upload (state dict, n_k, loss) must be dropped, or None if it is sound.

    The server never trusts an upload's form: it must carry exactly the router's keys, each
    tensor with the server's shape and a finite value, a positive integer n_k and a finite loss.
    One malformed or poisoned upload then costs that client its round, not the round itself
    (fedavg would refuse the whole batch, and a NaN would reach every client next round)."""
    try:
        state, n, loss = upload
    except (TypeError, ValueError):
        return "upload is not (state dict, n_k, loss)"
    why = routing.state_problem(state, server_state)  # keys, shapes, finite values
    if why:
        return why
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"n_k must be a positive integer, got {n!r}"
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"loss must be a finite number, got {loss!r}"
    return None


def run_rounds(router: torch.nn.Module, make_router, clients: list[Client], rounds: int, local_epochs: int,
               lr: float, batch_size: int, fraction: float = 1.0, seed: int = 0, timeout_s: float = 600.0,
               on_round=None, desc: str = "router") -> list[dict]:
    """E4: R rounds of FedAvg. Each round samples max(1, round(fraction * K)) clients, sends
    them the router's state, and averages the uploads of those that answered, weighted by n_k.
    A client that raises, exceeds `timeout_s` or uploads a malformed state (`check_upload`:
    wrong keys or shapes, NaN/inf) is dropped from the round and logged; a round where every
    sampled client failed raises RuntimeError. Returns one log dict per round; the router's
    parameters are updated in place. `on_round(router)` -> dict of extra figures for the log
    (e.g. held-out accuracy), shown in the progress bar."""
    rng = random.Random(f"rounds-{seed}")
    log = []
    bar = tqdm(range(rounds), desc=desc, dynamic_ncols=True, disable=None)
    for r in bar:
        sampled = rng.sample(clients, max(1, round(fraction * len(clients))))
        state = {k: v.detach().clone() for k, v in router.state_dict().items()}
        uploads, dropped = [], {}
        # One thread per sampled client: a client that hangs is abandoned at the deadline and
        # cannot block the others (nor the next round). Each update is a pure function of
        # (state, client data, seed), so the threads do not change the result.
        pool = ThreadPoolExecutor(max_workers=len(sampled))
        futures = {c.name: pool.submit(c.router_update, state, make_router, local_epochs, lr, batch_size,
                                       seed * 1000 + r) for c in sampled}
        deadline = time.time() + timeout_s
        for name, fut in futures.items():
            try:
                up = fut.result(timeout=max(0.0, deadline - time.time()))
                why = check_upload(up, state)
                if why:
                    dropped[name] = f"malformed upload: {why}"
                else:
                    uploads.append((name, *up))
            except FutureTimeout:
                dropped[name] = f"timed out after {timeout_s:.0f}s"
            except Exception as e:  # a client's failure must not end the federation
                dropped[name] = f"{type(e).__name__}: {e}"
        pool.shutdown(wait=False, cancel_futures=True)
        for name, why in dropped.items():
            tqdm.write(f"{desc} round {r}: client {name} dropped ({why})")
        if not uploads:
            raise RuntimeError(f"{desc} round {r}: no client reported ({dropped}); cannot aggregate")
        router.load_state_dict(fedavg([u[1] for u in uploads], [u[2] for u in uploads]))
        n = sum(u[2] for u in uploads)
        loss = sum(u[2] * u[3] for u in uploads) / n  # n_k-weighted mean of the local losses
        entry = {"round": r, "clients": [u[0] for u in uploads], "dropped": dropped, "loss": loss}
        entry.update(on_round(router) if on_round else {})
        log.append(entry)
        bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in entry.items()
                         if k not in ("round", "clients", "dropped")})
    return log


def fedavg_reward_model(rms: list[reward.RewardModel], counts: list[int]) -> reward.RewardModel:
    """E8's FedAvg-RM: one reward model whose parameters (backbone and head) are the n_k-weighted
    mean of the client RMs. Only meaningful when every client started from the same checkpoint
    (the homogeneous setting): averaging independently initialised networks mixes unrelated
    coordinates. The result is written into the first RM, whose architecture all must share."""
    families = {rm.vlm.config.model_type for rm in rms}
    if len(families) != 1:
        raise ValueError(f"FedAvg-RM needs one architecture, got {sorted(families)} (homogeneous setting only)")
    avg = fedavg([{k: v.detach() for k, v in rm.state_dict().items()} for rm in rms], counts)
    out = rms[0]
    out.load_state_dict(avg)
    return out
