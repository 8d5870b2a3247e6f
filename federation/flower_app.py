"""The router's FedAvg (E4) as Flower apps: the ClientApp a site runs and the ServerApp's round loop.

`federated.run_rounds` runs the rounds with every client a Python object in one process; these
apps run the identical rounds in a Flower deployment, where each client is a SuperNode (a
separate process, on its own machine in a real federation) that holds only its own client's
data. Round r:

  server  sampled = Random(f"rounds-{seed}").sample(clients, max(1, round(fraction * K)))    as run_rounds
          -> every sampled client: phi (the router's state dict) and (E, lr, batch, seed * 1000 + r)
  client  phi_k, n_k, loss_k = federated.Client.router_update(phi, ...)     E epochs of AdamW on L_route
          <- phi_k (arrays), n_k and loss_k (two scalars)
  server  phi <- federated.fedavg([phi_k], [n_k])  over the clients that answered, in sampled order
          routing loss of the round = sum_k n_k * loss_k / sum_k n_k

The client step is `federated.Client.router_update` itself (CachedClient only changes where the
precomputed routing tensors come from: a safetensors cache on the site's own disk) and the
aggregation is `federated.fedavg` itself, in the same client order, so with the same seed the
router is bit-identical to the in-process one.

What crosses the wire (parameters of phi and counts; never a feature, a reward or a pair)
  server -> client  ArrayRecord "router" (phi: D*hidden + hidden + hidden*K + K floats plus the two
                    [D] input statistics) and ConfigRecord "config" (round, seed, E, lr, batch, shape)
  client -> server  ArrayRecord "router" (phi_k) and MetricRecord "metrics" (n_k, mean local loss);
                    at the handshake the client's name and counts, at the end its held-out accuracy
Flower serialises records as numpy buffers and scalars: no pickle, no code, no data.

Drop-outs. Every reply is validated before it can touch phi; a bad one costs its client the
round, never the round. A client that does not answer is waited for until `round_timeout`; the
wait ends earlier only once the SuperLink lists its SuperNode as gone: at once for a SuperNode
that shut down (it deregisters), but for one that crashed (SIGKILL, power loss) only when it has
missed its heartbeats: Flower 1.41 sends one every 17.5-22.5 s and declares a node offline 60 s
after the last one, so 37.5-60 s after the crash (measured: 46, 55, 57 s; docs/flower.md).

This module travels to the sites inside the Flower App Bundle and imports only what a site has
(requirements.txt + requirements-flower.txt). The commands, the manifest and the local launcher
are federation/flower_fed.py and federation/flower_local.py.
"""

from __future__ import annotations

# Flower is optional (requirements-flower.txt): fail in one line that says how to get it, before
# paying for the torch import.
try:
    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("the Flower framework (flwr) is not installed; "
                      "install it with: pip install -r requirements-flower.txt") from _e

import json
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import federated
import router as routing
import safe_io

CACHE_FORMAT = "mor-routing-cache/1"
ROUTING_KEYS = ("e_w", "e_l", "r_w", "r_l")  # Client._routing[part] order: features [N, D], rewards [N, K]
LOG_PREFIX = "[mor-flower]"  # ServerApp lines the launcher shows on the console (the rest goes to logs/)

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
            raise FileNotFoundError(f"routing cache {path}: no such file (write it with `python -m federation.flower_fed prepare`)")
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
    aggregate: str = "fedavg"    # federated.aggregate's rule (mor.py --aggregate); crossval: in-process only
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
        if self.aggregate not in federated.RULES or self.aggregate == "crossval":
            # crossval needs one more exchange (every client judges the round's uploads) that the
            # Flower apps do not implement yet: the in-process rounds (mor.py) have it
            raise ValueError(f"run config 'aggregate': {self.aggregate!r} is not available over Flower; "
                             f"one of {[r for r in federated.RULES if r != 'crossval']}")
        names = self.client_names()
        if len(set(names)) != len(names):
            raise ValueError(f"run config 'clients': duplicate names in {names}")


# ----------------------------------------------------------------------------------------------
# ClientApp: runs on a SuperNode, owns one client's cache; every message is a fresh process
# ----------------------------------------------------------------------------------------------


def _site_client(context: Context) -> CachedClient:
    """This SuperNode's client: the cache named by its node-config (its private data stays here)."""
    torch.set_num_threads(int(context.run_config.get("threads", 1)))
    path = context.node_config.get("routing-cache")
    if not path:
        raise ValueError("this SuperNode's node-config has no 'routing-cache'; start it with --node-config "
                         "FILE.toml holding  routing-cache = \"/path/to/<client>.safetensors\"")
    return CachedClient(path)


def _router_factory(client: CachedClient, config: ConfigRecord):
    """make_router as pipeline.make_router builds it: Router(D, K, width, context); D and K from the cache."""
    hidden, route_on = int(config["hidden"]), str(config["route-on"])
    return lambda: routing.Router(client.dim, client.num_rms, hidden, route_on)


def _received_state(msg: Message) -> dict[str, torch.Tensor]:
    """The server's phi from a message: {name: tensor} with the Router's keys, e.g. net.0.weight
    [hidden, D], feat_mean / feat_std [D]. torch.from_numpy over Flower's read-only buffers would
    alias them (and warn): clone into ordinary tensors."""
    return {k: v.clone() for k, v in msg.content["router"].to_torch_state_dict().items()}


# The three handlers are plain functions (Flower's decorators register and return them), so another
# ClientApp can reuse them, e.g. one that wraps `client_train` (the tests' fault injection).
def client_handshake(msg: Message, context: Context) -> Message:
    """Who am I: the client's name and counts (n_k, D, K, held-out pairs). No data."""
    c = _site_client(context)
    return Message(RecordDict({
        "client": ConfigRecord({"name": c.name}),
        "metrics": MetricRecord({"num-examples": c.n, "dim": c.dim, "num-rms": c.num_rms,
                                 "heldout-pairs": c.heldout_pairs})}), reply_to=msg)


def client_train(msg: Message, context: Context) -> Message:
    """E4 local step: federated.Client.router_update on this site's tensors, from the server's phi."""
    c = _site_client(context)
    cfg = msg.content["config"]
    # Same call, same arguments, same seed schedule (seed * 1000 + r) as run_rounds makes in-process.
    state, n_k, loss = c.router_update(_received_state(msg), _router_factory(c, cfg), int(cfg["epochs"]),
                                       float(cfg["lr"]), int(cfg["batch-size"]), int(cfg["seed"]))
    print(f"{LOG_PREFIX} client {c.name}: round {int(cfg['round'])}, local loss {loss:.4f} on n_k={n_k}", flush=True)
    # The upload: phi_k's arrays, n_k and the mean local loss. Nothing else leaves the site.
    return Message(RecordDict({"router": ArrayRecord(torch_state_dict=state),
                               "metrics": MetricRecord({"num-examples": int(n_k), "loss": float(loss)})}),
                   reply_to=msg)


def client_evaluate(msg: Message, context: Context) -> Message:
    """Held-out pair accuracy of the mixed reward under the received router (E3): one number."""
    c = _site_client(context)
    if not c.heldout_pairs:
        return Message(RecordDict({"metrics": MetricRecord({"heldout-pairs": 0})}), reply_to=msg)
    model = _router_factory(c, msg.content["config"])()
    model.load_state_dict(_received_state(msg))
    return Message(RecordDict({"metrics": MetricRecord({"heldout-pairs": c.heldout_pairs,
                                                        "heldout-accuracy": float(c.mixed_accuracy(model))})}),
                   reply_to=msg)


client_app = ClientApp()
client_app.query()(client_handshake)
client_app.train()(client_train)
client_app.evaluate()(client_evaluate)

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
                    min_clients: int = 1, rule: str = "fedavg") -> tuple[dict[str, torch.Tensor], dict]:
    """E4 on the valid uploads {name: (phi_k, n_k, loss_k)} of a round: federated.aggregate(rule)
    in the sampled order (run_rounds' order, so float64 accumulation rounds identically) and the n_k-
    weighted routing loss, computed with run_rounds' own expression. Fewer than `min_clients`
    valid replies -> RuntimeError naming who answered and why the others dropped."""
    order = [c for c in sampled if c in uploads]
    if len(order) < min_clients:
        raise RuntimeError(f"round {rnd}: {len(order)} valid repl{'y' if len(order) == 1 else 'ies'} "
                           f"({order}), fewer than min-clients={min_clients}; dropped: {dropped}")
    ups = [uploads[c] for c in order]
    state = federated.aggregate(rule, [u[0] for u in ups], [u[1] for u in ups])
    n = sum(u[1] for u in ups)
    loss = sum(u[1] * u[2] for u in ups) / n  # n_k-weighted mean of the local losses
    return state, {"round": rnd, "clients": order, "dropped": {c: dropped[c] for c in sampled if c in dropped},
                   "loss": loss}


OFFLINE = "SuperNode offline (it left the SuperLink, or missed its heartbeats for 60 s)"


def _exchange(grid: Grid, cfg: FedConfig, targets: list[tuple[str, int | None]], content, message_type: str,
              group: str, timeout: float) -> tuple[dict[str, Message], dict[str, str]]:
    """Send content(label) to each (label, node id) and collect replies until all answered or
    `timeout` s passed. Returns ({label: reply}, {label: why it dropped}).

    A node that is not in grid.get_node_ids() (checked every second) will never answer, so its
    wait ends there. That list loses a SuperNode at once when it shuts down (it deregisters), but
    one that crashed only after 37.5-60 s of missed heartbeats (module docstring); the SuperLink
    then also answers its message with a NODE_UNAVAILABLE error reply. Before that, only `timeout`
    ends the wait, and a crashed node still listed is sent the next round's message too.
    Grid.send_and_receive is not used: it sleeps 3 s between pulls and cannot tell a departed
    SuperNode from a slow one."""
    online, dropped, msgs, labels = set(grid.get_node_ids()), {}, [], []
    for label, node in targets:
        if node is None:
            dropped[label] = "not connected (no SuperNode answered the handshake for it)"
        elif node not in online:
            dropped[label] = OFFLINE
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
            if label is None:
                continue
            if rep.has_error() and rep.error.code == ErrorCode.NODE_UNAVAILABLE:
                dropped[label] = OFFLINE + " during the round"
            else:
                replies[label] = rep
        if pending and time.monotonic() >= next_check:
            online, next_check = set(grid.get_node_ids()), time.monotonic() + 1.0
            for mid, label in list(pending.items()):
                if node_of[label] not in online:
                    dropped[label] = OFFLINE + " during the round"
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
            state = safe_io.load_router_state(cfg.init_path, routing.Router(cfg.dim, cfg.num_rms, cfg.hidden, cfg.route_on))
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
                state, entry = aggregate_round(r, sampled, uploads, dropped, cfg.min_clients, cfg.aggregate)
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
    mixed reward (E3), the figure stages.stage_router prints per domain. -> ({client: {...}}, dropped)."""
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
