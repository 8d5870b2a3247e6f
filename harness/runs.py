"""Operating a run directory: one invocation at a time, a config read back, the plan of a rerun.

  locked(run_dir, wait)   one lock per run directory (filelock): a second invocation on it is
                          refused in one line naming the holder's pid, or waits with --wait.
                          Several settings may share one run directory (--full does), but one
                          after the other: config.json, wall_seconds.json and provenance records
                          are read-modify-write files, and two writers would lose entries.
  config_defaults(...)    --config FILE: a run's config.json (its "invocation") or a JSON / YAML
                          object of flags, as defaults that the command line overrides.
  plan(run)               --plan: what each stage would do (fresh / stale and why / missing),
                          without doing it.
  missing_upstream(...)   a stage whose upstream output is missing and not produced by this
                          invocation: one line naming the stage or flag that produces it.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from harness import provenance
from harness.pipeline import Run, methods, policy_dir
from safe_io import atomic_write_text

LOCK, HOLDER = ".mor.lock", ".mor.lock.pid"  # in the run directory; the pid file names the holder
_HELD: set[str] = set()  # run directories this process holds (--full re-enters main per setting)


def holder(run_dir: Path) -> str:
    """The pid the holder wrote beside the lock ('unknown' in the instant before it writes it)."""
    try:
        return (Path(run_dir) / HOLDER).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def locked(run_dir: str | Path, wait: bool = False):
    """Hold `run_dir`'s lock for the block. The lock is the kernel's (flock): a process that dies,
    even by kill -9, releases it, so a crashed run never leaves the directory locked."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    if key in _HELD:  # this process holds it already (--full's settings, one after the other)
        yield
        return
    lock = FileLock(d / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise SystemExit(f"error: {d} is in use by another mor invocation (pid {holder(d)}); let it finish, "
                             "add --wait to queue behind it, or use another --run-dir") from None
        print(f"[lock] {d} is in use by pid {holder(d)}; waiting for it (--wait)", flush=True)
        lock.acquire()
    atomic_write_text(d / HOLDER, f"{os.getpid()}\n")
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        (d / HOLDER).unlink(missing_ok=True)
        lock.release()


# Flags that say how to run this invocation, not what it computes: never taken from a --config.
NOT_FROM_CONFIG = {"config", "plan", "wait", "full"}


def config_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    """--config FILE -> {dest: value} for p.set_defaults. FILE is a run's config.json (its
    "invocation": the flags of the run's last invocation) or a JSON / YAML object of flags, keyed
    by flag name (grpo-steps or grpo_steps). Each value is checked against its flag's kind; the
    ranges are checked later with the command line's own values (mor.check_args)."""
    f = Path(path)
    if not f.is_file():
        p.error(f"--config {path}: file not found")
    text = f.read_text(encoding="utf-8")
    try:
        if f.suffix in (".yaml", ".yml"):
            import yaml  # installed with transformers

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as e:  # a JSON or YAML syntax error: its first line says where
        p.error(f"--config {path}: not valid {'YAML' if f.suffix in ('.yaml', '.yml') else 'JSON'} "
                f"({str(e).splitlines()[0]})")
    if isinstance(obj, dict) and isinstance(obj.get("invocation"), dict):
        obj = obj["invocation"]  # a run's config.json
    if not isinstance(obj, dict):
        p.error(f"--config {path}: expected an object of flags (or a run's config.json)")
    actions = {a.dest: a for a in p._actions}
    out = {}
    for key, v in obj.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in NOT_FROM_CONFIG:
            continue
        act = actions.get(dest)
        if act is None or dest == "help":
            p.error(f"--config {path}: unknown flag {key!r}")
        flag = act.option_strings[-1]
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                p.error(f"--config {path}: {flag} expects true or false, got {v!r}")
        elif isinstance(act, argparse._AppendAction):
            if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                p.error(f"--config {path}: {flag} expects a list of NAME=VALUE strings, got {v!r}")
        elif dest in ("seeds", "stages", "methods") and isinstance(v, list):
            v = ",".join(str(x) for x in v)  # config.json stores them parsed: [0, 1, 2]
        elif v is not None:
            if act.type in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
                p.error(f"--config {path}: {flag} expects a number, got {v!r}")
            if act.type is int and v != int(v):
                p.error(f"--config {path}: {flag} expects an integer, got {v!r}")
            v = act.type(v) if act.type in (int, float) else v if act.type is None else str(v)
            if act.choices is not None and v not in act.choices:
                p.error(f"--config {path}: {flag} {v!r}: choose from {list(act.choices)}")
        out[dest] = v
    return out


# What each stage reads: its upstream outputs (mor.UPSTREAM lists the stages whose staleness
# matters; here, what must *exist* for the stage to start at all).
NEEDS = {"base": [], "sft": ["base"], "reward": [], "router": ["sft", "reward"], "grpo": ["sft", "reward", "router"],
         "eval": ["sft"]}


def missing_upstream(run: Run, stages: list[str]) -> str | None:
    """One line for the first stage of `stages` whose upstream output is missing and not made by
    this invocation, naming the stage (or flag) that makes it; None when every input is there.
    (The reward stage checks its own: only clients that start from the base need it.)"""
    a = run.args
    for name in stages:
        needs = list(NEEDS[name])
        if name == "grpo":
            ms = methods(run)
            if not any(m.startswith("mor") for m in ms):
                needs.remove("router")
            if set(ms) <= {"oracle"}:
                needs.remove("reward")  # the oracle reads gold answers, no RM
        for up in needs:
            if up in stages or (up == "base" and a.base):
                continue
            out = run.output(up)
            if not out.exists():
                how = f"add {up} to --stages" + (" (or give --base DIR, a checkpoint)" if up == "base" else "")
                return f"[{name}] needs {out}, the {up} stage's output, which is missing: {how}"
    return None


def _status(run: Run, output: Path, inputs: dict) -> str:
    if not output.exists():
        return "missing"
    diff = provenance.changed(provenance.stored(output, run.dir), inputs)
    return "fresh" if not diff else "stale: " + "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")


def plan(run: Run) -> list[str]:
    """--plan: one line per stage output of this invocation (and per client RM and per policy
    under reward and grpo): fresh (kept), stale with the input that changed, or missing; a stage
    runs when anything under it is not fresh, or when --force names it. Nothing is written."""
    a = run.args
    lines = [f"plan for {run.dir} ({a.setting} setting; --force: {'yes' if a.force else 'no'}):"]
    names = a.stages.split(",")
    for name in names:
        subs = []
        if name == "reward":
            subs = [(f"RM {k}", run.rm_dir(k), run.rm_inputs(k)) for k in run.fed.clients]
        if name == "grpo":
            subs = [(f"{m} seed {s}", policy_dir(run, m, s), run.policy_inputs(m, s))
                    for m in methods(run) for s in run.seeds(m)]
        out = run.output(name)
        states = [_status(run, out, run.stage_inputs(name))] + [_status(run, d, i) for _, d, i in subs]
        runs = a.force or any(s != "fresh" for s in states)
        lines.append(f"  {name:<7}{'runs' if runs else 'kept':<6}{states[0]:<8} {out.relative_to(run.dir)}"
                     if not states[0].startswith("stale") else
                     f"  {name:<7}{'runs':<6}{states[0]} ({out.relative_to(run.dir)})")
        for (what, d, _), s in zip(subs, states[1:]):
            lines.append(f"         {what}: {s}" + ("" if s == "fresh" else f" ({d.relative_to(run.dir)})"))
    gap = missing_upstream(run, names)
    if gap:
        lines.append(f"  and it would stop: {gap}")
    return lines
