"""Router and federated rounds (E2-E4, E8): values, learning on a synthetic federation, faults."""
import math
import re
import threading

import pytest
import torch

import data
import router
import safe_io
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


_RELEASE = threading.Event()


class _Slow(Client):
    def router_update(self, *a, **k):
        # hangs until the test is over, however long the round's deadline: never "fast enough"
        _RELEASE.wait(120)
        return super().router_update(*a, **k)


def test_a_failing_or_slow_client_is_skipped_and_an_empty_round_fails():
    good = _synthetic_client(0)
    bad, slow = _synthetic_client(1), _synthetic_client(2)
    bad.__class__, slow.__class__ = _Broken, _Slow
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    model = make()
    # the deadline leaves the good client's few-ms update room on a loaded machine; the slow one
    # waits for an event, not a sleep a loaded machine could outlast
    _RELEASE.clear()
    try:
        log = run_rounds(model, make, [good, bad, slow], rounds=2, local_epochs=1, lr=1e-2, batch_size=64,
                         timeout_s=4.0)
    finally:
        _RELEASE.set()
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


class _Malformed(Client):
    """Answers every round, but with an upload the server must not average (set `.fault`)."""

    def router_update(self, state, *a, **k):
        sd, n, loss = super().router_update(state, *a, **k)
        if self.fault == "keys":
            sd["net.9.weight"] = sd.pop("net.2.weight")
        elif self.fault == "shape":
            sd["net.2.weight"] = sd["net.2.weight"][:, :-1]
        elif self.fault == "nan":
            sd["net.0.bias"][0] = float("nan")
        elif self.fault == "count":
            n = -5
        return sd, n, loss


@pytest.mark.parametrize("fault,why", [("keys", "wrong keys.*unexpected \\['net.9.weight'\\]"),
                                       ("shape", "'net.2.weight' has shape \\(3, 15\\), expected \\(3, 16\\)"),
                                       ("nan", "'net.0.bias' holds NaN"), ("count", "n_k must be a positive")])
def test_a_malformed_upload_is_dropped_and_the_round_goes_on(fault, why):
    good, bad = _synthetic_client(0), _synthetic_client(1)
    bad.__class__, bad.fault = _Malformed, fault
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    log = run_rounds(model, make, [good, bad], rounds=2, local_epochs=1, lr=1e-2, batch_size=64)
    # only the sound client is averaged: the router equals a federation of that client alone
    torch.manual_seed(0)
    alone = make()
    run_rounds(alone, make, [_synthetic_client(0)], rounds=2, local_epochs=1, lr=1e-2, batch_size=64)
    for entry in log:
        assert entry["clients"] == ["d0"]
        assert re.search("malformed upload: " + why, entry["dropped"]["d1"]), entry["dropped"]
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_nan_batch_in_a_local_update_is_skipped_and_logged(capsys):
    c = _synthetic_client(0)
    e_w, e_l, r_w, r_l = c._routing["train"]
    r_w = r_w.clone()
    r_w[7, 1] = float("inf")  # one poisoned RM score: exactly one of the epoch's 4 batches holds it
    c._routing["train"] = (e_w, e_l, r_w, r_l)
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    torch.manual_seed(0)
    init = make().state_dict()
    state, n, loss = c.router_update(init, make, epochs=1, lr=1e-2, batch_size=64, seed=0)
    out = capsys.readouterr().out  # inf -> finite loss (log sigmoid saturates) but a NaN gradient
    assert out.count("router client d0: non-finite gradient, batch skipped") == 1, out
    # the other three batches trained: finite, moved weights and a finite mean loss
    assert all(torch.isfinite(v).all() for v in state.values()) and math.isfinite(loss)
    assert not torch.equal(state["net.0.weight"], init["net.0.weight"])


def test_router_weights_are_checked_before_they_are_loaded(tmp_path):
    import pickle

    from safetensors.torch import save_file

    model = router.Router(D, K, hidden=16)
    good = tmp_path / "router.safetensors"
    save_file(model.state_dict(), str(good))
    assert set(safe_io.load_router_state(good, router.Router(D, K, hidden=16))) == set(model.state_dict())
    planted = {
        "pickle": (lambda p: p.write_bytes(pickle.dumps(model.state_dict())), "not a valid safetensors file"),
        "K": (lambda p: save_file(router.Router(D, K + 1, hidden=16).state_dict(), str(p)),
              "router has 4 outputs but the federation has 3 reward models"),
        "keys": (lambda p: save_file({**model.state_dict(), "extra": torch.zeros(1)}, str(p)),
                 "unexpected \\['extra'\\]"),
        "shape": (lambda p: save_file(router.Router(D, K, hidden=8).state_dict(), str(p)),
                  "'net.0.bias' has shape \\(8,\\), expected \\(16,\\)"),  # keys in sorted order
        "nan": (lambda p: save_file({**model.state_dict(), "feat_std": torch.full((D,), float("nan"))}, str(p)),
                "'feat_std' holds NaN"),
    }
    for name, (plant, msg) in planted.items():
        path = tmp_path / f"{name}.safetensors"
        plant(path)
        with pytest.raises(ValueError, match=msg):
            safe_io.load_router_state(path, router.Router(D, K, hidden=16))
    (tmp_path / "router.pt").write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        safe_io.load_router_state(tmp_path / "router.pt", model)


class _NoJudge(Client):
    def judge(self, *a, **k):
        raise ConnectionError("judge went offline")


def test_crossval_rounds_log_their_evidence_and_survive_a_failing_judge(capsys):
    clients = [_synthetic_client(k) for k in range(K)]
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    with pytest.raises(ValueError, match="unknown aggregation rule 'mean'"):
        run_rounds(make(), make, clients, rounds=1, local_epochs=1, lr=1e-2, batch_size=64, aggregate="mean")
    # one client per round: no one else judges its upload, so it is kept and crossval is fedavg
    runs = {}
    for rule in ("fedavg", "crossval"):
        torch.manual_seed(0)
        runs[rule] = make()
        log = run_rounds(runs[rule], make, [_synthetic_client(k) for k in range(K)], rounds=3, local_epochs=1,
                         lr=1e-2, batch_size=64, fraction=0.34, seed=1, aggregate=rule)
    assert all(e["rejected"] == [] and math.isnan(next(iter(e["crossval"].values()))) for e in log)
    assert all(torch.equal(v, runs["fedavg"].state_dict()[k]) for k, v in runs["crossval"].state_dict().items())
    # a judge that fails is logged and has no say; the round goes on
    clients[2].__class__ = _NoJudge
    log = run_rounds(make(), make, clients, rounds=1, local_epochs=1, lr=1e-2, batch_size=64, aggregate="crossval")
    assert "judge d2 gave no scores (ConnectionError: judge went offline)" in capsys.readouterr().out
    assert sorted(log[0]["clients"]) == ["d0", "d1", "d2"]
    assert all(math.isfinite(v) for v in log[0]["crossval"].values())  # d2 judged by d0 and d1
