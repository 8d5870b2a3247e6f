"""Federated averaging (E4) and its robust variants; clients joining and leaving the router.

  fedavg    phi <- sum_k (n_k / sum_j n_j) * phi_k        over the clients that reported this round  (E4)
  median    phi[i] <- median_k phi_k[i]                    coordinate-wise
  trimmed   phi[i] <- mean_k phi_k[i] without the t smallest and t largest values, coordinate-wise
  crossval  s_k = sum_{j != k} v_j [L_j(phi_k) - L_j(phi)] / sum_{j != k} v_j   L_j: E4's loss on
            v_j = max(0, 2 a_j - 1)^2,  a_j: phi's pair accuracy on j's pairs     j's own pairs
            keep k iff s_k <= median_m s_m + margin;  phi <- fedavg over the kept uploads

`aggregate(rule, ...)` is the one entry point: the in-process rounds (`run_rounds`) and the Flower
ServerApp call it, so both produce the same router bit for bit. Why `crossval` exists: a client
whose labels are noise (e.g. half of them flipped) is best served, under L_route, by the
smallest mixed margin, so its local step routes every domain to its own low-margin RM; FedAvg
gives it weight n_k, the largest when it holds the most pairs. Its upload is not an outlier
coordinate by coordinate (honest clients of different domains disagree as much), which is what
median and trimmed mean test, but it raises the routing loss of every other client, which is what
crossval tests. The noisy client is a judge too and would call every sharpening of the routing
harmful; its labels make a_j ~ 1/2 under any router, so (1 - 2 eps)^2, the information a BT label
of flip rate eps carries, gives it no say. When no upload is flagged, crossval is fedavg exactly.
The default is fedavg (DEFAULT_RULE), the paper's rule; crossval is the opt-in for a federation
that expects a noisy client (the noisy setting measures it: docs/history.md).
Privacy: crossval shows each client the other clients' individual uploads phi_k, more than fedavg.

Joining and leaving without retraining (the last layer of the router has one row per RM):
  join   W' = [W ; mean_k W_k],  b' = [b ; mean_k b_k - log K]  -> w'_k = w_k (1 - w'_new), w'_new
         <= 1 / (K^2 + 1): the existing RMs keep their weight ratios exactly; then the joining
         client fits the new row alone on its pairs (Client.fit_new_rm), then warm rounds
  leave  row k removed                                          -> w'_j = w_j / (1 - w_k)

Used in MoR for the router's parameters each round (E4), and for the FedAvg-RM baseline (E8,
homogeneous setting only: the parameter-sharing method MoR is compared against), as McMahan's
multi-round FedAvg of one reward model (`fedavg_rm_rounds`: each round every client takes local
steps of its own RM recipe from the global RM, the server averages by n_k) and, labelled one-shot,
as the n_k-average of the K separately trained RMs (`fedavg_reward_model`).

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
import safe_io
from safe_io import Progress


def fedavg(state_dicts: list[dict[str, torch.Tensor]], num_examples: list[int]) -> dict[str, torch.Tensor]:
    """E4: the n_k-weighted mean of `state_dicts`, key by key.

    Refuses (ValueError, naming the client index and key) mismatched key sets, shapes, non-float
    tensors that differ, non-positive counts, and an empty round. Floating tensors are averaged in
    float64 and cast back to their dtype, so the result does not depend on the clients' order
    beyond float64 rounding; integer buffers (e.g. counters) must agree and are copied.
    """
    _check_round("fedavg", state_dicts, num_examples)
    total = float(sum(num_examples))
    weights = [n / total for n in num_examples]  # n_k / sum_j n_j
    out = {}
    for k, v0 in state_dicts[0].items():
        if not v0.is_floating_point():
            out[k] = v0.clone()  # equal across clients (checked)
            continue
        acc = torch.zeros(v0.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc += w * sd[k].detach().to("cpu", torch.float64)
        out[k] = acc.to(v0.dtype)
    return out


def _check_round(rule: str, state_dicts: list[dict[str, torch.Tensor]], num_examples: list[int]) -> None:
    """The uploads of one round can be combined: same keys and shapes, equal integer tensors,
    positive counts, at least one upload. ValueError naming the client index and key otherwise."""
    if not state_dicts:
        raise ValueError(f"{rule}: no client reported this round (nothing to average)")
    if len(state_dicts) != len(num_examples):
        raise ValueError(f"{rule}: {len(state_dicts)} state dicts but {len(num_examples)} example counts")
    if any(n <= 0 for n in num_examples):
        raise ValueError(f"{rule}: example counts must be positive, got {list(num_examples)}")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(ref):
            missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
            raise ValueError(f"{rule}: client {i} keys differ from client 0 (missing {missing}, unexpected {extra})")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"{rule}: client {i} '{k}' has shape {tuple(v.shape)}, "
                                 f"client 0 has {tuple(ref[k].shape)}")
            if not v.is_floating_point() and not torch.equal(v, ref[k]):
                raise ValueError(f"{rule}: integer tensor '{k}' differs between client 0 and client {i}")


# ----------------------------------------------------------------------------------------------
# Robust aggregation of a router round (E4 under a rule)
# ----------------------------------------------------------------------------------------------

RULES = ("fedavg", "median", "trimmed", "crossval")
# mor.py's --aggregate default. crossval equals fedavg whenever no upload harms the others (module
# docstring) and resists a random-label client on the synthetic federation of the tests; it stays
# opt-in until the bucket settings have measured it on the benchmark (docs/results.md).
DEFAULT_RULE = "fedavg"
# nats per pair an upload may add to the others' routing loss beyond the median upload; measured on
# the synthetic federation of the tests: sound uploads stay within 0.02 of it, a random-label one is 0.1-0.35 above
CROSSVAL_MARGIN = 0.05


def aggregate(rule: str, states: list[dict[str, torch.Tensor]], num_examples: list[int],
              scores: torch.Tensor | None = None, trim: int = 1,
              margin: float = CROSSVAL_MARGIN) -> dict[str, torch.Tensor]:
    """One round's router from its uploads under `rule` (RULES; module docstring).

    states, num_examples: the uploads phi_k and counts n_k, in a fixed order (the sampled order).
    scores [M]: crossval's evidence, `cross_scores` (the routing loss each upload's local step
      adds on the other clients' own pairs).
    trim: uploads dropped at each end per coordinate by `trimmed` (at most (M-1)//2 are).
    Every rule is a pure function of its inputs and combines in float64: the result does not
    depend on the machine that runs the server (in-process rounds or the Flower ServerApp)."""
    if rule not in RULES:
        raise ValueError(f"aggregate: unknown rule {rule!r}; one of {RULES}")
    if rule == "fedavg":
        return fedavg(states, num_examples)
    if rule == "crossval":
        _check_round(rule, states, num_examples)
        keep = crossval_keep(scores, len(states), margin)
        return fedavg([s for s, k in zip(states, keep) if k], [n for n, k in zip(num_examples, keep) if k])
    _check_round(rule, states, num_examples)
    M = len(states)
    t = (M - 1) // 2 if rule == "median" else min(max(trim, 0), (M - 1) // 2)
    out = {}
    for k, v0 in states[0].items():
        if not v0.is_floating_point():
            out[k] = v0.clone()
            continue
        x = torch.stack([sd[k].detach().to("cpu", torch.float64) for sd in states]).sort(0).values  # [M, ...]
        out[k] = x[t:M - t].mean(0).to(v0.dtype)  # median: the middle one, or the mean of the middle two
    return out


def crossval_keep(scores: torch.Tensor | None, num_uploads: int, margin: float = CROSSVAL_MARGIN) -> list[bool]:
    """crossval's decision, which of the M uploads to average: upload k is dropped when its score
    s_k (`cross_scores` [M]: nats of routing loss its local step adds on the other clients'
    pairs) exceeds the lower median of the scores by more than `margin`. A majority of sound
    uploads fixes the median, so the best upload is always kept and a round where every upload
    does about the same is plain fedavg. An upload nobody judged (NaN) is kept."""
    if scores is None or scores.shape != (num_uploads,):
        raise ValueError(f"crossval: needs one score per upload ({num_uploads}, from cross_scores), "
                         f"got {None if scores is None else tuple(scores.shape)}")
    judged = ~scores.isnan()
    if not judged.any():
        return [True] * num_uploads
    bar = scores[judged].double().median() + margin
    return [bool(not j or v <= bar) for v, j in zip(scores.double().tolist(), judged.tolist())]


def cross_scores(losses: torch.Tensor, accuracy: torch.Tensor, judges: list[str], uploaders: list[str]) -> torch.Tensor:
    """crossval's evidence -> s [M], one score per upload.

    losses [J, 1 + M]: judge j's routing loss (Client.judge) of the round's starting router phi
      (column 0) and of each upload; accuracy [J]: phi's pair accuracy a_j on j's pairs.
    s_k = sum_{j != k} v_j (L_j(phi_k) - L_j(phi)) / sum_{j != k} v_j,   v_j = max(0, 2 a_j - 1)^2
    L_j(phi_k) - L_j(phi) is what upload k's local step alone does to client j. v_j is the
    information a BT label of flip rate eps_j = 1 - a_j carries, (1 - 2 eps)^2: a client whose
    labels are noise scores a_j ~ 1/2 under any router, so it has no say on the others' uploads
    (it would call every sharpening of the routing harmful; one that disagrees with the router
    more often than chance has none either), while harm concentrated on one sound client's
    domain still counts in full (a median over judges would hide it). No client judges itself."""
    d = (losses[:, 1:] - losses[:, :1]).double()  # [J, M]
    v = ((2 * accuracy.double() - 1).clamp_min(0) ** 2).nan_to_num(0.0)[:, None].expand_as(d).clone()  # [J, M]
    own = torch.tensor([[j == u for u in uploaders] for j in judges], dtype=torch.bool).view(d.shape)
    v[own | d.isnan()] = 0.0
    return (v * d.nan_to_num(0.0)).sum(0) / v.sum(0)  # NaN where no judge has a say


# ----------------------------------------------------------------------------------------------
# Clients joining and leaving: grow or shrink the router's last layer (one row per RM)
# ----------------------------------------------------------------------------------------------


def join_rm(model: routing.Router, offset: float | None = None) -> routing.Router:
    """A router for K + 1 RMs from a trained one for K, without retraining: the new row of the
    last layer is the mean of the existing rows (bias: their mean + `offset`, default -log K), so
    the new logit is the mean logit - log K for every input: the existing RMs keep their weight
    ratios exactly and the new RM starts with a share <= 1 / (K^2 + 1) (mean z <= logsumexp z -
    log K). The input standardisation is kept: the function the clients trained is unchanged.
    Next: the joining client's Client.fit_new_rm, then run_rounds from it with the K + 1 clients
    (each holding the new RM's scores, Client.add_rm)."""
    offset = -math.log(model.num_rms) if offset is None else offset
    new = routing.Router(model.dim, model.num_rms + 1, model.hidden, model.context)
    state = model.state_dict()
    W, b = _last_layer(model)
    state[W] = torch.cat([state[W], state[W].mean(0, keepdim=True)])  # [K + 1, hidden]
    state[b] = torch.cat([state[b], state[b].mean(0, keepdim=True) + offset])  # [K + 1]
    new.load_state_dict(state)
    return new


def drop_rm(model: routing.Router, k: int) -> routing.Router:
    """A router for the K - 1 RMs left when client k leaves: row k of the last layer removed, so
    the remaining weights are w_j / (1 - w_k), the trained router conditioned on not routing to k."""
    if not 0 <= k < model.num_rms or model.num_rms < 2:
        raise ValueError(f"drop_rm: cannot remove RM {k} of a router over {model.num_rms}")
    new = routing.Router(model.dim, model.num_rms - 1, model.hidden, model.context)
    state = model.state_dict()
    for key in _last_layer(model):
        state[key] = torch.cat([state[key][:k], state[key][k + 1:]])
    new.load_state_dict(state)
    return new


JOIN_FIT_EPOCHS = 10  # the joining client's own epochs on its new row (fit_new_rm) before the rounds


def warm_start(old: routing.Router, old_names: list[str], names: list[str]) -> tuple[routing.Router, list[int]]:
    """A router for the clients `names` from one trained for `old_names`, without retraining:
    the general form of join_rm / drop_rm. A client that stayed keeps its row of the last layer
    (reordered to `names`); one that left loses it; one that joined gets the mean of the kept
    rows with its bias lowered by log(#kept), as in join_rm, so it starts with a small share and
    the kept clients' weight ratios are unchanged. The input standardisation is kept.
    -> (router, rows of the joining clients: each fits its own with Client.fit_new_rm)."""
    keep = [old_names.index(n) for n in names if n in old_names]
    if not keep:
        raise ValueError(f"warm_start: none of {names} is among the trained router's clients {old_names}")
    W, b = _last_layer(old)
    state = old.state_dict()
    w_new = state[W][keep].mean(0)  # [hidden]
    b_new = state[b][keep].mean() - math.log(len(keep))
    state[W] = torch.stack([state[W][old_names.index(n)] if n in old_names else w_new for n in names])  # [K, hidden]
    state[b] = torch.stack([state[b][old_names.index(n)] if n in old_names else b_new for n in names])  # [K]
    new = routing.Router(old.dim, len(names), old.hidden, old.context)
    new.load_state_dict(state)
    return new, [i for i, n in enumerate(names) if n not in old_names]


def _last_layer(model: routing.Router) -> tuple[str, str]:
    """Keys of the last nn.Linear of the router's MLP: its rows are the K reward models."""
    i = len(model.net) - 1
    if not isinstance(model.net[i], torch.nn.Linear):
        raise TypeError(f"router's last layer is a {type(model.net[i]).__name__}, not nn.Linear")
    return f"net.{i}.weight", f"net.{i}.bias"


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

    def local_rm_steps(self, rm: reward.RewardModel, phase: str, steps: int, cfg: reward.RMConfig,
                       seed: int) -> float:
        """FedAvg-RM's local update (fedavg_rm_rounds): `steps` steps of E1's recipe on the
        client's own pairs, from the global RM the server sent, in place (rm's state is the
        upload). phase "sft": the warm-up on the chosen responses; "bt": Bradley-Terry. A fresh
        AdamW each round (the server averages parameters, not optimiser moments). -> mean loss."""
        if phase == "sft":
            losses = reward.train_sft(rm.vlm, rm.encoder, reward.warmup_examples(self._train), steps, cfg.sft_batch,
                                      cfg.sft_lr, seed, desc=f"fedavg_rm {self.name} sft")
        else:
            opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
            batches = models.image_batches([*self._train, *self._format], cfg.batch, seed)
            rm.train()
            losses = []
            for _ in range(steps):
                rc, rr = rm.pair_rewards(next(batches))
                loss = reward.bradley_terry_loss(rc, rr)  # E1
                if models.guarded_step(opt, loss, rm.parameters(), f"fedavg_rm {self.name} bt"):
                    losses.append(loss.item())
            rm.eval()
        return sum(losses) / max(len(losses), 1)

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
        self._routing, self._routing_pairs = {}, {}
        for part, pairs in (("train", train), ("heldout", self._heldout)):
            pairs = sorted(pairs, key=lambda p: p.image)  # neighbours share an image: encoded once
            self._routing_pairs[part] = pairs  # the rows of the cache, for an RM that joins later
            N = len(pairs)
            # chosen and rejected rows of a pair side by side in one call: the image is encoded once
            e = routing.features(ref_vlm, ref_encoder, [p.image for p in pairs for _ in (0, 1)],
                                 [p.prompt for p in pairs for _ in (0, 1)],
                                 [y for p in pairs for y in (p.chosen, p.rejected)]).view(N, 2, -1)
            scores = [reward.pair_scores(rm, pairs) for rm in rms]  # K x ([N], [N])
            r_w = torch.stack([rm.standardized(rc) for rm, (rc, _) in zip(rms, scores)], -1)
            r_l = torch.stack([rm.standardized(rr) for rm, (_, rr) in zip(rms, scores)], -1)
            self._routing[part] = (e[:, 0], e[:, 1], r_w, r_l)

    def add_rm(self, rm: reward.RewardModel) -> None:
        """A client joined: append its RM's standardised rewards as column K + 1 of r_w, r_l
        [N, K + 1] on the pairs prepare_routing cached (features are not recomputed)."""
        for part, (e_w, e_l, r_w, r_l) in self._routing.items():
            rc, rr = reward.pair_scores(rm, self._routing_pairs[part])
            self._routing[part] = (e_w, e_l, torch.cat([r_w, rm.standardized(rc)[:, None]], -1),
                                   torch.cat([r_l, rm.standardized(rr)[:, None]], -1))

    def drop_rm(self, k: int) -> None:
        """Client k left: its RM's column leaves r_w, r_l (drop_rm removes its router row)."""
        keep = [j for j in range(self._routing["train"][2].shape[1]) if j != k]
        self._routing = {part: (e_w, e_l, r_w[:, keep], r_l[:, keep])
                         for part, (e_w, e_l, r_w, r_l) in self._routing.items()}

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
        losses = self._local_epochs(model, torch.optim.AdamW(model.parameters(), lr=lr), epochs, batch_size, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, self.n, sum(losses) / max(len(losses), 1)

    def fit_new_rm(self, state: dict[str, torch.Tensor], make_router, epochs: int, lr: float,
                   batch_size: int, seed: int, row: int = -1) -> tuple[dict[str, torch.Tensor], int, float]:
        """The joining client's first step (after join_rm or warm_start): E epochs of AdamW on
        L_route over its own pairs that move only its RM's row `row` of the last layer (weights
        and bias; the last row after join_rm); every
        other parameter comes back as the server sent it. The client that brings the RM is the
        one whose data says where it beats the existing mixture; without this step the new row
        starts far below the confident rows and the federation needs as many rounds to lift it
        as a router trained from scratch. Same upload as router_update."""
        model = make_router()
        model.load_state_dict(state)
        W, b = (model.get_parameter(k) for k in _last_layer(model))
        for p in model.parameters():
            p.requires_grad_(p is W or p is b)
        mask = torch.zeros(W.shape[0], 1)
        mask[row] = 1.0  # [K, 1]: the new row only
        W.register_hook(lambda g: g * mask)
        b.register_hook(lambda g: g * mask[:, 0])
        opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=0.0)  # decay would move the frozen rows
        losses = self._local_epochs(model, opt, epochs, batch_size, seed)
        out = {k: v.detach().clone() for k, v in state.items()}
        for k in _last_layer(model):
            out[k][row] = model.state_dict()[k][row]
        return out, self.n, sum(losses) / max(len(losses), 1)

    def _local_epochs(self, model, opt, epochs: int, batch_size: int, seed: int) -> list[float]:
        """E epochs of `opt` on L_route (E4) over the training pairs, seeded batches; the losses."""
        e_w, e_l, r_w, r_l = self._routing["train"]
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
        return losses

    @torch.no_grad()
    def judge(self, states: list[dict[str, torch.Tensor]], make_router, part: str = "train"
              ) -> tuple[list[float], list[float]]:
        """crossval's evidence: L_route (E4) and the mixed pair accuracy (E3) of each router state
        on this client's own pairs, all M states in one vmapped forward; only the 2M numbers
        leave the client. `part` "train" by default: the uploads being judged never saw these
        pairs (each was trained on its own client's), and the held-out pairs stay untouched by
        any decision of the server, so the held-out accuracy it reports is not selected on."""
        e_w, e_l, r_w, r_l = self._routing[part]
        model = make_router()
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}  # [M, ...] per key

        def one(params):  # R(x, y_w) - R(x, y_l) [N] under the router phi = params (E3)
            w = [torch.softmax(torch.func.functional_call(model, params, (e,)), -1) for e in (e_w, e_l)]
            return routing.mixed_reward(w[0], r_w) - routing.mixed_reward(w[1], r_l)
        margin = torch.vmap(one)(stacked)  # [M, N]
        loss = -torch.nn.functional.logsigmoid(margin).mean(1)  # routing_loss, per state
        return loss.tolist(), (margin > 0).float().mean(1).tolist()

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
    why = safe_io.state_problem(state, server_state)  # keys, shapes, finite values
    if why:
        return why
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"n_k must be a positive integer, got {n!r}"
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"loss must be a finite number, got {loss!r}"
    return None


def run_rounds(router: torch.nn.Module, make_router, clients: list[Client], rounds: int, local_epochs: int,
               lr: float, batch_size: int, fraction: float = 1.0, seed: int = 0, timeout_s: float = 600.0,
               on_round=None, desc: str = "router", aggregate: str = "fedavg") -> list[dict]:
    """E4: R rounds of federated training. Each round samples max(1, round(fraction * K)) clients,
    sends them the router's state, and combines the uploads of those that answered with the rule
    `aggregate` (RULES; "fedavg": weighted by n_k). For "crossval" the clients that answered
    then judge every upload on their own pairs (one more exchange: the starting state and the M
    uploads down, 2 (M + 1) numbers up each; `cross_scores`); the log holds each upload's score
    ("crossval") and the uploads left out ("rejected"). mor.py's flag defaults to DEFAULT_RULE.
    A client that raises, exceeds `timeout_s` or uploads a malformed state (`check_upload`:
    wrong keys or shapes, NaN/inf) is dropped from the round and logged; a round where every
    sampled client failed raises RuntimeError. Returns one log dict per round; the router's
    parameters are updated in place. `on_round(router)` -> dict of extra figures for the log
    (e.g. held-out accuracy), shown in the progress bar."""
    if aggregate not in RULES:
        raise ValueError(f"run_rounds: unknown aggregation rule {aggregate!r}; one of {RULES}")
    rng = random.Random(f"rounds-{seed}")
    log = []
    bar = Progress(range(rounds), desc=desc, dynamic_ncols=True)
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
        names, states, counts = [u[0] for u in uploads], [u[1] for u in uploads], [u[2] for u in uploads]
        entry = {"round": r, "clients": names, "dropped": dropped}
        scores = None
        if aggregate == "crossval":  # the clients that answered judge every upload on their own pairs
            judges = [c for c in sampled if c.name in names]
            votes = [_judge(c, [state] + states, make_router, f"{desc} round {r}") for c in judges]
            losses = torch.tensor([v[0] for v in votes]).view(len(judges), len(states) + 1)
            scores = cross_scores(losses, torch.tensor([v[1][0] for v in votes]), [c.name for c in judges], names)
            entry["crossval"] = dict(zip(names, scores.tolist()))
            entry["rejected"] = [u for u, k in zip(names, crossval_keep(scores, len(names))) if not k]
        router.load_state_dict(_aggregate(aggregate, states, counts, scores))
        # n_k-weighted mean of the local losses (of all valid uploads, kept or not)
        entry["loss"] = sum(u[2] * u[3] for u in uploads) / sum(counts)
        entry.update(on_round(router) if on_round else {})
        log.append(entry)
        bar.log(r, clients=len(names), dropped=len(dropped), **{k: v for k, v in entry.items() if isinstance(v, float)})
        bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in entry.items()
                         if k not in ("round", "clients", "dropped", "rejected", "crossval")})
    return log


_aggregate = aggregate  # run_rounds' argument `aggregate` (the rule's name) shadows the function


def _judge(client: Client, states: list[dict[str, torch.Tensor]], make_router, desc: str):
    """Client.judge, or NaNs (no say) if it fails: a judge that cannot answer must not end the
    round (cross_scores gives a NaN row no weight)."""
    try:
        return client.judge(states, make_router)
    except Exception as e:  # noqa: BLE001  same policy as a failing local update
        tqdm.write(f"{desc}: judge {client.name} gave no scores ({type(e).__name__}: {e})")
        return [float("nan")] * len(states), [float("nan")] * len(states)


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


def fedavg_rm_rounds(rm: reward.RewardModel, clients: list[Client], cfg: reward.RMConfig, rounds: int,
                     seed: int) -> list[dict]:
    """E8's FedAvg-RM as McMahan's FedAvg of the reward model's parameters (in place on `rm`,
    the global model, initialised once from the common checkpoint):

      for phase in (SFT warm-up, Bradley-Terry), for r = 1..R:
        theta_k <- `local_rm_steps` of client k from theta (its share of the phase's steps)
        theta   <- sum_k n_k / sum_j n_j theta_k                                        (E4)

    The phase's steps are split over its R rounds (the remainder to the first rounds), so every
    client takes cfg.sft_steps + cfg.steps local steps on its own pairs in all: the recipe of
    its own RM. Returns one log entry per round {phase, round, steps, loss (n_k-weighted)}."""
    counts = [c.n for c in clients]
    log = []
    for phase, total in (("sft", cfg.sft_steps), ("bt", cfg.steps)):
        for r in range(rounds):
            steps = total // rounds + (r < total % rounds)
            if steps == 0:
                continue
            theta = {k: v.detach().clone() for k, v in rm.state_dict().items()}
            states, losses = [], []
            for c in clients:
                rm.load_state_dict(theta)
                losses.append(c.local_rm_steps(rm, phase, steps, cfg, seed * 1000 + r))
                states.append({k: v.detach().clone() for k, v in rm.state_dict().items()})
            rm.load_state_dict(fedavg(states, counts))
            log.append({"phase": phase, "round": r, "steps": steps,
                        "loss": sum(n * x for n, x in zip(counts, losses)) / sum(counts)})
            tqdm.write(f"fedavg_rm {phase} round {r}: {steps} local steps, loss {log[-1]['loss']:.4f}")
    return log


def pooled_client(clients: list[Client]) -> Client:
    """The central_router reference row: one client holding every client's routing cache (the
    pairs' features and K RM scores, after prepare_routing), as if the pairs had been pooled on
    one server. Trained with run_rounds over this one client, the same R rounds x E epochs see
    each pair as often as federated training does; what differs is only that nothing is averaged."""
    out = Client.__new__(Client)
    out.name, out._seed, out._format = "central", clients[0]._seed, []
    out._train = [p for c in clients for p in c._train]
    out._heldout = [p for c in clients for p in c._heldout]
    out._routing = {part: tuple(torch.cat([c._routing[part][i] for c in clients]) for i in range(4))
                    for part in ("train", "heldout")}
    return out
