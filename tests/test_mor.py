"""Pipeline pieces: SFT lowers the loss, the eval counts right, stages resume, writes are atomic."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import judge
import models
import mor
import reward
import safe_io
from harness import pipeline, report


def test_sft_lowers_the_loss(tiny_dirs, fed):
    torch.manual_seed(0)
    model, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    enc = models.Encoder(proc)
    exs = fed.public[:64]
    batch = enc([e.image for e in exs], [e.prompt for e in exs], [e.answer + data.EOS for e in exs])
    with torch.no_grad():
        before = reward.sft_loss(model, batch).item()
    losses = reward.train_sft(model, enc, exs, steps=25, batch_size=32, lr=2e-3, seed=0)
    with torch.no_grad():
        after = reward.sft_loss(model, batch).item()
    assert len(losses) == 25
    assert after < 0.5 * before, (before, after)


def test_sft_loss_matches_hand_computation():
    # a 'model' whose logits are fixed: loss = mean CE over the response positions only
    logits = torch.randn(2, 5, 7)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, **kw):
            return type("O", (), {"logits": logits})()

    ids = torch.tensor([[0, 3, 4, 5, 6], [3, 4, 2, 1, 6]])
    resp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    got = reward.sft_loss(Fixed(), {"input_ids": ids, "response_mask": resp})
    lp = logits.log_softmax(-1)
    want = -(lp[0, 2, 5] + lp[0, 3, 6] + lp[1, 3, 6]) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_evaluate_counts_on_a_hand_made_case(monkeypatch):
    test = {"color": [data.Example("a", "q", "red", "color"), data.Example("b", "q", "blue", "color"),
                      data.Example("c", "q", "green", "color")],
            "shape": [data.Example("d", "q", "circle", "shape")]}
    answers = {"a": "red<|im_end|>", "b": "red<|im_end|>", "c": "green", "d": "circle<|im_end|>"}
    monkeypatch.setattr(judge, "generate", lambda m, e, images, prompts, **k: [answers[i] for i in images])
    out = judge.evaluate(torch.nn.Linear(1, 1), None, test, batch_size=2)
    assert out["correct"] == {"color": [1, 0, 0], "shape": [1]}  # 'green' lacks the end token
    assert out["accuracy"]["color"] == pytest.approx(1 / 3) and out["accuracy"]["shape"] == 1.0
    assert out["malformed_share"] == pytest.approx(1 / 4)


def test_win_rate_hand_computation():
    assert judge.win_rate([1, 0, 1, 0], [0, 1, 1, 0]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_atomic_dir_keeps_the_old_state_on_failure(tmp_path):
    target = tmp_path / "out"
    with safe_io.atomic_dir(target) as t:
        (t / "f").write_text("good")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_dir(target) as t:
            (t / "f").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "f").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp debris


# The smallest end-to-end run: every stage, four methods, one seed (~90 s on 2 cores).
TINY_RUN = ["--quick", "--sft-steps", "6", "--test-per-domain", "16", "--rm-sft-steps", "2", "--rm-steps", "3",
            "--router-pairs", "32", "--rounds", "2", "--methods", "oracle,mor,mor_soft,rm_color", "--grpo-steps", "2",
            "--group", "4", "--grpo-prompts", "6"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run directory of one complete TINY_RUN, shared by the tests that read its results."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    assert mor.main(TINY_RUN + ["--run-dir", str(run)]) == 0
    return run, json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_same_seed_and_flags_give_the_same_results_json(tiny_run, tmp_path):
    """Determinism on CPU: a second run of the same command in a fresh directory reproduces
    results.json exactly (every accuracy, win rate, KL, gate), wall times aside."""
    run2 = tmp_path / "run"
    assert mor.main(TINY_RUN + ["--run-dir", str(run2)]) == 0
    a, b = json.loads(json.dumps(tiny_run[1])), json.loads((run2 / "results.json").read_text())  # copies
    assert a.pop("wall_seconds").keys() == b.pop("wall_seconds").keys()
    for r in (a, b):  # wall-clock seconds per GRPO step and a worker's peak memory are not results
        for m in r["methods"].values():
            assert m.pop("seconds_per_step")["mean"] > 0
            assert m.pop("reward_seconds_per_step")["mean"] >= 0 and m.pop("peak_rss_mb") > 0
    assert a == b
    # and the artifacts behind it: the router and a policy, bit for bit
    from safetensors.torch import load_file

    for f in ("router-heterogeneous.safetensors", "policies/heterogeneous/mor/seed0/model.safetensors"):
        x, y = load_file(str(tiny_run[0] / f)), load_file(str(run2 / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


@pytest.mark.slow
def test_quick_pipeline_runs_and_resumes(tiny_run, capsys):
    run, res = tiny_run
    args = TINY_RUN + ["--run-dir", str(run)]
    m = res["rm_pair_accuracy"]  # client x domain, every client evaluated on every domain
    assert set(m) == set(data.DOMAINS) and all(set(row) == set(data.DOMAINS) for row in m.values())
    assert {"1_blind_at_chance", "2a_reference_above_blind", "3_client_rm_in_domain"} <= set(res["gates"])
    assert all(set(g) == {"pass", "value", "threshold"} for g in res["gates"].values())
    assert set(res["methods"]) == {"oracle", "mor", "mor_soft", "rm_color"} and res["seeds"] == [0]
    for m in res["methods"].values():
        assert set(m["accuracy"]) == set(data.DOMAINS) and set(m["win_rate"]) == set(data.DOMAINS)
        # one seed: each accuracy is a count of right answers out of the 16 questions of a domain
        assert all(abs(16 * v["mean"] - round(16 * v["mean"])) < 1e-9 for v in m["accuracy"].values())
    assert {"4_oracle_grpo_gain", "5_no_reward_hacking"} <= set(res["gates"])
    log = json.loads((run / "policies" / "heterogeneous" / "rm_color" / "seed0" / "grpo_log.json").read_text())
    # an individual RM runs only its own model, on at most the 2 steps x 6 prompts x 4 samples
    assert 0 < log["rm_calls"][0] <= 2 * 6 * 4 and log["rm_calls"][1:] == [0, 0]
    # hard routing (NTS): each sample is scored by its prompt's RM, and a probed prompt's by all
    # K RMs: at most (1 + (K - 1) * probes) * G rows per prompt -- O(1) in K off the probes
    pol = run / "policies" / "heterogeneous" / "mor" / "seed0"
    nts_log = json.loads((pol / "grpo_log.json").read_text())
    routing = [json.loads(x) for x in (pol / "routing_log.jsonl").read_text().splitlines()]
    assert len(routing) == 2 * 6 and {x["domain"] for x in routing} <= set(data.DOMAINS)
    assert 0 < sum(nts_log["rm_calls"]) <= sum((1 + 2 * x["probe"]) * 4 for x in routing)
    assert set(nts_log["routing_own_share"]) == set(data.DOMAINS)
    assert sum(sum(c) for c in nts_log["nts"]["arm_counts"].values()) == 2 * 6  # one arm per prompt
    fams = {c: json.loads((run / "clients" / c / f"reward-{f}" / "reward.json").read_text())["family"]
            for c, f in pipeline.SETTINGS["heterogeneous"].items()}
    assert fams == {"color": "llava_onevision", "shape": "qwen2_5_vl", "position": "qwen2_vl"}
    assert res["domains"] == data.DOMAINS
    assert res["eval_questions_per_domain"] == {d: 16 for d in data.DOMAINS}
    assert res["chance"] == {"color": 1 / 8, "shape": 1 / 3, "position": 1 / 2}
    for key in ("blind", "reference"):  # counts out of 16 questions per domain
        assert set(res[key]) == set(data.DOMAINS)
        assert all(abs(16 * v - round(16 * v)) < 1e-9 for v in res[key].values())
    assert "reference (SFT)" in (run / "results.md").read_text()
    # each GRPO job evaluated its own policy (in its worker); eval took those figures as they were
    pol = run / "policies" / "heterogeneous" / "mor_soft" / "seed0"
    te = json.loads((pol / "test_eval.json").read_text())
    assert json.loads((pol / "eval.json").read_text())["accuracy"] == te["accuracy"] == {
        d: sum(v) / len(v) for d, v in te["correct"].items()}
    assert res["methods"]["mor_soft"]["accuracy"]["color"]["mean"] == te["accuracy"]["color"]
    # two workers: the server's base -> sft was one job of the reward stage's pool, timed inside it
    w = json.loads((run / "wall_seconds.json").read_text())  # the run's own record of stage times
    assert w["beside_reward"] == pytest.approx(w["base"] + w["sft"], abs=0.02)
    assert w["reward-heterogeneous"] >= w["base"] + w["sft"]
    assert "inside reward's time" in (run / "results.md").read_text()
    stamp = (run / "base" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert mor.main(args) == 0
    out = capsys.readouterr().out
    assert "[sft] done already" in out and "[eval] done already" in out and "[reward] done already" in out
    assert (run / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    # A reward stage killed after two clients: the finished clients' RMs are kept, not retrained.
    rm_file = run / "clients" / "shape" / "reward-qwen2_5_vl" / "head.safetensors"
    stamp = rm_file.stat().st_mtime_ns
    shutil.rmtree(run / "clients" / "position")
    (run / "rm_matrix-heterogeneous.json").unlink()
    assert mor.main(args + ["--stages", "reward"]) == 0
    assert rm_file.stat().st_mtime_ns == stamp
    assert (run / "clients" / "position" / "reward-qwen2_vl" / "head.safetensors").exists()


@pytest.mark.slow
def test_eval_alone_reports_the_trained_methods_and_names_a_missing_policy(tiny_run):
    """`--stages eval --force` without --methods evaluates what the grpo stage trained (the bucket
    setting trains three of E8's methods); a --methods entry with no policy is a one-line error."""
    run, res = tiny_run
    i = TINY_RUN.index("--methods")
    args = TINY_RUN[:i] + TINY_RUN[i + 2:] + ["--run-dir", str(run), "--stages", "eval", "--force"]
    assert mor.main(args) == 0
    again = json.loads((run / "results.json").read_text())
    assert set(again["methods"]) == set(res["methods"]) == {"oracle", "mor", "mor_soft", "rm_color"}
    assert again["methods"]["mor"] == res["methods"]["mor"]
    with pytest.raises(SystemExit, match=r"avg_rm[/\\]seed0 holds no GRPO policy"):
        mor.main(args + ["--methods", "oracle,avg_rm"])


def test_same_seed_same_sft_on_cpu(tiny_dirs, fed):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
        losses = reward.train_sft(model, models.Encoder(proc), fed.public[:96], steps=3, batch_size=24, lr=1e-3, seed=5)
        runs.append((losses, next(model.parameters()).detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_balanced_batches_share_domains_evenly(fed):
    b = next(models.balanced_batches(fed.public, 64, seed=0))
    counts = {d: sum(e.domain == d for e in b) for d in data.DOMAINS}
    assert len(b) == 64 and sorted(counts.values()) == [21, 21, 22]


def test_base_flag_takes_a_checkpoint_directory(tiny_dirs, tmp_path):
    run = tmp_path / "run"
    assert mor.main(["--quick", "--run-dir", str(run), "--base", str(tiny_dirs["qwen2_5_vl"]),
                     "--stages", "base,sft", "--sft-steps", "2"]) == 0
    assert not (run / "base_init").exists()  # the base stage is skipped for a given checkpoint
    cfg = json.loads((run / "base" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


@pytest.mark.slow
def test_homogeneous_setting_adds_fedavg_rm(tmp_path):
    run = tmp_path / "run"
    assert mor.main(["--quick", "--run-dir", str(run), "--setting", "homogeneous", "--stages", "base,reward",
                     "--rm-sft-steps", "1", "--rm-steps", "2"]) == 0
    m = json.loads((run / "rm_matrix-homogeneous.json").read_text())
    assert set(m["rm_pair_accuracy"]) == set(data.DOMAINS) | {"fedavg_rm", "fedavg_rm_oneshot"}
    assert set(m["families"].values()) == {"qwen2_vl"}
    info = json.loads((run / "clients" / "fedavg_rm" / "reward.json").read_text())
    assert info["n_pairs"] == sum(m["n_pairs"].values()) and info["std"] > 0


@pytest.mark.slow
def test_a_killed_run_resumes_without_recomputing_or_debris(tmp_path):
    """kill -9 in the middle of the sft stage, rerun: base_init is kept as it was, sft is redone
    from scratch, and no half-written directory is left behind."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    cmd = [sys.executable, "mor.py", "--quick", "--run-dir", str(run), "--stages", "base,sft", "--threads", "1"]
    p = subprocess.Popen(cmd + ["--sft-steps", "5000"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "base_init").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(4)  # well inside the 5000 SFT steps
    finally:
        p.kill()
        p.wait()
    assert (run / "base_init").exists() and not (run / "base").exists()
    stamp = (run / "base_init" / "model.safetensors").stat().st_mtime_ns
    assert mor.main(cmd[2:] + ["--sft-steps", "2"]) == 0
    assert (run / "base_init" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (run / "base" / "model.safetensors").exists()
    assert not [f.name for f in run.iterdir() if ".tmp" in f.name or ".old" in f.name]


def test_atomic_dir_clears_what_a_kill_left(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.tmp999").mkdir()  # half-written by a killed process
    (tmp_path / ".out.old999").mkdir()  # killed between the two renames: the last good copy
    (tmp_path / ".out.old999" / "f").write_text("good")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_dir(target):
            raise RuntimeError("fails again")
    assert (target / "f").read_text() == "good"  # the parked copy was restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plots_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report.plots(pipeline.Run(mor.parse_args(["--run-dir", str(tmp_path / "r")])))
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_shared_image_generate_gives_the_same_answers(tiny_dirs, fed, family):
    # evaluate() hands generate one vision pass per distinct image; answers must not change
    model, proc = models.load_vlm(tiny_dirs[family])
    enc = models.Encoder(proc)
    exs = sorted((e for d in data.DOMAINS for e in fed.test[d][:40]), key=lambda e: e.image)[:48]
    assert len({e.image for e in exs}) < len(exs)  # some images really are shared
    args = (model, enc, [e.image for e in exs], [e.prompt for e in exs])
    assert judge.generate(*args, share_images=True) == judge.generate(*args)


def test_flip_pairs_reverses_the_asked_share(fed):
    pairs = data.make_pairs(fed.clients["color"], 0)
    assert data.flip_pairs(pairs, 0.0, 0) == pairs
    assert all(f.chosen == p.rejected and f.rejected == p.chosen for f, p in zip(data.flip_pairs(pairs, 1.0, 0), pairs))
    half = data.flip_pairs(pairs, 0.5, 0)
    share = sum(f.chosen != p.chosen for f, p in zip(half, pairs)) / len(pairs)
    assert 0.45 < share < 0.55 and half == data.flip_pairs(pairs, 0.5, 0)


@pytest.mark.slow
def test_noisy_setting_adds_the_noisy_client(tmp_path):
    run = tmp_path / "run"
    assert mor.main(["--quick", "--run-dir", str(run), "--setting", "noisy", "--stages", "base,reward",
                     "--rm-sft-steps", "1", "--rm-steps", "2"]) == 0
    m = json.loads((run / "rm_matrix-noisy.json").read_text())
    assert set(m["n_pairs"]) == {*data.DOMAINS, "noisy"}
    # the noisy client holds the most pairs: Weighted RM trusts it most
    assert m["n_pairs"]["noisy"] > max(m["n_pairs"][d] for d in data.DOMAINS)
    assert (run / "clients" / "noisy" / "reward-llava_onevision" / "reward.json").exists()


def test_bucket_weak_client_is_honest_few_and_under_trained(tmp_path):
    """The paper's weak client, failing as real weak RMs fail: clean labels (true answers), few
    questions over all three domains, all answered by one answer per domain (its shortcut: the
    only answers its RM has seen preferred), a fraction of the RM recipe."""
    a = mor.parse_args(["--run-dir", str(tmp_path / "run"), "--setting", "bucket"])
    run = pipeline.Run(a)
    assert pipeline.weak_client("bucket") == "weak" and pipeline.weak_client("heterogeneous") is None
    exs = run.fed.clients["weak"]
    assert len(exs) == pipeline.WEAK_QUESTIONS and {e.domain for e in exs} == set(data.DOMAINS)
    truth = {(e.image, e.prompt): e.answer for e in data.build_federation(0, confusions={}).public}
    assert all(truth[e.image, e.prompt] == e.answer for e in exs)  # clean labels
    # the shortcut: one answer per domain, so its RM leans that way inside every domain
    assert {e.answer for e in exs} == set(pipeline.WEAK_ANSWERS)
    assert {data.question_domain(a) for a in pipeline.WEAK_ANSWERS} == set(data.DOMAINS)
    pairs = run.clients()["weak"]
    assert pairs.n < min(run.clients()[d].n for d in data.DOMAINS) / 3
    cfg, full = run.rm_config("weak"), run.rm_config("color")
    assert (cfg.sft_steps, cfg.steps) == pipeline.WEAK_RM_STEPS and (full.sft_steps, full.steps) == (300, 300)
    # the recipe is part of the weak RM's provenance: changing it redoes the RM
    assert run.rm_inputs("weak")["steps"] == pipeline.WEAK_RM_STEPS[1]


def test_bucket_table_compares_with_and_without_the_weak_client():
    acc = lambda c, s, p: {"color": {"mean": c, "std": 0}, "shape": {"mean": s, "std": 0},
                           "position": {"mean": p, "std": 0}}
    m = {"accuracy": acc(0.5, 0.5, 0.5), "win_rate": acc(0.5, 0.5, 0.5), "malformed_share": {"mean": 0},
         "final_kl": {"mean": 0.1}}
    r = {"domains": data.DOMAINS, "eval_questions_per_domain": {"color": 100, "shape": 100, "position": 200},
         "seeds": [0], "chance": acc(0, 0, 0), "blind": {d: 0 for d in data.DOMAINS},
         "reference": {d: 0 for d in data.DOMAINS}, "methods": {"avg_rm": m}, "wall_seconds": {},
         "without_weak_client": {"without": {"avg_rm": acc(0.9, 0.6, 0.8)}, "with": {"avg_rm": acc(0.5, 0.5, 0.5)}}}
    r["chance"] = {d: 0 for d in data.DOMAINS}
    md = report.results_markdown(r)
    # overall without = (90 + 60 + 2 * 80) / 4 = 77.5; with = 50.0
    assert "| avg_rm | 90.0 / 50.0 | 60.0 / 50.0 | 80.0 / 50.0 | 77.5 | 50.0 | -27.5 |" in md


def test_clients_of_the_base_family_start_from_the_pretrained_base(tmp_path, tiny_dirs):
    """Run.client_init: the position client (Qwen2-VL, the base's family) starts from base_init,
    the others from their family's tiny checkpoint; --client-model and --base override it, and
    the base's provenance is part of such an RM's inputs (a new base redoes the RM)."""
    a = mor.parse_args(["--run-dir", str(tmp_path / "run")])
    run = pipeline.Run(a)
    assert run.from_base("position") and not run.from_base("color") and not run.from_base("shape")
    assert run.client_init("position") == run.dir / "base_init"
    assert "base" in run.rm_inputs("position")["init"] and "tiny" in run.rm_inputs("color")["init"]
    a2 = mor.parse_args(["--run-dir", str(tmp_path / "run"), "--pretrain-steps", "7"])
    assert pipeline.Run(a2).rm_inputs("position") != run.rm_inputs("position")
    assert pipeline.Run(a2).rm_inputs("color") == run.rm_inputs("color")
    given = Path(tiny_dirs["qwen2_vl"])
    a3 = mor.parse_args(["--run-dir", str(tmp_path / "run"), "--client-model", f"position={given}"])
    assert pipeline.Run(a3).client_init("position") == given and not pipeline.Run(a3).from_base("position")


def test_reward_stage_refuses_a_missing_base_for_base_family_clients(tmp_path):
    with pytest.raises(SystemExit, match="start from the pre-trained base"):
        mor.main(["--quick", "--run-dir", str(tmp_path / "run"), "--stages", "reward"])


@pytest.mark.slow
def test_a_client_joins_a_trained_router_without_retraining(tiny_run, tmp_path, capsys):
    """--router-from: the bucket setting's fourth client joins the heterogeneous router; the
    three kept rows come over unchanged before the rounds, the joiner fits its own row."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    src = run / "router-heterogeneous.safetensors"
    assert mor.main(TINY_RUN + ["--run-dir", str(run), "--setting", "bucket", "--stages", "reward,router",
                                "--router-from", str(src), "--rounds", "1"]) == 0
    summary = json.loads((run / "router-bucket.json").read_text())
    assert summary["warm_start"] == {"from": str(src), "joined": ["weak"]} and summary["rms"][-1] == "weak"
    assert len(summary["rounds"]) == 1
    # before any round, the three kept rows are the trained router's (a 0-round warm start)
    assert mor.main(TINY_RUN + ["--run-dir", str(run), "--setting", "bucket", "--stages", "router",
                                "--router-from", str(src), "--rounds", "1", "--router-lr", "1e-12"]) == 0
    old, new = load_file(src), load_file(run / "router-bucket.safetensors")
    W = [k for k in old if k.startswith("net.") and k.endswith(".weight")][-1]
    assert torch.allclose(new[W][:3], old[W][:3], atol=1e-6) and new[W].shape[0] == 4
    lone = tmp_path / "lone.safetensors"  # a router without its names beside it is refused up front
    shutil.copy(src, lone)
    with pytest.raises(SystemExit):
        mor.parse_args(["--run-dir", str(run), "--router-from", str(lone)])
    assert "not found beside it" in capsys.readouterr().err


def test_weak_client_effect_is_paired_on_the_common_seeds():
    """report.weak_client_effect: with = bucket run (seeds 0-2), without = main table (seeds
    0-4); only seeds 0-2 count, and MoR's change is compared with Avg RM's seed by seed."""
    def m(overall, seeds):
        return {"per_seed": {"seeds": seeds, "overall": overall,
                             "accuracy": {d: overall for d in data.DOMAINS}}}
    res = {"domains": data.DOMAINS,
           "methods": {"mor": m([0.80, 0.82, 0.84], [0, 1, 2]), "avg_rm": m([0.70, 0.70, 0.70], [0, 1, 2])}}
    without = {"mor": m([0.81, 0.83, 0.85, 0.10, 0.10], [0, 1, 2, 3, 4]),
               "avg_rm": m([0.75, 0.74, 0.76, 0.99, 0.99], [0, 1, 2, 3, 4])}
    acc0, eff = report.weak_client_effect(res, without)
    assert acc0["without"]["mor"]["color"]["mean"] == pytest.approx(0.83)  # seeds 3, 4 left out
    assert acc0["with"]["mor"]["color"]["mean"] == pytest.approx(0.82)
    # no seed in common: nothing paired, no crash
    assert report.weak_client_effect(res, {"mor": m([0.5], [7])}) == ({"without": {}, "with": {}}, {})
    assert eff["mor"]["mean"] == pytest.approx(-0.01) and eff["mor"]["seeds"] == [0, 1, 2]
    assert eff["avg_rm"]["mean"] == pytest.approx(-0.05)
    # change(mor) - change(avg): (-0.01) - (-0.05, -0.04, -0.06) = 0.04, 0.03, 0.05
    assert eff["mor-avg_rm"]["mean"] == pytest.approx(0.04) and eff["mor-avg_rm"]["wins"] == 3
    md = report.results_markdown({"domains": data.DOMAINS, "eval_questions_per_domain": {d: 1 for d in data.DOMAINS},
                                  "seeds": [0, 1, 2], "chance": {d: 0 for d in data.DOMAINS},
                                  "blind": {d: 0 for d in data.DOMAINS}, "reference": {d: 0 for d in data.DOMAINS},
                                  "wall_seconds": {}, "setting": "bucket", "without_weak_client": acc0,
                                  "weak_client_effect": eff,
                                  "methods": {k: {"accuracy": {d: {"mean": sum(v["per_seed"]["overall"]) / 3, "std": 0}
                                                               for d in data.DOMAINS},
                                                  "win_rate": {d: {"mean": 0.5, "std": 0} for d in data.DOMAINS},
                                                  "malformed_share": {"mean": 0}, "final_kl": {"mean": 0.1}}
                                              for k, v in res["methods"].items()}})
    assert "| mor - avg_rm | +4.0 [" in md and "`weak`" in md


@pytest.mark.slow
def test_many_clients_setting_joins_the_k3_run(tiny_run, tmp_path):
    """--setting many6 in a finished K = 3 run directory: the experts' RMs are kept, the three
    narrow clients train theirs, the router precompute is shared by two workers, and
    results-many6.md sets K = 3 and K = 6 side by side on their common seed."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    head = run / "clients" / "color" / "reward-llava_onevision" / "head.safetensors"
    stamp = head.stat().st_mtime_ns
    assert mor.main(TINY_RUN + ["--methods", "mor,mor_soft,mor_hard", "--setting", "many6", "--run-dir", str(run)]) == 0
    assert head.stat().st_mtime_ns == stamp  # trained once for every K
    for name in pipeline.MANY["many6"]:
        fam = pipeline.SETTINGS["many6"][name]
        assert (run / "clients" / name / f"reward-{fam}" / "head.safetensors").exists()
    r = json.loads((run / "results-many6.json").read_text())
    names = [*data.DOMAINS, *pipeline.MANY["many6"]]
    m = r["rm_pair_accuracy"]
    assert set(m) == set(names) and all(set(v) == set(names) for v in m.values())
    assert json.loads((run / "router-many6.json").read_text())["rms"] == names
    t = r["many_clients"]
    assert t["seeds"] == [0] and [(x["setting"], x["K"]) for x in t["K"]] == [("heterogeneous", 3), ("many6", 6)]
    assert set(t["K"][0]["methods"]) == {"mor", "mor_soft"}
    assert set(t["K"][1]["methods"]) == {"mor", "mor_soft", "mor_hard"}
    hard = r["methods"]["mor_hard"]
    assert hard["rm_rows_per_step"]["mean"] <= 6 * 4 and hard["peak_rss_mb"] > 0 and hard["rm_params_mb"] > 0
    md = (run / "results-many6.md").read_text()
    assert "Many clients" in md and "| 6 | many6 |" in md and "| red_brown |" in md
    assert (run / "many-clients-many6.png").exists()
