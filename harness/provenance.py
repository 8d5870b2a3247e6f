"""Provenance of stage outputs: what made each one, so that a rerun never reuses a stale output.

Every output of a stage (a directory such as a client's RM or one (method, seed) policy, or a
file such as the router) is stored with the *inputs* that made it: the flags that matter to that
stage, the client set, digests of the user's data files and the digests of the upstream outputs
it read. Its fingerprint is the digest of those inputs:

  fingerprint(output) = sha256( canonical JSON of inputs(output) )[:16]

and an output is *fresh* when it exists and its stored inputs equal the inputs the current flags
ask for. Upstream digests chain the stages: change --rm-steps and every client RM is stale, so
are the router that read their scores, the policies aligned with them and the tables. The
pipeline redoes stale outputs (saying which input changed) instead of reporting what it did not
compute. An output written before provenance existed has no record and counts as stale.

Where the records live:
  directory outputs   <dir>/provenance.json, written inside the atomic temp directory, so the
                      record and the output appear together in one rename
  file outputs        <run dir>/provenance.json, {file name: inputs}, written after the file
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safe_io import atomic_write_json

RECORD = "provenance.json"


def digest(obj) -> str:
    """16 hex digits of sha256 over canonical JSON (sorted keys): equal inputs, equal digest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """Digest of a file's bytes (cached per (path, size, mtime): data files are read once)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def data_digest(path: str | Path) -> str:
    """A user JSONL file and the images it names: an image replaced under the same name changes
    the digest too (by size and mtime, so large image sets are not re-read). Lines that do not
    parse are left to the loader, which names them (safe_io.load_jsonl)."""
    p = Path(path)
    parts = [file_digest(p)]
    with open(p, "rb") as f:
        for line in f:
            try:
                img = (p.parent / json.loads(line)["image"]).resolve()
                st = img.stat()
                parts.append(f"{img}:{st.st_size}:{st.st_mtime_ns}")
            except Exception:  # noqa: BLE001 -- validation is the loader's job, with file:line
                continue
    return digest(parts)


def dir_digest(path: str | Path) -> str:
    """A checkpoint directory given by the user (--base, --client-model): its config.json and the
    name, size and mtime of every file (weights are GBs: not hashed byte by byte)."""
    p = Path(path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    cfg = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return digest([cfg, files])


def stored(output: Path, run_dir: Path) -> dict | None:
    """The inputs recorded for `output`, or None (no record: an output from before provenance)."""
    if output.is_dir():
        rec = output / RECORD
        return json.loads(rec.read_text()) if rec.is_file() else None
    table = run_dir / RECORD
    if not table.is_file():
        return None
    return json.loads(table.read_text()).get(output.name)


def record_dir(tmp_dir: Path, inputs: dict) -> None:
    """Inside a directory output's atomic temp dir, before its rename."""
    atomic_write_json(Path(tmp_dir) / RECORD, inputs)


def record_file(output: Path, run_dir: Path, inputs: dict) -> None:
    """After a file output was written (one process writes file outputs: the main one)."""
    table = run_dir / RECORD
    t = json.loads(table.read_text()) if table.is_file() else {}
    t[output.name] = inputs
    atomic_write_json(table, t)


def changed(old: dict | None, new: dict) -> list[str]:
    """The input keys whose values differ, as readable strings ('rounds: 30 -> 5')."""
    if old is None:
        return ["no provenance record (written by an older version, or interrupted)"]
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            a, b = json.dumps(old.get(k), sort_keys=True), json.dumps(new.get(k), sort_keys=True)
            out.append(f"{k}: {a if len(a) <= 60 else 'was ' + digest(old.get(k))} -> "
                       f"{b if len(b) <= 60 else 'now ' + digest(new.get(k))}")
    return out
