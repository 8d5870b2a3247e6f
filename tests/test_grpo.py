"""GRPO (E5): advantages, k3 KL and the clipped loss against hand computations; the hard-routed
rewards (mor_hard, NTS E6-E7) with fake RMs."""
import copy
import math

import pytest
import torch

import data
import grpo
import mixture
import models
import nts
import router


def test_group_advantages_match_hand_computation_and_are_zero_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, 4)
    std = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3)  # unbiased
    want = [(x - 0.5) / (std + 1e-4) for x in (1, 0, 0, 1)] + [0.0] * 4
    assert torch.allclose(a, torch.tensor(want), atol=1e-6)
    assert torch.allclose(a.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.zeros(6), 4)


def test_format_guard_ranks_malformed_samples_last_in_their_group():
    # group 1: a malformed sample the RM liked best (5.0) drops to min(well-formed) - 1 = -1.5;
    # group 2: nothing well-formed, rewards kept (A = 0 or not, E5 only compares inside a group);
    # group 3: all well-formed, untouched
    r = torch.tensor([0.5, 5.0, -0.5, 1.0, 3.0, 1.0, 2.0, 0.0, 0.1, 0.2, 0.3, 0.4])
    ok = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    out = grpo.format_guard(r, ok, 4)
    assert out.tolist() == pytest.approx([0.5, -1.5, -0.5, 1.0, 3.0, 1.0, 2.0, 0.0, 0.1, 0.2, 0.3, 0.4])
    a = grpo.group_advantages(out, 4).view(3, 4)
    assert a[0, 1] == a[0].min() and a[0, 1] < 0  # the hack now has the lowest advantage


def test_kl_k3_is_zero_when_policies_agree_and_positive_otherwise():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.allclose(grpo.kl_k3(lp, lp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.4, 0.1, 0.95]))
    k = grpo.kl_k3(lp, ref)
    d = ref - lp
    assert (k > 0).all() and torch.allclose(k, d.exp() - d - 1)


def test_grpo_loss_matches_hand_computation_with_clipping_and_masking():
    eps, beta = 0.2, 0.1
    # two sequences, three positions; the second sequence's last position is padding
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -9.0]])
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.1, -1.2, 0.0]])  # ratios e^0.5, 1, e^-1 | e^-0.2, 1, pad
    ref = torch.tensor([[-1.0, -0.7, -2.0], [-0.3, -1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def tok(lp, o, rf, a):
        ratio = math.exp(lp - o)
        surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        d = rf - lp
        return -(surr - beta * (math.exp(d) - d - 1))

    s1 = sum(tok(*v, 1.0) for v in zip(logp[0].tolist(), old[0].tolist(), ref[0].tolist())) / 3
    s2 = sum(tok(*v, -2.0) for v in zip(logp[1, :2].tolist(), old[1, :2].tolist(), ref[1, :2].tolist())) / 2
    got = grpo.grpo_loss(logp, old, ref, adv, mask, eps, beta)
    assert got.item() == pytest.approx((s1 + s2) / 2, rel=1e-6)
    # clipping on both sides: ratio e^0.5 > 1.2 with A > 0 is clipped (no gradient), ratio
    # e^-1 < 0.8 with A > 0 is not (min picks the unclipped, smaller term)
    lp = logp.clone().requires_grad_(True)
    grpo.grpo_loss(lp, old, old, adv, mask, eps, 0.0).backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] != 0
    assert lp.grad[1, 2] == 0  # padding gets no gradient


def test_response_batch_masks_up_to_the_first_end_token():
    prompts = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
               "mm_token_type_ids": torch.zeros(2, 3, dtype=torch.long)}
    EOS, PAD = 4, 0
    new = torch.tensor([[11, EOS, PAD], [12, 13, 14], [EOS, PAD, PAD], [15, EOS, PAD]])  # G = 2
    b = grpo.response_batch(prompts, new, 2, EOS)
    assert b["input_ids"].shape == (4, 6)
    assert b["response_mask"][:, 3:].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b["attention_mask"].tolist()[0] == [0, 1, 1, 1, 1, 0]
    assert torch.equal(b["input_ids"][1, :3], prompts["input_ids"][0])  # row 1 = prompt 0, sample 2
    assert b["mm_token_type_ids"].shape == (4, 6)


@pytest.fixture(scope="module")
def policy(tiny_dirs):
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    return vlm, models.Encoder(proc)


def test_token_logprobs_match_generate_and_features_match_the_router(policy, fed):
    vlm, enc = policy
    exs = fed.pool[:3]
    pb = enc([e.image for e in exs], [e.prompt for e in exs])
    with torch.no_grad():
        out = vlm.generate(**pb, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                           suppress_tokens=enc.banned_ids, pad_token_id=enc.pad_id, eos_token_id=enc.eos_id)
        new = out.sequences[:, pb["input_ids"].shape[1]:]
        rb = grpo.response_batch(pb, new, 1, enc.eos_id)
        feats = models.image_features(vlm, pb, [0, 1, 2])
        logp, h = grpo.token_logprobs(vlm, rb, feats, enc.banned_ids, hidden=True)
    Tp = pb["input_ids"].shape[1]
    for t in range(new.shape[1]):
        want = torch.log_softmax(out.scores[t].float(), -1).gather(-1, new[:, t:t + 1]).squeeze(-1)
        got = logp[:, Tp - 1 + t]
        live = rb["response_mask"][:, Tp + t].bool()
        assert torch.allclose(got[live], want[live], atol=1e-4), (t, got, want)
    # routing features pooled from this forward == router.features on the decoded text
    e = router.pool_features(h, rb["attention_mask"], rb["response_mask"])
    e_text = router.features(vlm, enc, [x.image for x in exs], [x.prompt for x in exs], enc.decode(new))
    assert torch.allclose(e, e_text, atol=1e-4)


def test_grpo_steps_raise_the_reward(policy, fed):
    """A reward for answering "red": a few GRPO steps must make it more frequent (a learnable
    signal that does not need a trained model to be non-zero)."""
    vlm, enc = policy
    vlm = copy.deepcopy(vlm)
    ref = copy.deepcopy(vlm)
    pool = fed.pool[:8]

    def red(images, prompts, responses, e):
        return torch.tensor([float(r.startswith("red")) for r in responses])

    # format_guard off: this untrained model's samples are almost all malformed, and the test is
    # about E5 raising an arbitrary reward, not about the form
    cfg = grpo.GRPOConfig(steps=12, prompts=4, group=8, max_new_tokens=2, lr=3e-3, beta=0.0, format_guard=False)
    log = grpo.train_grpo(vlm, ref, enc, pool, red, cfg, seed=0)
    assert sum(log["reward"][-3:]) / 3 > sum(log["reward"][:3]) / 3 + 0.2, log["reward"]
    assert all(math.isfinite(x) for x in log["loss"] + log["kl"])


def test_train_grpo_computes_the_objective_gain_only_for_a_reward_that_needs_it(policy, fed):
    """E7 wiring: the median and improvement rules get the step's change (each prompt's gain
    [N], each sample's ratio and KL change [N, G]; one extra forward), the probe rule gets None
    after the policy step."""
    vlm, enc = policy

    class Spy:
        def __init__(self, needs_gain):
            self.needs_gain, self.got = needs_gain, []

        def __call__(self, images, prompts, responses, e):
            return torch.tensor([float(len(r)) for r in responses])

        def feedback(self, gain):
            self.got.append(gain)

    cfg = grpo.GRPOConfig(steps=1, prompts=3, group=2, max_new_tokens=2, lr=1e-5)
    for needs in (True, False):
        spy = Spy(needs)
        grpo.train_grpo(copy.deepcopy(vlm), copy.deepcopy(vlm), enc, fed.pool[:6], spy, cfg, seed=0)
        assert len(spy.got) == 1
        if needs:
            ch = spy.got[0]
            assert ch["gain"].shape == (3,) and ch["ratio_gain"].shape == ch["kl_change"].shape == (3, 2)
            assert ch["beta"] == cfg.beta and torch.isfinite(ch["ratio_gain"]).all()
            # J is linear in A: the gain with the step's own advantages is A u - beta dKL
        else:
            assert spy.got[0] is None


def test_repeated_samples_are_scored_once():
    class FakeRM:
        rows = []

        def score(self, images, prompts, responses):
            self.rows.append(len(responses))
            return torch.tensor([float(len(r)) for r in responses])

        def standardized(self, r):
            return (r - 1.0) / 2.0

    rm = FakeRM()
    resp = ["red<|im_end|>", "red<|im_end|>", "blue<|im_end|>", "red<|im_end|>"]
    r, n = mixture.score_unique(rm, ["a.png"] * 4, ["q"] * 4, resp)
    assert n == 2 and rm.rows == [2]
    assert torch.equal(r, (torch.tensor([float(len(x)) for x in resp]) - 1.0) / 2.0)
    src = mixture.MixedReward([rm, FakeRM()], router.single_rm(0, 2))
    src(["a.png"] * 4, ["q"] * 4, resp, torch.zeros(4, 2))
    assert src.calls == [2, 0]  # the zero-weight RM is never run


# ----------------------------------------------------------------------------------------------
# Hard routing (mor_hard) and NTS (E6-E7) with fake RMs: who scores which row, and the feedback
# ----------------------------------------------------------------------------------------------

class CountingRM:
    """Scores a one-word answer by a table; records the rows of every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, images, prompts, responses):
        self.calls.append(list(zip(prompts, responses)))
        return torch.tensor([self.table[data.extract_answer(r)] for r in responses])

    def standardized(self, r):
        return r


def _routing_setup(N=6, G=4, D=4, seed=0):
    torch.manual_seed(seed)
    src = router.Router(D, 2, hidden=8)
    e = torch.randn(N, 1, D).expand(N, G, D).reshape(N * G, D)  # one context per prompt
    words = ["red", "blue", "green", "red"]
    prompts = [f"q{i}" for i in range(N) for _ in range(G)]
    responses = [w + data.EOS for _ in range(N) for w in words]
    return src, e, ["img"] * (N * G), prompts, responses


TABLE = {"red": 1.0, "blue": 0.0, "green": 0.5}


def test_hard_routing_scores_each_rm_on_its_routed_rows_only():
    src, e, images, prompts, responses = _routing_setup()
    rms = [CountingRM(TABLE), CountingRM({k: -v for k, v in TABLE.items()}), CountingRM(TABLE)]  # K = 3
    src = router.Router(4, 3, hidden=8)
    fn = mixture.HardReward(rms, src, 4, domains={"q0": "color"})
    r = fn(images, prompts, responses, e)
    arms = src(e.view(6, 4, -1).mean(1)).argmax(-1)
    for k, rm in enumerate(rms):
        mine = {f"q{i}" for i in range(6) if arms[i] == k}
        # one batched call per RM that has rows, none for an RM without rows
        assert len(rm.calls) == (1 if mine else 0)
        assert {p for c in rm.calls for p, _ in c} == mine
        assert fn.calls[k] == 3 * len(mine)  # "red" twice per group: 3 distinct rows per prompt
    sign = torch.tensor([1.0, -1.0, 1.0])[arms].repeat_interleave(4)
    assert torch.equal(r, sign * torch.tensor([1.0, 0.0, 0.5, 1.0]).repeat(6))
    assert [x["arm"] for x in fn.log] == arms.tolist() and fn.log[0]["domain"] == "color"
    assert fn.log[1]["domain"] is None and all(x["spread"] == 1.0 and not x["probe"] for x in fn.log)


def _nts_reward(rms, src, **kw):
    ts = nts.NeuralTS(src, nu=0.0)
    return mixture.NTSReward(rms, ts, 4, **kw), ts


def test_nts_probe_scores_every_rm_once_and_grades_them_against_the_mixture():
    src, e, images, prompts, responses = _routing_setup()
    with torch.no_grad():  # the referee trusts RM 0: mixture weights ~ (1, 0)
        src.net[2].weight.zero_()
        src.net[2].bias.copy_(torch.tensor([8.0, 0.0]))
    responses[4:8] = ["red" + data.EOS] * 4  # prompt 1: a tied group, no feedback
    rms = [CountingRM(TABLE), CountingRM({k: -v for k, v in TABLE.items()})]  # RM 1 reverses RM 0
    fn, ts = _nts_reward(rms, src, probe=1.0)  # every prompt is a probe
    r = fn(images, prompts, responses, e)
    assert [len(rm.calls) for rm in rms] == [1, 1] and fn.calls == [6 * 3 - 2, 6 * 3 - 2]
    w = src.weights(e)[:, 0]
    r0 = torch.tensor([TABLE[data.extract_answer(o)] for o in responses])
    assert torch.allclose(r, w * r0 + (1 - w) * -r0)  # probe prompts get R^mix (E3)
    assert fn.needs_gain is False
    fn.feedback(None)
    assert [x["b"] for x in fn.log] == [1.0, None, 1.0, 1.0, 1.0, 1.0]  # the drawn arm is RM 0
    assert fn.log[0]["b_arms"] == [1.0, 0.0] and fn.log[1]["b_arms"] == [None, None]
    assert len(ts.replay[3]) == 5 * 2  # all arms of the five untied probe prompts
    assert fn.history[-1]["feedback"] == 1.0 and all(x["probe"] for x in fn.log)


def test_nts_probe_draws_are_seeded_and_non_probe_prompts_give_no_feedback():
    src, e, images, prompts, responses = _routing_setup(N=16)
    draws = []
    for _ in range(2):
        fn, ts = _nts_reward([CountingRM(TABLE), CountingRM(TABLE)], src, probe=0.25, seed=3)
        for _ in range(5):
            fn(images, prompts, responses, e)
            fn.feedback(None)
        draws.append([x["probe"] for x in fn.log])
    assert draws[0] == draws[1] and 12 <= sum(draws[0]) <= 28  # E = 0.25 * 80 = 20
    assert all((x["b"] is None) == (not x["probe"]) for x in fn.log)
    assert [x["step"] for x in fn.log] == [s for s in range(5) for _ in range(16)]
    # rows: the drawn arm's 3 distinct rows per prompt + the other arm's on probe prompts
    assert sum(fn.calls) == 3 * (80 + sum(draws[1]))


def test_nts_median_rule_updates_the_drawn_arms_with_the_gain():
    src, e, images, prompts, responses = _routing_setup()
    rms = [CountingRM(TABLE), CountingRM(TABLE)]
    fn, ts = _nts_reward(rms, src, feedback="median")
    arms = src(e.view(6, 4, -1).mean(1)).argmax(-1)
    fn(images, prompts, responses, e)
    assert fn.needs_gain and sum(fn.calls) == 6 * 3  # no probes: one RM per prompt
    fn.feedback({"gain": torch.tensor([0.3, -0.1, 0.0, 0.5, 0.1, 0.2])})
    assert [x["b"] for x in fn.log] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # median of 6: the lower middle, 0.1
    assert torch.equal(ts.replay[2], arms)
    with pytest.raises(ValueError, match="per-batch"):
        mixture.NTSReward(rms, ts, 4, per_batch=True)
    with pytest.raises(ValueError, match="feedback"):
        mixture.NTSReward(rms, ts, 4, feedback="gain")


def test_nts_improvement_rule_steps_on_the_drawn_arm_and_grades_it_by_the_others():
    """improvement: probe prompts are scored by every RM but rewarded with the drawn arm's own
    reward (the step is the arm's); feedback reads the step's change; the first `warmup` Delta of
    an arm only seed its baseline."""
    src, e, images, prompts, responses = _routing_setup()
    rms = [CountingRM(TABLE), CountingRM({k: -v for k, v in TABLE.items()}), CountingRM(TABLE)]
    src = router.Router(4, 3, hidden=8)
    ts = nts.NeuralTS(src, nu=0.0)
    fn = mixture.NTSReward(rms, ts, 4, feedback="improvement", probe=1.0)
    fn.baseline.warmup = 1
    arms = src(e.view(6, 4, -1).mean(1)).argmax(-1)
    r = fn(images, prompts, responses, e)
    own = torch.tensor([[1.0, 0.0, 0.5, 1.0], [-1.0, 0.0, -0.5, -1.0], [1.0, 0.0, 0.5, 1.0]])[arms].reshape(-1)
    assert fn.needs_gain and torch.equal(r, own) and all(len(rm.calls) == 1 for rm in rms)
    u = torch.ones(6, 4)
    u[:, 0] = 2.0  # the step raised sample 0 ("red") most
    fn.feedback({"ratio_gain": u, "kl_change": torch.zeros(6, 4), "beta": 0.0, "gain": torch.zeros(6)})
    # the others' consensus: for arm 1 (the reverser) the two table RMs, which like red, so the
    # step that raised red scores Delta > 0; for arm 0 or 2 the reverser and a table RM cancel:
    # a tied consensus, no Delta, no feedback
    assert 1 in arms.tolist() and len(set(arms.tolist())) > 1  # both cases occur
    table = torch.tensor([1.0, 0.0, 0.5, 1.0])
    adv = (table - table.mean()) / (table.std() + 1e-4)
    for x in fn.log:
        if x["arm"] == 1:
            assert x["delta"] == pytest.approx((adv * u[0]).mean().item(), abs=1e-5) and x["delta"] > 0
        else:
            assert x["delta"] is None and x["b"] is None
    with pytest.raises(ValueError, match="feedback"):
        mixture.NTSReward(rms, ts, 4, feedback="probes")


def test_reference_rows_min_uwo_and_random_hard():
    src, e, images, prompts, responses = _routing_setup()
    rms = [CountingRM(TABLE), CountingRM({k: -v for k, v in TABLE.items()})]
    r0 = torch.tensor([TABLE[data.extract_answer(o)] for o in responses])
    assert torch.equal(mixture.EnsembleReward(rms, "min_rm")(images, prompts, responses, e), -r0.abs())
    uwo = mixture.EnsembleReward(rms, "uwo_rm", penalty=1.0)(images, prompts, responses, e)
    assert torch.allclose(uwo, -r0 ** 2)  # mean 0, population variance r0^2
    with pytest.raises(ValueError, match="rule"):
        mixture.EnsembleReward(rms, "max_rm")
    picks = []
    for _ in range(2):
        fn = mixture.RandomHardReward(rms, 4, seed=5)
        for _ in range(5):
            fn(images, prompts, responses, e)
        picks.append([x["arm"] for x in fn.log])
    assert picks[0] == picks[1] and set(picks[0]) == {0, 1}  # seeded, and both arms drawn
    assert sum(fn.calls) == 5 * 6 * 3  # one RM per prompt (3 distinct answers of the 4 samples)


def test_own_share_over_the_first_and_last_steps():
    log = [{"step": s, "domain": d, "arm": a} for s, d, a in
           [(0, "color", 0), (0, "shape", 0), (1, "color", 1), (1, "shape", 1), (2, "color", 0), (2, "shape", 1)]]
    share = mixture.own_share(log + [{"step": 2, "domain": None, "arm": 0}], {"color": 0, "shape": 1, "position": 2},
                           first=2, last=1)
    assert share == {"color": {"start": 0.5, "end": 1.0}, "shape": {"start": 0.5, "end": 1.0},
                     "position": {"start": None, "end": None}}


# ----------------------------------------------------------------------------------------------
# The frozen vision tower: features cached once per image, the same numbers as without the cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", models.FAMILIES)
def test_vision_parameters_are_everything_the_image_features_depend_on(tiny_dirs, fed, family):
    """Freezing vision_parameters leaves image_features with no gradient path: the whole image
    encoder (tower, merger or projector) is covered, in every family."""
    vlm, proc = models.load_vlm(tiny_dirs[family])
    exs = fed.pool[:2]
    pb = models.Encoder(proc)([e.image for e in exs], [e.prompt for e in exs])
    assert models.image_features(vlm, pb, [0, 1])[0].requires_grad
    for p in grpo.vision_parameters(vlm):
        p.requires_grad_(False)
    assert not any(f.requires_grad for f in models.image_features(vlm, pb, [0, 1]))
    lm = [p for p in vlm.parameters() if p.requires_grad]
    assert lm and len(lm) < len(list(vlm.parameters()))  # the language model still trains


def test_image_features_cache_encodes_each_image_once_and_matches_the_tower(policy, fed):
    vlm, enc = policy
    exs = [fed.pool[0], fed.pool[1], fed.pool[0]]  # one image twice in the batch
    images = [e.image for e in exs]
    pb = enc(images, [e.prompt for e in exs])
    cache = grpo.ImageFeatures().bind(vlm)
    got = cache(vlm, pb, images)
    assert cache.computed == 2 and cache.reused == 1
    want = models.image_features(vlm, pb, [0, 1, 2])
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    cache(vlm, pb, images)
    assert cache.computed == 2 and cache.reused == 4  # the second batch runs no tower
    # a tower with other weights empties the cache (a shared cache never serves another model)
    other = copy.deepcopy(vlm)
    with torch.no_grad():
        grpo.vision_parameters(other)[0].add_(1.0)
    cache.bind(other)
    assert not cache.store
    cache.bind(vlm)
    assert not cache.store  # and back: recomputed, never stale


def _frozen_uncached(vlm):
    """The uncached path with the same maths: the tower frozen by hand, train_vision=True (so
    train_grpo neither freezes nor caches, and runs the tower in every pass as before)."""
    for p in grpo.vision_parameters(vlm):
        p.requires_grad_(False)
    return vlm


def test_cached_vision_path_gives_the_uncached_losses_and_leaves_the_tower_untouched(policy, fed):
    vlm, enc = policy
    pool = fed.pool[:8]
    cfg = dict(steps=2, prompts=4, group=4, max_new_tokens=3, lr=1e-2, beta=0.04, format_guard=False)

    def reward(images, prompts, responses, e):  # depends on the samples, so the updates are real
        return torch.tensor([float(len(r)) for r in responses])

    runs = {}
    for name, train_vision, prep in (("cached", False, lambda m: m), ("uncached", True, _frozen_uncached),
                                     ("trained", True, lambda m: m)):
        pol, ref = prep(copy.deepcopy(vlm)), copy.deepcopy(vlm)
        seen = []
        log = grpo.train_grpo(pol, ref, enc, pool, reward, grpo.GRPOConfig(train_vision=train_vision, **cfg),
                              seed=0, on_step=lambda s, info: seen.append(info["logp"]))
        runs[name] = (pol, log, seen)
    (pc, lc, sc), (pu, lu, su), (pt, _, _) = runs["cached"], runs["uncached"], runs["trained"]
    # same samples, same per-token log-probs, same loss / KL at every step
    for a, b in zip(sc, su):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    for k in ("reward", "loss", "kl"):
        assert lc[k] == pytest.approx(lu[k], abs=1e-4), k
    # the tower: no gradient, no update; the language model moved, the same way in both paths
    v0 = grpo.vision_parameters(vlm)
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(grpo.vision_parameters(pc), v0))
    lm = [n for n, _ in vlm.named_parameters() if "lm_head" in n or "language_model" in n]
    moved = dict(pc.named_parameters())
    assert any(not torch.equal(moved[n], dict(vlm.named_parameters())[n]) for n in lm)
    for (n, a), (_, b) in zip(pc.named_parameters(), pu.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), n
    # --train-vision: the tower does get updated (the check above can fail)
    assert any(not torch.equal(p, q) for p, q in zip(grpo.vision_parameters(pt), v0))


def test_evaluation_with_cached_features_gives_the_same_answers(policy, fed):
    import judge

    vlm, enc = policy
    exs = sorted((e for d in data.DOMAINS for e in fed.test[d][:12]), key=lambda e: e.image)
    args = (vlm, enc, [e.image for e in exs], [e.prompt for e in exs])
    want = judge.generate(*args, share_images=True, max_new_tokens=3)
    assert len(set(want)) > 3  # varied answers: the comparison below can fail
    cache = grpo.ImageFeatures().bind(vlm)
    assert judge.generate(*args, max_new_tokens=3, features=cache) == want
    n = cache.computed
    assert judge.generate(*args, max_new_tokens=3, features=cache) == want and cache.computed == n
    test = {d: fed.test[d][:6] for d in data.DOMAINS}
    assert judge.evaluate(vlm, enc, test, features=cache) == judge.evaluate(vlm, enc, test)


def test_rm_scores_with_cached_features_equal_the_plain_scores(tiny_dirs, fed):
    import reward

    vlm, proc = models.load_vlm(tiny_dirs["qwen2_5_vl"])
    rm = reward.RewardModel(vlm, proc).eval()
    exs = fed.pool[:4]
    args = ([e.image for e in exs] * 2, [e.prompt for e in exs] * 2, ["red<|im_end|>"] * 4 + ["circle"] * 4)
    with torch.no_grad():
        want = rm.score(*args)
        rm.image_features = grpo.ImageFeatures().bind(rm.vlm)
        got, again = rm.score(*args), rm.score(*args)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(again, want, atol=1e-5)
    assert rm.image_features.computed == 4  # 4 distinct images, encoded once over both calls


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_prompt_shared_logprobs_equal_the_full_forward_in_value_and_gradient(tiny_dirs, fed, family):
    """token_logprobs(group=G) runs each prompt once for its G samples: the log-probs, the hidden
    states (routing features) and the gradient must be those of the full [N*G, T] forward."""
    vlm, proc = models.load_vlm(tiny_dirs[family])
    enc = models.Encoder(proc)
    exs, G = fed.pool[:3], 4
    pb = enc([e.image for e in exs], [e.prompt for e in exs])
    torch.manual_seed(0)
    with torch.no_grad():
        out = vlm.generate(**pb, max_new_tokens=4, do_sample=True, num_return_sequences=G, top_k=None, top_p=None,
                           suppress_tokens=enc.banned_ids, pad_token_id=enc.pad_id, eos_token_id=enc.eos_id)
    rb = grpo.response_batch(pb, out[:, pb["input_ids"].shape[1]:], G, enc.eos_id)
    with torch.no_grad():
        feats = grpo._expand(models.image_features(vlm, pb, [0, 1, 2]), G)
    params = [p for p in vlm.parameters() if p.requires_grad]
    (a, ha), (b, hb) = (grpo.token_logprobs(vlm, rb, feats, enc.banned_ids, hidden=True, group=g) for g in (1, G))
    assert a.shape == b.shape and (a != 0).any()
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ha, hb, atol=1e-5)
    w = torch.randn_like(a)  # any loss of the log-probs: the gradients agree
    ga, gb = (torch.autograd.grad((x * w).sum(), params, allow_unused=True) for x in (a, b))
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5))
