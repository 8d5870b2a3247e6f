"""The six benchmark gates (harness/report.py:gates), each held at both sides of its threshold: a
flipped comparison, an ignored threshold or a mean where the docs say max fails a case here."""
import copy

import pytest

from harness.report import gates


def _ok() -> dict:
    """A results dict on which every gate passes, each value a margin away from its threshold."""
    per_seed = {"seeds": [0, 1, 2, 3, 4], "malformed": [0.01, 0.02, 0.01, 0.0, 0.02]}
    return {
        "domains": ["color", "shape"], "eval_questions_per_domain": {"color": 10, "shape": 10},
        "chance": {"color": 0.125, "shape": 0.333}, "blind": {"color": 0.14, "shape": 0.35},
        "reference": {"color": 0.6, "shape": 0.6},
        # weak: a scenario client (bucket); gate 3 covers the domain experts only
        "rm_pair_accuracy": {"color": {"color": 0.95, "shape": 0.5, "weak": 0.5},
                             "shape": {"color": 0.5, "shape": 0.97, "weak": 0.5},
                             "weak": {"color": 0.6, "shape": 0.6, "weak": 0.55}},
        "methods": {"oracle": {"accuracy": {"color": {"mean": 0.7, "std": 0.0}, "shape": {"mean": 0.7, "std": 0.0}},
                               "malformed_share": {"mean": 0.012, "std": 0.0}, "per_seed": per_seed},
                    "mor": {"accuracy": {"color": {"mean": 0.7, "std": 0.0}, "shape": {"mean": 0.7, "std": 0.0}},
                            "malformed_share": {"mean": 0.012, "std": 0.0}, "per_seed": dict(per_seed)}},
    }


def _set(r: dict, path: str, value) -> dict:
    r = copy.deepcopy(r)
    *keys, last = path.split("/")
    d = r
    for k in keys:
        d = d[k]
    d[last] = value
    return r


def test_every_gate_passes_on_the_sound_case():
    g = gates(_ok())
    assert len(g) == 6 and all(x["pass"] for x in g.values()), g


# (gate, the field changed, a value that must pass, a value that must fail); each pair sits a small
# margin either side of the threshold, so neither a flipped comparison nor a threshold of 0 survives.
CASES = [
    ("1_blind_at_chance", "blind/color", 0.125 + 0.04, 0.125 + 0.06),
    ("2a_reference_above_blind", "reference/shape", 0.35 + 0.11, 0.35 + 0.09),
    ("3_client_rm_in_domain", "rm_pair_accuracy/color/color", 0.91, 0.89),
    ("4_oracle_grpo_gain", "methods/oracle/accuracy/shape/mean", 0.6 + 0.06, 0.6 + 0.04),
]


@pytest.mark.parametrize("gate,path,good,bad", CASES, ids=[c[0] for c in CASES])
def test_each_gate_holds_at_both_sides_of_its_threshold(gate, path, good, bad):
    g_good, g_bad = gates(_set(_ok(), path, good))[gate], gates(_set(_ok(), path, bad))[gate]
    assert g_good["pass"] and not g_bad["pass"]
    assert g_bad["value"] == pytest.approx(bad - (0.6 if "oracle" in path else 0.35 if "reference" in path
                                                  else 0.125 if "blind" in path else 0.0))


def test_gate_2b_caps_the_references_overall_accuracy():
    r = _set(_set(_ok(), "reference/color", 0.79), "reference/shape", 0.79)
    assert gates(r)["2b_reference_overall_at_most"]["pass"]
    r = _set(_set(_ok(), "reference/color", 0.81), "reference/shape", 0.81)
    g = gates(r)["2b_reference_overall_at_most"]
    assert not g["pass"] and g["value"] == pytest.approx(0.81)


def test_gate_3_leaves_the_scenario_clients_to_the_matrix():
    """The weak client's own accuracy (0.55) is far below 0.90, yet the gate reads the experts only."""
    g = gates(_ok())["3_client_rm_in_domain"]
    assert g["pass"] and g["value"] == pytest.approx(0.95)


def test_gate_5_is_the_max_over_methods_and_seeds():
    """One hacked seed among five fails the gate although the mean over seeds (0.02) is clean."""
    hacked = _set(_ok(), "methods/mor/per_seed/malformed", [0.01, 0.01, 0.0, 0.0, 0.08])
    g = gates(hacked)["5_no_reward_hacking"]
    assert not g["pass"] and g["value"] == pytest.approx(0.08)
    clean = _set(_ok(), "methods/mor/per_seed/malformed", [0.04, 0.04, 0.04, 0.04, 0.04])
    assert gates(clean)["5_no_reward_hacking"]["pass"]
    # the threshold is strict: 5% on a seed is already too much
    at = _set(_ok(), "methods/mor/per_seed/malformed", [0.0, 0.05])
    assert not gates(at)["5_no_reward_hacking"]["pass"]
