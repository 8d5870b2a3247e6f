"""Run the router's FedAvg (E4) as a real Flower deployment on this machine, and check it.

Three modules, imported one way (flower_fed -> flower_local -> flower_app):
  federation/flower_app.py    the Flower apps: the ClientApp each site runs, the ServerApp's round loop
  federation/flower_local.py  the processes: a SuperLink + one SuperNode per client on 127.0.0.1
  federation/flower_fed.py    the commands:
    prepare  stages.routing_setup (the router stage's client precompute and initial router), each
             client's routing tensors written to a cache on "its" disk, plus manifest.json
    launch   writes the Flower App, starts the local federation, `flwr run`s the ServerApp, waits
    compare  federated.run_rounds in-process on the same caches and seed: bit-identical
A crashed SuperNode is declared offline by the SuperLink only 37.5-60 s after the crash (missed
heartbeats; measured 46-57 s, docs/flower.md); until then a round waits for it up to --round-timeout.

  python -m federation.flower_fed prepare --run-dir runs/default            # caches, initial router, manifest
  python -m federation.flower_fed launch  --run-dir runs/default --compare  # train over Flower, then in-process
"""

from __future__ import annotations

import sys

try:  # Flower is optional: without it, one line that says how to get it (flower_app's message)
    from federation.flower_app import LOG_PREFIX, CachedClient, FedConfig, write_routing_cache
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    if __name__ == "__main__":
        sys.exit(f"flower_fed: {_e}")  # the line on stderr, exit status 1
    raise

import argparse
import ast
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import flwr
import tomli_w  # a dependency of flwr
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import federated
import router as routing
import safe_io
from federation.flower_local import LocalFederation

REPO = Path(__file__).resolve().parent.parent
MANIFEST_FORMAT = "mor-flower-manifest/1"


# ----------------------------------------------------------------------------------------------
# Manifest: a federation on disk (client order, cache per client, initial router, hyperparameters)
# ----------------------------------------------------------------------------------------------

CONFIG_KEYS = ("rounds", "local_epochs", "lr", "batch_size", "fraction", "seed", "hidden", "route_on", "aggregate")


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
        raise FileNotFoundError(f"{path}: no manifest (write it with `python -m federation.flower_fed prepare`)")
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
# The Flower App and a launch on the local federation
# ----------------------------------------------------------------------------------------------


def app_modules(*roots: str | Path) -> list[Path]:
    """federation/flower_app.py, the `roots`, and every module of this repo they import, directly
    or not (an import naming REPO/<a>/<b>.py or REPO/<a>.py). They travel inside the Flower App
    Bundle, so a SuperNode needs only the packages of requirements.txt + requirements-flower.txt,
    not this repo; found, not listed, so a module that starts importing a new one cannot break the app."""
    todo, found = [REPO / "federation" / "flower_app.py", *map(Path, roots)], {}
    while todo:
        path = todo.pop().resolve()
        if path in found:
            continue
        found[path] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import mod` names pkg/mod.py; `from mod import x` names mod.py
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            here = [REPO / (n.replace(".", "/") + ".py") for n in names]
            todo += [f for f in here if f.is_file()]
    return sorted(found.values())


def _app_path(module: Path) -> Path:
    """Where a shipped module lies inside the app: its place in the repo (federation/flower_app.py
    stays importable as federation.flower_app), or flat for a module from elsewhere."""
    try:
        rel = module.relative_to(REPO)
    except ValueError:
        return Path(module.name)
    return Path(module.name) if rel.parts[0] == "tests" else rel


def write_app(app_dir: Path, client_app: str = "federation.flower_app:client_app", extra_modules=()) -> Path:
    """A Flower App directory: the modules a site runs plus a pyproject.toml naming the ServerApp
    and ClientApp and declaring every run-config key (FedConfig's defaults; each launch passes its
    own values with --run-config). Generated at run time in a temp dir, never in the repo.
    `client_app` ("module:attribute") is the ClientApp the SuperNodes load; `extra_modules` (file
    paths) are shipped too, with what they import (app_modules), e.g. the module of another ClientApp."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    for m in app_modules(*extra_modules):
        (app_dir / _app_path(m)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(m, app_dir / _app_path(m))
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "mor-router", "version": "1.0.0",
                    "description": "MoR: the router's FedAvg (E4) over Flower",
                    # documentation only: runtime dependency installation is disabled
                    "dependencies": [f"flwr=={flwr.__version__}", "torch", "safetensors", "numpy", "pillow", "tqdm"]},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "mor",
                                  "components": {"serverapp": "federation.flower_app:server_app",
                                                 "clientapp": client_app},
                                  "config": FedConfig().to_run_config()}}},
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(pyproject).encode())
    return app_dir


def launch(manifest: str | Path, out_dir: str | Path | None = None, overrides: dict | None = None,
           timeout: float | None = None, verbose: bool = True, keep_workdir: bool = False, during=None,
           client_app: str = "federation.flower_app:client_app", extra_modules=(), node_config: dict | None = None) -> dict:
    """Train the router of `manifest` over a local Flower federation and return the run summary.

    Writes into out_dir (default: the manifest's folder): router-flower.safetensors (final phi),
    router-flower.json (per-round log, handshake, evaluate, timings), router-flower.progress.jsonl
    and logs/ (one log per process). `overrides`: FedConfig fields (rounds, min_clients,
    round_timeout, ...). `during(fed, cfg)` is called once the run is submitted (tests kill a
    SuperNode from it). `client_app`, `extra_modules` (see write_app) and `node_config` ({client:
    {key: value}} added to that site's node config) let a caller run another ClientApp, e.g. the
    tests' one that wraps flower_app's handlers to inject faults."""
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
        app_dir = write_app(workdir / "app", client_app, extra_modules)
        run_toml = workdir / "run.toml"
        run_toml.write_bytes(tomli_w.dumps(cfg.to_run_config()).encode())
        with LocalFederation(man["caches"], workdir, out_dir / "logs", node_config, cfg.threads, verbose) as fed:
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


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over keys and entries of |a - b| (keys must agree)."""
    if set(a) != set(b):
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------
# prepare: the router stage's start (stages.routing_setup), written as one cache per client
# ----------------------------------------------------------------------------------------------


def prepare(run_dir: str | Path, setting: str = "heterogeneous", mor_argv: list[str] | None = None) -> Path:
    """The router stage's start, stages.routing_setup itself (each client's precompute of its
    pairs' features and RM scores; the server's seeded initial router with the pooled feature
    statistics), with each client's routing tensors written to its cache as soon as it has them.
    Writes run_dir/flower/<setting>/{clients/<name>.safetensors, router-init.safetensors,
    manifest.json}; nothing else of run_dir is touched. `mor_argv`: extra mor.py flags (sizes)."""
    import mor
    from harness import pipeline, stages
    a = mor.parse_args(["--run-dir", str(run_dir), "--setting", setting, *(mor_argv or [])])
    torch.set_num_threads(a.threads or 1)
    run = pipeline.Run(a)
    for need in [run.dir / "base", *(run.rm_dir(k) for k in pipeline.SETTINGS[setting])]:
        if not need.exists():
            raise FileNotFoundError(f"{need}: missing; run `python mor.py --run-dir {run_dir} --setting {setting} "
                                    "--stages sft,reward` first")
    out = run.dir / "flower" / setting

    def path_for(c: federated.Client) -> Path:
        return out / "clients" / f"{c.name}.safetensors"  # "the client's own disk"

    t = time.perf_counter()
    clients, model, _ = stages.routing_setup(run, on_client=lambda c: write_routing_cache(c, path_for(c)))
    seconds = time.perf_counter() - t  # models loaded, clients' precompute, initial router
    path = write_manifest(out, {k: path_for(c) for k, c in clients.items()}, model.state_dict(),
                          rounds=a.rounds, local_epochs=a.local_epochs, lr=a.router_lr, batch_size=a.router_batch,
                          fraction=a.client_fraction, seed=a.seed, hidden=a.router_hidden, route_on=a.route_on,
                          aggregate=a.aggregate, setting=setting, run_dir=str(run_dir), prepare_seconds=round(seconds, 1))
    print(f"prepare: {len(clients)} client caches, initial router and manifest in {out} ({seconds:.1f}s)")
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def compare(manifest: Path, summary: dict, overrides: dict | None, out_dir: Path) -> dict:
    """federated.run_rounds from the manifest's initial router on the same caches and seed, as
    stages.stage_router runs it -> wall times, max |weight difference| to the Flower router,
    per-round losses at 4 decimals, held-out accuracy; written to out_dir/compare.json."""
    man = load_manifest(manifest)
    cfg = _config_from_manifest(man, overrides)
    clients = [CachedClient(man["caches"][c]) for c in man["clients"]]

    def make():
        return routing.Router(cfg.dim, cfg.num_rms, cfg.hidden, cfg.route_on)

    model = make()
    model.load_state_dict(safe_io.load_router_state(man["init"], model))
    t = time.perf_counter()
    log = federated.run_rounds(model, make, clients, cfg.rounds, cfg.local_epochs, cfg.lr, cfg.batch_size,
                               cfg.fraction, cfg.seed, timeout_s=cfg.round_timeout, desc="in-process rounds",
                               aggregate=cfg.aggregate)
    seconds = time.perf_counter() - t
    acc = {c.name: c.mixed_accuracy(model) for c in clients if c.heldout_pairs}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flower_state = safe_io.load_router_state(summary["config"]["out-path"], make())
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
    if man.get("run_dir") and man.get("setting"):  # the pipeline's own router (mor.py --stages router)
        pipe = Path(man["run_dir"]) / f"router-{man['setting']}.safetensors"
        if pipe.is_file():
            res["max_abs_weight_diff_vs_pipeline_router"] = max_abs_diff(flower_state, load_file(str(pipe)))
            res["pipeline_router"] = str(pipe)
    safe_io.atomic_write_json(out_dir / "compare.json", res)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write each client's routing cache + the initial router + manifest.json",
                        description="Runs the router stage's precompute (stages.routing_setup: reference features "
                                    "and RM scores of each client's pairs, the initial router) and writes "
                                    "RUN_DIR/flower/SETTING/. Any other "
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
                            ("--round-timeout", float, "seconds to wait for a round's replies (default 600); a crashed "
                             "SuperNode ends the wait sooner, when the SuperLink declares it offline "
                             "(37.5-60 s after the crash)"),
                            ("--threads", int, "torch threads per Flower process (default 1)")):
        pl.add_argument(flag, type=kind, default=None, help=hlp)
    pl.add_argument("--no-evaluate", action="store_true", help="skip the final held-out evaluation round")
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
    manifest = Path(a.manifest or Path(a.run_dir) / "flower" / a.setting / "manifest.json")
    overrides = {k: getattr(a, k) for k in ("rounds", "local_epochs", "lr", "batch_size", "fraction", "seed",
                                            "min_clients", "round_timeout", "threads")}
    overrides["evaluate"] = not a.no_evaluate
    summary = launch(manifest, a.out_dir, overrides, a.timeout, keep_workdir=a.keep_workdir)
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
