"""Real federation of the MoR router over Flower: one process per client, the same numbers as in-process.

DESIGN E4 trains the router g_phi by FedAvg. `federated.run_rounds` runs those rounds with every
client as a Python object inside one process; this module runs the identical rounds as a Flower
deployment: a SuperLink (the server's message hub), one SuperNode per client (a separate process
that owns only its client's data) and a ServerApp (the round loop). Round r:

  server  sampled = Random(f"rounds-{seed}").sample(clients, max(1, round(fraction * K)))    as run_rounds
          -> every sampled client: phi (the router's state dict) and (E, lr, batch, seed * 1000 + r)
  client  phi_k, n_k, loss_k = federated.Client.router_update(phi, ...)     E epochs of AdamW on L_route (E4)
          <- phi_k (arrays), n_k and loss_k (two scalars)
  server  phi <- federated.fedavg([phi_k], [n_k])  over the clients that answered, in sampled order (E4)
          routing loss of the round = sum_k n_k * loss_k / sum_k n_k

The client step is `federated.Client.router_update` itself (a subclass only changes where the
precomputed routing tensors come from: a safetensors cache on the site's own disk) and the
aggregation is `federated.fedavg` itself, in the same client order, so with the same seed the
router is bit-identical to the in-process one (tests/test_flower.py checks this through real
SuperLink / SuperNode processes).

What crosses the wire (E4: parameters of phi and counts; never a feature, a reward or a pair)
  server -> client  ArrayRecord "router" (phi: D*64 + 64 + 64*K + K floats plus the two [D] input
                    statistics) and ConfigRecord "config" (round, seed, E, lr, batch, router shape)
  client -> server  ArrayRecord "router" (phi_k) and MetricRecord "metrics" (n_k, mean local loss);
                    at the handshake the client's name and counts, at the end its held-out accuracy
Flower serialises records as numpy buffers and scalars: no pickle, no code, no data.

Pieces
  routing cache     save_routing_cache / write_routing_cache / CachedClient: one client's E2-E3
                    tensors e_w, e_l [N, D], r_w, r_l [N, K] (+ the held-out part) and n_k
  client_app        Flower ClientApp: handshake (query), the E4 local step (train), held-out
                    accuracy of the mixed reward (evaluate)
  server_app        Flower ServerApp: handshake, R rounds of sampled FedAvg with every reply
                    validated, drop-outs, min_clients, a final evaluate, the router saved atomically
  LocalFederation   the launcher: SuperLink + one SuperNode per client as separate processes on
                    127.0.0.1 (insecure HTTP, acceptable on loopback only), `flwr run`, teardown of
                    every process it started on success, error and Ctrl-C
  prepare           mor.py's router-stage precompute (stage_router) written out as caches

Usage (see --help of each command)
  python flower_fed.py prepare --run-dir runs/default            # caches, initial router, manifest
  python flower_fed.py launch  --run-dir runs/default --compare  # train over Flower, then in-process
"""

from __future__ import annotations

import sys

# Flower is optional (requirements-flower.txt): fail in one line that says how to get it, before
# paying for the torch import.
try:
    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    _MISSING = ("flower_fed: the Flower framework (flwr) is not installed; "
                "install it with: pip install -r requirements-flower.txt")
    if __name__ == "__main__":
        sys.exit(_MISSING)  # the line on stderr, exit status 1
    raise ImportError(_MISSING) from _e

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import safe_io
import federated
import router as routing

REPO = Path(__file__).resolve().parent
CACHE_FORMAT = "mor-routing-cache/1"
MANIFEST_FORMAT = "mor-flower-manifest/1"
ROUTING_KEYS = ("e_w", "e_l", "r_w", "r_l")  # Client._routing[part] order: features [N, D], rewards [N, K]
LOG_PREFIX = "[mor-flower]"  # ServerApp lines the launcher shows on the console (the rest goes to logs/)
# The modules a site needs to run the ClientApp; they travel inside the Flower App Bundle (FAB), so
# a SuperNode needs only the packages of requirements.txt + requirements-flower.txt, not this repo.
APP_MODULES = ("flower_fed.py", "federated.py", "router.py", "reward.py", "data.py", "models.py", "safe_io.py")

# Crash-safe writes: safe_io.atomic_save_file / safe_io.atomic_write_json, as mor.py writes (safe_io.py ships
# with the app, so the ServerApp needs no copy of them).

# ----------------------------------------------------------------------------------------------
# The routing cache: what `Client.prepare_routing` computed, on the client's own disk
# ----------------------------------------------------------------------------------------------


def _check_cache(where, meta: dict, t: dict[str, torch.Tensor]) -> tuple[str, int, dict]:
    """Validate a cache's metadata and tensors -> (client name, n_k, {part: (e_w, e_l, r_w, r_l)}).
    Errors name `where` (the file) and the key at fault."""
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"routing cache {where}: metadata 'format' is {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    name = meta.get("client")
    if not name or "," in name:
        raise ValueError(f"routing cache {where}: client name {name!r} must be non-empty and free of commas")
    n_k = t.get("n_k")
    if n_k is None or n_k.numel() != 1 or n_k.is_floating_point() or int(n_k) <= 0:
        raise ValueError(f"routing cache {where}: 'n_k' must be one positive integer")
    parts = {}
    for part in ("train", "heldout"):
        keys = [f"{part}.{k}" for k in ROUTING_KEYS]
        have = [k in t for k in keys]
        if not any(have) and part == "heldout":
            continue  # optional: only the final evaluate reads it
        missing = [k for k, h in zip(keys, have) if not h]
        if missing:
            raise ValueError(f"routing cache {where}: missing {missing}")
        e_w, e_l, r_w, r_l = (t[k] for k in keys)
        N = e_w.shape[0] if e_w.dim() == 2 else -1
        # e_* [N, D] features (E2), r_* [N, K] standardised rewards (E3): one row per pair
        for k, v, want in zip(keys, (e_w, e_l, r_w, r_l), ("N, D", "N, D", "N, K", "N, K")):
            if v.dim() != 2 or v.shape[0] != N or N <= 0 or not v.is_floating_point():
                raise ValueError(f"routing cache {where}: '{k}' has shape {tuple(v.shape)} ({v.dtype}), "
                                 f"expected float [{want}] with N = {N} > 0 rows")
            if not torch.isfinite(v).all():
                raise ValueError(f"routing cache {where}: '{k}' has non-finite values")
        if e_l.shape != e_w.shape or r_l.shape != r_w.shape:
            raise ValueError(f"routing cache {where}: {part} chosen/rejected shapes differ "
                             f"({tuple(e_w.shape)} / {tuple(e_l.shape)}, {tuple(r_w.shape)} / {tuple(r_l.shape)})")
        parts[part] = (e_w, e_l, r_w, r_l)
    if "heldout" in parts:
        dk = lambda p: (parts[p][0].shape[1], parts[p][2].shape[1])  # noqa: E731  (D, K) of a part
        if dk("heldout") != dk("train"):
            raise ValueError(f"routing cache {where}: held-out (D, K) = {dk('heldout')} differs from the "
                             f"training part's {dk('train')}")
    return name, int(n_k), parts


def save_routing_cache(path: str | Path, name: str, n_k: int, train: tuple, heldout: tuple | None = None) -> None:
    """Write one client's routing tensors: train = (e_w, e_l [N, D], r_w, r_l [N, K]), the same for
    `heldout` (optional: only the final evaluate reads it), and n_k (the FedAvg weight: the
    client's full training-pair count, which can exceed N when routing used a subsample).
    Keys "train.e_w", ..., "heldout.r_l", "n_k"; the client's name in the file's metadata.
    Validated before anything is written, so a bad cache never reaches the disk."""
    tensors = {"n_k": torch.tensor(int(n_k), dtype=torch.int64)}
    for part, tup in (("train", train), ("heldout", heldout)):
        if tup is None:
            continue
        if len(tup) != 4:
            raise ValueError(f"routing cache {path}: {part} needs 4 tensors {ROUTING_KEYS}, got {len(tup)}")
        tensors.update({f"{part}.{k}": t for k, t in zip(ROUTING_KEYS, tup)})
    meta = {"format": CACHE_FORMAT, "client": name}
    _check_cache(path, meta, tensors)
    safe_io.atomic_save_file(path, tensors, meta)


def write_routing_cache(client: federated.Client, path: str | Path) -> None:
    """The cache of a `federated.Client` after `prepare_routing`. Client-side code: it runs at the
    site and writes to the site's own disk, which is why it may read the client's private
    `_routing` (the only reader outside federated.Client; nothing of it goes to the server)."""
    part = getattr(client, "_routing", None) or {}
    if "train" not in part:
        raise ValueError(f"client {client.name!r}: no routing tensors yet; call prepare_routing first")
    save_routing_cache(path, client.name, client.n, part["train"], part.get("heldout"))


class CachedClient(federated.Client):
    """A `federated.Client` whose routing tensors come from a cache file instead of its pairs.

    Only the constructor and `n` differ: `router_update`, `mixed_accuracy`, `feature_moments` and
    `routing_weights` are federated.Client's own methods, so a Flower client runs exactly the
    code the in-process federation runs. The file is validated on load (names the key at fault)."""

    def __init__(self, path: str | Path):  # noqa: D107  (deliberately not calling Client.__init__: no pairs here)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing cache {path}: no such file (write it with `python flower_fed.py prepare`)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' own message does not name the file
            raise ValueError(f"routing cache {path}: not a readable safetensors file ({e})") from e
        self.name, self._n, self._routing = _check_cache(path, meta, t)
        self._path = path

    @property
    def n(self) -> int:
        """n_k as the client reported it when the cache was written (its FedAvg weight)."""
        return self._n

    @property
    def dim(self) -> int:
        return self._routing["train"][0].shape[1]  # D = 2H of the reference model (E2)

    @property
    def num_rms(self) -> int:
        return self._routing["train"][2].shape[1]  # K reward models

    @property
    def heldout_pairs(self) -> int:
        return self._routing["heldout"][0].shape[0] if "heldout" in self._routing else 0


# ----------------------------------------------------------------------------------------------
# Run configuration: one typed record, shipped to the ServerApp as Flower's run config
# ----------------------------------------------------------------------------------------------


@dataclass
class FedConfig:
    """Everything the ServerApp needs. Flower run-config keys are the field names with '-'.
    The defaults are mor.py's DEFAULT router sizes (30 rounds, E=1, AdamW 1e-3, batch 64)."""
    clients: str = ""            # comma-separated names: the population run_rounds samples, in its order
    init_path: str = ""          # initial router state (server side: feature stats already set)
    out_path: str = ""           # final router state (safetensors, written atomically)
    summary_path: str = ""       # JSON: per-round log, handshake, evaluate, timings, status
    progress_path: str = ""      # JSON lines, one per finished round (for watchers and tests)
    rounds: int = 30
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    fraction: float = 1.0        # share of clients sampled per round; 1.0 = every client, every round
    seed: int = 0
    dim: int = 0                 # D of the routing features and K reward models: the router's shape,
    num_rms: int = 0             # checked when the initial state is loaded (0: unchecked)
    hidden: int = 64             # router MLP width (mor.py --router-hidden)
    route_on: str = "prompt+response"
    min_clients: int = 1         # a round with fewer valid replies fails the run (run_rounds: 1)
    round_timeout: float = 600.0  # seconds to wait for a round's replies (run_rounds' timeout_s)
    node_wait_timeout: float = 120.0  # seconds to wait for the SuperNodes to connect at the start
    poll_interval: float = 0.1   # seconds between pulls of replies from the SuperLink
    evaluate: bool = True        # after the last round, every client reports held-out accuracy
    threads: int = 1             # torch threads in every Flower process (2 shared cores here)
    token: str = ""              # launcher's id of this run: the summary it reads back must carry it

    def client_names(self) -> list[str]:
        return [c for c in self.clients.split(",") if c]

    def to_run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, rc) -> "FedConfig":
        """Flower's run config (TOML values) -> FedConfig, each value cast to its field's type."""
        cfg = cls()
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in rc:
                kind = type(getattr(cfg, f.name))
                v = rc[key]
                if kind is bool and not isinstance(v, bool):
                    raise ValueError(f"run config '{key}': expected true/false, got {v!r}")
                try:
                    setattr(cfg, f.name, kind(v))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"run config '{key}': {v!r} is not a {kind.__name__}") from e
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse values the rounds cannot run with, naming the run-config key."""
        bad = {"clients": not self.client_names(), "rounds": self.rounds < 0, "local-epochs": self.local_epochs < 1,
               "lr": not self.lr > 0, "batch-size": self.batch_size < 1, "fraction": not 0 < self.fraction <= 1,
               "min-clients": self.min_clients < 1, "round-timeout": not self.round_timeout > 0,
               "threads": self.threads < 1, "route-on": self.route_on not in routing.CONTEXTS}
        for key, is_bad in bad.items():
            if is_bad:
                raise ValueError(f"run config '{key}': invalid value {getattr(self, key.replace('-', '_'))!r}")
        names = self.client_names()
        if len(set(names)) != len(names):
            raise ValueError(f"run config 'clients': duplicate names in {names}")


# ----------------------------------------------------------------------------------------------
# ClientApp: runs on a SuperNode, owns one client's cache; every message is a fresh process
# ----------------------------------------------------------------------------------------------

client_app = ClientApp()

# Test-only fault injection: the SuperNode's node-config key `fault`, a comma list of KIND@ROUND
# (ROUND omitted or "*" = every round). Used by tests/test_flower.py to prove that the server
# rejects bad replies and survives dead clients; a real site never sets it.
#   sleep: hang for an hour before training        exit: the ClientApp process dies, no reply
#   raise: the ClientApp raises                    bad-keys / bad-shape / nan: a corrupted upload
FAULTS = ("sleep", "exit", "raise", "bad-keys", "bad-shape", "nan")


def _faults(context: Context, rnd: int) -> set[str]:
    """The fault kinds this node's config schedules for round `rnd` (empty on a real site)."""
    out = set()
    for item in (s.strip() for s in str(context.node_config.get("fault", "")).split(",")):
        if not item:
            continue
        kind, _, when = item.partition("@")
        if kind not in FAULTS:
            raise ValueError(f"node-config fault {item!r}: unknown kind (one of {FAULTS})")
        if when not in ("", "*") and not when.isdigit():
            raise ValueError(f"node-config fault {item!r}: ROUND must be a round number or *")
        if when in ("", "*") or int(when) == rnd:
            out.add(kind)
    return out


def _corrupt(state: dict[str, torch.Tensor], faults: set[str]) -> dict[str, torch.Tensor]:
    """Test-only: damage an upload the way a buggy or hostile client would."""
    state = dict(state)
    key = next(k for k, v in state.items() if v.dim() >= 1 and v.shape[-1] > 1)
    if "bad-keys" in faults:
        state[key + "_typo"] = state.pop(key)  # a renamed parameter: missing one key, one unexpected
    elif "bad-shape" in faults:
        state[key] = state[key][..., :-1].clone()  # one column short
    elif "nan" in faults:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    return state


def _site_client(context: Context) -> CachedClient:
    """This SuperNode's client: the cache named by its node-config (its private data stays here)."""
    torch.set_num_threads(int(context.run_config.get("threads", 1)))
    path = context.node_config.get("routing-cache")
    if not path:
        raise ValueError("this SuperNode's node-config has no 'routing-cache'; start it with --node-config "
                         "FILE.toml holding  routing-cache = \"/path/to/<client>.safetensors\"")
    return CachedClient(path)


def _router_factory(client: CachedClient, config: ConfigRecord):
    """make_router as mor.make_router builds it: Router(D, K, width, context); D and K from the cache."""
    hidden, route_on = int(config["hidden"]), str(config["route-on"])
    return lambda: routing.Router(client.dim, client.num_rms, hidden, route_on)


def _received_state(msg: Message) -> dict[str, torch.Tensor]:
    """The server's phi from a message: {name: tensor} with the Router's keys, e.g. net.0.weight
    [hidden, D], feat_mean / feat_std [D]. torch.from_numpy over Flower's read-only buffers would
    alias them (and warn): clone into ordinary tensors."""
    return {k: v.clone() for k, v in msg.content["router"].to_torch_state_dict().items()}


@client_app.query()
def _client_handshake(msg: Message, context: Context) -> Message:
    """Who am I: the client's name and counts (n_k, D, K, held-out pairs). No data."""
    c = _site_client(context)
    return Message(RecordDict({
        "client": ConfigRecord({"name": c.name}),
        "metrics": MetricRecord({"num-examples": c.n, "dim": c.dim, "num-rms": c.num_rms,
                                 "heldout-pairs": c.heldout_pairs})}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """E4 local step: federated.Client.router_update on this site's tensors, from the server's phi."""
    c = _site_client(context)
    cfg = msg.content["config"]
    faults = _faults(context, int(cfg["round"]))
    if "sleep" in faults:
        time.sleep(3600)
    if "exit" in faults:
        os._exit(3)  # the process vanishes without a reply, like a crashed site
    if "raise" in faults:
        raise RuntimeError(f"client {c.name}: injected failure (node-config fault)")
    # Same call, same arguments, same seed schedule (seed * 1000 + r) as run_rounds makes in-process.
    state, n_k, loss = c.router_update(_received_state(msg), _router_factory(c, cfg), int(cfg["epochs"]),
                                       float(cfg["lr"]), int(cfg["batch-size"]), int(cfg["seed"]))
    if faults:
        state = _corrupt(state, faults)
    print(f"{LOG_PREFIX} client {c.name}: round {int(cfg['round'])}, local loss {loss:.4f} on n_k={n_k}", flush=True)
    # The upload: phi_k's arrays, n_k and the mean local loss. Nothing else leaves the site.
    return Message(RecordDict({"router": ArrayRecord(torch_state_dict=state),
                               "metrics": MetricRecord({"num-examples": int(n_k), "loss": float(loss)})}),
                   reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """Held-out pair accuracy of the mixed reward under the received router (E3): one number."""
    c = _site_client(context)
    if not c.heldout_pairs:
        return Message(RecordDict({"metrics": MetricRecord({"heldout-pairs": 0})}), reply_to=msg)
    model = _router_factory(c, msg.content["config"])()
    model.load_state_dict(_received_state(msg))
    return Message(RecordDict({"metrics": MetricRecord({"heldout-pairs": c.heldout_pairs,
                                                        "heldout-accuracy": float(c.mixed_accuracy(model))})}),
                   reply_to=msg)


# ----------------------------------------------------------------------------------------------
# ServerApp: the E4 round loop over the Grid
# ----------------------------------------------------------------------------------------------

server_app = ServerApp()


class Rejected(ValueError):
    """A client's reply that must not be aggregated; the message names the client and the key."""


def check_upload(name: str, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 n_k=1, loss=0.0) -> None:
    """A reply's (phi_k, n_k, loss) must pass federated.check_upload, the test run_rounds applies
    in-process (exactly the reference's keys and shapes, finite values, n_k a positive integer,
    a finite loss), and carry the reference's dtypes (fedavg casts to the first upload's dtype,
    so one float64 upload would silently change the router's). Raises Rejected naming the client
    and the key at fault; only that client leaves the round (fedavg would refuse the whole round)."""
    why = federated.check_upload((state, n_k, loss), reference)
    if why:
        raise Rejected(f"client {name}: {why}")
    for k, ref in reference.items():
        if state[k].dtype != ref.dtype:
            raise Rejected(f"client {name}: '{k}' has dtype {state[k].dtype}, expected {ref.dtype}")


def parse_train_reply(name: str, msg: Message, reference: dict[str, torch.Tensor]) -> tuple[dict, int, float]:
    """A train reply -> (phi_k, n_k, mean local loss), or Rejected with the reason."""
    if msg.has_error():
        raise Rejected(f"client {name}: its ClientApp failed ({msg.error.reason})")
    content = msg.content
    if "router" not in content.array_records:
        raise Rejected(f"client {name}: reply has no ArrayRecord 'router' (has {sorted(content)})")
    if "metrics" not in content.metric_records:
        raise Rejected(f"client {name}: reply has no MetricRecord 'metrics' (has {sorted(content)})")
    try:
        state = content.array_records["router"].to_torch_state_dict()
    except Exception as e:  # an array Flower cannot turn back into numpy
        raise Rejected(f"client {name}: router arrays could not be decoded ({e})") from e
    m = content.metric_records["metrics"]
    n_k, loss = m.get("num-examples"), m.get("loss")
    check_upload(name, state, reference, n_k, loss)
    return {k: v.clone() for k, v in state.items()}, n_k, loss


def aggregate_round(rnd: int, sampled: list[str], uploads: dict[str, tuple], dropped: dict[str, str],
                    min_clients: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """E4 on the valid uploads {name: (phi_k, n_k, loss_k)} of a round: federated.fedavg in the
    sampled order (run_rounds' order, so float64 accumulation rounds identically) and the n_k-
    weighted routing loss, computed with run_rounds' own expression. Fewer than `min_clients`
    valid replies -> RuntimeError naming who answered and why the others dropped."""
    order = [c for c in sampled if c in uploads]
    if len(order) < min_clients:
        raise RuntimeError(f"round {rnd}: {len(order)} valid repl{'y' if len(order) == 1 else 'ies'} "
                           f"({order}), fewer than min-clients={min_clients}; dropped: {dropped}")
    ups = [uploads[c] for c in order]
    state = federated.fedavg([u[0] for u in ups], [u[1] for u in ups])
    n = sum(u[1] for u in ups)
    loss = sum(u[1] * u[2] for u in ups) / n  # n_k-weighted mean of the local losses
    return state, {"round": rnd, "clients": order, "dropped": {c: dropped[c] for c in sampled if c in dropped},
                   "loss": loss}


def _exchange(grid: Grid, cfg: FedConfig, targets: list[tuple[str, int | None]], content, message_type: str,
              group: str, timeout: float) -> tuple[dict[str, Message], dict[str, str]]:
    """Send content(label) to each (label, node id) and collect replies until all answered or
    `timeout` s passed. Returns ({label: reply}, {label: why it dropped}). Grid.send_and_receive
    is not used: it sleeps 3 s between pulls and cannot tell a departed SuperNode from a slow one."""
    online, dropped, msgs, labels = set(grid.get_node_ids()), {}, [], []
    for label, node in targets:
        if node is None:
            dropped[label] = "not connected (no SuperNode answered the handshake for it)"
        elif node not in online:
            dropped[label] = "SuperNode offline (no longer connected to the SuperLink)"
        else:
            msgs.append(Message(content(label), dst_node_id=node, message_type=message_type, group_id=group,
                                ttl=timeout + 60.0))
            labels.append(label)
    pending = {}
    for label, mid in zip(labels, list(grid.push_messages(msgs)) if msgs else []):
        if mid is None:
            dropped[label] = "the SuperLink refused the message"
        else:
            pending[mid] = label
    node_of = dict(targets)
    replies, deadline, next_check = {}, time.monotonic() + timeout, time.monotonic() + 1.0
    while pending and time.monotonic() < deadline:
        for rep in grid.pull_messages(list(pending)):
            label = pending.pop(rep.metadata.reply_to_message_id, None)
            if label is not None:
                replies[label] = rep
        if pending and time.monotonic() >= next_check:
            # A SuperNode that shut down (or missed its heartbeats) has left the node list: it will
            # never answer, so stop waiting for it now rather than at the deadline.
            online, next_check = set(grid.get_node_ids()), time.monotonic() + 1.0
            for mid, label in list(pending.items()):
                if node_of[label] not in online:
                    dropped[label] = "SuperNode went offline during the round"
                    del pending[mid]
        if pending:
            time.sleep(cfg.poll_interval)
    for label in pending.values():
        dropped[label] = f"no reply within {timeout:g}s (SuperNode dead, hung or too slow)"
    return replies, dropped


def _say(text: str) -> None:
    print(f"{LOG_PREFIX} {text}", flush=True)  # streamed to `flwr run --stream`, filtered by the launcher


def _handshake(grid: Grid, cfg: FedConfig, node_ids: list[int]) -> dict[str, dict]:
    """Ask every connected SuperNode which client it serves -> {name: {node_id, n_k, dim, ...}}."""
    names = cfg.client_names()
    replies, dropped = _exchange(grid, cfg, [(str(n), n) for n in node_ids],
                                 lambda _: RecordDict({"config": ConfigRecord({"token": cfg.token})}),
                                 "query", "handshake", cfg.round_timeout)
    for node, why in dropped.items():
        _say(f"handshake: SuperNode {node} did not answer ({why})")
    out = {}
    for node, rep in replies.items():
        try:
            if rep.has_error():
                raise Rejected(f"its ClientApp failed ({rep.error.reason})")
            name = str(rep.content.config_records["client"]["name"])
            m = rep.content.metric_records["metrics"]
            info = {"node_id": int(node), "n_k": int(m["num-examples"]), "dim": int(m["dim"]),
                    "num_rms": int(m["num-rms"]), "heldout_pairs": int(m["heldout-pairs"])}
        except (KeyError, TypeError, ValueError) as e:
            _say(f"handshake: SuperNode {node} rejected ({e})")
            continue
        if name not in names:
            _say(f"handshake: SuperNode {node} serves client {name!r}, not one of {names}: ignored")
        elif name in out:
            _say(f"handshake: SuperNode {node} also claims client {name!r} (node {out[name]['node_id']}): ignored")
        else:
            out[name] = info
    return out


def run_federation(grid: Grid, cfg: FedConfig) -> dict:
    """The ServerApp's work: wait for the SuperNodes, handshake, R rounds of E4, evaluate, save.
    The summary JSON is written (atomically) whatever happens, with status 'ok' or 'failed'."""
    names = cfg.client_names()
    summary = {"format": "mor-flower-run/1", "token": cfg.token, "status": "running", "config": cfg.to_run_config(),
               "flwr": flwr.__version__, "handshake": {}, "rounds": [], "evaluate": {}, "seconds": {}}
    t_all = time.monotonic()
    try:
        if cfg.dim and cfg.num_rms:  # router.load_state: safetensors only, the Router's keys and shapes, finite
            state = routing.load_state(cfg.init_path, routing.Router(cfg.dim, cfg.num_rms, cfg.hidden, cfg.route_on))
        else:
            state = load_file(cfg.init_path)
        # The reference a reply must match: the server's own router (keys, shapes [out, in], dtypes).
        reference = {k: v.clone() for k, v in state.items()}
        # SuperNodes register with the SuperLink on their own schedule (a site may start late): wait
        # for as many as there are clients, but only so long; missing ones are dropped each round.
        t = time.monotonic()
        while len(list(grid.get_node_ids())) < len(names) and time.monotonic() - t < cfg.node_wait_timeout:
            time.sleep(0.2)
        nodes = list(grid.get_node_ids())
        summary["seconds"]["wait_nodes"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        # Flower's node ids are anonymous; the handshake maps them to client names, which the
        # sampling rule (it draws from the list of names) and every drop-out message need.
        info = summary["handshake"] = _handshake(grid, cfg, nodes)
        summary["seconds"]["handshake"] = round(time.monotonic() - t, 2)
        _say(f"{len(nodes)} SuperNode(s) connected; clients " + ", ".join(
            f"{c} (n_k={info[c]['n_k']})" if c in info else f"{c} (absent)" for c in names))
        if len(info) < cfg.min_clients:
            raise RuntimeError(f"only {len(info)} client(s) answered the handshake ({sorted(info)}), "
                               f"fewer than min-clients={cfg.min_clients}")
        node_of = {c: info[c]["node_id"] if c in info else None for c in names}
        # run_rounds' sampling rule, verbatim: one generator for the run, m clients per round.
        rng = random.Random(f"rounds-{cfg.seed}")
        m = max(1, round(cfg.fraction * len(names)))
        t_rounds = time.monotonic()
        progress = open(cfg.progress_path, "a", encoding="utf-8") if cfg.progress_path else None
        try:
            for r in range(cfg.rounds):
                t = time.monotonic()
                sampled = rng.sample(names, m)  # same draw as run_rounds: names stand in for Client objects
                # the local step's arguments; the seed schedule seed * 1000 + r is run_rounds' own
                config = ConfigRecord({"round": r, "seed": cfg.seed * 1000 + r, "epochs": cfg.local_epochs,
                                       "lr": cfg.lr, "batch-size": cfg.batch_size, "hidden": cfg.hidden,
                                       "route-on": cfg.route_on})
                replies, dropped = _exchange(
                    grid, cfg, [(c, node_of[c]) for c in sampled],
                    lambda _: RecordDict({"router": ArrayRecord(torch_state_dict=state), "config": config}),
                    "train", str(r), cfg.round_timeout)
                # Every reply is checked before it can touch phi: a malformed or poisoned upload costs
                # its client the round (logged with the key at fault), never the round itself.
                uploads = {}
                for c, rep in replies.items():
                    try:
                        uploads[c] = parse_train_reply(c, rep, reference)
                    except Rejected as e:
                        dropped[c] = f"rejected: {e}"
                state, entry = aggregate_round(r, sampled, uploads, dropped, cfg.min_clients)
                entry["seconds"] = round(time.monotonic() - t, 3)
                summary["rounds"].append(entry)
                _say(f"round {r:3d}: routing loss {entry['loss']:.4f}, answered {', '.join(entry['clients'])}"
                     + "".join(f"; dropped {c}: {why}" for c, why in entry["dropped"].items()))
                if progress:
                    progress.write(json.dumps(entry) + "\n")
                    progress.flush()
        finally:
            if progress:
                progress.close()
        summary["seconds"]["rounds"] = round(time.monotonic() - t_rounds, 2)
        # the final phi, as mor.py saves router-<setting>.safetensors (atomic; token: which run wrote it)
        safe_io.atomic_save_file(cfg.out_path, state, {"format": "mor-router", "rounds": cfg.rounds, "token": cfg.token})
        if cfg.evaluate:
            t = time.monotonic()
            summary["evaluate"], summary["evaluate_dropped"] = _evaluate(grid, cfg, node_of, state)
            summary["seconds"]["evaluate"] = round(time.monotonic() - t, 2)
        summary["status"] = "ok"
        return summary
    except BaseException as e:
        summary["status"], summary["error"] = "failed", f"{type(e).__name__}: {e}"
        _say(f"run failed: {summary['error']}")
        raise
    finally:
        summary["seconds"]["total"] = round(time.monotonic() - t_all, 2)
        if cfg.summary_path:
            safe_io.atomic_write_json(cfg.summary_path, summary)


def _evaluate(grid: Grid, cfg: FedConfig, node_of: dict, state: dict) -> tuple[dict, dict]:
    """One extra exchange after the last round (not part of E4, only a report): every client scores
    the final router on its held-out pairs and answers with one number, the pair accuracy of the
    mixed reward (E3), the figure mor.stage_router prints per domain. -> ({client: {...}}, dropped)."""
    names = cfg.client_names()
    replies, dropped = _exchange(
        grid, cfg, [(c, node_of[c]) for c in names],
        lambda _: RecordDict({"router": ArrayRecord(torch_state_dict=state), "config": ConfigRecord(
            {"hidden": cfg.hidden, "route-on": cfg.route_on})}), "evaluate", "evaluate", cfg.round_timeout)
    out = {}
    for c, rep in replies.items():
        m = None if rep.has_error() else rep.content.metric_records.get("metrics")
        acc = m.get("heldout-accuracy") if m else None
        if acc is None and m is not None and m.get("heldout-pairs") == 0:
            out[c] = {"heldout_pairs": 0}  # a cache without a held-out part: nothing to report
        elif isinstance(acc, float) and 0.0 <= acc <= 1.0:
            out[c] = {"heldout_accuracy": acc, "heldout_pairs": int(m["heldout-pairs"])}
        else:  # an error reply, or a number that cannot be an accuracy
            dropped[c] = f"rejected: bad evaluate reply ({rep.error.reason if rep.has_error() else m})"
    _say("held-out pair accuracy of the mixed reward: "
         + ", ".join(f"{c} {100 * v['heldout_accuracy']:.1f}%" for c, v in out.items() if "heldout_accuracy" in v)
         + "".join(f"; {c} dropped: {why}" for c, why in dropped.items()))
    return out, dropped


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = FedConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.threads)
    run_federation(grid, cfg)


# ----------------------------------------------------------------------------------------------
# Manifest: a federation on disk (client order, cache per client, initial router, hyperparameters)
# ----------------------------------------------------------------------------------------------

CONFIG_KEYS = ("rounds", "local_epochs", "lr", "batch_size", "fraction", "seed", "hidden", "route_on")


def write_manifest(out_dir: str | Path, caches: dict[str, str | Path], init_state: dict[str, torch.Tensor],
                   **config) -> Path:
    """out_dir/manifest.json + out_dir/router-init.safetensors. `caches`: {client: cache path}, in
    the order run_rounds would hold the clients; `config`: any of CONFIG_KEYS (else FedConfig's)."""
    out_dir = Path(out_dir)
    unknown = set(config) - set(CONFIG_KEYS) - {"setting", "run_dir", "prepare_seconds"}
    if unknown:
        raise ValueError(f"write_manifest: unknown config keys {sorted(unknown)}")
    clients = {name: CachedClient(p) for name, p in caches.items()}
    for name, c in clients.items():
        if c.name != name:
            raise ValueError(f"manifest: cache {caches[name]} belongs to client {c.name!r}, listed as {name!r}")
    dims = {(c.dim, c.num_rms) for c in clients.values()}
    if len(dims) != 1:
        raise ValueError(f"manifest: the caches disagree on (D, K): {sorted(dims)}")
    safe_io.atomic_save_file(out_dir / "router-init.safetensors", init_state, {"format": "mor-router", "rounds": 0})
    defaults = FedConfig()
    dim, num_rms = dims.pop()
    man = {"format": MANIFEST_FORMAT, "clients": list(caches),
           "caches": {k: os.path.relpath(Path(p).resolve(), out_dir.resolve()) for k, p in caches.items()},
           "init": "router-init.safetensors", "dim": dim, "num_rms": num_rms,
           "config": {k: config.get(k, getattr(defaults, k)) for k in CONFIG_KEYS},
           **{k: config[k] for k in ("setting", "run_dir", "prepare_seconds") if k in config}}
    safe_io.atomic_write_json(out_dir / "manifest.json", man)
    return out_dir / "manifest.json"


def load_manifest(path: str | Path) -> dict:
    """manifest.json -> dict with absolute 'caches' and 'init' paths; errors name the file and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (write it with `python flower_fed.py prepare`)")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if man.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: 'format' is {man.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for key in ("clients", "caches", "init", "config", "dim", "num_rms"):
        if key not in man:
            raise ValueError(f"{path}: missing field '{key}'")
    if set(man["caches"]) != set(man["clients"]):
        raise ValueError(f"{path}: 'caches' {sorted(man['caches'])} do not match 'clients' {man['clients']}")
    man["caches"] = {k: (path.parent / v).resolve() for k, v in man["caches"].items()}
    man["init"] = (path.parent / man["init"]).resolve()
    return man


def _config_from_manifest(man: dict, overrides: dict | None) -> FedConfig:
    """The manifest's hyperparameters, then any non-None override (CLI flags, tests), validated."""
    cfg = FedConfig(clients=",".join(man["clients"]), **{k: man["config"][k] for k in CONFIG_KEYS if k in man["config"]})
    for k, v in (overrides or {}).items():
        if v is not None:
            if not hasattr(cfg, k):
                raise ValueError(f"unknown federation option {k!r}")
            setattr(cfg, k, v)
    cfg.init_path, cfg.dim, cfg.num_rms = str(man["init"]), int(man["dim"]), int(man["num_rms"])
    cfg.check()
    return cfg


# ----------------------------------------------------------------------------------------------
# The launcher: SuperLink + SuperNodes + `flwr run` as separate processes on 127.0.0.1
# ----------------------------------------------------------------------------------------------

SUPERLINK_NAME = "mor-local"  # the SuperLink connection `flwr run` uses (in the launch's own FLWR_HOME)


def _flower_bin(name: str) -> str:
    """A Flower executable of this interpreter's environment (the venv's bin/), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not found next to {sys.executable} nor on PATH "
                                "(pip install -r requirements-flower.txt)")
    return found


def _free_port(taken: set[int]) -> int:
    """An unused loopback TCP port (bound, read, released; another program could grab it in the
    few ms before Flower binds it: acceptable for a local launcher)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (Linux /proc), parents first. Flower's SuperLink and SuperNodes
    spawn SuperExec processes, which spawn one ServerApp/ClientApp process per task; some detach
    into their own session, so a process-group kill would miss them."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return [root]
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie (exited, not yet reaped by its parent) counts as gone:
    it holds no port and no file, and only its parent can make it disappear."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombie = gone
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _terminate(procs: list[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal each process and every descendant by pid, all at once, wait up to `grace` s for the
    lot, then SIGKILL what is left. Only processes this launcher started, and what they spawned."""
    # Collect the trees first: once a parent dies its children are re-parented and lost from view.
    pids = [pid for p in procs if p.poll() is None for pid in _process_tree(p.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap our direct children so they do not linger as zombies
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class LocalFederation:
    """A SuperLink and one SuperNode per client, each a separate OS process on 127.0.0.1.

    Insecure mode (plain HTTP, no SuperNode authentication) is fine here because every port is
    bound to the loopback interface; across sites use TLS (see the README section). Each SuperNode
    gets its own FLWR_HOME (its own app install dir), as a separate site would, and a node-config
    TOML naming its cache. Use as a context manager: every process it started, with all the
    processes those spawned, is terminated on exit, error or Ctrl-C."""

    def __init__(self, caches: dict[str, Path], workdir: Path, log_dir: Path, faults: dict[str, str] | None = None,
                 threads: int = 1, verbose: bool = True):
        self.caches, self.workdir, self.log_dir = caches, Path(workdir), Path(log_dir)
        self.faults, self.threads, self.verbose = faults or {}, threads, verbose
        unknown = set(self.faults) - set(caches)
        if unknown:
            raise ValueError(f"faults for unknown clients {sorted(unknown)}; clients are {sorted(caches)}")
        self.nodes: dict[str, subprocess.Popen] = {}
        self.superlink: subprocess.Popen | None = None
        self.run_proc: subprocess.Popen | None = None  # `flwr run --stream`, once submitted
        self._procs: list[subprocess.Popen] = []
        self._files = []
        self._ports: set[int] = set()
        self.port = None

    # -- processes --------------------------------------------------------------------------

    def _env(self, flwr_home: Path) -> dict:
        """The environment of a Flower process: inherited, plus a private Flower home, no network
        side channels and the thread cap, which every ServerApp/ClientApp process inherits."""
        env = dict(os.environ)
        env.update(FLWR_HOME=str(flwr_home),            # no ~/.flwr: a fresh Flower home per launch
                   FLWR_TELEMETRY_ENABLED="0",          # Flower phones home by default; offline here
                   FLWR_DISABLE_UPDATE_CHECK="1",
                   OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        # SuperExec finds flwr-serverapp / flwr-clientapp on PATH: this interpreter's bin/ first.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        flwr_home.mkdir(parents=True, exist_ok=True)
        return env

    def _spawn(self, label: str, cmd: list[str], env: dict, **kw) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if "stdout" not in kw:
            f = open(self.log_dir / f"{label}.log", "w", encoding="utf-8")
            self._files.append(f)
            kw.update(stdout=f, stderr=subprocess.STDOUT)
        # Own session: a Ctrl-C in the terminal reaches only the launcher, which then tears the
        # federation down in order (SuperNodes first, SuperLink last).
        p = subprocess.Popen(cmd, env=env, cwd=self.workdir, start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def start(self) -> "LocalFederation":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server_home = self.workdir / "server-flwr-home"
        env = self._env(self.server_home)
        self.port = _free_port(self._ports)
        # One HTTP port serves the Fleet API (SuperNodes), the Control API (`flwr run`) and the
        # runtime API (ServerApp). Runtime dependency installation (`uv sync`) off: the
        # environment already has what the app needs, and it must never reach the network.
        self.superlink = self._spawn("superlink", [
            _flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation"], env)
        self._wait_superlink(timeout=60.0)
        # `flwr run` reads its SuperLink connections from FLWR_HOME/config.toml
        (self.server_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SUPERLINK_NAME}"\n\n[superlink.{SUPERLINK_NAME}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        import tomli_w  # a dependency of flwr
        for name, cache in self.caches.items():
            site = self.workdir / "sites" / name
            site.mkdir(parents=True, exist_ok=True)
            node_cfg = {"routing-cache": str(Path(cache).resolve())}
            if name in self.faults:
                node_cfg["fault"] = self.faults[name]  # test-only fault injection (see FAULTS)
            (site / "node-config.toml").write_bytes(tomli_w.dumps(node_cfg).encode())
            self.nodes[name] = self._spawn(f"supernode-{name}", [
                _flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(_free_port(self._ports)),
                "--node-config", str(site / "node-config.toml")], self._env(site / "flwr-home"))
        return self

    def _wait_superlink(self, timeout: float) -> None:
        """Poll the SuperLink's /health until it answers: SuperNodes started before that would only
        spin in their retry loop, and `flwr run` would fail outright."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with status {self.superlink.returncode}; "
                                   f"see {self.log_dir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"flower-superlink not ready after {timeout:.0f}s; see {self.log_dir / 'superlink.log'}")

    def submit(self, app_dir: Path, run_config: Path, rounds: int = 0) -> subprocess.Popen:
        """`flwr run APP mor-local --run-config run.toml --stream`: builds the FAB from `app_dir`,
        starts the run on the SuperLink and streams the ServerApp's log until the run ends. The
        stream goes to logs/serverapp.log; LOG_PREFIX lines are echoed to the console, above a
        progress bar over the `rounds` rounds (a Flower round costs seconds, not milliseconds)."""
        proc = self._spawn("flwr-run", [_flower_bin("flwr"), "run", str(app_dir), SUPERLINK_NAME,
                                        "--run-config", str(run_config), "--stream"],
                           self._env(self.server_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, bufsize=1)
        log = open(self.log_dir / "serverapp.log", "w", encoding="utf-8")
        self._files.append(log)
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        bar = tqdm(total=rounds, desc="flower rounds", dynamic_ncols=True, disable=None if self.verbose else True)

        def pump():  # a thread, so the main thread stays free for the deadline and Ctrl-C
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if self.verbose and LOG_PREFIX in line:
                    text = ansi.sub("", line[line.index(LOG_PREFIX):]).rstrip()
                    tqdm.write(text)
                    if re.match(rf"{re.escape(LOG_PREFIX)} round +\d+:", text):
                        bar.update(1)
            bar.close()

        threading.Thread(target=pump, daemon=True).start()
        self.run_proc = proc
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float | None = None) -> int:
        """Block until `flwr run --stream` returns (the run finished or failed), or raise
        TimeoutError after `timeout` s; the caller's `with` block then tears everything down."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the Flower run did not finish within {timeout:.0f}s; logs in {self.log_dir}")
            for name, node in self.nodes.items():  # a SuperNode that dies is logged, not fatal (drop-outs)
                if node.poll() is not None and not getattr(node, "_reported", False):
                    node._reported = True
                    if self.verbose:
                        tqdm.write(f"{LOG_PREFIX} SuperNode {name} exited (status {node.returncode})")
            time.sleep(0.1)
        return proc.returncode

    def kill_node(self, name: str) -> None:
        """SIGKILL a client's SuperNode and everything it spawned: a site that crashes mid-run."""
        _terminate([self.nodes[name]], signal.SIGKILL, grace=2.0)

    def close(self) -> None:
        # `flwr run` and the SuperNodes together (each SuperNode deregisters from the SuperLink on
        # SIGTERM), then the SuperLink with its SuperExec and ServerApp processes
        _terminate([p for p in self._procs if p is not self.superlink], signal.SIGTERM, grace=5.0)
        _terminate([p for p in self._procs if p is self.superlink], signal.SIGTERM, grace=5.0)
        for f in self._files:
            f.close()
        self._procs.clear()
        self._files.clear()

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def write_app(app_dir: Path) -> Path:
    """A Flower App directory: the modules a site runs plus a pyproject.toml naming the ServerApp
    and ClientApp and declaring every run-config key (FedConfig's defaults; each launch passes its
    own values with --run-config). Generated at run time in a temp dir, never in the repo."""
    import tomli_w
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    for m in APP_MODULES:
        shutil.copy2(REPO / m, app_dir / m)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "mor-router", "version": "1.0.0",
                    "description": "MoR: the router's FedAvg (DESIGN E4) over Flower",
                    # documentation only: runtime dependency installation is disabled
                    "dependencies": [f"flwr=={flwr.__version__}", "torch", "safetensors", "numpy", "pillow", "tqdm"]},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "mor",
                                  "components": {"serverapp": "flower_fed:server_app",
                                                 "clientapp": "flower_fed:client_app"},
                                  "config": FedConfig().to_run_config()}}},
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(pyproject).encode())
    return app_dir


def launch(manifest: str | Path, out_dir: str | Path | None = None, overrides: dict | None = None,
           faults: dict[str, str] | None = None, timeout: float | None = None, verbose: bool = True,
           keep_workdir: bool = False, during=None) -> dict:
    """Train the router of `manifest` over a local Flower federation and return the run summary.

    Writes into out_dir (default: the manifest's folder): router-flower.safetensors (final phi),
    router-flower.json (per-round log, handshake, evaluate, timings), router-flower.progress.jsonl
    and logs/ (one log per process). `overrides`: FedConfig fields (rounds, min_clients,
    round_timeout, ...). `faults`: {client: spec}, test-only (see FAULTS). `during(fed, cfg)` is
    called once the run is submitted (tests use it to kill a SuperNode mid-run)."""
    man = load_manifest(manifest)
    out_dir = Path(out_dir or Path(manifest).parent).resolve()
    cfg = _config_from_manifest(man, overrides)
    cfg.out_path = str(out_dir / "router-flower.safetensors")
    cfg.summary_path = str(out_dir / "router-flower.json")
    cfg.progress_path = str(out_dir / "router-flower.progress.jsonl")
    cfg.token = uuid.uuid4().hex
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(cfg.progress_path).unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mor-flower-"))
    t0 = time.perf_counter()
    try:
        import tomli_w
        app_dir = write_app(workdir / "app")
        run_toml = workdir / "run.toml"
        run_toml.write_bytes(tomli_w.dumps(cfg.to_run_config()).encode())
        with LocalFederation(man["caches"], workdir, out_dir / "logs", faults, cfg.threads, verbose) as fed:
            if verbose:
                tqdm.write(f"{LOG_PREFIX} SuperLink on 127.0.0.1:{fed.port}, {len(fed.nodes)} SuperNodes; "
                           f"logs in {out_dir / 'logs'}")
            proc = fed.submit(app_dir, run_toml, cfg.rounds)
            t_submit = time.perf_counter()
            if during is not None:
                during(fed, cfg)
            fed.wait(proc, timeout)
            t_done = time.perf_counter()
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    path = Path(cfg.summary_path)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("token") != cfg.token:
        raise RuntimeError(f"the ServerApp wrote no summary for this run ({path}); see {out_dir / 'logs'}/serverapp.log")
    if summary.get("status") != "ok":
        raise RuntimeError(f"the Flower run failed: {summary.get('error')}; see {out_dir / 'logs'}")
    # launch_wall: start of the SuperLink to teardown done; processes_up: until `flwr run` was
    # submitted; teardown: from the end of the run until every process is gone
    summary["seconds"].update(launch_wall=round(wall, 2), processes_up=round(t_submit - t0, 2),
                              teardown=round(time.perf_counter() - t_done, 2))
    safe_io.atomic_write_json(path, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# In-process reference: federated.run_rounds on the same caches, for the comparison
# ----------------------------------------------------------------------------------------------


def run_in_process(manifest: str | Path, overrides: dict | None = None) -> tuple[dict, list[dict], float, dict]:
    """federated.run_rounds from the manifest's initial router on its caches, as mor.stage_router
    runs it -> (final state, per-round log, rounds wall seconds, held-out accuracy per client)."""
    man = load_manifest(manifest)
    cfg = _config_from_manifest(man, overrides)
    clients = [CachedClient(man["caches"][c]) for c in man["clients"]]
    dim, K = clients[0].dim, clients[0].num_rms

    def make():
        return routing.Router(dim, K, cfg.hidden, cfg.route_on)

    model = make()
    model.load_state_dict(routing.load_state(man["init"], model))
    t = time.perf_counter()
    log = federated.run_rounds(model, make, clients, cfg.rounds, cfg.local_epochs, cfg.lr, cfg.batch_size,
                               cfg.fraction, cfg.seed, timeout_s=cfg.round_timeout, desc="in-process rounds")
    seconds = time.perf_counter() - t
    acc = {c.name: c.mixed_accuracy(model) for c in clients if c.heldout_pairs}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, log, seconds, acc


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over keys and entries of |a - b| (keys must agree)."""
    if set(a) != set(b):
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------
# prepare: mor.stage_router's client precompute, written as one cache per client
# ----------------------------------------------------------------------------------------------


def prepare(run_dir: str | Path, setting: str = "heterogeneous", mor_argv: list[str] | None = None) -> Path:
    """For each client of `run_dir`'s federation: `prepare_routing(ref, Encoder, rms, router_pairs)`
    exactly as mor.stage_router calls it, then its cache; the server's initial router exactly as
    stage_router builds it (set_seed, make_router, feature stats pooled from the clients'
    moments). Writes run_dir/flower/<setting>/{clients/<name>.safetensors, router-init.safetensors,
    manifest.json}; nothing else of run_dir is touched. `mor_argv`: extra mor.py flags (sizes)."""
    import models
    import mor
    import reward
    a = mor.parse_args(["--run-dir", str(run_dir), "--setting", setting, *(mor_argv or [])])
    torch.set_num_threads(a.threads or 1)
    run = mor.Run(a)
    for need in [run.dir / "base", *(run.rm_dir(k) for k in mor.SETTINGS[setting])]:
        if not need.exists():
            raise FileNotFoundError(f"{need}: missing; run `python mor.py --run-dir {run_dir} --setting {setting} "
                                    "--stages sft,reward` first")
    out = run.dir / "flower" / setting
    t = time.perf_counter()
    clients = run.clients()
    names = list(clients)
    # What every client downloads: the public reference (features, E2) and the K RM uploads (E3).
    ref, proc = models.load_vlm(run.dir / "base", device=run.device)
    rms = [reward.RewardModel.load(run.rm_dir(k), device=run.device) for k in names]
    for c in tqdm(clients.values(), desc="prepare: clients precompute features and RM scores", disable=None):
        c.prepare_routing(ref, models.Encoder(proc), rms, a.router_pairs)
        write_routing_cache(c, out / "clients" / f"{c.name}.safetensors")  # on the client's disk
    del ref, rms
    # The server's initial router, as stage_router makes it: seeded init, then input standardisation
    # from the pooled feature moments (count, sum [D], sum of squares [D]) of the clients.
    mor.set_seed(a.seed)
    model = mor.make_router(run)()
    model.set_feature_stats(*routing.pooled_stats([c.feature_moments() for c in clients.values()]))
    seconds = time.perf_counter() - t
    path = write_manifest(out, {k: out / "clients" / f"{k}.safetensors" for k in names}, model.state_dict(),
                          rounds=a.rounds, local_epochs=a.local_epochs, lr=a.router_lr, batch_size=a.router_batch,
                          fraction=a.client_fraction, seed=a.seed, hidden=a.router_hidden, route_on=a.route_on,
                          setting=setting, run_dir=str(run_dir), prepare_seconds=round(seconds, 1))
    print(f"prepare: {len(names)} client caches, initial router and manifest in {out} ({seconds:.1f}s)")
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def compare(manifest: Path, summary: dict, overrides: dict | None, out_dir: Path) -> dict:
    """In-process run_rounds on the same caches and seed -> wall times, max |weight difference|,
    per-round losses at 4 decimals, held-out accuracy; written to out_dir/compare.json."""
    c = summary["config"]
    flower_state = routing.load_state(c["out-path"], routing.Router(c["dim"], c["num-rms"], c["hidden"], c["route-on"]))
    state, log, seconds, acc = run_in_process(manifest, overrides)
    safe_io.atomic_save_file(out_dir / "router-inprocess.safetensors", state, {"format": "mor-router"})
    f_losses = [f"{e['loss']:.4f}" for e in summary["rounds"]]
    i_losses = [f"{e['loss']:.4f}" for e in log]
    res = {"max_abs_weight_diff": max_abs_diff(flower_state, state),
           "losses_equal_4dp": f_losses == i_losses, "clients_equal": [e["clients"] for e in summary["rounds"]]
           == [e["clients"] for e in log], "rounds": len(log),
           "seconds": {"inprocess_rounds": round(seconds, 3), "flower_rounds": summary["seconds"]["rounds"],
                       "flower_launch_wall": summary["seconds"].get("launch_wall")},
           "heldout_accuracy": {"inprocess": acc, "flower": {k: v.get("heldout_accuracy")
                                                             for k, v in summary.get("evaluate", {}).items()}},
           "final_loss": {"inprocess": log[-1]["loss"] if log else None,
                          "flower": summary["rounds"][-1]["loss"] if summary["rounds"] else None}}
    man = load_manifest(manifest)
    if man.get("run_dir") and man.get("setting"):  # the pipeline's own router (mor.py --stages router)
        pipe = Path(man["run_dir"]) / f"router-{man['setting']}.safetensors"
        if pipe.is_file():
            res["max_abs_weight_diff_vs_pipeline_router"] = max_abs_diff(flower_state, load_file(str(pipe)))
            res["pipeline_router"] = str(pipe)
    safe_io.atomic_write_json(out_dir / "compare.json", res)
    return res


def _manifest_path(a) -> Path:
    if a.manifest:
        return Path(a.manifest)
    return Path(a.run_dir) / "flower" / a.setting / "manifest.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write each client's routing cache + the initial router + manifest.json",
                        description="Runs mor.py's router-stage precompute (reference features and RM scores "
                                    "of each client's pairs) and writes RUN_DIR/flower/SETTING/. Any other "
                                    "mor.py flag (e.g. --router-pairs, --quick, --threads) is passed through.")
    pp.add_argument("--run-dir", default="runs/default", help="a run directory with base/ and the client RMs")
    pp.add_argument("--setting", default="heterogeneous", help="mor.py --setting (default %(default)s)")
    pl = sub.add_parser("launch", help="train the router over a local Flower federation (separate processes)",
                        description="Starts a SuperLink and one SuperNode per client on 127.0.0.1 (insecure "
                                    "HTTP on loopback only), runs the ServerApp with `flwr run`, waits, writes "
                                    "router-flower.safetensors/.json next to the manifest and tears every "
                                    "process down (also on error and Ctrl-C). Needs `prepare` first.")
    pl.add_argument("--run-dir", default="runs/default", help="use RUN_DIR/flower/SETTING/manifest.json")
    pl.add_argument("--setting", default="heterogeneous")
    pl.add_argument("--manifest", default=None, help="an explicit manifest.json (overrides --run-dir/--setting)")
    pl.add_argument("--out-dir", default=None, help="where outputs go (default: the manifest's folder)")
    pl.add_argument("--compare", action="store_true",
                    help="afterwards run federated.run_rounds in-process on the same caches and seed and report "
                         "wall times and max |weight difference| (compare.json)")
    for flag, kind, hlp in (("--rounds", int, "override the manifest's rounds"),
                            ("--local-epochs", int, "override local epochs E"), ("--lr", float, "override lr"),
                            ("--batch-size", int, "override the router batch"),
                            ("--fraction", float, "share of clients sampled per round (1.0 = all)"),
                            ("--seed", int, "override the seed"),
                            ("--min-clients", int, "a round needs this many valid replies (default 1)"),
                            ("--round-timeout", float, "seconds to wait for a round's replies (default 600)"),
                            ("--threads", int, "torch threads per Flower process (default 1)")):
        pl.add_argument(flag, type=kind, default=None, help=hlp)
    pl.add_argument("--no-evaluate", action="store_true", help="skip the final held-out evaluation round")
    pl.add_argument("--fault", action="append", default=[], metavar="CLIENT=KIND@ROUND",
                    help=f"TEST ONLY: inject a fault into a client ({', '.join(FAULTS)})")
    pl.add_argument("--timeout", type=float, default=None, help="give up (and tear down) after this many seconds")
    pl.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (app, FLWR_HOMEs) for debugging")
    a, rest = p.parse_known_args(argv)
    if a.cmd == "launch" and rest:
        p.error(f"launch: unrecognised arguments {rest}")
    # SIGTERM -> SystemExit, so the `with LocalFederation` teardown runs as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if a.cmd == "prepare":
        prepare(a.run_dir, a.setting, rest)
        return 0
    torch.set_num_threads(a.threads or 1)
    manifest = _manifest_path(a)
    overrides = {k: getattr(a, k) for k in ("rounds", "local_epochs", "lr", "batch_size", "fraction", "seed",
                                            "min_clients", "round_timeout", "threads")}
    overrides["evaluate"] = not a.no_evaluate
    faults = dict(f.split("=", 1) for f in a.fault)
    summary = launch(manifest, a.out_dir, overrides, faults, a.timeout, keep_workdir=a.keep_workdir)
    out_dir = Path(summary["config"]["out-path"]).parent
    s = summary["seconds"]
    print(f"flower: {len(summary['rounds'])} rounds in {s['rounds']:.1f}s (launch wall {s['launch_wall']:.1f}s, "
          f"handshake {s['handshake']:.1f}s); final routing loss "
          f"{summary['rounds'][-1]['loss']:.4f}" if summary["rounds"] else "flower: 0 rounds")
    print(f"router: {summary['config']['out-path']}; log: {summary['config']['summary-path']}")
    if a.compare:
        res = compare(manifest, summary, overrides, out_dir)
        print(f"in-process run_rounds: {res['seconds']['inprocess_rounds']:.2f}s for {res['rounds']} rounds; "
              f"max |weight difference| Flower vs in-process {res['max_abs_weight_diff']:.3g}; per-round losses "
              f"equal at 4 decimals: {res['losses_equal_4dp']}; same clients per round: {res['clients_equal']}")
        if "max_abs_weight_diff_vs_pipeline_router" in res:
            print(f"vs the pipeline's {res['pipeline_router']}: max |weight difference| "
                  f"{res['max_abs_weight_diff_vs_pipeline_router']:.3g}")
        print(f"comparison: {out_dir / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
