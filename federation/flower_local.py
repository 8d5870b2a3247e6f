"""A local Flower deployment: a SuperLink and one SuperNode per client as separate processes.

Everything runs on 127.0.0.1 over plain HTTP (`--insecure`), which is acceptable on loopback only;
across sites the same Flower commands run with TLS. Each SuperNode gets its own FLWR_HOME and a
node config naming its client's routing cache, as a separate site would. `flwr run --stream`
submits a Flower App (flower_fed.write_app) and streams the ServerApp's log. Every process this
module starts, and every process those spawn (SuperExecs, one ServerApp / ClientApp process per
task), is torn down on exit, error, Ctrl-C and SIGTERM.

Liveness as Flower 1.41 sees it: a SuperNode that is shut down (SIGTERM) deregisters and leaves
the SuperLink's node list at once; one that is killed (`kill_node`, SIGKILL) stays listed until
its heartbeats are overdue, 37.5-60 s after the kill (measured 46-57 s, docs/flower.md).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import tomli_w  # a dependency of flwr
from tqdm.auto import tqdm

from federation.flower_app import LOG_PREFIX

SUPERLINK_NAME = "mor-local"  # the SuperLink connection `flwr run` uses (in the launch's own FLWR_HOME)


def flower_bin(name: str) -> str:
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
    bound to the loopback interface; across sites use TLS (docs/flower.md, across real sites). Each SuperNode
    gets its own FLWR_HOME (its own app install dir), as a separate site would, and a node-config
    TOML naming its cache (`node_config`: more keys per client, which a ClientApp reads from
    context.node_config). Use as a context manager: every process it started, with all the
    processes those spawned, is terminated on exit, error or Ctrl-C."""

    def __init__(self, caches: dict[str, Path], workdir: Path, log_dir: Path,
                 node_config: dict[str, dict] | None = None, threads: int = 1, verbose: bool = True):
        self.caches, self.workdir, self.log_dir = caches, Path(workdir), Path(log_dir)
        self.node_config, self.threads, self.verbose = node_config or {}, threads, verbose
        unknown = set(self.node_config) - set(caches)
        if unknown:
            raise ValueError(f"node config for unknown clients {sorted(unknown)}; clients are {sorted(caches)}")
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
        # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (inherited if set, else Flower's 1 s) is how often each
        # SuperExec asks its SuperLink / SuperNode for a task (a ServerApp or ClientApp process to
        # start). Left alone: polling faster shortens the wait before each ClientApp starts, but
        # every SuperExec then burns CPU all the time, which made rounds slower on 2 shared cores
        # (docs/flower.md has the measurements).
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
            flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation"], env)
        self._wait_superlink(timeout=60.0)
        # `flwr run` reads its SuperLink connections from FLWR_HOME/config.toml
        (self.server_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SUPERLINK_NAME}"\n\n[superlink.{SUPERLINK_NAME}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        for name, cache in self.caches.items():
            site = self.workdir / "sites" / name
            site.mkdir(parents=True, exist_ok=True)
            node_cfg = {**self.node_config.get(name, {}), "routing-cache": str(Path(cache).resolve())}
            (site / "node-config.toml").write_bytes(tomli_w.dumps(node_cfg).encode())
            self.nodes[name] = self._spawn(f"supernode-{name}", [
                flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
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
        proc = self._spawn("flwr-run", [flower_bin("flwr"), "run", str(app_dir), SUPERLINK_NAME,
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
                if node.poll() is not None and self.verbose and not getattr(node, "_reported", False):
                    node._reported = True
                    tqdm.write(f"{LOG_PREFIX} SuperNode {name} exited (status {node.returncode})")
            time.sleep(0.1)
        return proc.returncode

    def kill_node(self, name: str) -> None:
        """SIGKILL a client's SuperNode and everything it spawned: a site that crashes mid-run. The
        SuperLink lists the node until its heartbeats are overdue, 37.5-60 s later."""
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
