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


# ----------------------------------------------------------------------------------------------
# Robust aggregation (E4 under a rule), clients joining and leaving
# ----------------------------------------------------------------------------------------------

import math  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import router  # noqa: E402
from federated import RULES, aggregate, cross_scores, crossval_keep, drop_rm, join_rm, run_rounds  # noqa: E402


def test_aggregation_rules_on_hand_values():
    sds, n = [_sd(0), _sd(1), _sd(2), _sd(3), _sd(4)], [1, 1, 1, 1, 100]
    want = fedavg(sds, n)
    assert all(torch.equal(v, want[k]) for k, v in aggregate("fedavg", sds, n).items())  # bit for bit
    x = torch.stack([sd["w"] for sd in sds]).sort(0).values  # [5, 3, 4]
    assert torch.equal(aggregate("median", sds, n)["w"], x[2])  # counts do not matter: no n_k weighting
    assert torch.allclose(aggregate("trimmed", sds, n, trim=1)["w"], x[1:4].mean(0), atol=1e-6)
    assert torch.equal(aggregate("trimmed", sds, n, trim=9)["w"], x[2])  # at most (M - 1) // 2 per side
    assert torch.allclose(aggregate("median", sds[:4], n[:4])["w"],  # even M: mean of the middle two
                          torch.stack([sd["w"] for sd in sds[:4]]).sort(0).values[1:3].mean(0), atol=1e-6)
    assert torch.equal(aggregate("median", sds, n)["steps"], torch.tensor(7))
    for rule in RULES:
        with pytest.raises(ValueError, match=f"{rule}: client 1 'w' has shape"):
            aggregate(rule, [sds[0], dict(sds[1], w=sds[1]["w"].T)], [1, 1], scores=torch.zeros(2))
    with pytest.raises(ValueError, match="unknown rule 'krum'"):
        aggregate("krum", sds, n)
    # crossval: upload 2 costs the others 0.3 nats per pair, the rest about nothing
    scores = torch.tensor([0.01, -0.02, 0.30, 0.04, float("nan")])
    assert crossval_keep(scores, 5) == [True, True, False, True, True]  # the unjudged one is kept
    kept = aggregate("crossval", sds, n, scores=scores)
    assert all(torch.equal(v, fedavg([sds[i] for i in (0, 1, 3, 4)], [1, 1, 1, 100])[k]) for k, v in kept.items())
    assert crossval_keep(torch.tensor([0.01, 0.02, 0.03]), 3) == [True] * 3  # no one flagged: fedavg
    with pytest.raises(ValueError, match="needs one score per upload"):
        aggregate("crossval", sds, n)


def test_cross_scores_weigh_judges_by_their_label_information():
    # judges a, b, c; uploads a, b, c. c's labels are noise (accuracy 0.5): it has no say
    losses = torch.tensor([[0.50, 0.40, 0.52, 0.90],    # a: L(phi), L(phi_a), L(phi_b), L(phi_c)
                           [0.40, 0.43, 0.30, 0.50],    # b
                           [0.69, 0.80, 0.85, 0.60]])   # c
    acc = torch.tensor([0.9, 0.7, 0.5])
    s = cross_scores(losses, acc, ["a", "b", "c"], ["a", "b", "c"])
    va, vb = 0.8 ** 2, 0.4 ** 2
    want = [0.03, 0.02, (va * 0.40 + vb * 0.10) / (va + vb)]  # a by b only, b by a only (c has v = 0)
    assert s.tolist() == pytest.approx(want, abs=1e-6)
    assert crossval_keep(s, 3) == [True, True, False]
    # a judge that disagrees with the router more often than chance has no say either
    s2 = cross_scores(losses, torch.tensor([0.9, 0.1, 0.5]), ["a", "b", "c"], ["a", "b", "c"])
    assert math.isnan(s2[0].item()) and s2[2].item() == pytest.approx(0.40)


def test_client_judge_reports_the_routing_loss_and_mixed_accuracy():
    c = _domain_client("d0", [0], K=4, n=64)
    make = lambda: router.Router(D, 4, hidden=8)  # noqa: E731
    models_ = [make() for _ in range(3)]
    loss, acc = c.judge([m.state_dict() for m in models_], make, part="heldout")
    e_w, e_l, r_w, r_l = c._routing["heldout"]
    for m, l_, a in zip(models_, loss, acc):
        assert l_ == pytest.approx(router.routing_loss(m, e_w, e_l, r_w, r_l).item(), rel=1e-5)
        assert a == pytest.approx(c.mixed_accuracy(m), abs=1e-6)


def test_join_and_drop_keep_the_trained_routing(monkeypatch):
    torch.manual_seed(0)
    m = router.Router(D, 3, hidden=8)
    with torch.no_grad():
        m.net[2].bias.copy_(torch.tensor([2.0, -1.0, 0.5]))  # a confident router
    e = torch.randn(50, D)
    w = m.weights(e)
    j = join_rm(m)
    wj = j.weights(e)
    assert wj.shape == (50, 4)
    assert torch.allclose(wj[:, :3] / wj[:, :3].sum(-1, keepdim=True), w, atol=1e-6)  # ratios unchanged
    assert (wj[:, 3] <= 1 / (3 ** 2 + 1) + 1e-6).all()
    d = drop_rm(j, 1)
    assert torch.allclose(d.weights(e), torch.cat([wj[:, :1], wj[:, 2:]], -1) / (1 - wj[:, 1:2]), atol=1e-6)
    assert torch.allclose(drop_rm(j, 3).weights(e), w, atol=1e-6)  # join then leave: the same router
    with pytest.raises(ValueError, match="cannot remove RM 3"):
        drop_rm(m, 3)
    # the joining client's fit moves its row only; the other clients append / remove columns
    c = _domain_client("d3", [3], K=4, n=64)
    state, n, _ = c.fit_new_rm(j.state_dict(), lambda: router.Router(D, 4, hidden=8), 2, 1e-2, 32, 0)
    moved = {k for k, v in state.items() if not torch.equal(v, j.state_dict()[k])}
    assert moved == {"net.2.weight", "net.2.bias"} and n == c.n
    assert torch.equal(state["net.2.weight"][:3], j.state_dict()["net.2.weight"][:3])
    assert not torch.equal(state["net.2.weight"][3], j.state_dict()["net.2.weight"][3])
    r_w = c._routing["train"][2]
    c.drop_rm(1)
    assert torch.equal(c._routing["train"][2], r_w[:, [0, 2, 3]])
    # add_rm scores the cached pairs with the new RM (a stand-in here) and appends its column
    c._routing_pairs = {p: [None] * len(t[0]) for p, t in c._routing.items()}
    monkeypatch.setattr(reward, "pair_scores", lambda rm, pairs: (torch.ones(len(pairs)), torch.zeros(len(pairs))))
    c.add_rm(SimpleNamespace(standardized=lambda r: 2 * r - 1))
    for e_w, e_l, r_w, r_l in c._routing.values():
        assert r_w.shape[1] == 4 and (r_w[:, 3] == 1).all() and (r_l[:, 3] == -1).all()


# A synthetic federation: domain d has a centroid in feature space; RM k is the expert of domain k
# (BT margin ~ N(1.5, 1), ~93% pairs right), on other domains it is noise (margin ~ N(0, 1.5));
# the public client's RM ("pub", the last) has tiny margins everywhere.
D, LR, BATCH = 16, 2e-2, 128
CENTROIDS = torch.randn(4, D, generator=torch.Generator().manual_seed(0)) * 1.5


def _domain_client(name, domains, K, n=300, noisy_rm=None, random_labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = Client(name, [data.Pair(f"{name}_{i}.png", "q", "a", "b", name) for i in range(20)], seed=0)
    c._routing = {}
    for part, m in (("train", n), ("heldout", max(n // 2, 200))):
        d = torch.tensor(domains)[torch.randint(len(domains), (m,), generator=g)]
        e_w, e_l = (CENTROIDS[d] + 0.5 * torch.randn(m, D, generator=g) for _ in (0, 1))
        shared, noise = torch.randn(m, K, generator=g), 1.5 * torch.randn(m, K, generator=g)
        expert = d[:, None] == torch.arange(K)  # [m, K]
        margin = torch.where(expert, 1.5 + torch.randn(m, K, generator=g), noise)
        if noisy_rm is not None:
            margin[:, noisy_rm] = 0.1 * torch.randn(m, generator=g)
        r_w, r_l = shared + margin / 2, shared - margin / 2
        if random_labels:  # half the pairs swapped: labels independent of the truth
            f = (torch.rand(m, generator=g) < 0.5)[:, None]
            e_w, e_l, r_w, r_l = (torch.where(f, e_l, e_w), torch.where(f, e_w, e_l),
                                  torch.where(f, r_l, r_w), torch.where(f, r_w, r_l))
        c._routing[part] = (e_w, e_l, r_w, r_l)
    return c


def _train(clients, K, rounds, rule="fedavg", model=None, judges=None):
    """Router rounds from a fresh router (or `model`); -> (router, honest held-out accuracy per round)."""
    make = lambda: router.Router(D, K, hidden=16)  # noqa: E731
    if model is None:
        torch.manual_seed(0)
        model = make()
        model.set_feature_stats(*router.pooled_stats([c.feature_moments() for c in clients]))
    judges = judges or clients
    log = run_rounds(model, make, clients, rounds, 2, LR, BATCH, seed=0, aggregate=rule,
                     on_round=lambda m: {"acc": sum(c.mixed_accuracy(m) for c in judges) / len(judges)})
    return model, log


def test_a_random_label_client_drags_fedavg_and_crossval_resists():
    """3 honest domain clients + the public client: random labels, its own low-margin RM, the most
    pairs. Under L_route random labels are served best by the smallest margin, i.e. its RM."""
    honest = lambda: [_domain_client(f"d{k}", [k], K=4, noisy_rm=3, seed=k) for k in range(3)]  # noqa: E731
    pub = lambda: _domain_client("pub", [0, 1, 2], K=4, n=1200, noisy_rm=3, random_labels=True, seed=9)  # noqa: E731
    R = 8
    clean, clean_log = _train(honest(), 4, R)
    acc = {"clean": clean_log[-1]["acc"]}
    pub_weight = {}
    for rule in ("fedavg", "median", "crossval"):
        ev = honest()
        m, log = _train(honest() + [pub()], 4, R, rule, judges=ev)
        acc[rule] = log[-1]["acc"]
        pub_weight[rule] = max(c.routing_weights(m).mean(0)[3].item() for c in ev)
        if rule == "crossval":
            assert sum("pub" in e["rejected"] for e in log) >= R - 1 and not any(
                set(e["rejected"]) - {"pub"} for e in log), [e["rejected"] for e in log]
    print("honest held-out mixed accuracy", acc, "max weight on pub's RM", pub_weight)
    assert acc["clean"] > 0.9
    assert acc["fedavg"] < acc["clean"] - 0.03 and pub_weight["fedavg"] > 0.2  # the failure is real
    assert acc["crossval"] > acc["clean"] - 0.01 and pub_weight["crossval"] < 0.05
    assert acc["fedavg"] < acc["median"]  # coordinate-wise median helps, but honest domains differ too
    # without a noisy client nothing is flagged: crossval is fedavg bit for bit
    a, _ = _train(honest(), 4, 2, "fedavg")
    b, log = _train(honest(), 4, 2, "crossval")
    assert not any(e["rejected"] for e in log)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in b.state_dict().items())


def test_a_client_joins_and_leaves_without_training_from_scratch():
    """Trained router over 3 domains; client d3 joins with its RM. Rounds to reach the held-out
    accuracy of a router trained from scratch on all 4 (within 1 point): join <= 1/3 of scratch."""
    def clients(K, doms):
        out = [_domain_client(f"d{k}", [k], K=4, seed=k) for k in doms]
        for c in out:  # the federation before the join holds K RMs only
            c._routing = {p: (a, b, rw[:, :K], rl[:, :K]) for p, (a, b, rw, rl) in c._routing.items()}
        return out
    R = 12
    t = time.time()
    full, scratch = _train(clients(4, range(4)), 4, R)
    t_scratch = time.time() - t
    curve = [e["acc"] for e in scratch]
    target = curve[-1] - 0.01
    r_scratch = next(i + 1 for i, a in enumerate(curve) if a >= target)
    old, _ = _train(clients(3, range(3)), 3, R)
    t = time.time()
    joined = join_rm(old)  # server: one more row, existing ratios kept
    new = clients(4, [3])[0]
    state, _, _ = new.fit_new_rm(joined.state_dict(), lambda: router.Router(D, 4, hidden=16), 10, LR, BATCH, 0)
    joined.load_state_dict(state)  # one exchange with the joining client
    everyone = clients(4, range(4))
    start = sum(c.mixed_accuracy(joined) for c in everyone) / 4
    _, warm = _train(everyone, 4, r_scratch, model=joined)
    t_join = time.time() - t
    curve_j = [start] + [e["acc"] for e in warm]  # index = exchanges after the join's fit
    r_join = 1 + next(i for i, a in enumerate(curve_j) if a >= target)  # the fit counts as a round
    print(f"scratch: {r_scratch} rounds to {target + 0.01:.3f} ({t_scratch / R:.2f} s/round); join: {r_join} "
          f"rounds (fit + {r_join - 1} warm), accuracy after the fit {start:.3f}, {t_join:.1f} s for fit + "
          f"{r_scratch} rounds")
    assert 3 * r_join <= r_scratch
    # leave: d1 goes; with its row dropped, the router trained on all 4 is as good for the other
    # three as one trained from scratch on them, without a round
    left = clients(4, [0, 2, 3])
    for c in left:
        c.drop_rm(1)
    _, scratch3 = _train(left, 3, R)
    acc_drop = sum(c.mixed_accuracy(drop_rm(full, 1)) for c in left) / 3
    print(f"leave: dropped router {acc_drop:.3f} without a round, scratch {scratch3[-1]['acc']:.3f}")
    assert acc_drop > scratch3[-1]["acc"] - 0.01


def test_warm_start_keeps_reorders_drops_and_joins_rows():
    """federated.warm_start: rows of clients that stayed are copied (in the new order), a client
    that left loses its row, a joiner gets the kept rows' mean with bias - log(#kept): the
    stayers' weight ratios are exactly the trained router's."""
    from federated import warm_start
    torch.manual_seed(0)
    m = router.Router(D, 3, hidden=8)
    m.set_feature_stats(torch.randn(D), torch.rand(D) + 0.5)
    with torch.no_grad():
        m.net[2].bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    e = torch.randn(40, D)
    w = m.weights(e)  # over a, b, c
    new, rows = warm_start(m, ["a", "b", "c"], ["c", "a", "d"])  # b left, d joined, order changed
    assert rows == [2] and new.num_rms == 3
    wn = new.weights(e)
    ratio_new = wn[:, 0] / wn[:, 1]  # c / a
    assert torch.allclose(ratio_new, w[:, 2] / w[:, 0], atol=1e-5)
    assert torch.allclose(new.net[2].bias[2], (m.net[2].bias[0] + m.net[2].bias[2]) / 2 - math.log(2))
    assert torch.equal(new.feat_mean, m.feat_mean) and torch.equal(new.feat_std, m.feat_std)
    same, rows = warm_start(m, ["a", "b", "c"], ["a", "b", "c"])
    assert rows == [] and torch.allclose(same.weights(e), w)
    with pytest.raises(ValueError, match="none of"):
        warm_start(m, ["a", "b", "c"], ["x", "y"])
    # the joiner fits its own row, here the middle one of three: only that row and its bias move
    new, rows = warm_start(m, ["a", "b", "c"], ["a", "d", "c"])
    assert rows == [1]
    c = _domain_client("d", [1], K=3, n=64)
    st, _, _ = c.fit_new_rm(new.state_dict(), lambda: router.Router(D, 3, hidden=8), 2, 1e-2, 32, 0, row=1)
    W0, W1 = new.state_dict()["net.2.weight"], st["net.2.weight"]
    b0, b1 = new.state_dict()["net.2.bias"], st["net.2.bias"]
    assert torch.equal(W0[[0, 2]], W1[[0, 2]]) and not torch.equal(W0[1], W1[1])
    assert torch.equal(b0[[0, 2]], b1[[0, 2]]) and b0[1] != b1[1]


# ----------------------------------------------------------------------------------------------
# FedAvg-RM as McMahan's multi-round FedAvg, and the pooled client of the central router
# ----------------------------------------------------------------------------------------------

from federated import fedavg_rm_rounds, pooled_client  # noqa: E402


def test_fedavg_rm_rounds_start_every_client_from_the_global_model_and_average_by_n_k(monkeypatch):
    """Each round every client receives the current global RM, takes its share of its recipe's
    steps, and the server averages by n_k; over the rounds each client takes exactly
    sft_steps + steps local steps (its own RM's recipe)."""
    clients = [Client(f"c{i}", [data.Pair(f"c{i}_{j}.png", "q", "a", "b", "d") for j in range(n)], seed=0, heldout=0.2)
               for i, n in enumerate((10, 30))]
    got = []

    def local(self, rm, phase, steps, cfg, seed):  # a non-additive update: theta <- theta / 2 + k + 1
        got.append((self.name, phase, steps, rm.weight.detach().clone()))
        with torch.no_grad():
            rm.weight.mul_(0.5).add_(int(self.name[1]) + 1.0)
        return 0.0

    monkeypatch.setattr(Client, "local_rm_steps", local)
    rm = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(rm.weight, 4.0)
    log = fedavg_rm_rounds(rm, clients, reward.RMConfig(sft_steps=5, steps=3), rounds=2, seed=0)
    assert [(x["phase"], x["steps"]) for x in log] == [("sft", 3), ("sft", 2), ("bt", 2), ("bt", 1)]
    for c in clients:
        assert sum(s for name, _, s, _ in got if name == c.name) == 5 + 3
    w = [c.n / sum(x.n for x in clients) for c in clients]
    theta = 4.0
    for r in range(4):  # both clients receive the same global theta, then the n_k-mean
        assert [g[3].item() for g in got[2 * r: 2 * r + 2]] == pytest.approx([theta, theta])
        theta = w[0] * (theta / 2 + 1) + w[1] * (theta / 2 + 2)
    assert rm.weight.item() == pytest.approx(theta)


def test_local_rm_steps_train_a_real_rm_in_place(fed, tiny_dirs):
    c = Client("shape", _pairs(fed, "shape", n=24), seed=0, heldout=0.2)
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    rm = reward.RewardModel(vlm, proc)
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    cfg = reward.RMConfig(sft_steps=1, sft_batch=4, steps=1, batch=4)
    for phase in ("sft", "bt"):
        assert math.isfinite(c.local_rm_steps(rm, phase, 1, cfg, 0))
    assert any(not torch.equal(v, before[k]) for k, v in rm.state_dict().items())


def test_pooled_client_holds_every_clients_routing_pairs():
    a, b = _domain_client("a", [0], 2, n=40), _domain_client("b", [1], 2, n=60, seed=1)
    p = pooled_client([a, b])
    for part in ("train", "heldout"):
        for i in range(4):
            assert torch.equal(p._routing[part][i], torch.cat([a._routing[part][i], b._routing[part][i]]))
    assert p.n == a.n + b.n and p.name == "central"
