"""Crash-safe I/O and validation of what users hand in.

  1. Users' own data: JSONL files (client pairs, prompt pools, evaluation sets, the server's SFT
     examples), validated row by row so that every error names file:line and the field. Every
     image is decoded in full here, once per distinct file, because a file that only *opens*
     (a truncated JPEG, a PNG with a corrupt data chunk, a 40-megapixel decompression bomb) would
     otherwise fail or exhaust memory hours later, inside a training worker, with no location.
  2. Uploads from outside: a checkpoint directory (--base, --client-model, a client's RM) holds
     safetensors weights and JSON configs only, with sound headers and no request for remote
     code; router weights are safetensors with exactly the router's keys, shapes and finite values.
  3. Crash-safe writes: a temp file beside the target, then a rename (atomic on POSIX). A killed
     run leaves the previous good state or nothing, never half a file. Every stage output and the
     Flower apps' files go through them.
  4. `Progress`: the progress of every long loop (a tqdm bar on a terminal, plain periodic lines
     in a log or a worker) and its live per-step metrics (JSONL, TensorBoard when installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

# ----------------------------------------------------------------------------------------------
# 1. Users' own data: JSONL with validation
# ----------------------------------------------------------------------------------------------

# kind -> (required fields, optional fields). Optional fields, when present, obey the same rule
# as required ones (a non-empty string): a null or a number there is a mistake, not "absent".
# image_id names the image for splits by image (the exported benchmark writes easy-VQA's ids);
# without it the image's path serves.
JSONL_KEYS = {"pairs": ("image", "prompt", "chosen", "rejected"), "prompts": ("image", "prompt"),
              "eval": ("image", "prompt", "answer"), "sft": ("image", "prompt", "answer")}
JSONL_OPTIONAL = {"pairs": ("domain", "image_id"), "prompts": ("domain", "answer", "image_id"),
                  "eval": ("domain", "image_id"), "sft": ("domain", "image_id")}
# Images the models cannot use or that would exhaust memory. A side below 8 px is below any
# patch size; beyond 20:1 the processors' resize leaves a strip of one patch; 40 megapixels is
# ~120 MB as RGB, far above what any processor keeps (Qwen2-VL's default cap is 12.8 MP).
MIN_IMAGE_SIDE = 8
MAX_ASPECT = 20.0
MAX_IMAGE_PIXELS = 40_000_000


class DataError(ValueError):
    """Bad user data; the message names the file, the line and the field."""


def _check_image(img: Path) -> tuple[int, int] | str:
    """(width, height) of a sound image file, else the reason it is refused (a string).

    The size is read from the header before any pixel is decoded, so a bomb is refused without
    allocating it; then `load()` decodes every pixel (PIL's `verify()` only checks the chunk
    CRCs of a PNG and reads nothing of a JPEG's scan data)."""
    try:
        with warnings.catch_warnings():
            # the size is checked below, against a lower limit than the one PIL warns at
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(img) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"{w}x{h} px is {w * h / 1e6:.0f} megapixels, above the limit of {MAX_IMAGE_PIXELS / 1e6:.0f}"
                if min(w, h) < MIN_IMAGE_SIDE:
                    return f"degenerate size {w}x{h} px (a side below {MIN_IMAGE_SIDE} px)"
                if max(w, h) / min(w, h) > MAX_ASPECT:
                    return f"extreme aspect ratio {w}x{h} px (beyond {MAX_ASPECT:.0f}:1)"
                im.load()
    except Image.DecompressionBombError as e:  # raised by open() beyond twice PIL's own limit
        return f"a decompression bomb ({e})"
    except Exception as e:  # PIL raises many types for a corrupt file: OSError, SyntaxError, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"unreadable image ({type(e).__name__}{': ' + msg if msg else ''})"
    return w, h


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    if first and raw.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write: harmless, dropped
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def _row(raw: bytes, where: str, n: int, path: Path, kind: str, checked: dict) -> dict | None:
    """One line of a JSONL file of `kind` -> its validated row (None for a blank line)."""
    need, optional = JSONL_KEYS[kind], JSONL_OPTIONAL[kind]
    line = _decode_line(raw, where, n == 1)
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "pairs" and ("images" in row or any(isinstance(row.get(k), list) for k in need)):
        raise DataError(f"{where}: this looks like TRL's preference format ('images', or messages as lists); "
                        f"convert the file first: python data.py import {path} OUT.jsonl")
    for key in need:
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (needs {', '.join(need)})")
    for key in (*need, *(k for k in optional if k in row)):
        v = row[key]
        if not isinstance(v, str) or not v.strip():
            hint = "" if key in need else " when present (omit it otherwise)"
            raise DataError(f"{where}: field '{key}' must be a non-empty string{hint}, got {json.dumps(v)[:40]}")
    img = (path.parent / row["image"]).resolve()
    if img not in checked:  # each distinct file is decoded once per load
        checked[img] = _check_image(img) if img.is_file() else "file not found"
    if isinstance(checked[img], str):
        raise DataError(f"{where}: field 'image': {checked[img]}: {img}")
    if kind == "pairs" and row["chosen"].strip() == row["rejected"].strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return dict(row, image=str(img), _line=n)


def load_jsonl(path: str | os.PathLike, kind: str) -> list[dict]:
    """Rows of a user JSONL file of `kind` ('pairs', 'prompts', 'eval' or 'sft', JSONL_KEYS).

    Image paths are relative to the file; each row comes back with 'image' resolved to an
    absolute path and '_line' (its line number, for errors found later: `models.check_lengths`).
    Errors name file:line and the field: bytes that are not UTF-8, a line that is not JSON or not
    an object, a missing field, a field (required or optional) that is not a non-empty string,
    an image that is missing, does not decode in full, or whose size is degenerate, extremely
    elongated or absurdly large, chosen == rejected, and an empty file. Each distinct image file
    is decoded once, however many rows use it.
    """
    if kind not in JSONL_KEYS:
        raise ValueError(f"unknown JSONL kind {kind!r}; one of {sorted(JSONL_KEYS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    checked: dict[Path, tuple[int, int] | str] = {}  # resolved image path -> size or refusal
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # if anything turned it on, a cut file would pass
    try:
        # Bytes, decoded line by line: a stray Latin-1 byte then names its line and column
        # instead of failing the whole file with an offset in bytes from its start.
        with open(path, "rb") as f:
            rows = [row for n, raw in enumerate(f, 1) if (row := _row(raw, f"{path}:{n}", n, path, kind, checked))]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Uploads from outside: checkpoint directories and router weights (safetensors only, no code)
# ----------------------------------------------------------------------------------------------


def read_json(f: Path) -> dict:
    """A JSON object from a checkpoint's config file; errors are one line naming the file."""
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{f}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(obj).__name__}")
    return obj


# The configs that can ask for remote code (auto_map); tokenizer.json cannot.
_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
            "video_preprocessor_config.json")


# Pickle suffixes: unpickling runs code, so weights in these formats are never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Pickles that HF Trainer / TRL write beside the weights (training state, never weights) and no
# loader here reads: a fine-tuned output directory holds training_args.bin, a Trainer
# checkpoint-N/ also the optimizer's. Named on stderr and ignored, not refused.
TRAINING_STATE = re.compile(r"(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)")


def refuse_unsafe_dir(path: str) -> None:
    """A checkpoint directory is an upload from outside: weights only as safetensors, no remote
    code. A weight pickle (pytorch_model*.bin, *.pt, *.pkl, ...) is refused; the training-state
    pickles of HF Trainer / TRL outputs and any other file (a README, a .py without auto_map)
    are named and ignored, since nothing reads them (trust_remote_code is always False)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    files = sorted(f.name for f in p.iterdir() if f.is_file())
    pickles = [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    bad = [f for f in pickles if not TRAINING_STATE.fullmatch(f)]
    if bad:
        raise ValueError(f"{path}: refusing to load {', '.join(bad)}: only safetensors weights "
                         "and JSON configs are accepted (no pickle, no remote code)")
    ignored = [f for f in files if f in pickles or Path(f).suffix == ".py"]
    if ignored:
        print(f"[checkpoint] {path}: ignoring {', '.join(ignored)} (never read: training state or code)",
              file=sys.stderr)
    if not any(f.suffix == ".safetensors" for f in p.iterdir()):
        raise ValueError(f"{path}: no .safetensors weights found")
    for name in _CONFIGS:
        if (p / name).is_file() and "auto_map" in read_json(p / name):
            raise ValueError(f"{p / name}: asks for remote code (auto_map); refused")


def check_safetensors(p: Path) -> None:
    """Each .safetensors file's header, read without the weights: a truncated download or a
    file that is not safetensors fails here, not minutes later in from_pretrained."""
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = set((read_json(index).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ValueError(f"{index}: names shard(s) that are not there: {', '.join(missing)}")
    for f in sorted(p.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if size - 8 < n < 100 << 20:  # a plausible header, cut short
                raise ValueError(f"{f}: truncated ({size} bytes, shorter than its header); download it again")
            try:  # bytes 0-7: the header's length; then the JSON header; then the tensors
                header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except Exception:  # not JSON, not a dict, entries without data_offsets
                raise ValueError(f"{f}: not a safetensors file (unreadable header)") from None
        if 8 + n + end > size:
            raise ValueError(f"{f}: truncated ({size} bytes, the header says {8 + n + end}); download it again")


def load_router_state(path, model) -> dict[str, torch.Tensor]:
    """The router weights in `path`, checked against `model` (built for this federation's D and
    K) before anything is loaded: a router file is an upload like an RM. safetensors only (a
    pickle is never unpickled), exactly the model's keys, the model's shapes, finite values.
    A router trained for K' != K reward models is refused with both numbers."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: router weights must be a .safetensors file; refused")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: router weights not found (run the router stage)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # a pickle renamed .safetensors lands here
        raise ValueError(f"{path}: not a valid safetensors file ({e}); refused") from None
    want = model.state_dict()
    last = "net.2.weight"  # [K, hidden]: its rows are the K reward models
    if last in state and last in want and state[last].shape[0] != want[last].shape[0]:
        raise ValueError(f"{path}: router has {state[last].shape[0]} outputs but the federation has "
                         f"{want[last].shape[0]} reward models (K mismatch); retrain the router")
    why = state_problem(state, want)
    if why:
        raise ValueError(f"{path}: {why}; refused")
    return state


def state_problem(state, want: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with router weights `state` against the expected `want`, or None: exactly
    want's keys, tensors of want's shapes, finite floats. Shared by the router file check above
    and the server's check of every round upload (federated.check_upload)."""
    if not isinstance(state, dict):
        return f"state is a {type(state).__name__}, not a dict of tensors"
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        return f"wrong keys (missing {missing}, unexpected {extra})"
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            return f"'{k}' is a {type(v).__name__}, not a tensor"
        if v.shape != want[k].shape:
            return f"'{k}' has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}"
        if v.is_floating_point() and not torch.isfinite(v).all():
            return f"'{k}' holds NaN/inf"
    return None



def with_end_token(rows: list[dict], path: str | os.PathLike, end: str) -> list[dict]:
    """Pair rows as a policy sample looks: every sample the policy writes ends in the end token
    `end` (data.EOS), and the format guard and the embedded pairs rely on it, so an RM trained on
    responses without it would score text no sample ever looks like.

    A file whose `chosen` responses never carry it (plain text, TRL's format) gets it appended to
    every chosen and rejected response. A file that uses it (`data.py export`, `data.py import`)
    is taken as written, where a `rejected` response may lack it on purpose (a truncated answer is
    a malformed sample to rank low), but a `chosen` one without it is refused with its line: the
    response to prefer must be one a policy could write."""
    if not any(r["chosen"].endswith(end) for r in rows):
        return [dict(r, chosen=r["chosen"].rstrip() + end, rejected=r["rejected"].rstrip() + end) for r in rows]
    for r in rows:
        if not r["chosen"].endswith(end):
            raise DataError(f"{path}:{r['_line']}: field 'chosen' does not end in {end} although other rows' do; "
                            f"end every chosen response with {end}, or none (then it is appended to all)")
    return rows


def _text(content, where: str, field: str) -> str:
    """A TRL message's content (a string, or parts [{"type": "text", "text": ...}, {"type": "image"}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) for c in content):
        return "".join(c.get("text", "") for c in content if c.get("type") == "text")
    raise DataError(f"{where}: field '{field}': a message's content must be text or a list of parts")


def _messages(v, where: str, field: str, roles: tuple[str, ...]) -> str:
    """TRL's text or conversational field -> one string; conversational: only messages of `roles`."""
    if isinstance(v, str):
        return v
    if not (isinstance(v, list) and v and all(isinstance(m, dict) and "content" in m for m in v)):
        raise DataError(f"{where}: field '{field}' must be text or a list of messages {{role, content}}")
    bad = [m.get("role") for m in v if m.get("role") not in roles]
    if bad:
        raise DataError(f"{where}: field '{field}': a message of role {bad[0]!r} where only {'/'.join(roles)} "
                        "may stand (multi-turn conversations are not supported)")
    return "\n".join(_text(m["content"], where, field) for m in v)


def import_preference(src: str | os.PathLike, out: str | os.PathLike, end: str) -> int:
    """TRL's preference format (JSONL) -> this project's pairs file; returns the rows written.

    Read per line: `prompt`, `chosen`, `rejected` as text, or as conversational messages
    ([{"role": "user", "content": ...}], the chosen and rejected an assistant's); or, with an
    implicit prompt, `chosen` and `rejected` as whole conversations that share all but their last
    (assistant) message; the image as `images` (a list of one path, or {"path": ...}) or `image`.
    Written: image (relative to OUT), prompt, chosen and rejected ending in `end`, and `domain`
    when the row has one; OUT appears whole or not at all. Image paths are relative to SRC. An
    error names SRC:line and the field; a row with several images or none is refused (each pair
    here is about one image). A Hub dataset is JSONL after `dataset.to_json(path)`."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise DataError(f"{src}: file not found")
    rows = []
    with open(src, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{src}:{n}"
            line = _decode_line(raw, where, n == 1)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
                raise DataError(f"{where}: expected an object with 'chosen' and 'rejected' (and 'prompt', 'images')")
            chosen, rejected = row["chosen"], row["rejected"]
            if "prompt" in row:
                prompt = _messages(row["prompt"], where, "prompt", ("system", "user"))
            elif isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and chosen[:-1] == rejected[:-1]:
                prompt, chosen, rejected = _messages(chosen[:-1], where, "chosen", ("system", "user")), chosen[-1:], rejected[-1:]
            else:
                raise DataError(f"{where}: no 'prompt', and 'chosen' / 'rejected' are not conversations that share "
                                "their prompt messages")
            images = row.get("images", [row["image"]] if "image" in row else [])
            images = images if isinstance(images, list) else [images]
            if len(images) != 1:
                raise DataError(f"{where}: field 'images': expected exactly one image, got {len(images)}")
            img = images[0].get("path") if isinstance(images[0], dict) else images[0]
            if not isinstance(img, str) or not (src.parent / img).is_file():
                raise DataError(f"{where}: field 'images': not a path to an image file: {str(img)[:80]}")
            texts = [_messages(x, where, k, ("assistant",)).strip() for k, x in (("chosen", chosen), ("rejected", rejected))]
            if not prompt.strip() or not all(texts):
                raise DataError(f"{where}: an empty prompt, chosen or rejected response")
            r = {"image": os.path.relpath((src.parent / img).resolve(), out.parent.resolve()), "prompt": prompt,
                 "chosen": texts[0] if texts[0].endswith(end) else texts[0] + end,
                 "rejected": texts[1] if texts[1].endswith(end) else texts[1] + end}
            if isinstance(row.get("domain"), str) and row["domain"].strip():
                r["domain"] = row["domain"]
            rows.append(json.dumps(r, ensure_ascii=False))
    if not rows:
        raise DataError(f"{src}: empty file (no rows)")
    atomic_write_text(out, "\n".join(rows) + "\n")
    return len(rows)


# ----------------------------------------------------------------------------------------------
# 3. Crash-safe writes: beside the target, then a rename (atomic on POSIX). A killed run leaves
#    the previous good state or nothing, never half a file. Here rather than in mor.py because
#    the Flower apps (federation/flower_fed.py) ship this module to the sites and write the same way.
# ----------------------------------------------------------------------------------------------


def _atomic(path: str | Path, write) -> None:
    """write(tmp) to a hidden temp path beside `path`, then rename it over `path`. Temp files a
    killed process left for the same target (kill -9 skips every cleanup) are removed first, those
    of a live process never; a failed write leaves the old file and no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        if not _alive_owner(stale):
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


def _alive_owner(p: Path) -> bool:
    """Is the process whose pid ends the name of temp path `p` (.name.tmp<pid>) alive, and not us?"""
    digits = p.name[len(p.name.rstrip("0123456789")):]
    if not digits or int(digits) == os.getpid():
        return False
    try:
        os.kill(int(digits), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed (kill -9 skips the cleanup below): its half-written
    # temp dir, or the previous output parked aside between the two renames. A leftover's name
    # ends in the pid that made it: one whose process is still alive is that process's live
    # work (another invocation, a worker), never ours to delete.
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        if not _alive_owner(stale):
            shutil.rmtree(stale, ignore_errors=True)
    for parked in path.parent.glob(f".{path.name}.old*"):
        if _alive_owner(parked):
            continue
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


# ----------------------------------------------------------------------------------------------
# 4. Progress of long loops: a tqdm bar on a terminal, plain lines in a log or a worker process
# ----------------------------------------------------------------------------------------------
# Every training and evaluation loop reports through `Progress` (a tqdm) with the figures that
# matter set as its postfix (loss, reward, KL, accuracy). On a terminal it is an ordinary live bar.
# When stderr is not a terminal (`bash train.sh > log`), or inside a worker process where two jobs
# would overwrite one bar line, it prints one full line every `PLAIN_INTERVAL` seconds and at the
# end, prefixed by the job's name, so a log shows every job moving.
#
# Importing this module also silences transformers' own per-load bars ("Loading weights", "Writing
# model shards"): one per checkpoint load, dozens per run, none of them informative.
#
# Live metrics: with $MOR_METRICS set to a folder (mor.py sets <run>/metrics/<setting>), each
# loop's `Progress.log(step, **scalars)` appends one JSON line per step to <folder>/<desc>.jsonl
# (started afresh when the loop starts) and, when tensorboard is installed, to an event file
# under <folder>/tb/<desc>/: `tail -f` or `tensorboard --logdir` shows a job while it runs.

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

PLAIN_INTERVAL = 30.0  # seconds between two plain progress lines of one loop
PLAIN_ENV = "MOR_PLAIN_PROGRESS"  # set to 1 in worker processes (stages.in_workers)
METRICS_ENV = "MOR_METRICS"  # the live metrics folder (see above); unset: no metrics files


def plain() -> bool:
    return os.environ.get(PLAIN_ENV) == "1" or not sys.stderr.isatty()


class Progress(tqdm):
    """tqdm that degrades to periodic plain lines (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._plain = plain()
        self._printed = -1.0  # when the last plain line was printed (tqdm's clock)
        self._closing = False
        if self._plain:
            kwargs["disable"] = False
            kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        # refresh() runs on every update and postfix change: print only every PLAIN_INTERVAL
        # seconds of progress, and the final state when the loop closes
        now = self._time()
        if self.n == 0 or not (self._closing or now - max(self._printed, self.start_t) >= PLAIN_INTERVAL):
            return True
        self._printed = now
        print((msg or self.format_meter(**self.format_dict)).strip(), file=sys.stderr, flush=True)
        return True

    def log(self, step: int, **scalars) -> None:
        """One step's raw figures (not the bar's smoothed postfix) to the live metrics sinks."""
        folder = os.environ.get(METRICS_ENV)
        if not folder:
            return
        if not hasattr(self, "_sink"):  # opened on the loop's first step: a rerun starts over
            name = "-".join(str(self.desc).split()) or "loop"
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._sink, self._tb = open(Path(folder) / f"{name}.jsonl", "w", encoding="utf-8"), None
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(folder) / "tb" / name))
            except ImportError:  # tensorboard is optional: the JSONL file is always there
                pass
        vals = {k: float(v) for k, v in scalars.items() if v is not None}
        self._sink.write(json.dumps({"step": step, "time": round(time.time(), 3), **vals}) + "\n")
        self._sink.flush()
        for k, v in vals.items() if self._tb else ():
            self._tb.add_scalar(k, v, step)

    def close(self):
        self._closing = True
        super().close()
        if hasattr(self, "_sink"):
            self._sink.close()
            if self._tb:
                self._tb.close()
