"""Crash-safe I/O and validation of what users hand in.

  1. Users' own data: JSONL files (client pairs, prompt pools, evaluation sets, SFT examples),
     validated row by row so that every error names file:line and the field.
  2. Crash-safe writes: a temp file beside the target, then a rename (atomic on POSIX). A killed
     run leaves the previous good state or nothing, never half a file. Every stage output and the
     Flower apps' files go through them.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------
# 7. Users' own data: JSONL with validation
# ----------------------------------------------------------------------------------------------

JSONL_KEYS = {"pairs": ("image", "prompt", "chosen", "rejected"), "prompts": ("image", "prompt"),
              "eval": ("image", "prompt", "answer")}


class DataError(ValueError):
    """Bad user data; the message names the file, the line and the field."""


def load_jsonl(path: str | os.PathLike, kind: str) -> list[dict]:
    """Rows of a user JSONL file of `kind` ('pairs', 'prompts' or 'eval').

    Image paths are relative to the file. Errors name file:line and the field: a line that is not
    JSON or not an object, a missing or non-string field, an image that is missing or unreadable,
    chosen == rejected, and an empty file.
    """
    if kind not in JSONL_KEYS:
        raise ValueError(f"unknown JSONL kind {kind!r}; one of {sorted(JSONL_KEYS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in JSONL_KEYS[kind]:
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}' (needs {', '.join(JSONL_KEYS[kind])})")
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{where}: field '{key}' must be a non-empty string")
            img = (path.parent / row["image"]).resolve()
            if not img.is_file():
                raise DataError(f"{where}: field 'image': file not found: {img}")
            try:
                with Image.open(img) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for a corrupt file
                raise DataError(f"{where}: field 'image': unreadable image {img} ({type(e).__name__})") from None
            if kind == "pairs" and row["chosen"].strip() == row["rejected"].strip():
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
            row = dict(row, image=str(img))
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


# ----------------------------------------------------------------------------------------------
# 8. Crash-safe writes: beside the target, then a rename (atomic on POSIX). A killed run leaves
#    the previous good state or nothing, never half a file. Here rather than in mor.py because
#    the Flower apps (flower_fed.py) ship this module to the sites and write the same way.
# ----------------------------------------------------------------------------------------------


def _atomic(path: str | Path, write) -> None:
    """write(tmp) to a hidden temp path beside `path`, then rename it over `path`. Temp files a
    killed process left for the same target (kill -9 skips every cleanup) are removed first; a
    failed write leaves the old file and no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # after a success tmp is already gone
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` through a temp file, fsynced before the rename."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_file(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors through a temp file (metadata values are stored as strings)."""
    meta = {k: str(v) for k, v in metadata.items()} if metadata else None
    _atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                        str(tmp), metadata=meta))


def atomic_savefig(fig, path: str | Path) -> None:
    """A matplotlib figure as PNG (format given: the temp name has no .png suffix)."""
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed (kill -9 skips the cleanup below): its half-written
    # temp dir, or the previous output parked aside between the two renames.
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    for parked in path.parent.glob(f".{path.name}.old*"):
        if path.exists():
            shutil.rmtree(parked, ignore_errors=True)
        else:  # killed between the renames: the parked copy is the last good output
            os.replace(parked, path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: the old output moves aside, the new one takes its name. A kill between them
    # leaves the previous good copy under .old*, never a half-written directory under `path`.
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
