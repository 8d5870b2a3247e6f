"""FedAvg (E4): the weighted mean, and refusals of malformed client updates."""
import pytest
import torch

from federated import fedavg


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
