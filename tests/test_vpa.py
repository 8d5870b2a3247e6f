"""FedVPA-GP (vpa.py, V1-V7): Gumbel-Softmax, KL, orthogonal loss, mixture prior, federated
training on a synthetic two-group problem, the MoR scoring interface. Synthetic features only:
nothing here needs runs/default."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import reward
import vpa

torch.set_num_threads(1)

# -- V2: Gumbel-Softmax ------------------------------------------------------------------------


def test_gumbel_softmax_shapes_and_one_hot():
    logits = torch.randn(5, 3, 4)
    z, q = vpa.gumbel_softmax(logits, tau=0.7, hard=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == q.shape == (5, 3, 4)
    assert torch.all((z == 0) | (z == 1)) and torch.allclose(z.sum(-1), torch.ones(5, 3))
    assert torch.allclose(q, F.softmax(logits, -1))
    soft, _ = vpa.gumbel_softmax(logits, tau=0.7, hard=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z.argmax(-1), soft.argmax(-1))  # same noise: the hard sample is the soft one's argmax
    with pytest.raises(ValueError, match="temperature"):
        vpa.gumbel_softmax(logits, tau=0.0)


def test_gumbel_softmax_straight_through_gradient_is_the_soft_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 5)  # any downstream use of the sample
    grads = {}
    for hard in (True, False):
        logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        z, _ = vpa.gumbel_softmax(logits, tau=0.5, hard=hard, generator=torch.Generator().manual_seed(2))
        (z * w).sum().backward()
        grads[hard] = logits.grad.clone()
    assert grads[True].abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], atol=1e-6)


def test_temperature_schedule_anneals_then_stays():
    taus = [vpa.temperature(s, 100, 1.0, 0.25, anneal=0.5) for s in (0, 25, 50, 99)]
    assert taus[0] == pytest.approx(1.0) and taus[1] == pytest.approx(0.5)
    assert taus[2] == pytest.approx(0.25) and taus[3] == pytest.approx(0.25)


# -- V5, V6, V7 --------------------------------------------------------------------------------


def test_categorical_kl_hand_cases():
    q, pi = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert vpa.categorical_kl(q, pi).item() == pytest.approx(want, rel=1e-6)
    # a zero in q contributes nothing (0 log 0 = 0); batched rows
    qs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    kl = vpa.categorical_kl(qs, torch.tensor([0.5, 0.25, 0.25]))
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert kl[1].item() == pytest.approx(0.2 * math.log(0.4) + 0.3 * math.log(1.2) + 0.5 * math.log(2.0), rel=1e-5)
    assert vpa.categorical_kl(qs[1], qs[1]).item() == pytest.approx(0.0, abs=1e-7)


def test_orthogonal_loss_zero_iff_orthogonal():
    assert vpa.orthogonal_loss(torch.eye(3, 5) * 4.0).item() == pytest.approx(0.0, abs=1e-7)
    Q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    assert vpa.orthogonal_loss(Q.T).item() == pytest.approx(0.0, abs=1e-6)  # 4 orthonormal rows of R^6
    # cos([1,0],[1,1])^2 = cos([0,1],[1,1])^2 = 1/2, cos([1,0],[0,1]) = 0; scale does not matter
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    assert vpa.orthogonal_loss(v).item() == pytest.approx(1.0, rel=1e-6)
    assert vpa.orthogonal_loss(torch.tensor([[1.0, 2.0], [-2.0, -4.0]])).item() == pytest.approx(1.0, rel=1e-6)


def test_mixture_prior_is_the_n_weighted_mean_floored():
    ups = [vpa.Upload({}, 1, torch.tensor([1.0, 0.0]), 0.0, 0.0), vpa.Upload({}, 3, torch.tensor([0.0, 1.0]), 0.0, 0.0)]
    assert torch.allclose(vpa.mixture_prior(ups, 0.0), torch.tensor([0.25, 0.75]))
    assert torch.allclose(vpa.mixture_prior(ups, 0.1), torch.tensor([0.9 * 0.25 + 0.05, 0.9 * 0.75 + 0.05]))


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        vpa.VPA(8, vpa.VPAConfig(prototypes=1))
    with pytest.raises(ValueError, match="no training pairs"):
        vpa.ClientFeatures("empty", "a", torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        vpa.ClientFeatures("c", "a", torch.zeros(3, 8), torch.zeros(2, 8), torch.empty(0, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="no clients"):
        vpa.train_federated("vpa", [], vpa.VPAConfig(), 0)
    with pytest.raises(ValueError, match="kind"):
        vpa.train_federated("bogus", two_group_clients(), vpa.VPAConfig(rounds=1), 0)


# -- a synthetic federation with conflicting preferences -----------------------------------------

D = 6
FAST = dict(prototypes=3, hidden=32, context=8, targets=16, episodes=8, local_steps=10, lr=5e-3,
            eval_contexts=16)


def two_group_clients(n=400, held=200, seed=0):
    """4 clients, 2 groups. Utility u_A = e0 + 2 e1, u_B = e0 - 2 e1: the groups agree on e0
    and disagree on e1, so one reward for both can only use e0 (~65% per pair)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, group in enumerate(["A", "B", "A", "B"]):
        u = torch.tensor([1.0, 2.0 if group == "A" else -2.0, 0, 0, 0, 0])
        parts = []
        for m in (n, held):
            a, b = torch.randn(m, D, generator=g), torch.randn(m, D, generator=g)
            first = (a @ u > b @ u).unsqueeze(-1)
            parts += [torch.where(first, a, b), torch.where(first, b, a)]  # chosen, rejected
        out.append(vpa.ClientFeatures(f"c{k}{group}", group, *parts))
    return out


@pytest.fixture(scope="module")
def trained():
    clients = two_group_clients()
    cfg = vpa.VPAConfig(**FAST, rounds=12)
    model, prior, log = vpa.train_federated("vpa", clients, cfg, seed=0)
    mono, _, _ = vpa.train_federated("mono", clients, cfg, seed=0)
    return clients, cfg, model, prior, log, mono


def test_latent_separates_groups_and_beats_monolithic(trained):
    clients, cfg, model, prior, log, mono = trained
    ev, ev_mono = vpa.evaluate(model, clients, prior), vpa.evaluate(mono, clients)
    assert ev["group_purity"] >= 0.95 and ev["client_purity"] >= 0.9 and ev["used"] >= 2
    # clients of one group share a prototype, the groups use different ones
    a = ev["assignment"]
    assert a["c0A"] == a["c2A"] and a["c1B"] == a["c3B"] and a["c0A"] != a["c1B"]
    for c in clients:
        assert ev["accuracy"][c.name] >= 0.78, ev["accuracy"]
        assert ev["accuracy"][c.name] >= ev_mono["accuracy"][c.name] + 0.1, (ev["accuracy"], ev_mono["accuracy"])
    assert prior.shape == (cfg.prototypes,) and prior.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_a_few_rounds_lower_the_elbo(trained):
    clients, cfg, model, prior, log, _ = trained
    torch.manual_seed(0)  # train_federated's init for seed 0
    init = vpa.VPA(D, cfg)
    init.set_feature_stats(*vpa.pooled_feature_stats(clients))
    uniform = torch.full((cfg.prototypes,), 1.0 / cfg.prototypes)
    three, prior3, _ = vpa.train_federated("vpa", clients, vpa.VPAConfig(**FAST, rounds=3), seed=0)
    before, after3 = vpa.neg_elbo(init, clients, uniform), vpa.neg_elbo(three, clients, prior3)
    after12 = vpa.neg_elbo(model, clients, prior)
    assert after3 < before - 0.05 and after12 < after3, (before, after3, after12)
    assert log[-1]["loss"] < log[0]["loss"]


def test_same_seed_same_result():
    clients = two_group_clients(n=100, held=20)
    cfg = vpa.VPAConfig(**FAST, rounds=2)
    a, pa, la = vpa.train_federated("vpa", clients, cfg, seed=3)
    b, pb, lb = vpa.train_federated("vpa", clients, cfg, seed=3)
    assert la == lb and torch.equal(pa, pb)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# -- the MoR interface -------------------------------------------------------------------------


def test_reward_model_interface(trained, monkeypatch, tmp_path):
    clients, cfg, model, prior, _, _ = trained
    c = clients[1]
    rm = vpa.VPARewardModel.from_context(model, c.train_w, c.train_l)
    r = rm.rewards(c.held_w[:7])
    assert r.shape == (7,)
    with pytest.raises(RuntimeError, match="reference VLM"):
        rm.score(["img"], ["p"], ["y"])
    # score() runs the E2 features of the reference; stand in a lookup for the VLM forward
    feats = {f"y{i}": c.held_w[i] if i < 50 else c.held_l[i - 50] for i in range(100)}
    monkeypatch.setattr(vpa.routing, "features", lambda vlm, enc, im, pr, resp: torch.stack([feats[y] for y in resp]))
    rm.ref_vlm = object()
    s = rm.score(["img"] * 3, ["p"] * 3, ["y0", "y1", "y60"])
    assert s.shape == (3,) and torch.allclose(s, rm.rewards(torch.stack([feats["y0"], feats["y1"], feats["y60"]])))
    pairs = [data.Pair("img", "p", f"y{i}", f"y{i + 50}") for i in range(50)]
    rc, rr = reward.pair_scores(rm, pairs)  # the same helper MoR uses for any client RM
    assert rc.shape == rr.shape == (50,)
    assert reward.pair_accuracy(rm, pairs) == pytest.approx(vpa.heldout_accuracy(model, c, rm.q), abs=0.05)
    rm.calibrate(torch.cat([c.train_w, c.train_l]))
    z = rm.standardized(rm.rewards(torch.cat([c.train_w, c.train_l])))
    assert z.mean().abs() < 1e-4 and (z.std() - 1).abs() < 1e-4
    rm.save(tmp_path / "rm")
    back = vpa.VPARewardModel.load(tmp_path / "rm")
    assert torch.allclose(back.rewards(c.held_w[:7]), rm.rewards(c.held_w[:7]), atol=1e-6)
    assert back.mean == pytest.approx(rm.mean)
    with pytest.raises(ValueError, match="empty context"):
        vpa.VPARewardModel.from_context(model, c.train_w[:0], c.train_l[:0])


# -- the benchmark variant ---------------------------------------------------------------------


def test_conflict_clients_split_domains_and_flip_only_the_style_pair():
    exs = [data.Example(f"im{i}.png", "what color is the circle?", data.COLORS[i % 8], "color", f"im{i}")
           for i in range(20)]
    exs += [data.Example(f"jm{i}.png", "is the circle on the left or the right?", ["left", "right"][i % 2],
                         "position", f"jm{i}") for i in range(10)]
    fed = SimpleNamespace(clients={"color": exs[:20], "position": exs[20:]})
    out = vpa.conflict_clients(fed, seed=0)
    assert sorted(out) == ["color/full", "color/terse", "position/full", "position/terse"]
    imgs = {k: {p.image for p in pairs} for k, (_, pairs) in out.items()}
    assert not imgs["color/full"] & imgs["color/terse"] and len(imgs["color/full"]) == 10
    for name, (group, pairs) in out.items():
        style = [p for p in pairs if "the shape is" in p.chosen + p.rejected]
        assert len(style) == len(imgs[name])  # one style pair per question
        for p in style:
            full = p.chosen if group == "full" else p.rejected
            assert full.startswith("the shape is") and full.endswith(data.EOS)
        assert all(p.chosen.endswith(data.EOS) for p in pairs)
    assert vpa.conflict_clients(fed, seed=0) == out  # deterministic
