"""Router and federated rounds (E2-E4, E8): values, learning on a synthetic federation, faults."""
import math
import time

import pytest
import torch

import data
import router
from federated import Client, run_rounds

K, D = 3, 8


def test_mixed_reward_is_the_weighted_sum():
    w = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    r = torch.tensor([[1.0, 2.0, -2.0], [3.0, -1.0, 5.0]])
    assert torch.allclose(router.mixed_reward(w, r), torch.tensor([0.5 + 0.5 - 0.5, -1.0]))
    with pytest.raises(ValueError, match="differ"):
        router.mixed_reward(w, r[:, :2])


def test_routing_loss_matches_hand_computation():
    src = router.FixedWeights([1.0, 3.0])  # w = [0.25, 0.75]
    e = torch.zeros(2, D)
    r_w, r_l = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    margins = [0.25 * 2 - 0.75 * 1, 0.25 * 0 + 0.75 * 2]
    want = -sum(math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert router.routing_loss(src, e, e, r_w, r_l).item() == pytest.approx(want, rel=1e-6)


def test_fixed_weight_baselines():
    e = torch.randn(4, D)
    assert torch.allclose(router.avg_rm(4).weights(e), torch.full((4, 4), 0.25))
    assert torch.allclose(router.weighted_rm([100, 300]).weights(e)[0], torch.tensor([0.25, 0.75]))
    assert torch.equal(router.single_rm(1, 3).weights(e)[2], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError):
        router.FixedWeights([0.0, 0.0])


def test_router_weights_are_a_distribution_per_row():
    w = router.Router(D, K, hidden=16).weights(torch.randn(5, D) * 10)
    assert w.shape == (5, K) and torch.allclose(w.sum(-1), torch.ones(5)) and (w >= 0).all()
    assert router.routing_entropy(torch.full((2, K), 1 / K)) == pytest.approx(math.log(K), rel=1e-6)


def test_pool_features_means_over_prompt_and_response():
    h = torch.arange(12.0).reshape(1, 4, 3)  # T = 4 tokens
    attn = torch.tensor([[0, 1, 1, 1]])  # one left pad
    resp = torch.tensor([[0, 0, 1, 1]])
    e = router.pool_features(h, attn, resp)
    assert torch.allclose(e, torch.cat([h[0, 1], (h[0, 2] + h[0, 3]) / 2]).unsqueeze(0))


def _synthetic_client(k: int, n: int = 256, seed: int = 0) -> Client:
    """Domain k: features carry a one-hot domain code; RM k separates chosen from rejected
    (margin +2), the other RMs are noise. Only routing by domain gets the pairs right."""
    g = torch.Generator().manual_seed(100 * k + seed)
    pairs = [data.Pair(f"img{k}_{i}.png", "q", "a", "b", str(k)) for i in range(20)]
    c = Client(f"d{k}", pairs, seed=0)
    parts = {}
    for part in ("train", "heldout"):
        e = torch.zeros(n, D)
        e[:, k] = 3.0
        e_w, e_l = e + 0.1 * torch.randn(n, D, generator=g), e + 0.1 * torch.randn(n, D, generator=g)
        r_w, r_l = torch.randn(n, K, generator=g) * 2, torch.randn(n, K, generator=g) * 2
        r_w[:, k], r_l[:, k] = 1.0, -1.0
        parts[part] = (e_w, e_l, r_w, r_l)
    c._routing = parts  # what prepare_routing would have computed from real models
    return c


def test_trained_router_routes_each_domain_to_its_expert():
    clients = [_synthetic_client(k) for k in range(K)]
    torch.manual_seed(0)
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    model = make()
    before = [c.mixed_accuracy(model) for c in clients]
    log = run_rounds(model, make, clients, rounds=8, local_epochs=2, lr=1e-2, batch_size=64, seed=0)
    assert log[-1]["loss"] < log[0]["loss"]
    for k, c in enumerate(clients):
        w = c.routing_weights(model).mean(0)
        assert w[k] > 0.8, (k, w)  # most weight on the domain's own expert
        assert c.mixed_accuracy(model) > 0.95 > before[k]
    avg = router.avg_rm(K)
    assert all(c.mixed_accuracy(model) > c.mixed_accuracy(avg) for c in clients)


class _Broken(Client):
    def router_update(self, *a, **k):
        raise ConnectionError("client went offline")


class _Slow(Client):
    def router_update(self, *a, **k):
        time.sleep(3)
        return super().router_update(*a, **k)


def test_a_failing_or_slow_client_is_skipped_and_an_empty_round_fails():
    good = _synthetic_client(0)
    bad, slow = _synthetic_client(1), _synthetic_client(2)
    bad.__class__, slow.__class__ = _Broken, _Slow
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    model = make()
    log = run_rounds(model, make, [good, bad, slow], rounds=2, local_epochs=1, lr=1e-2, batch_size=64,
                     timeout_s=1.0)
    for entry in log:
        assert entry["clients"] == ["d0"]
        assert "offline" in entry["dropped"]["d1"] and "timed out" in entry["dropped"]["d2"]
    with pytest.raises(RuntimeError, match="no client reported"):
        run_rounds(model, make, [bad], rounds=1, local_epochs=1, lr=1e-2, batch_size=64)


def test_client_sampling_takes_the_fraction_each_round():
    clients = [_synthetic_client(k) for k in range(K)]
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    log = run_rounds(make(), make, clients, rounds=4, local_epochs=1, lr=1e-2, batch_size=64, fraction=0.34, seed=1)
    assert all(len(e["clients"]) == 1 for e in log)
    assert len({e["clients"][0] for e in log}) > 1  # different clients in different rounds


def test_pooled_stats_equal_the_union_of_client_features():
    parts = [torch.randn(n, D) * (k + 1) + k for k, n in enumerate((5, 9, 13))]
    moments = [(p.shape[0], p.double().sum(0), (p.double() ** 2).sum(0)) for p in parts]
    mean, std = router.pooled_stats(moments)
    allp = torch.cat(parts)
    assert torch.allclose(mean, allp.mean(0), atol=1e-5) and torch.allclose(std, allp.std(0), atol=1e-5)
    r = router.Router(D, K)
    r.set_feature_stats(mean, std)
    e = allp[:4]
    assert torch.allclose(r(e), r.net((e - mean) / std))  # the router sees standardised features
