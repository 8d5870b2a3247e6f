"""Neural Thompson Sampling (E6, E7): posterior, selection, update, and regret on a synthetic bandit."""
import torch

import nts
import router

D, K = 4, 3


def _net(seed=0, zero_last=True):
    torch.manual_seed(seed)
    net = router.Router(D, K, hidden=16)
    if zero_last:  # all arms score 0 at the start: no arm is favoured before feedback
        torch.nn.init.zeros_(net.net[2].weight)
        torch.nn.init.zeros_(net.net[2].bias)
    return net


def test_variance_shrinks_on_the_updated_arm_only():
    ts = nts.NeuralTS(_net(zero_last=False), lam=1e-2, nu=1.0)
    x = torch.randn(8, D)
    _, v0 = ts.posterior(x)
    ts.update(x, torch.zeros(8, dtype=torch.long), torch.ones(8))  # feedback on arm 0 only
    _, v1 = ts.posterior(x)
    assert (v1[:, 0] < v0[:, 0]).all()
    assert (v0 > 0).all() and v1[:, 0].mean() < 0.8 * v0[:, 0].mean()


def test_without_variance_selection_is_the_argmax_of_f():
    net = _net(zero_last=False)
    ts = nts.NeuralTS(net, nu=0.0)
    x = torch.randn(16, D)
    assert torch.equal(ts.select(x), net(x).argmax(-1))
    per_batch = ts.select(x, per_batch=True)
    assert per_batch.shape == (16,) and (per_batch == per_batch[0]).all()


def test_update_lowers_the_squared_loss_and_leaves_the_router_alone():
    net = _net(zero_last=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ts = nts.NeuralTS(net)
    x, arms, b = torch.randn(16, D), torch.randint(0, K, (16,)), torch.bernoulli(torch.full((16,), 0.7))
    l0 = ts.squared_loss(x, arms, b)
    ts.update(x, arms, b)
    assert ts.squared_loss(x, arms, b) < l0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # NTS works on a copy


def test_zero_update_steps_and_zero_nu_is_static_hard_routing():
    """The ablation arm of the README (--nts-nu 0 --nts-update-steps 0): the bandit neither
    explores nor learns, so it always picks the router's argmax, before and after feedback."""
    net = _net(zero_last=False)
    ts = nts.NeuralTS(net, nu=0.0, update_steps=0)
    x = torch.randn(32, D)
    ts.update(x, ts.select(x), torch.ones(32))
    assert torch.equal(ts.select(x), net(x).argmax(-1))
    assert all(torch.equal(p, q) for p, q in zip(ts.net.parameters(), net.parameters()))


def test_feedback_credits_prompts_at_or_above_the_median_gain():
    gain = torch.tensor([0.3, -0.1, 0.0, 0.5, 0.1])
    assert nts.grpo_feedback(gain).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]


def _regret(policy: str, seed: int, T: int = 60, B: int = 4) -> float:
    """Contextual bandit with known expected rewards mu_k(x) = sigmoid(3 a_k . x): the best arm
    depends on the context; feedback is Bernoulli(mu). Regret uses the expected rewards."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, D, generator=g)
    A = A / A.norm(dim=1, keepdim=True)
    ts = nts.NeuralTS(_net(seed), nu=0.0 if policy == "greedy" else 1.0, seed=seed)
    regret = 0.0
    for _ in range(T):
        x = torch.randn(B, D, generator=g)
        mu = torch.sigmoid(3 * x @ A.T)  # [B, K]
        arms = torch.randint(0, K, (B,), generator=g) if policy == "random" else ts.select(x)
        b = torch.bernoulli(mu[torch.arange(B), arms], generator=g)
        regret += (mu.max(1).values - mu[torch.arange(B), arms]).sum().item()
        if policy != "random":
            ts.update(x, arms, b)
    return regret


def test_neural_ts_regret_beats_random_and_greedy_over_seeds():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: a second thread only adds sync overhead
    try:
        for seed in range(4):
            r = {p: _regret(p, seed) for p in ("nts", "greedy", "random")}
            assert r["nts"] < r["greedy"] < r["random"], (seed, r)
    finally:
        torch.set_num_threads(threads)
