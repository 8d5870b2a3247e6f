"""Bradley-Terry reward models (E1): loss, learning, save/load, refusing unsafe uploads."""
import math
import pickle
import shutil

import pytest
import torch

import data
import reward


def test_bt_loss_matches_hand_computation():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    want = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))
             + math.log(1 / (1 + math.exp(2.0)))) / 3
    assert reward.bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)


@pytest.fixture
def rm(tiny_dirs):
    torch.manual_seed(0)
    vlm, proc = data.load_vlm(tiny_dirs["qwen2_vl"])
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
    losses = reward.train_reward_model(rm, train, steps=40, batch_size=32, lr=1e-3, seed=0)
    after = reward.pair_accuracy(rm, held)
    assert sum(losses[-5:]) / 5 < losses[0]
    assert after >= 0.65 and after > before + 0.15, (before, after)
    assert rm.std > 0


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
