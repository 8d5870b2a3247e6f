"""Paired statistics (harness/stats.py) and the generated comparison and claims tables (harness/report.py)."""
import math

import pytest

from harness import report, stats


@pytest.mark.parametrize("nu,q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantiles_match_the_tables(nu, q):
    assert stats.t_quantile(0.975, nu) == pytest.approx(q, abs=1e-3)


def test_t_cdf_matches_closed_forms():
    # nu = 1 is the Cauchy distribution; nu = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-10)


def test_paired_difference_by_hand():
    a, b = [0.90, 0.88, 0.91, 0.87, 0.90], [0.85, 0.86, 0.90, 0.88, 0.86]
    d = [0.05, 0.02, 0.01, -0.01, 0.04]
    mean = sum(d) / 5
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 4 / 5)
    c = stats.paired(a, b)
    assert c["mean"] == pytest.approx(mean) and c["n"] == 5 and c["wins"] == 4
    assert c["ci95_low"] == pytest.approx(mean - 2.7764 * se, abs=1e-5)
    assert c["ci95_high"] == pytest.approx(mean + 2.7764 * se, abs=1e-5)
    assert c["p"] == pytest.approx(2 * (1 - stats.t_cdf(mean / se, 4)))
    assert 0.05 < c["p"] < 0.2  # t = 2.06 on 4 df
    assert stats.verdict(c) == "not settled"
    assert stats.verdict(stats.paired([1, 2, 3.5], [0, 1, 2])) == "holds"
    assert stats.verdict(stats.paired([0, 1, 2], [1, 2, 3.5])) == "does not hold"
    assert stats.paired([1.0], [0.5])["ci95_low"] is None


def _method(overall, seeds=(0, 1, 2)):
    return {"per_seed": {"seeds": list(seeds), "overall": overall,
                         "accuracy": {"color": overall, "shape": [x - 0.1 for x in overall]}}}


def test_paired_comparisons_and_claims_are_generated_from_the_seeds():
    r = {"domains": ["color", "shape"], "methods": {
        "mor": _method([0.90, 0.91, 0.89]), "avg_rm": _method([0.85, 0.87, 0.86]),
        "rm_color": _method([0.30, 0.31, 0.32]), "rm_shape": _method([0.50, 0.20, 0.21]),
        # trained on seeds 1, 2 only: compared with MoR on the two seeds both have
        "mor_hard": _method([0.80, 0.95], seeds=(1, 2))}}
    r["paired"] = report.paired_comparisons(r)
    assert set(r["paired"]) == {"mor-avg_rm", "mor-best_single_rm", "mor-mor_hard"}
    assert r["paired"]["mor-best_single_rm"]["vs"] == "rm_color"  # mean 0.310 against rm_shape's 0.303
    nts = r["paired"]["mor-mor_hard"]
    assert nts["seeds"] == [1, 2] and nts["overall"]["mean"] == pytest.approx(((0.91 - 0.80) + (0.89 - 0.95)) / 2)
    assert r["paired"]["mor-avg_rm"]["shape"]["mean"] == pytest.approx(r["paired"]["mor-avg_rm"]["overall"]["mean"])
    r["claims"] = report.claims(r)
    cl = {c["comparison"]: c["verdict"] for c in r["claims"]}
    assert cl == {"mor - avg_rm": "holds", "mor - rm_color": "holds", "mor - mor_hard": "not settled"}
    md = "\n".join(report.paired_markdown(r))
    assert "| MoR beats the plain average of the client RMs (Avg RM) | paper | mor - avg_rm | 3 |" in md
    assert "holds" in md


def _claims(ms):
    r = {"domains": ["color", "shape"], "methods": {k: _method(v) for k, v in ms.items()}}
    r["paired"] = report.paired_comparisons(r)
    return {c["comparison"]: c for c in report.claims(r)}


def test_every_claim_is_on_the_papers_mor_and_flips_with_its_comparison():
    """Each claim reads A - B with A the paper's MoR (mor, the NTS row): swapping which method is
    ahead flips the verdict, so a comparison taken the wrong way round fails here."""
    ahead, behind = [0.90, 0.91, 0.89], [0.80, 0.82, 0.81]
    rows = ("avg_rm", "weighted_rm", "fedavg_rm", "mor_hard", "mor_soft", "rm_color")
    up = _claims({"mor": ahead, **{m: behind for m in rows}})
    down = _claims({"mor": behind, **{m: ahead for m in rows}})
    keys = {"mor - avg_rm", "mor - weighted_rm", "mor - fedavg_rm", "mor - mor_hard", "mor - mor_soft",
            "mor - rm_color", "mor_soft - avg_rm"}
    assert set(up) == set(down) == keys
    for k in keys - {"mor_soft - avg_rm"}:
        assert up[k]["verdict"] == "holds" and down[k]["verdict"] == "does not hold", k
        assert up[k]["mean"] > 0 > down[k]["mean"]
    assert up["mor - mor_soft"]["source"] == "ours" and up["mor - avg_rm"]["source"] == "paper"
    assert up["mor - rm_color"]["n"] == 3  # the seeds the comparison has, stated
    # no claim is a one-sided "within N points"
    assert not any("within" in text for text, _, _ in report.CLAIMS)


def _effect(avg_change, mor_change):
    return {"avg_rm": stats.paired([a + x for a, x in zip([.8] * 5, avg_change)], [.8] * 5),
            "mor-avg_rm": stats.paired(mor_change, avg_change)}


def test_bucket_claim_needs_its_premise_and_reads_the_change_difference_the_right_way():
    hurt = [-0.06, -0.05, -0.07, -0.06, -0.05]  # Avg RM loses 5-7 points: the premise holds
    c = report.bucket_claim(_effect(hurt, [-0.01, 0.0, -0.02, 0.0, -0.01]))
    assert c["premise"] and c["verdict"] == "holds" and c["mean"] > 0
    c = report.bucket_claim(_effect(hurt, [-0.10, -0.09, -0.11, -0.12, -0.10]))  # MoR loses more
    assert c["premise"] and c["verdict"] == "does not hold"
    c = report.bucket_claim(_effect([0.01, -0.02, 0.0, 0.02, -0.01], [0.05] * 5))  # the weak client did not hurt
    assert not c["premise"] and c["verdict"].startswith("premise fails")
    assert report.bucket_claim({}) is None


def test_crn_widths_shrink_when_the_noise_is_shared():
    """A seed's noise shared by both methods cancels in the paired difference: with
    a(s) = noise(s) + 0.05 and b(s) = noise(s), the paired interval has width 0 while the
    mismatched pairings see the noise; with nothing shared the ratio is near 1 on average."""
    noise = [0.10, -0.20, 0.05, 0.30, -0.15]
    a = [x + 0.05 for x in noise]
    w = stats.crn_widths(a, noise)
    assert w["paired"] < 1e-12 and w["mismatched"] > 0.3 and w["ratio"] < 1e-9
    # by hand, shift k = 1: pairs (a0, b1), ...: differences a(s) - b(s + 1)
    d = [a[i] - noise[(i + 1) % 5] for i in range(5)]
    m = sum(d) / 5
    se = (sum((x - m) ** 2 for x in d) / 4 / 5) ** 0.5
    assert abs(stats.paired(a, noise[1:] + noise[:1])["ci95_high"] - (m + stats.t_quantile(0.975, 4) * se)) < 1e-12
    assert stats.crn_widths(a[:2], noise[:2]) is None
