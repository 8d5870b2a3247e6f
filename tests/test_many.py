"""Many clients (pipeline.MANY): the K = 6 and K = 12 federations, the cost of routing as K grows,
and the table that sets the K's side by side (report.many_clients)."""

import json

import pytest
import torch

import data
import mixture
import router
from harness import pipeline, report
from harness.pipeline import MANY, MANY_METHODS, NARROW, Run
from mor import parse_args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    return {s: Run(parse_args(["--setting", s, "--run-dir", str(d)]))
            for s in ("heterogeneous", "many6", "many12")}


def test_the_federation_grows_by_narrow_honest_clients(runs):
    experts = list(pipeline.SETTINGS["heterogeneous"])
    six, twelve = runs["many6"].fed.clients, runs["many12"].fed.clients
    assert list(six) == experts + MANY["many6"] and len(six) == 6
    assert list(twelve) == experts + MANY["many12"] and len(twelve) == 12
    # K = 6 is inside K = 12, and the experts hold the same questions as in the K = 3 table
    for k in six:
        assert six[k] == twelve[k]
    for k in experts:
        assert twelve[k] == runs["heterogeneous"].fed.clients[k]
    # each narrow client: its domain, its answers only, true labels (the public split's images with
    # the careless annotator's confusions undone), disjoint from every other client's questions
    truth = {(e.image_id, e.prompt): e.answer for d in data.DOMAINS for e in data.easy_vqa_examples("train", 0)[d]}
    seen = set()
    for name in MANY["many12"]:
        dom, answers = NARROW[name]
        exs = twelve[name]
        assert len(exs) >= 150, name
        assert {e.domain for e in exs} == {dom} and {e.answer for e in exs} == set(answers)
        assert all(truth[e.image_id, e.prompt] == e.answer for e in exs)
        keys = {(e.image_id, e.prompt) for e in exs}
        assert not keys & seen
        seen |= keys
    public_images = set(runs["many12"].fed.image_split["public"])
    assert all(e.image_id in public_images for n in MANY["many12"] for e in twelve[n])


def test_narrow_clients_train_as_many_epochs_as_their_expert(runs):
    run = runs["many12"]
    for name in MANY["many12"]:
        dom = NARROW[name][0]
        assert run.family(name) == pipeline.SETTINGS["heterogeneous"][dom]
        share = len(run.fed.clients[name]) / len(run.fed.clients[dom])
        cfg = run.rm_config(name)
        want = max(pipeline.NARROW_MIN_STEPS, round(300 * share))
        assert cfg.sft_steps == cfg.steps == want and want < 300
    assert run.rm_config("color").steps == 300
    # the expert's RM is the K = 3 table's (same inputs, same directory): trained once for all K
    het = runs["heterogeneous"]
    for k in pipeline.SETTINGS["heterogeneous"]:
        assert run.rm_inputs(k) == het.rm_inputs(k) and run.rm_dir(k) == het.rm_dir(k)
    assert "answers red/brown" in run.rm_inputs("red_brown")["data"]
    quick = Run(parse_args(["--setting", "many12", "--quick", "--run-dir", str(run.dir)]))
    assert quick.rm_config("red_brown").steps == quick.args.rm_steps  # never more than the flags ask


def test_many_settings_compare_the_routing_methods_by_default(runs, tmp_path):
    assert pipeline.methods(runs["many12"]) == MANY_METHODS.split(",")
    one = Run(parse_args(["--setting", "many6", "--methods", "oracle,rm_circle", "--run-dir", str(tmp_path)]))
    assert pipeline.methods(one) == ["oracle", "rm_circle"]


class RowRM:
    def __init__(self):
        self.rows = 0

    def score(self, images, prompts, responses):
        self.rows += len(responses)
        return torch.ones(len(responses))

    def standardized(self, r):
        return r


@pytest.mark.parametrize("K", [3, 6, 12])
def test_hard_routing_scores_the_same_rows_whatever_k(K):
    """Hard routing's work per step is one RM per prompt: the rows scored do not grow with K, and
    an RM no prompt is routed to is never called. The soft mixture pays K RMs on every row."""
    N, G, D = 16, 4, 6
    torch.manual_seed(K)
    e = torch.randn(N, 1, D).expand(N, G, D).reshape(N * G, D)
    prompts = [f"q{i}" for i in range(N) for _ in range(G)]
    responses = [f"{w}{data.EOS}" for _ in range(N) for w in ("red", "blue", "green", "teal")]
    src = router.Router(D, K, hidden=8)
    rms = [RowRM() for _ in range(K)]
    mixture.HardReward(rms, src, G)(["img"] * (N * G), prompts, responses, e)
    arms = src(e.view(N, G, D).mean(1)).argmax(-1)
    assert sum(rm.rows for rm in rms) == N * G
    assert [rm.rows for rm in rms] == [G * int((arms == k).sum()) for k in range(K)]
    soft = [RowRM() for _ in range(K)]
    mixture.MixedReward(soft, src)(["img"] * (N * G), prompts, responses, e)
    assert [rm.rows for rm in soft] == [N * G] * K


def _table(seeds, acc):
    """A results dict as the eval stage writes it: {method: overall accuracy per seed}."""
    ms = {m: {"seeds": seeds, "per_seed": {"seeds": seeds, "overall": v},
              "seconds_per_step": {"mean": 1.0 + 0.1 * i, "std": 0.0},
              "reward_seconds_per_step": {"mean": 0.2, "std": 0.0}, "rm_rows_per_step": {"mean": 30.0, "std": 0.0},
              "peak_rss_mb": 500.0 + i, "rm_params_mb": 10.0}
          for i, (m, v) in enumerate(acc.items())}
    return {"methods": ms, "rm_pair_accuracy": {k: {} for k in range(len(acc) + 1)}}


def test_the_k_table_pairs_every_k_on_the_seeds_all_of_them_ran(tmp_path):
    k3 = _table([0, 1, 2, 3, 4], {"mor": [.8, .7, .9, .6, .5], "avg_rm": [.7, .7, .8, .6, .9]})
    k3["rm_pair_accuracy"] = {k: {} for k in range(3)}
    (tmp_path / "results.json").write_text(json.dumps(k3))
    (tmp_path / "router-heterogeneous.json").write_text(json.dumps({"rounds": [{}] * 30, "seconds": {
        "precompute": 40.0, "rounds": 2.0}}))
    k6 = _table([0, 1, 2], {"mor": [.9, .8, .7], "avg_rm": [.6, .7, .7]})
    k6["rm_pair_accuracy"] = {k: {} for k in range(6)}
    t = report.many_clients(tmp_path, "many6", k6)
    assert t["seeds"] == [0, 1, 2] and [row["K"] for row in t["K"]] == [3, 6]
    k3_row, k6_row = t["K"]
    # K = 3 on seeds 0-2 only: MoR - Avg = (.1, 0, .1) -> mean .0667
    assert k3_row["mor-avg_rm"]["mean"] == pytest.approx(0.2 / 3) and k3_row["mor-avg_rm"]["n"] == 3
    assert k3_row["methods"]["mor"]["overall"]["mean"] == pytest.approx(0.8)
    assert k6_row["mor-avg_rm"]["mean"] == pytest.approx(0.4 / 3) and k6_row["mor-avg_rm"]["wins"] == 2
    assert k3_row["router"] == {"rounds": 30, "seconds": {"precompute": 40.0, "rounds": 2.0}}
    assert "router" not in k6_row and k6_row["memory"] == {"peak_rss_mb": 501.0, "rm_params_mb": 10.0}
    md = "\n".join(report.many_clients_markdown(t))
    assert "| 3 | heterogeneous | 80.0 +/- 10.0 | 73.3 +/- 5.8 | +6.7 [" in md
    assert "| 6 | many6 |" in md and "| 3 | 1.00 [0.20] |" in md and "30, 40 + 2" in md
    report.many_clients_plot(t, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 0
    # a K = 12 table reads the smaller K's; the K = 6 table never reads K = 12's
    (tmp_path / "results-many6.json").write_text(json.dumps(k6))
    (tmp_path / "results-many12.json").write_text(json.dumps(k6))
    t6 = report.many_clients(tmp_path, "many6", k6)
    assert [row["setting"] for row in t6["K"]] == ["heterogeneous", "many6"]
    t12 = report.many_clients(tmp_path, "many12", _table([0, 1, 2], {"mor": [.9, .9, .9], "avg_rm": [.5, .5, .5]}))
    assert [row["setting"] for row in t12["K"]] == ["heterogeneous", "many6", "many12"]
