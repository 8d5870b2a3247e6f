"""FedAvg (E4): the weighted mean, and refusals of malformed client updates."""
import pytest
import torch

import data
import models
import reward
from federated import Client, fedavg, fedavg_reward_model


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
            "steps": torch.tensor(7)}


def test_fedavg_is_the_sample_weighted_mean():
    sds, n = [_sd(0), _sd(1), _sd(2)], [10, 30, 60]
    out = fedavg(sds, n)
    for k in ("w", "b"):
        want = (10 * sds[0][k] + 30 * sds[1][k] + 60 * sds[2][k]) / 100
        assert torch.allclose(out[k], want, atol=1e-6)
        assert out[k].dtype == sds[0][k].dtype
    assert torch.equal(out["steps"], torch.tensor(7))
    assert torch.allclose(fedavg([sds[0]], [5])["w"], sds[0]["w"])


def test_fedavg_rejects_malformed_updates():
    a, b = _sd(0), _sd(1)
    with pytest.raises(ValueError, match="client 1 keys differ.*missing \\['b'\\]"):
        fedavg([a, {k: v for k, v in b.items() if k != "b"}], [1, 1])
    with pytest.raises(ValueError, match="client 1 'w' has shape \\(4, 3\\)"):
        fedavg([a, dict(b, w=b["w"].T)], [1, 1])
    with pytest.raises(ValueError, match="no client reported"):
        fedavg([], [])
    with pytest.raises(ValueError, match="must be positive"):
        fedavg([a, b], [1, 0])
    with pytest.raises(ValueError, match="integer tensor 'steps' differs"):
        fedavg([a, dict(b, steps=torch.tensor(8))], [1, 1])


def _pairs(fed, domain, n=60):
    return data.make_pairs(fed.clients[domain][:n], seed=0)


def test_client_holds_out_whole_images_and_reports_only_counts(fed):
    pairs = _pairs(fed, "shape")
    c = Client("shape", pairs, seed=0, heldout=0.2)
    train_imgs = {p.image for p in c._train}
    held_imgs = {p.image for p in c._heldout}
    assert train_imgs and held_imgs and not (train_imgs & held_imgs)
    assert c.n == len(c._train) and len(c._train) + len(c._heldout) == len(pairs)
    public = [a for a in vars(c) if not a.startswith("_")]
    assert public == ["name"]  # everything else a client holds is private
    with pytest.raises(ValueError, match="no preference pairs"):
        Client("empty", [], seed=0)
    # format pairs (public questions) only join the RM's BT batches: no n_k, no held-out pairs
    fmt = data.format_pairs(fed.public, 50, seed=0, tag="shape")
    c2 = Client("shape", pairs, seed=0, heldout=0.2, format_pairs=fmt)
    assert c2.n == c.n and c2._heldout == c._heldout and c2._train == c._train and c2._format == fmt


def test_fedavg_reward_model_is_the_weighted_mean_of_client_rms(tiny_dirs):
    rms = []
    for s in (0, 1):
        vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
        torch.manual_seed(s)
        rm = reward.RewardModel(vlm, proc)
        with torch.no_grad():
            for p in rm.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        rms.append(rm)
    sds = [{k: v.clone() for k, v in rm.state_dict().items()} for rm in rms]
    out = fedavg_reward_model(rms, [1, 3])
    for k, v in out.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.25 * sds[0][k] + 0.75 * sds[1][k], atol=1e-6), k
    vlm, proc = models.load_vlm(tiny_dirs["llava_onevision"])
    with pytest.raises(ValueError, match="one architecture"):
        fedavg_reward_model([rms[0], reward.RewardModel(vlm, proc)], [1, 1])
