"""Bradley-Terry reward models (E1): loss, learning, save/load, refusing unsafe uploads."""
import math
import pickle
import shutil

import pytest
import torch

import data
import models
import reward


def test_bt_loss_matches_hand_computation():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    want = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))
             + math.log(1 / (1 + math.exp(2.0)))) / 3
    assert reward.bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)


@pytest.fixture
def rm(tiny_dirs):
    torch.manual_seed(0)
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    return reward.RewardModel(vlm, proc)


def test_gradient_step_pushes_chosen_above_rejected(rm, fed):
    pairs = data.make_pairs(fed.clients["color"][:8], seed=0)
    rc, rr = rm.pair_rewards(pairs)
    margin0 = (rc - rr).mean().item()
    opt = torch.optim.SGD(rm.parameters(), lr=0.05)
    reward.bradley_terry_loss(rc, rr).backward()
    opt.step()
    with torch.no_grad():
        rc, rr = rm.pair_rewards(pairs)
    assert (rc - rr).mean().item() > margin0 + 1e-3


def test_chosen_and_rejected_share_one_forward(rm, fed, monkeypatch):
    calls = []
    orig = rm.vlm.model.forward
    monkeypatch.setattr(rm.vlm.model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or orig(*a, **k))
    pairs = data.make_pairs(fed.clients["color"][:5], seed=0)
    rm.pair_rewards(pairs)
    assert len(calls) == 1 and calls[0][0] == 2 * len(pairs)


def test_reward_reads_the_last_non_pad_token(rm, fed):
    ex = fed.clients["color"][:2]
    batch = rm.encoder([e.image for e in ex], [e.prompt for e in ex], ["red<|im_end|>", "red red red<|im_end|>"])
    with torch.no_grad():
        r = rm(**batch)
        h = rm.vlm.model(**{k: v for k, v in batch.items() if k != "response_mask"}).last_hidden_state
    assert torch.allclose(r, rm.head(h[:, -1]).squeeze(-1), atol=1e-6)  # left padding: last index


def test_tiny_rm_beats_chance_on_its_domain(rm, fed):
    exs = fed.clients["color"]
    train, held = data.make_pairs(exs[:600], seed=0), data.make_pairs(exs[600:700], seed=1)
    before = reward.pair_accuracy(rm, held)
    cfg = reward.RMConfig(sft_steps=0, steps=40, batch=32, lr=1e-3)  # BT only, no warm-up
    losses = reward.train_reward_model(rm, train, cfg, seed=0)["loss"]
    after = reward.pair_accuracy(rm, held)
    assert sum(losses[-5:]) / 5 < losses[0]
    assert after >= 0.65 and after > before + 0.15, (before, after)
    assert rm.std > 0


@pytest.mark.slow
def test_format_pairs_teach_the_form_on_other_domains_prompts(tiny_dirs, fed):
    """A colour client's RM scores shape and position prompts too when used alone. Trained on its
    own pairs only, it has never seen those prompts; with format pairs on public questions in its
    BT batches, it ranks a well-formed answer above its malformed variants there (held-out public
    questions) clearly more often."""
    own = data.make_pairs(fed.clients["color"][:300], seed=0)
    other = [e for e in fed.public if e.domain != "color"]
    fmt, held = data.format_pairs(other[:600], 300, seed=0), data.format_pairs(other[600:], 200, seed=1)
    cfg = reward.RMConfig(sft_steps=0, steps=40, batch=32, lr=1e-3)
    acc = {}
    for name, extra in (("own only", []), ("with format pairs", fmt)):
        torch.manual_seed(0)
        rm = reward.RewardModel(*models.load_vlm(tiny_dirs["qwen2_vl"]))
        reward.train_reward_model(rm, own, cfg, seed=0, format_pairs=extra)
        acc[name] = reward.pair_accuracy(rm, held)
    assert acc["with format pairs"] >= 0.9 and acc["with format pairs"] > acc["own only"] + 0.05, acc


def test_save_load_bit_for_bit(rm, fed, tmp_path):
    rm.mean, rm.std, rm.info = 0.25, 2.0, {"family": "qwen2_vl"}
    rm.save(tmp_path / "rm")
    back = reward.RewardModel.load(tmp_path / "rm")
    pairs = data.make_pairs(fed.clients["shape"][:6], seed=0)
    with torch.no_grad():
        a, b = rm.eval().pair_rewards(pairs), back.pair_rewards(pairs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (back.mean, back.std, back.info["family"]) == (0.25, 2.0, "qwen2_vl")


def test_pickle_upload_is_refused(rm, tmp_path):
    rm.save(tmp_path / "rm")
    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "rm", evil)
    (evil / "head.safetensors").write_bytes(pickle.dumps({"weight": torch.zeros(1, 128)}))
    with pytest.raises(ValueError, match="head.safetensors: not a valid safetensors"):
        reward.RewardModel.load(evil)
    shutil.rmtree(evil)
    shutil.copytree(tmp_path / "rm", evil)
    (evil / "head.pt").write_bytes(pickle.dumps({}))
    with pytest.raises(ValueError, match="unexpected file"):
        reward.RewardModel.load(evil)
    (evil / "head.pt").unlink()
    (evil / "backbone" / "model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(ValueError, match="no pickle"):
        reward.RewardModel.load(evil)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_shared_image_encoding_equals_one_image_per_row(tiny_dirs, fed, family, monkeypatch):
    """encode_shared runs the vision tower on distinct images only, and the hidden states equal
    those of the plain per-row batch."""
    vlm, proc = models.load_vlm(tiny_dirs[family])
    enc = models.Encoder(proc)
    ex = fed.clients["shape"][:3]
    imgs = [ex[0].image, ex[1].image, ex[0].image, ex[2].image, ex[1].image]
    prompts = [e.prompt for e in ex] + [ex[0].prompt, ex[1].prompt]
    resp = ["circle<|im_end|>", "red<|im_end|>", "triangle", "<|im_end|>", "left left<|im_end|>"]
    seen = []
    orig = vlm.model.get_image_features
    monkeypatch.setattr(vlm.model, "get_image_features", lambda pv, *a, **k: seen.append(len(a[0])) or orig(pv, *a, **k))
    with torch.no_grad():
        plain = enc(imgs, prompts, resp)
        plain.pop("response_mask")
        h0 = vlm.model(**plain).last_hidden_state
        shared = enc.encode_shared(vlm, imgs, prompts, resp)
        shared.pop("response_mask")
        h1 = vlm.model(**shared).last_hidden_state
    assert seen[-1] == 3  # the second forward encoded 3 distinct images, not 5 rows
    assert "pixel_values" not in shared
    assert torch.allclose(h0, h1, atol=1e-5)


def test_image_batches_keep_every_image_group_whole(fed):
    pairs = data.make_pairs(fed.clients["position"][:200], seed=0)
    per_image = {}
    for p in pairs:
        per_image[p.image] = per_image.get(p.image, 0) + 1
    it = models.image_batches(pairs, 16, seed=0)
    for _ in range(5):
        b = next(it)
        assert len(b) >= 16
        counts = {}
        for p in b:
            counts[p.image] = counts.get(p.image, 0) + 1
        assert all(counts[i] == per_image[i] for i in counts)  # never a split group


def test_warmup_examples_are_the_distinct_chosen_answers():
    p = [data.Pair("a.png", "q?", "red<|im_end|>", "blue<|im_end|>", "color"),
         data.Pair("a.png", "q?", "red<|im_end|>", "<|im_end|>", "color"),
         data.Pair("b.png", "q?", "green<|im_end|>", "red", "color")]
    ex = reward.warmup_examples(p)
    assert [(e.image, e.answer) for e in ex] == [("a.png", "red"), ("b.png", "green")]
