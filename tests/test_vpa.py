"""FedVPA-GP (fedvpa.py V1-V8, experiments/fedvpa_table.py): Gumbel-Softmax, the ELBO terms by hand, orthogonal
loss, the mixture prior and its warm-up, a constructed rich-get-richer collapse, federated
training on a synthetic two-group problem, the MoR scoring interface and its save/load, a
client's VPA RM built from pairs through a tiny reference VLM. Nothing here needs runs/default."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import fedvpa as vm
import mixture
import models
import reward
from experiments import fedvpa_table as vpa

torch.set_num_threads(1)

# -- V2: Gumbel-Softmax ------------------------------------------------------------------------


def test_gumbel_softmax_shapes_and_one_hot():
    logits = torch.randn(5, 3, 4)
    z, q = vm.gumbel_softmax(logits, tau=0.7, hard=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == q.shape == (5, 3, 4)
    assert torch.all((z == 0) | (z == 1)) and torch.allclose(z.sum(-1), torch.ones(5, 3))
    assert torch.allclose(q, F.softmax(logits, -1))
    soft, _ = vm.gumbel_softmax(logits, tau=0.7, hard=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z.argmax(-1), soft.argmax(-1))  # same noise: the hard sample is the soft one's argmax
    with pytest.raises(ValueError, match="temperature"):
        vm.gumbel_softmax(logits, tau=0.0)


def test_gumbel_softmax_straight_through_gradient_is_the_soft_gradient():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # any downstream use of the sample
    grads = {}
    for hard in (True, False):
        logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        z, _ = vm.gumbel_softmax(logits, tau=0.5, hard=hard, generator=torch.Generator().manual_seed(2))
        (z * w).sum().backward()
        grads[hard] = logits.grad.clone()
    assert grads[True].abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], atol=1e-6)


def test_temperature_schedule_anneals_then_stays():
    taus = [vm.temperature(s, 100, 1.0, 0.25, anneal=0.5) for s in (0, 25, 50, 99)]
    assert taus[0] == pytest.approx(1.0) and taus[1] == pytest.approx(0.5)
    assert taus[2] == pytest.approx(0.25) and taus[3] == pytest.approx(0.25)


# -- V4, V5: the ELBO terms against a hand computation --------------------------------------------


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _hand_model():
    """D = H = P = 2 with every weight set: identity layers, so each step is a few scalars."""
    cfg = vm.VPAConfig(prototypes=2, hidden=2, context=2, targets=2, episodes=1, beta=0.3)
    m = vm.VPA(2, cfg)
    with torch.no_grad():
        for lin in (m.phi[0], m.phi[2], m.trunk[0]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        m.to_logits.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        m.to_logits.bias.copy_(torch.tensor([0.1, -0.2]))
        m.w0.weight.copy_(torch.tensor([[0.3, -0.4]]))
        m.w0.bias.fill_(0.7)
        m.prototypes.copy_(torch.tensor([[1.0, 0.0], [-0.5, 1.5]]))
    return m, cfg


def test_elbo_terms_match_a_hand_computation():
    m, cfg = _hand_model()
    w = torch.tensor([[0.5, 1.0], [1.5, -0.5], [0.2, 0.3], [-1.0, 2.0]])
    l = torch.tensor([[0.0, 0.5], [0.5, 0.5], [1.0, -0.2], [0.3, 0.1]])
    ctx, tgt, prior = torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([0.8, 0.2])
    # V1: q = softmax(W mean_c gelu(gelu(w_c - l_c)) + b)
    pooled = [sum(_gelu(_gelu((w[c, j] - l[c, j]).item())) for c in (0, 1)) / 2 for j in (0, 1)]
    W, b = [[1.0, -1.0], [0.5, 2.0]], [0.1, -0.2]
    logits = [sum(W[p][j] * pooled[j] for j in (0, 1)) + b[p] for p in (0, 1)]
    q = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    # V3: r_p(e) = gelu(e) . (w0 + v_p) + b0
    readout = [[0.3 + 1.0, -0.4 + 0.0], [0.3 - 0.5, -0.4 + 1.5]]

    def r(e, p):
        return sum(_gelu(e[j].item()) * readout[p][j] for j in (0, 1)) + 0.7

    def logsig(x):
        return -math.log1p(math.exp(-x))
    loglik = sum(q[p] * logsig(r(w[t], p) - r(l[t], p)) for t in (2, 3) for p in (0, 1))
    kl = sum(q[p] * math.log(q[p] / prior[p].item()) for p in (0, 1))
    o = vm.episode_terms(m, w, l, ctx, tgt, prior, None)
    assert o["q"][0].tolist() == pytest.approx(q, rel=1e-5)
    assert o["loglik"].item() == pytest.approx(loglik, rel=1e-5)
    assert o["kl"].item() == pytest.approx(kl, rel=1e-5)
    # the -ELBO per target pair that neg_elbo reports (V4)
    c = vm.ClientFeatures("c", "a", w, l, w[:0], l[:0])
    want = -(loglik - cfg.beta * kl) / cfg.targets
    g = torch.Generator().manual_seed(0)
    ctx_e, tgt_e = vm.episodes(4, cfg.eval_contexts, cfg.context, cfg.targets, g)
    o_e = vm.episode_terms(m, w, l, ctx_e, tgt_e, prior, None)
    assert vpa.neg_elbo(m, [c], prior) == pytest.approx(
        (-(o_e["loglik"] - cfg.beta * o_e["kl"]) / cfg.targets).mean().item(), rel=1e-6)
    assert -(o["loglik"] - cfg.beta * o["kl"]).item() / cfg.targets == pytest.approx(want, rel=1e-5)
    # the sampled path: the forward uses exactly the prototype argmax(logits + Gumbel noise)
    u = torch.rand((1, 2), generator=torch.Generator().manual_seed(5))
    pick = int((torch.tensor([logits]) - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))).argmax())
    o_s = vm.episode_terms(m, w, l, ctx, tgt, prior, 0.5, torch.Generator().manual_seed(5))
    assert o_s["z"][0].tolist() == [float(p == pick) for p in (0, 1)]
    assert o_s["loglik"].item() == pytest.approx(sum(logsig(r(w[t], pick) - r(l[t], pick)) for t in (2, 3)), rel=1e-5)


def test_categorical_kl_hand_cases():
    q, pi = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert vm.categorical_kl(q, pi).item() == pytest.approx(want, rel=1e-6)
    qs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])  # a zero in q contributes nothing (0 log 0 = 0)
    kl = vm.categorical_kl(qs, torch.tensor([0.5, 0.25, 0.25]))
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert kl[1].item() == pytest.approx(0.2 * math.log(0.4) + 0.3 * math.log(1.2) + 0.5 * math.log(2.0), rel=1e-5)
    assert vm.categorical_kl(qs[1], qs[1]).item() == pytest.approx(0.0, abs=1e-7)


def test_orthogonal_loss_zero_iff_orthogonal():
    assert vm.orthogonal_loss(torch.eye(3, 5) * 4.0).item() == pytest.approx(0.0, abs=1e-7)
    Q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    assert vm.orthogonal_loss(Q.T).item() == pytest.approx(0.0, abs=1e-6)  # 4 orthonormal rows of R^6
    # cos([1,0],[1,1])^2 = cos([0,1],[1,1])^2 = 1/2, cos([1,0],[0,1]) = 0; scale does not matter
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    assert vm.orthogonal_loss(v).item() == pytest.approx(1.0, rel=1e-6)
    assert vm.orthogonal_loss(torch.tensor([[1.0, 2.0], [-2.0, -4.0]])).item() == pytest.approx(1.0, rel=1e-6)


# -- V6, V8: the mixture prior and its warm-up ---------------------------------------------------


def test_mixture_prior_is_the_n_weighted_mean():
    ups = [vm.Upload({}, 1, torch.tensor([1.0, 0.0]), 0.0, 0.0), vm.Upload({}, 3, torch.tensor([0.0, 1.0]), 0.0, 0.0)]
    assert torch.allclose(vm.mixture_prior(ups), torch.tensor([0.25, 0.75]))


def test_prior_burn_in_is_uniform_then_the_floored_mixture():
    pibar = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cfg = vm.VPAConfig(rounds=10, prior_warmup=0.4, prior_floor=0.2)
    pis = [vm.prior_for_round(pibar, r, cfg) for r in range(11)]
    for r in range(4):  # r < w R: the uniform, whatever the clients' posteriors say
        assert torch.allclose(pis[r], torch.full((4,), 0.25))
    for r in (4, 7, 10):  # after: (1 - eps) pibar + eps / P
        assert torch.allclose(pis[r], torch.tensor([0.8 + 0.05, 0.05, 0.05, 0.05]))
    assert all(p.min() >= 0.2 / 4 - 1e-7 and p.sum().item() == pytest.approx(1.0) for p in pis)
    # w = 0: the mixture (floored) from round 1, the method as first implemented
    cfg0 = vm.VPAConfig(rounds=10, prior_warmup=0.0, prior_floor=0.01)
    assert torch.allclose(vm.prior_for_round(pibar, 0, cfg0), torch.full((4,), 0.25))
    assert torch.allclose(vm.prior_for_round(pibar, 1, cfg0), 0.99 * pibar + 0.0025)


def weak_two_group_clients(n=400, held=200, seed=0):
    """Like two_group_clients, with a weaker conflict (u = e0 +- e1): the groups are harder to find,
    so whichever prototype leads early can take everybody."""
    return two_group_clients(n, held, seed, conflict=1.0)


def test_burn_in_prevents_a_constructed_rich_get_richer_collapse():
    """Prototype 0 starts dominant (its logit +1 for every context). Fed back from round 1, the
    mixture prior follows it until every client sits on it (one prototype, purity 0.5); with the
    burn-in (V8) the groups are found first and keep two prototypes."""
    clients = weak_two_group_clients()
    out = {}
    for w in (0.0, 0.5):
        cfg = vm.VPAConfig(**{**FAST, "context": 4}, rounds=12, prior_warmup=w)
        torch.manual_seed(1)
        init = vm.VPA(D, cfg)
        with torch.no_grad():
            init.to_logits.bias += torch.tensor([1.0, 0.0, 0.0])
        model, prior, log = vm.train_federated("vpa", clients, cfg, seed=1, init=init.state_dict())
        out[w] = (vpa.evaluate(model, clients, prior), prior, log)
    ev, prior, log = out[0.0]
    assert ev["used"] == 1 and ev["group_purity"] < 0.6 and ev["collapsed"], ev
    assert prior.max() > 0.9 and log[3]["usage"][0] > log[0]["usage"][0]  # the loop: usage and prior grow together
    ev, prior, log = out[0.5]
    assert ev["used"] >= 2 and ev["group_purity"] >= 0.9 and not ev["collapsed"], ev
    assert all(torch.allclose(torch.tensor(e["prior"]), torch.full((3,), 1 / 3), atol=1e-4) for e in log[:6])
    assert sorted(prior.tolist())[-2] > 0.3  # after the burn-in the mixture holds both groups


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        vm.VPA(8, vm.VPAConfig(prototypes=1))
    with pytest.raises(ValueError, match="prior_warmup"):
        vm.VPAConfig(prior_warmup=1.5).validate()
    with pytest.raises(ValueError, match="no training pairs"):
        vm.ClientFeatures("empty", "a", torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        vm.ClientFeatures("c", "a", torch.zeros(3, 8), torch.zeros(2, 8), torch.empty(0, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="no clients"):
        vm.train_federated("vpa", [], vm.VPAConfig(), 0)
    with pytest.raises(ValueError, match="kind"):
        vm.train_federated("bogus", two_group_clients(), vm.VPAConfig(rounds=1), 0)


# -- a synthetic federation with conflicting preferences -----------------------------------------

D = 6
FAST = dict(prototypes=3, hidden=32, context=8, targets=16, episodes=8, local_steps=10, lr=5e-3,
            eval_contexts=16)


def two_group_clients(n=400, held=200, seed=0, conflict=2.0):
    """4 clients, 2 groups. Utility u_A = e0 + c e1, u_B = e0 - c e1 (c = `conflict`): the groups
    agree on e0 and disagree on e1, so one reward for both can only use e0 (~65% per pair at c = 2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, group in enumerate(["A", "B", "A", "B"]):
        u = torch.tensor([1.0, conflict if group == "A" else -conflict, 0, 0, 0, 0])
        parts = []
        for m in (n, held):
            a, b = torch.randn(m, D, generator=g), torch.randn(m, D, generator=g)
            first = (a @ u > b @ u).unsqueeze(-1)
            parts += [torch.where(first, a, b), torch.where(first, b, a)]  # chosen, rejected
        out.append(vm.ClientFeatures(f"c{k}{group}", group, *parts))
    return out


@pytest.fixture(scope="module")
def trained():
    clients = two_group_clients()
    cfg = vm.VPAConfig(**FAST, rounds=12)
    model, prior, log = vm.train_federated("vpa", clients, cfg, seed=0)
    mono, _, _ = vm.train_federated("mono", clients, cfg, seed=0)
    return clients, cfg, model, prior, log, mono


def test_latent_separates_groups_and_beats_monolithic(trained):
    clients, cfg, model, prior, log, mono = trained
    ev, ev_mono = vpa.evaluate(model, clients, prior), vpa.evaluate(mono, clients)
    assert ev["group_purity"] >= 0.95 and ev["client_purity"] >= 0.9 and ev["used"] >= 2 and not ev["collapsed"]
    a = ev["assignment"]  # clients of one group share a prototype, the groups use different ones
    assert a["c0A"] == a["c2A"] and a["c1B"] == a["c3B"] and a["c0A"] != a["c1B"]
    for c in clients:
        assert ev["accuracy"][c.name] >= 0.78, ev["accuracy"]
        assert ev["accuracy"][c.name] >= ev_mono["accuracy"][c.name] + 0.1, (ev["accuracy"], ev_mono["accuracy"])
    assert prior.shape == (cfg.prototypes,) and prior.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_per_round_log_traces_prior_usage_and_entropy(trained):
    clients, cfg, _, prior, log, _ = trained
    assert [e["round"] for e in log] == list(range(cfg.rounds))
    assert torch.allclose(torch.tensor(log[0]["prior"]), torch.full((cfg.prototypes,), 1 / cfg.prototypes), atol=1e-4)
    for e in log:
        assert sum(e["usage"]) == pytest.approx(1.0, abs=1e-3) and sum(e["prior"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= e["H_q"] <= math.log(cfg.prototypes) + 1e-6 and e["kl"] >= -1e-6
        assert sorted(e["qbar"]) == sorted(c.name for c in clients)
    assert log[-1]["H_q"] < log[0]["H_q"]  # the posteriors sharpen as the groups are found


def test_a_few_rounds_lower_the_elbo(trained):
    clients, cfg, model, prior, log, _ = trained
    torch.manual_seed(0)  # train_federated's init for seed 0
    init = vm.VPA(D, cfg)
    init.set_feature_stats(*vm.pooled_feature_stats(clients))
    uniform = torch.full((cfg.prototypes,), 1.0 / cfg.prototypes)
    three, prior3, _ = vm.train_federated("vpa", clients, vm.VPAConfig(**FAST, rounds=3), seed=0)
    before, after3 = vpa.neg_elbo(init, clients, uniform), vpa.neg_elbo(three, clients, prior3)
    after12 = vpa.neg_elbo(model, clients, prior)
    assert after3 < before - 0.05 and after12 < after3, (before, after3, after12)
    assert log[-1]["loss"] < log[0]["loss"]


def test_same_seed_same_result():
    clients = two_group_clients(n=100, held=20)
    cfg = vm.VPAConfig(**FAST, rounds=2)
    a, pa, la = vm.train_federated("vpa", clients, cfg, seed=3)
    b, pb, lb = vm.train_federated("vpa", clients, cfg, seed=3)
    assert la == lb and torch.equal(pa, pb)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# -- the MoR interface -------------------------------------------------------------------------


def test_reward_model_interface_and_save_load(trained, monkeypatch, tmp_path):
    clients, cfg, model, prior, _, _ = trained
    c = clients[1]
    rm = vm.VPARewardModel.from_context(model, c.train_w, c.train_l)
    r = rm.rewards(c.held_w[:7])
    assert r.shape == (7,)
    with pytest.raises(RuntimeError, match="reference VLM"):
        rm.score(["img"], ["p"], ["y"])
    # score() runs the E2 features of the reference; stand in a lookup for the VLM forward
    feats = {f"y{i}": c.held_w[i] if i < 50 else c.held_l[i - 50] for i in range(100)}
    monkeypatch.setattr(vm.routing, "features", lambda vlm, enc, im, pr, resp: torch.stack([feats[y] for y in resp]))
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
    # save / load round trip: same rewards, same standardisation, same info; loadable by path
    rm.info["client"] = "c1B"
    rm.save(tmp_path / "rm")
    back = vpa.load_client_rm(tmp_path / "rm")
    assert isinstance(back, vm.VPARewardModel)
    assert torch.allclose(back.rewards(c.held_w[:7]), rm.rewards(c.held_w[:7]), atol=1e-6)
    assert torch.equal(back.q, rm.q) and (back.mean, back.std) == (rm.mean, rm.std) and back.info["client"] == "c1B"
    with pytest.raises(ValueError, match="empty context"):
        vm.VPARewardModel.from_context(model, c.train_w[:0], c.train_l[:0])


def test_a_tampered_vpa_rm_directory_is_refused(trained, tmp_path):
    _, _, model, _, _, _ = trained
    rm = vm.VPARewardModel(model, torch.tensor([0.5, 0.5, 0.0]))
    rm.save(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="not a VPA reward-model directory"):
        vm.VPARewardModel.load(tmp_path)
    (tmp_path / "ok" / "extra.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="unexpected file"):
        vm.VPARewardModel.load(tmp_path / "ok")
    (tmp_path / "ok" / "extra.pkl").unlink()
    meta = json.loads((tmp_path / "ok" / "vpa.json").read_text())
    (tmp_path / "ok" / "vpa.json").write_text(json.dumps(dict(meta, std=0.0)))
    with pytest.raises(ValueError, match="std"):
        vm.VPARewardModel.load(tmp_path / "ok")
    (tmp_path / "ok" / "vpa.json").write_text(json.dumps(meta))
    (tmp_path / "ok" / "vpa.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        vm.VPARewardModel.load(tmp_path / "ok")


def test_train_client_rm_from_pairs_through_a_tiny_reference(fed, tmp_path):
    """A client holding two conflicting groups: its VPA RMs (one per group) are written, load by
    path and score raw text through the reference VLM like any client RM."""
    ref = models.build_tiny("qwen2_vl", tmp_path / "ref", seed=0)
    conf = vpa.conflict_clients(SimpleNamespace(clients={"color": fed.clients["color"][:24]}), seed=0)
    pairs = conf["color/terse"][1] + conf["color/full"][1]
    groups = ["terse"] * len(conf["color/terse"][1]) + ["full"] * len(conf["color/full"][1])
    cfg = vm.VPAConfig(prototypes=2, hidden=8, context=4, targets=4, episodes=2, local_steps=2, rounds=2)
    out = vpa.train_client_rm("color", pairs, groups, ref, tmp_path / "rms", seed=0, cfg=cfg,
                              cache=tmp_path / "cache" / "f.safetensors")
    assert sorted(out) == ["full", "terse"]
    assert all(m["n_pairs"] > 0 for m in out.values()) and sum(m["heldout_pairs"] for m in out.values()) > 0
    assert all(0 <= m["heldout_accuracy"] <= 1 for m in out.values() if m["heldout_pairs"])  # nan: none held out
    ref_vlm, proc = models.load_vlm(ref)
    rm = vpa.load_client_rm(tmp_path / "rms" / "full", ref_vlm, proc)
    assert rm.info["group"] == "full" and rm.info["reference"] == vpa.reference_fingerprint(ref)
    p = pairs[-1]
    r = rm.score([p.image, p.image], [p.prompt, p.prompt], [p.chosen, p.rejected])
    table = vpa.feature_table([(p.image, p.prompt, p.chosen), (p.image, p.prompt, p.rejected)], ref,
                              tmp_path / "cache" / "f.safetensors")  # the cached features of training
    want = rm.rewards(torch.stack([table[(p.image, p.prompt, p.chosen)], table[(p.image, p.prompt, p.rejected)]]))
    assert torch.allclose(r, want, atol=1e-4)
    assert torch.isfinite(rm.standardized(r)).all()
    with pytest.raises(ValueError, match="group tags"):
        vpa.train_client_rm("color", pairs, groups[:-1], ref, tmp_path / "x", seed=0, cfg=cfg)
    with pytest.raises(ValueError, match="group tags"):
        vpa.train_client_rm("color", pairs, ["../up"] * len(pairs), ref, tmp_path / "x", seed=0, cfg=cfg)


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


# -- GRPO with a VPA client RM (experiments/fedvpa_table.py --grpo, vpa_eval's answer styles) -------------------------

import grpo  # noqa: E402
import router  # noqa: E402
from experiments import fedvpa_eval as vpa_eval  # noqa: E402


def test_answer_styles_judge_and_guard():
    E = data.EOS
    assert vpa_eval.answer_style("red" + E) == ("terse", "red")
    assert vpa_eval.answer_style("the shape is red" + E) == ("full", "red")
    assert vpa_eval.answer_style("the shape is on the left" + E) == ("full", "left")
    assert vpa_eval.answer_style("the shape is at the top" + E) == ("full", "top")
    for bad in ("the shape is red", "the shape is red red" + E, "the shape is on the red" + E, "the red" + E,
                "the shape is" + E, E, "red red" + E):
        assert vpa_eval.answer_style(bad) == ("other", None), bad
    judge = vpa_eval.StyleJudge()
    assert [judge(r, "red") for r in ("red" + E, "the shape is red" + E, "blue" + E, "the shape red" + E)] == \
        [True, True, False, False]
    assert judge.shares() == {"terse": 0.5, "full": 0.25, "other": 0.25}
    # the guard ranks only the malformed sample last; a full sentence keeps the RM's reward
    inner = lambda im, pr, resp, e: torch.tensor([3.0, 1.0, 2.0, 5.0])  # noqa: E731
    guard = vpa_eval.StyleGuard(inner, group=4, gold={("i", "p"): "red"})
    r = guard(["i"] * 4, ["p"] * 4, ["the shape is red" + E, "red" + E, "blue" + E, "red red" + E], None)
    assert r.tolist() == [3.0, 1.0, 2.0, 0.0]
    assert guard.log == [{"terse": 0.5, "full": 0.25, "other": 0.25, "accuracy": 0.5}]


def test_vpa_client_rm_in_grpo_reward_callables(trained, monkeypatch):
    """A VPA client RM in grpo's reward callables, scoring text through (a stand-in for) the
    reference: one standardised reward per sample, the full-style group's posterior ranks the full
    sentence over the terse answer and the terse group's posterior the reverse, the router's
    mixture and the format guard work on it unchanged, and the BT RM of the same kind too.
    Features: e0 = +1 for the right answer, e1 = +1 for a full sentence; the synthetic group A
    (u = e0 + 2 e1) is the full-style labeller, B (u = e0 - 2 e1) the terse one."""
    clients, cfg, model, _, _, mono = trained
    E = data.EOS

    def fake_features(vlm, enc, images, prompts, responses):
        rows = []
        for y in responses:
            style, w = vpa_eval.answer_style(y)
            rows.append(torch.tensor([1.0 if w == "red" else -1.0, 1.0 if style == "full" else -1.0, 0, 0, 0, 0]))
        return torch.stack(rows)
    monkeypatch.setattr(vm.routing, "features", fake_features)
    full, terse = (vm.VPARewardModel.from_context(model, c.train_w, c.train_l) for c in (clients[0], clients[1]))
    bt = vm.BTFeatureRewardModel(mono)
    for rm in (full, terse, bt):
        rm.ref_vlm = object()  # score() runs the (patched) reference features
        rm.calibrate(torch.cat([clients[0].train_w, clients[1].train_w]))
    N, G = 2, 4
    resp = ["the shape is red" + E, "red" + E, "blue" + E, "the shape is blue" + E,  # prompt 0
            "red red" + E, "red" + E, "the shape is red" + E, "red" + E]  # prompt 1: a repeat, a malformed
    images, prompts = ["i0"] * G + ["i1"] * G, ["p0"] * G + ["p1"] * G
    out = {}
    for name, rm in (("full", full), ("terse", terse), ("bt", bt)):
        fn = mixture.SingleReward(rm)
        out[name] = fn(images, prompts, resp, None)
        assert out[name].shape == (N * G,) and torch.isfinite(out[name]).all()
        assert fn.calls == [7]  # score_unique: the repeated (i1, p1, red) is scored once
        assert out[name][5] == out[name][7]
    assert out["full"][0] > out["full"][1] and out["full"][6] > out["full"][5]  # full sentence > terse, same answer
    assert out["terse"][1] > out["terse"][0] and out["terse"][5] > out["terse"][6]
    assert out["full"][0] > out["full"][3] and out["terse"][1] > out["terse"][2]  # both still prefer the right answer
    # MoR's mixture with a router over [VPA RM, BT RM], unchanged (E3), and the style-aware guard
    e = torch.randn(N * G, 8, generator=torch.Generator().manual_seed(0))
    src = router.Router(8, 2, hidden=4)
    mixed = mixture.MixedReward([full, bt], src)(images, prompts, resp, e)
    assert torch.allclose(mixed, router.mixed_reward(src.weights(e), torch.stack([out["full"], out["bt"]], 1)))
    guarded = vpa_eval.StyleGuard(mixture.SingleReward(full), G)(images, prompts, resp, e)
    keep = [i for i in range(N * G) if i != 4]
    assert torch.equal(guarded[keep], out["full"][keep]) and guarded[4] == out["full"][5:].min() - 1
    adv = grpo.group_advantages(guarded, G)
    assert adv.shape == (N * G,) and torch.isfinite(adv).all() and adv[0] > adv[1]


def test_grpo_experiment_end_to_end_at_toy_size(fed, tmp_path):
    """grpo_experiment through a tiny random reference: RMs written, both starts, every arm,
    one GRPO step each, a judged evaluation, the markdown section; too short an answer length
    for a full sentence is refused."""
    run = tmp_path / "run"
    models.build_tiny("qwen2_vl", run / "base", seed=0)
    pool = [(e, g) for e, g in zip(fed.pool, fed.pool_gold) if e.domain == "color"][:6]
    small = SimpleNamespace(clients={"color": fed.clients["color"][:20]},
                            public=[e for e in fed.public if e.domain == "color"][:12],
                            pool=[e for e, _ in pool], pool_gold=[g for _, g in pool], test={"color": fed.test["color"][:6]})
    cfg = vm.VPAConfig(prototypes=2, hidden=8, context=4, targets=4, episodes=2, local_steps=2, rounds=2)
    gcfg = grpo.GRPOConfig(steps=1, prompts=2, group=2, max_new_tokens=6)
    cache, seen = tmp_path / "cache" / "f.safetensors", []
    res = vpa.grpo_experiment(small, 0, [0], cfg, run, tmp_path / "out", cache, "color", gcfg, start_steps=1,
                              on_seed=seen.append)
    assert len(seen) == 1 and res["grpo_config"]["format_guard"] is False and res["full_tokens"] == 5
    assert sorted(res["starts"]) == sorted(vpa.GRPO_ARMS)
    for st in res["starts"].values():
        assert st["logp"]["terse"] < 0 and st["logp"]["full"] < 0 and 0 <= st["accuracy"] <= 1
    for start, arms in vpa.GRPO_ARMS.items():
        assert sorted(res["runs"][start]) == sorted(arms)
        for per in res["runs"][start].values():
            (x,) = per
            assert 0 <= x["accuracy"] <= 1 and sum(x["greedy"].values()) == pytest.approx(1.0)
            assert x["rm_rows"] > 0 and x["seed"] == 0
    assert all(0 <= per[0]["prefers_full"] <= 1 for per in res["rms"].values())
    for g in ("full", "terse"):
        assert (tmp_path / "out" / "vpa-clients" / "color" / "seed0" / g / "vpa.json").exists()
    start = tmp_path / "out" / "vpa-grpo" / "two-style-color"
    stamp = (start / "two_style.json").stat().st_mtime_ns
    assert vpa.two_style_start(small, "color", run / "base", start, 1) == start  # same recipe: reused
    assert (start / "two_style.json").stat().st_mtime_ns == stamp
    md = vpa.results_markdown({}, cfg, [0], "cmd", 1.0, None, dict(res, command="python -m experiments.fedvpa_table --grpo"))
    assert "## GRPO with a VPA client RM" in md and "| two-style start | VPA terse |" in md
    with pytest.raises(ValueError, match="takes 5 tokens"):
        vpa.grpo_experiment(small, 0, [0], cfg, run, tmp_path / "out", cache, "color",
                            grpo.GRPOConfig(steps=1, max_new_tokens=4))


def test_main_grpo_flag_runs_the_block_and_keeps_the_table(fed, tmp_path, monkeypatch):
    """`python -m experiments.fedvpa_table --grpo`: no table rerun, the GRPO block gets the CLI's GRPO settings, and
    vpa-results.json/.md keep the earlier table, its header, and gain the GRPO section."""
    prev = {"config": {}, "data_seed": 0, "seeds": [0, 1, 2, 3, 4], "command": "python -m experiments.fedvpa_table --table", "seconds": 9.0,
            "results": {}, "client_rm": {"color/full": {"vpa": vpa._ms([0.9]), "bt": vpa._ms([0.8])}}}
    (tmp_path / "vpa-results.json").write_text(json.dumps(prev))
    seen = {}
    x = {"accuracy": 0.9, "greedy": {"terse": 0.25, "full": 0.75, "other": 0.0}, "sampled_last10": {"full": 0.7},
         "kl_last10": 0.1, "seconds": 3.0}
    rm = {"answer_pairs": 0.97, "style_pairs": {"full": 0.9, "terse": 0.1}, "answer_top1": 0.8, "prefers_full": 0.85,
          "group_purity": 1.0}
    start = {"logp": {"terse": -0.2, "full": -40.0}, "sampled": {"terse": 1.0, "full": 0.0, "other": 0.0},
             "accuracy": 0.8, "greedy": {"full": 0.0}}

    def stub(fed_, data_seed, seeds, cfg, run_dir, out, cache, domain, gcfg, start_steps, on_seed):
        seen.update(seeds=seeds, domain=domain, steps=gcfg.steps, max_new_tokens=gcfg.max_new_tokens, start=start_steps)
        res = {"domain": domain, "grpo_config": vars(gcfg), "start_steps": start_steps, "full_tokens": 5, "seeds": seeds,
               "pairs": {"terse": 10, "full": 12}, "starts": {"reference": start}, "rms": {"VPA full": [rm]},
               "runs": {"reference": {"VPA full": [x]}}, "seconds": 1.0}
        on_seed(res)
        return res
    monkeypatch.setattr(vpa, "grpo_experiment", stub)
    monkeypatch.setattr(vpa, "run_experiment", lambda *a, **k: pytest.fail("--grpo alone must not rerun the table"))
    monkeypatch.setattr(vpa.data, "build_federation", lambda seed: fed)
    assert vpa.main(["--run-dir", str(tmp_path), "--grpo", "--seeds", "0", "--grpo-steps", "3", "--max-new-tokens", "7",
                     "--two-style-steps", "2"]) == 0
    assert seen == {"seeds": [0], "domain": "color", "steps": 3, "max_new_tokens": 7, "start": 2}
    out = json.loads((tmp_path / "vpa-results.json").read_text())
    assert (out["seeds"], out["command"], out["client_rm"]) == (prev["seeds"], prev["command"], prev["client_rm"])
    assert "--grpo" in out["grpo"]["command"] and out["grpo"]["threads"] == 1
    md = (tmp_path / "vpa-results.md").read_text()
    assert "python -m experiments.fedvpa_table --table" in md and "color/full" in md and "## GRPO with a VPA client RM" in md
    assert "| reference | VPA full | 90.0 ± 0.0 | 75.0 ± 0.0 |" in md


# -- V9: the learned prior; FedVPL (experiments/fedvpl.py); the ablation grid ---------------------

from experiments import fedvpl  # noqa: E402
from experiments.fedvpa_eval import paired  # noqa: E402


def test_learned_prior_gets_the_kl_gradient_pi_minus_q():
    """V9: d/d rho of KL(q || softmax(rho)) = softmax(rho) - q (summed over q's rows: n pi - sum q)."""
    rho = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    vm.categorical_kl(q, F.softmax(rho, -1)).sum().backward()
    pi = F.softmax(rho.detach(), -1)
    assert torch.allclose(rho.grad, 2 * pi - q.sum(0), atol=1e-6)
    # only the learned-prior configuration has rho, and its state holds it (FedAvg'd with the rest)
    assert "rho" not in vm.VPA(D, vm.VPAConfig(**FAST)).state_dict()
    m = vm.VPA(D, vm.VPAConfig(**FAST, learned_prior=True))
    assert torch.allclose(m.learned_prior(), torch.full((3,), 1 / 3)) and "rho" in m.state_dict()


def test_learned_prior_trains_and_is_logged():
    clients = two_group_clients(n=200, held=100)
    cfg = vm.VPAConfig(**FAST, rounds=4, learned_prior=True)
    model, prior, log = vm.train_federated("vpa", clients, cfg, seed=0)
    assert torch.allclose(torch.tensor(log[0]["prior"]), torch.full((3,), 1 / 3), atol=1e-4)  # rho starts at 0
    assert torch.allclose(prior, F.softmax(model.rho.detach(), -1)) and (prior - 1 / 3).abs().max() > 1e-3
    assert sum(log[-1]["prior"]) == pytest.approx(1.0, abs=1e-3) and log[-1]["prior"] != log[0]["prior"]


def test_gaussian_and_mixture_kl_match_hand_computations():
    mu, lv = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.4]])
    want = 0.5 * sum(m * m + math.exp(v) - 1 - v for m, v in ((0.5, 0.2), (-1.0, -0.4)))
    assert fedvpl.gaussian_kl(mu, lv).item() == pytest.approx(want, rel=1e-6)
    assert fedvpl.gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max().item() < 1e-7  # q = p
    # mixture of N(e_p, s^2 I), one sample z: log q(z) - log sum_p pi_p N(z; e_p, s^2 I)
    z, pi, s = torch.tensor([[0.3, 0.9]]), torch.tensor([0.25, 0.75]), 0.5

    def logn(x, m, var):
        return sum(-0.5 * ((a - b) ** 2 / v + math.log(2 * math.pi * v)) for a, b, v in zip(x, m, var))
    log_q = logn([0.3, 0.9], [0.5, -1.0], [math.exp(0.2), math.exp(-0.4)])
    log_p = math.log(0.25 * math.exp(logn([0.3, 0.9], [1, 0], [s * s] * 2)) + 0.75 * math.exp(logn([0.3, 0.9], [0, 1], [s * s] * 2)))
    assert fedvpl.mixture_kl(z, mu, lv, pi, s).item() == pytest.approx(log_q - log_p, rel=1e-5)


def test_fedvpl_shapes_reparameterisation_and_reward_linear_in_z():
    cfg = vm.VPAConfig(**FAST, orth=0.0, mixture_prior=False)
    m = fedvpl.VPL(D, cfg)
    w, l = torch.randn(40, D), torch.randn(40, D)
    ctx, tgt = vm.episodes(40, cfg.episodes, cfg.context, cfg.targets, torch.Generator().manual_seed(0))
    mu, lv = m.posterior(w[ctx], l[ctx])
    assert mu.shape == lv.shape == (cfg.episodes, cfg.prototypes)
    o = m.train_terms(w, l, ctx, tgt, None, 0, 10, torch.Generator().manual_seed(1))
    assert o["q"].shape == (cfg.episodes, 3) and o["kl"].shape == (cfg.episodes,) and "z" not in o
    assert torch.allclose(o["kl"], fedvpl.gaussian_kl(mu, lv))  # N(0, I): the closed form
    o["loss"].backward()
    assert m.to_logvar.weight.grad.abs().sum() > 0 and m.to_mu.weight.grad.abs().sum() > 0  # G2 passes gradient
    # G3 is linear in z: the reward at the mean of two z's is the mean of their rewards
    e, z1, z2 = torch.randn(1, 5, D), torch.randn(1, 3), torch.randn(1, 3)
    assert torch.allclose(m.reward(e, (z1 + z2) / 2), (m.reward(e, z1) + m.reward(e, z2)) / 2, atol=1e-5)
    # the mixture variant has the learned weights and a one-sample KL
    mm = fedvpl.VPL(D, vm.VPAConfig(**FAST))
    assert torch.allclose(mm.learned_prior(), torch.full((3,), 1 / 3))
    assert fedvpl.VPL(D, cfg).learned_prior() is None


def test_fedvpl_learns_the_two_groups_and_beats_monolithic(trained):
    clients, _, _, _, _, mono = trained
    cfg = vm.VPAConfig(**FAST, rounds=8, orth=0.0, mixture_prior=False)
    model, prior, log = vm.train_federated(fedvpl.VPL, clients, cfg, seed=0)
    assert prior is None and "usage" not in log[0] and "prior" not in log[0] and set(log[0]["qbar"]) == {c.name for c in clients}
    assert log[-1]["loss"] < log[0]["loss"]
    ev, ev_mono = fedvpl.evaluate_vpl(model, clients), vpa.evaluate(mono, clients)
    assert ev["group_purity"] >= 0.9 and not ev["collapsed"] and ev["kl_normal"] > 0.5, ev
    for c in clients:
        assert ev["accuracy"][c.name] >= ev_mono["accuracy"][c.name] + 0.05, (ev["accuracy"], ev_mono["accuracy"])
    again, _, log2 = vm.train_federated(fedvpl.VPL, clients, cfg, seed=0)  # same seed, same result
    assert log2 == log and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_kmeans_purity_separates_blobs_and_not_one_blob():
    g = torch.Generator().manual_seed(0)
    two = torch.cat([torch.randn(30, 3, generator=g) * 0.1 + 2, torch.randn(30, 3, generator=g) * 0.1 - 2])
    lab = fedvpl.kmeans(two, 4)
    assert lab.shape == (60,) and not set(lab[:30].tolist()) & set(lab[30:].tolist())
    # the evaluation's purity on a latent that ignores the context: every client at one point
    clients = two_group_clients(n=100, held=50)
    m = fedvpl.VPL(D, vm.VPAConfig(**FAST, mixture_prior=False))
    with torch.no_grad():
        m.to_mu.weight.zero_()
    ev = fedvpl.evaluate_vpl(m, clients)
    assert ev["group_purity"] == pytest.approx(0.5) and ev["collapsed"]


def test_paired_interval_by_hand():
    p = paired([0.8, 0.9, 0.7], [0.7, 0.7, 0.6])  # differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.0577
    half = 4.303 * math.sqrt(((0.1 - 0.4 / 3) ** 2 * 2 + (0.2 - 0.4 / 3) ** 2) / 2) / math.sqrt(3)
    assert p["mean"] == pytest.approx(0.4 / 3) and p["lo"] == pytest.approx(0.4 / 3 - half)
    assert p["hi"] == pytest.approx(0.4 / 3 + half) and p["values"] == pytest.approx([0.1, 0.2, 0.1])


def test_grid_rows_paired_columns_and_latent_plots(tmp_path):
    clients = two_group_clients(n=120, held=60)
    cfg = vm.VPAConfig(**{**FAST, "local_steps": 3}, rounds=2)
    res = vpa.run_experiment(clients, cfg, [0, 1], plot_dir=tmp_path, workers=2)
    assert list(res) == [vpa.MONO, *vpa.GRID]
    # forked workers give what one process gives: seed 1 of FedVPA-GP (V9) run here
    model, prior, _ = vm.train_federated("vpa", clients, vm.VPAConfig(**{**vars(cfg), "learned_prior": True}), 1)
    assert vpa.evaluate(model, clients, prior, 1)["accuracy"] == res[vpa.FULL]["per_seed"][1]["accuracy"]
    for name, e in res.items():
        assert e[f"vs {vpa.FULL}"]["values"] == pytest.approx(
            [a - b for a, b in zip(res[vpa.FULL]["mean_accuracy"]["values"], e["mean_accuracy"]["values"])])
        assert ("collapsed_seeds" in e) == (name != vpa.MONO)
    assert res[vpa.FULL][f"vs {vpa.FULL}"]["mean"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{v}-seed{s}.png" for v in vpa.PLOTTED.values() for s in (0, 1))
    md = vpa.results_markdown({"toy": res}, cfg, [0, 1], "cmd", 1.0)
    assert "| FedVPL + orthogonal loss |" in md and "paired: FedVPA-GP (V9) minus row" in md
