"""Bad input, faults and trust (docs/faults.md): each protection has a test that fails without it.

Federated faults (a client that raises, hangs, or uploads a malformed or NaN state) and router
uploads are in test_router.py; RM uploads with pickles or stray files in test_reward.py and
test_models.py; the JSONL loader's file:line:field errors in test_data.py; determinism of
results.json in test_mor.py. Here: user clients in the pipeline, configs that ask for more than
the data holds, checkpoints without chat tokens, poisoned RM uploads, NaN/inf injected into the
three training loops, and writes killed with SIGKILL.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import grpo
import models
import mor
import reward
import safe_io
from harness import pipeline

ROOT = Path(__file__).resolve().parent.parent


# -- user data entering the pipeline ------------------------------------------------------------


def _user_pairs_file(tmp_path, fed, n=40, name="clinic.jsonl", rows=None):
    pairs = data.make_pairs(fed.clients["color"][:n // 2], seed=0)[:n]
    rows = rows if rows is not None else [{"image": p.image, "prompt": p.prompt, "chosen": p.chosen,
                                           "rejected": p.rejected} for p in pairs]
    f = tmp_path / name
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return f


def test_a_user_client_joins_the_federation_with_its_own_pairs(tmp_path, fed):
    f = _user_pairs_file(tmp_path, fed)
    run = pipeline.Run(mor.parse_args(["--quick", "--run-dir", str(tmp_path / "run"), "--client-data", f"clinic={f}"]))
    clients = run.clients()
    assert list(clients) == ["color", "shape", "position", "clinic"]  # K = 4, the user client last
    c = clients["clinic"]
    assert c.n + len(c._heldout) == 40 and c.n > 0 and c._heldout  # whole images held out
    assert run.family("clinic") == pipeline.USER_FAMILY and "rm_clinic" in pipeline.methods(run)


@pytest.mark.parametrize("argv,msg", [
    (["--client-data", "a=x.jsonl", "--client-data", "a=y.jsonl"], "client name 'a' given twice"),
    (["--client-data", "color=x.jsonl"], "'color' is already a client of the heterogeneous setting"),
    (["--client-data", "../evil=x.jsonl"], "expected NAME=FILE"),
    (["--client-data", "clinic"], "expected NAME=FILE"),
    (["--client-model", "color=/a", "--client-model", "color=/b"], "client 'color' given twice"),
    (["--client-model", "nobody=/a"], "expected NAME=DIR with NAME one of"),
    (["--client-fraction", "0"], "must be in \\(0, 1\\]"),
])
def test_bad_client_configs_are_refused_by_the_cli(argv, msg, capsys):
    with pytest.raises(SystemExit):
        mor.parse_args(["--quick", *argv])
    import re
    assert re.search(msg, capsys.readouterr().err)


def test_bad_user_client_data_names_the_file_line_and_field(tmp_path, fed):
    good = json.loads(_user_pairs_file(tmp_path, fed).read_text().splitlines()[0])
    cases = {
        "line": ([good, {k: v for k, v in good.items() if k != "rejected"}], "bad.jsonl:2: missing field 'rejected'"),
        "same": ([good, dict(good, rejected=good["chosen"])], "bad.jsonl:2: 'chosen' and 'rejected' are identical"),
        "image": ([dict(good, image="gone.png")], "bad.jsonl:1: field 'image': file not found"),
        "empty": (["", ""], "bad.jsonl: empty file"),
        "one image": ([good, dict(good, chosen="a purple heptagon<|im_end|>")], "client 'clinic'.*needs pairs on at least 2 images"),
    }
    for name, (rows, msg) in cases.items():
        f = _user_pairs_file(tmp_path, fed, name="bad.jsonl", rows=rows)
        run = pipeline.Run(mor.parse_args(["--quick", "--run-dir", str(tmp_path / "run"), "--client-data", f"clinic={f}"]))
        with pytest.raises(ValueError, match=msg):
            run.clients()


def test_a_split_asking_for_more_images_than_the_data_holds_is_refused():
    sizes = dict(data.DEFAULT_SPLIT, public=3000)  # 3000 + 800 + 1200 + 800 + 600 > 4000
    with pytest.raises(ValueError, match="split sizes ask for 6400 train images, easy-VQA has 4000"):
        data.build_federation(0, split_sizes=sizes)


def test_a_checkpoint_whose_tokenizer_lacks_the_chat_tokens_is_refused(tmp_path, tiny_dirs):
    d = tmp_path / "nochat"
    shutil.copytree(tiny_dirs["qwen2_vl"], d)
    for f in [*d.glob("*.json"), *d.glob("*.jinja")]:  # the end-of-turn token renamed everywhere
        f.write_text(f.read_text().replace("<|im_end|>", "<|end|>"))
    with pytest.raises(ValueError, match=r"lacks the chat token\(s\) \['<\|im_end\|>'\]"):
        models.load_vlm(d)
    models.load_vlm(tiny_dirs["qwen2_vl"])  # the untouched checkpoint loads


def test_a_poisoned_reward_model_upload_is_refused(tmp_path, tiny_dirs):
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    reward.RewardModel(vlm, proc, mean=0.1, std=2.0).save(tmp_path / "rm")
    reward.RewardModel.load(tmp_path / "rm")  # sound upload: loads
    for name, edit, msg in [
        ("std", lambda d: (d / "reward.json").write_text(json.dumps({"mean": 0.0, "std": float("nan")})),
         "field 'std' must be a finite number"),
        ("zero", lambda d: (d / "reward.json").write_text(json.dumps({"mean": 0.0, "std": 0.0})),
         "field 'std' must be positive"),
        ("head", lambda d: save_file({k: v * float("inf") for k, v in load_file(str(d / "head.safetensors")).items()},
                                     str(d / "head.safetensors")), "holds NaN/inf"),
    ]:
        d = tmp_path / name
        shutil.copytree(tmp_path / "rm", d)
        edit(d)
        with pytest.raises(ValueError, match=msg):
            reward.RewardModel.load(d)


# -- NaN/inf where they arise -------------------------------------------------------------------


def test_guarded_step_skips_a_nonfinite_loss_or_gradient(capsys):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert not models.guarded_step(opt, (p * float("nan")).sum(), [p], "t")
    # sqrt at 0: a finite loss (0) with an infinite gradient
    assert not models.guarded_step(opt, torch.sqrt(p).sum(), [p], "t")
    out = capsys.readouterr().out
    assert "t: non-finite loss" in out and "t: non-finite gradient" in out
    assert torch.equal(p.detach(), torch.zeros(2)) and not opt.state  # AdamW moments untouched
    assert models.guarded_step(opt, ((p - 1) ** 2).sum(), [p], "t") and (p > 0).all()


def test_a_nan_bt_loss_is_skipped_and_rm_training_continues(tiny_dirs, fed, monkeypatch, capsys):
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    rm = reward.RewardModel(vlm, proc)
    real, calls = reward.bradley_terry_loss, []

    def poisoned(rc, rr):  # the second batch's loss is NaN (as from an overflowing RM)
        calls.append(1)
        return real(rc, rr) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(reward, "bradley_terry_loss", poisoned)
    head = rm.head.weight.detach().clone()
    log = reward.train_reward_model(rm, data.make_pairs(fed.clients["color"][:12], 0),
                                    reward.RMConfig(sft_steps=0, steps=4, batch=8), seed=0)
    assert len(calls) == 4 and len(log["loss"]) == 3  # 4 batches, 1 skipped, 3 trained
    assert "reward: non-finite loss (nan), batch skipped" in capsys.readouterr().out
    assert all(torch.isfinite(q).all() for q in rm.parameters()) and not torch.equal(rm.head.weight, head)
    assert 0 < rm.std < float("inf")


def test_nan_rewards_and_a_nan_loss_skip_their_grpo_step(tiny_dirs, fed, monkeypatch, capsys):
    policy, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    ref, _ = models.load_vlm(tiny_dirs["qwen2_vl"])
    before = [q.detach().clone() for q in policy.parameters()]
    n_calls = {"reward": 0, "loss": 0}

    def reward_fn(images, prompts, responses, e):
        n_calls["reward"] += 1  # step 1's reward source returns NaN for one sample
        r = torch.tensor([float(len(x)) for x in responses])
        if n_calls["reward"] == 2:
            r[3] = float("nan")
        return r

    real = grpo.grpo_loss

    def loss_fn(*a, **k):  # step 2's loss is inf (e.g. an overflowing ratio)
        n_calls["loss"] += 1
        return real(*a, **k) * (float("inf") if n_calls["loss"] == 2 else 1.0)

    monkeypatch.setattr(grpo, "grpo_loss", loss_fn)
    cfg = grpo.GRPOConfig(steps=4, prompts=3, group=2)
    log = grpo.train_grpo(policy, ref, models.Encoder(proc), fed.pool[:30], reward_fn, cfg, seed=0)
    out = capsys.readouterr().out
    assert log["skipped"] == [1, 2], log["skipped"]
    assert "step 1: 1 non-finite reward(s)" in out and "step 2: non-finite loss" in out
    assert len(log["reward"]) == 3 and n_calls == {"reward": 4, "loss": 3}
    after = list(policy.parameters())
    assert all(torch.isfinite(q).all() for q in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # steps 0 and 3 trained


# -- writes killed mid-way ----------------------------------------------------------------------

_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
import safe_io
from pathlib import Path
d, i = Path({d!r}), 0
while True:  # rewrite all three kinds of artifact, as fast as the disk allows
    i += 1
    safe_io.atomic_write_json(d / "r.json", {{"i": i, "pad": "x" * 2_000_000}})
    safe_io.atomic_save_file(d / "w.safetensors", {{"w": torch.full((1_000_000,), float(i))}})
    with safe_io.atomic_dir(d / "dir") as t:
        (t / "a").write_text(str(i) * 200_000)
        (t / "b").write_text(str(i) * 200_000)
    print(i, flush=True)
"""


def test_a_write_killed_at_any_point_leaves_the_previous_good_state(tmp_path):
    """SIGKILL a process that keeps rewriting a JSON file, a safetensors file and a directory,
    at several moments: each artifact is always whole (old or new, never half), and the next
    atomic write clears what the kill left."""
    for delay in (0.0, 0.03, 0.11, 0.27):
        d = tmp_path / f"k{delay}"
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), d=str(d))],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert p.stdout.readline().strip() == "1"  # one full round written: a good state exists
            time.sleep(delay)
        finally:
            p.kill()
            p.wait()
        r = json.loads((d / "r.json").read_text())
        assert len(r["pad"]) == 2_000_000 and r["i"] >= 1
        w = load_file(str(d / "w.safetensors"))["w"]
        assert w.numel() == 1_000_000 and (w == w[0]).all() and w[0] >= 1
        if not (d / "dir").exists():  # killed between atomic_dir's two renames: parked, not lost
            assert list(d.glob(".dir.old*"))
            with pytest.raises(RuntimeError):
                with safe_io.atomic_dir(d / "dir"):
                    raise RuntimeError("the next attempt fails too")
        a, b = (d / "dir" / "a").read_text(), (d / "dir" / "b").read_text()
        assert a == b and len(a) >= 200_000  # both files from the same, complete round
        safe_io.atomic_write_json(d / "r.json", {"i": 0})  # the next writes sweep the debris
        with safe_io.atomic_dir(d / "dir") as t:
            (t / "a").write_text("0")
        assert not [f.name for f in d.iterdir() if f.name.startswith((".r.json", ".dir"))]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch):
    import os

    safe_io.atomic_write_json(tmp_path / "r.json", {"good": 1})
    safe_io.atomic_save_file(tmp_path / "w.safetensors", {"w": torch.ones(3)})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        safe_io.atomic_write_json(tmp_path / "r.json", {"good": 0})
    monkeypatch.setattr(safe_io, "save_file", disk_full)
    with pytest.raises(OSError):
        safe_io.atomic_save_file(tmp_path / "w.safetensors", {"w": torch.zeros(3)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"good": 1}
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], torch.ones(3))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json", "w.safetensors"]
