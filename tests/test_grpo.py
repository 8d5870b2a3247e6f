"""GRPO (E5): advantages, k3 KL and the clipped loss against hand computations."""
import copy
import math

import pytest
import torch

import models
import grpo
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
    r, n = grpo.score_unique(rm, ["a.png"] * 4, ["q"] * 4, resp)
    assert n == 2 and rm.rows == [2]
    assert torch.equal(r, (torch.tensor([float(len(x)) for x in resp]) - 1.0) / 2.0)
    src = grpo.MixedReward([rm, FakeRM()], router.single_rm(0, 2))
    src(["a.png"] * 4, ["q"] * 4, resp, torch.zeros(4, 2))
    assert src.calls == [2, 0]  # the zero-weight RM is never run
