"""Runs that cannot lie: every flag range-checked before any work, stage outputs carrying the
inputs that made them (harness/provenance.py), stale outputs redone, --force that redoes, and an
own-task run through JSONL files that reproduces the embedded run."""
import json

import pytest

import data
import mixture
import mor
from harness import provenance
from harness.pipeline import Run


@pytest.mark.parametrize("argv,flag", [
    (["--group", "1"], "--group 1"), (["--rounds", "0"], "--rounds 0"), (["--seeds", "0,0"], "--seeds 0,0"),
    (["--test-per-domain", "-5"], "--test-per-domain -5"), (["--test-per-domain", "0"], "--test-per-domain 0"),
    (["--grpo-steps", "0"], "--grpo-steps 0"), (["--rm-batch", "0"], "--rm-batch 0"), (["--beta", "inf"], "--beta inf"),
    (["--threads", "-4"], "--threads -4"), (["--seeds", "a,b"], "--seeds 'a,b'"), (["--sft-lr", "nan"], "--sft-lr nan"),
    (["--router-lr", "-1e-3"], "--router-lr"), (["--nts-nu", "-1"], "--nts-nu"), (["--workers", "0"], "--workers 0"),
    (["--client-fraction", "0"], "--client-fraction"), (["--stages", "sft,sft"], "named twice"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"), (["--prompts", "/nonexistent.jsonl"], "--prompts"),
    (["--client-model", "color=/nonexistent"], "--client-model"), (["--setting", "own"], "--setting own"),
    (["--methods", "oracle,mor_nts"], "--methods mor_nts: renamed to mor"),
    (["--fedavg-rm-rounds", "0"], "--fedavg-rm-rounds 0"),
    (["--lora-r", "-1"], "--lora-r -1"), (["--rm-sft-lr", "0"], "--rm-sft-lr 0"), (["--rm-sft-batch", "0"], "--rm-sft-batch 0"),
])
def test_nonsense_flag_values_are_one_line_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        mor.parse_args(["--quick", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "Traceback" not in err


def test_stages_run_in_the_pipelines_order_and_seeds_parse():
    a = mor.parse_args(["--quick", "--stages", "eval,sft", "--seeds", "3,1"])
    assert a.stages == "sft,eval" and a.seeds == [3, 1]


def _run(tmp_path, *extra) -> Run:
    return Run(mor.parse_args(["--quick", "--run-dir", str(tmp_path), *extra]))


def test_the_paper_names_the_default_rows_and_the_reference_rows_run_on_request(tmp_path):
    """mor is the paper's MoR (NTS around the federated router), mor_soft and mor_hard the
    frozen router; the reference rows run only when named (or 'all', --full's main table), on
    the --single-rm-seeds seeds; the bucket setting's weak client leans one way per domain."""
    from harness import pipeline

    run = _run(tmp_path, "--seeds", "0,1,2,3")
    ms = pipeline.methods(run)
    assert ms[:6] == ["oracle", "mor", "mor_soft", "mor_hard", "avg_rm", "weighted_rm"]
    assert not set(ms) & set(pipeline.EXTRA_METHODS)
    assert "nts" in run.policy_inputs("mor", 0) and "nts" not in run.policy_inputs("mor_soft", 0)
    every = pipeline.methods(_run(tmp_path, "--methods", "all"))
    assert set(pipeline.EXTRA_METHODS) <= set(every) and "fedavg_rm" not in every
    asked = _run(tmp_path, "--seeds", "0,1,2,3", "--methods", "mor,central_router,random_hard")
    assert pipeline.methods(asked) == ["mor", "random_hard", "central_router"]
    assert asked.seeds("central_router") == [0, 1, 2] and asked.seeds("mor") == [0, 1, 2, 3]
    assert run.policy_inputs("central_router", 0)["router"] != run.policy_inputs("mor_soft", 0)["router"]
    homo = pipeline.methods(_run(tmp_path, "--setting", "homogeneous", "--methods", "all"))
    assert {"fedavg_rm", "fedavg_rm_oneshot"} <= set(homo)
    with pytest.raises(SystemExit, match="unknown"):
        pipeline.methods(_run(tmp_path, "--methods", "fedavg_rm"))  # heterogeneous: no FedAvg-RM
    weak = _run(tmp_path, "--setting", "bucket").fed.clients["weak"]
    assert len(weak) == pipeline.WEAK_QUESTIONS and {e.answer for e in weak} == set(pipeline.WEAK_ANSWERS)


def test_every_input_reaches_the_outputs_that_depend_on_it(tmp_path):
    """Upstream digests chain the stages: a flag of one stage changes that stage's inputs and
    every stage below it, and nothing above it."""
    base = _run(tmp_path)

    def digests(run):
        return {"base": provenance.digest(run.base_inputs()), "sft": provenance.digest(run.sft_inputs()),
                "rm": provenance.digest(run.rm_inputs("color")), "router": provenance.digest(run.router_inputs()),
                "mor": provenance.digest(run.policy_inputs("mor", 0)),
                "oracle": provenance.digest(run.policy_inputs("oracle", 0)),
                "eval": provenance.digest(run.test_signature())}

    d0 = digests(base)
    for flag, value, changed in [
        ("--rm-steps", "7", {"rm", "router", "mor"}),
        ("--sft-lr", "1e-4", {"sft", "router", "mor", "oracle"}),
        ("--rm-sft-lr", "1e-4", {"rm", "router", "mor"}),
        ("--lora-r", "4", {"sft", "rm", "router", "mor", "oracle"}),
        ("--pretrain-steps", "3", {"base", "sft", "router", "mor", "oracle"}),
        ("--rounds", "3", {"router", "mor"}),
        ("--group", "3", {"mor", "oracle"}),
        ("--test-per-domain", "8", {"eval"}),
        ("--judge", "contains", {"eval"}),
    ]:
        d1 = digests(_run(tmp_path, flag, value))
        assert {k for k in d0 if d0[k] != d1[k]} == changed, flag
    # a new client changes the client set: the matrix and the router are redone, the existing
    # clients' RMs are not
    pairs = tmp_path / "pairs.jsonl"
    img = data.build_federation(0).clients["color"][0].image
    pairs.write_text(json.dumps({"image": img, "prompt": "what color is the shape?", "chosen": "red<|im_end|>",
                                 "rejected": "blue<|im_end|>"}) + "\n")
    grown = _run(tmp_path, "--client-data", f"evil={pairs}")
    assert grown.matrix_inputs() != base.matrix_inputs() and grown.router_inputs() != base.router_inputs()
    assert grown.rm_inputs("color") == base.rm_inputs("color")
    # the user's file is part of its client's inputs: an edit makes that RM stale
    before = provenance.digest(grown.rm_inputs("evil"))
    pairs.write_text(pairs.read_text().replace("blue", "green"))
    assert provenance.digest(_run(tmp_path, "--client-data", f"evil={pairs}").rm_inputs("evil")) != before


def test_fresh_needs_a_matching_record_and_says_what_changed(tmp_path, capsys):
    run = _run(tmp_path)
    out = tmp_path / "clients" / "color" / "reward-x"
    assert not run.fresh(out, run.rm_inputs("color"), "reward color")  # missing
    out.mkdir(parents=True)
    assert not run.fresh(out, run.rm_inputs("color"), "reward color")  # no record: an older output
    assert "no provenance record" in capsys.readouterr().out
    provenance.record_dir(out, run.rm_inputs("color"))
    assert run.fresh(out, run.rm_inputs("color"), "reward color")
    other = _run(tmp_path, "--rm-steps", "9")
    assert not other.fresh(out, other.rm_inputs("color"), "reward color")
    assert "steps: 10 -> 9" in capsys.readouterr().out


# The smallest run that reaches the policies (one method, one seed, two steps).
SMALL = ["--quick", "--sft-steps", "4", "--pretrain-steps", "2", "--test-per-domain", "8", "--rm-sft-steps", "1",
         "--rm-steps", "2", "--router-pairs", "16", "--rounds", "1", "--methods", "avg_rm", "--grpo-steps", "2",
         "--group", "2", "--grpo-prompts", "3", "--workers", "1", "--threads", "1"]


@pytest.mark.slow
def test_a_rerun_with_other_flags_redoes_what_they_change_and_force_redoes(tmp_path, capsys):
    run = tmp_path / "run"
    assert mor.main(SMALL + ["--run-dir", str(run)]) == 0
    pol = run / "policies" / "heterogeneous" / "avg_rm" / "seed0"
    rm = run / "clients" / "color" / "reward-llava_onevision" / "head.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in (pol / "model.safetensors", rm, run / "base" / "model.safetensors")}
    # --group changes GRPO's inputs only: the policy is retrained, the RMs and the reference kept,
    # and config.json says what the grpo stage ran with
    capsys.readouterr()
    assert mor.main(SMALL + ["--run-dir", str(run), "--group", "3"]) == 0
    out = capsys.readouterr().out
    assert "group: 2 -> 3" in out
    assert json.loads((pol / "grpo_log.json").read_text())["config"]["group"] == 3
    assert (pol / "model.safetensors").stat().st_mtime_ns != stamps[pol / "model.safetensors"]
    assert rm.stat().st_mtime_ns == stamps[rm]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["invocation"]["group"] == 3
    assert cfg["stages"]["grpo-heterogeneous"]["policies"]["avg_rm/seed0"]["group"] == 3
    # the same flags again: nothing is redone
    stamp = (pol / "model.safetensors").stat().st_mtime_ns
    assert mor.main(SMALL + ["--run-dir", str(run), "--group", "3"]) == 0
    assert (pol / "model.safetensors").stat().st_mtime_ns == stamp
    # --force redoes the named stages' per-(method, seed) and per-client outputs
    assert mor.main(SMALL + ["--run-dir", str(run), "--group", "3", "--force", "--stages", "reward,grpo"]) == 0
    assert (pol / "model.safetensors").stat().st_mtime_ns != stamp and rm.stat().st_mtime_ns != stamps[rm]
    # a stale upstream that this invocation does not redo is refused, naming it
    with pytest.raises(SystemExit, match="reads the router stage's output, which is stale"):
        mor.main(SMALL + ["--run-dir", str(run), "--group", "3", "--rounds", "2", "--stages", "grpo",
                          "--methods", "mor"])
    # a new client joins a finished run: its RM is trained and it appears in the matrix
    pairs = tmp_path / "evil.jsonl"
    p = data.make_pairs(data.build_federation(0).clients["color"][:10], 0)
    pairs.write_text("".join(json.dumps({"image": x.image, "prompt": x.prompt, "chosen": x.chosen,
                                         "rejected": x.rejected}) + "\n" for x in p))
    assert mor.main(SMALL + ["--run-dir", str(run), "--group", "3", "--client-data", f"evil={pairs}"]) == 0
    m = json.loads((run / "rm_matrix-heterogeneous.json").read_text())["rm_pair_accuracy"]
    assert "evil" in m and (run / "clients" / "evil").exists()


@pytest.mark.slow
def test_a_method_whose_every_grpo_step_was_skipped_fails_instead_of_reporting(tmp_path, monkeypatch):
    import torch

    def nan_rewards(self, images, prompts, responses, e):
        return torch.full((len(responses),), float("nan"))

    monkeypatch.setattr(mixture.MixedReward, "__call__", nan_rewards)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="all 2 steps were skipped"):
        mor.main(SMALL + ["--run-dir", str(run)])
    assert not (run / "policies" / "heterogeneous" / "avg_rm" / "seed0").exists()
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_own_task_files_reproduce_the_embedded_run(tmp_path):
    """The embedded benchmark written out as JSONL (data.export_benchmark) and run through
    --setting own --client-data/--prompts/--eval/--sft-data gives the figures of the embedded
    homogeneous run (every client on the tiny Qwen2-VL, as user clients are)."""
    small = [x for x in SMALL if x not in ("--methods", "avg_rm")] + ["--methods", "oracle,mor,avg_rm"]
    emb = tmp_path / "embedded"
    assert mor.main(small + ["--run-dir", str(emb), "--setting", "homogeneous"]) == 0
    files = tmp_path / "files"
    data.export_benchmark(files, seed=0, test_per_domain=8)
    own = tmp_path / "own"
    argv = small + ["--run-dir", str(own), "--setting", "own", "--prompts", str(files / "prompts.jsonl"),
                    "--eval", str(files / "eval.jsonl"), "--sft-data", str(files / "sft.jsonl")]
    for c in data.DOMAINS:
        argv += ["--client-data", f"{c}={files / 'clients' / (c + '.jsonl')}"]
    assert mor.main(argv) == 0
    a = json.loads((emb / "results-homogeneous.json").read_text())
    b = json.loads((own / "results-own.json").read_text())
    assert b["own_task"] and not b["gates"] and b["blind"] is None
    assert a["reference"] == b["reference"]
    assert {k: v for k, v in a["rm_pair_accuracy"].items() if not k.startswith("fedavg_rm")} == b["rm_pair_accuracy"]
    for m in ("oracle", "mor", "avg_rm"):
        assert a["methods"][m]["accuracy"] == b["methods"][m]["accuracy"], m
    assert "no oracle row" not in (own / "results-own.md").read_text()


def test_progress_prints_plain_lines_in_a_log_or_a_worker(monkeypatch, capsys):
    """Off a terminal (a log file, a worker process) a loop prints one full line per interval and
    its final state, with the postfix figures; never one line per update."""
    import safe_io

    monkeypatch.setenv(safe_io.PLAIN_ENV, "1")
    monkeypatch.setattr(safe_io, "PLAIN_INTERVAL", 3600.0)
    bar = safe_io.Progress(range(50), desc="grpo mor s0")
    for i in bar:
        bar.set_postfix(reward=f"{i:.1f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpo mor s0: 100%") and "50/50" in lines[0]
    assert "reward=49.0" in lines[0]


@pytest.mark.slow
def test_the_worked_own_task_example_runs_as_printed(tmp_path, capsys):
    """docs/own-task.md's example at SMALL sizes: two clients with their own pairs (one file in
    plain text without end tokens), --setting own, a prompt pool without answers, the contains
    judge and room for a longer answer; then a rerun from its config.json redoes nothing."""
    files = tmp_path / "files"
    data.export_benchmark(files, seed=0, test_per_domain=8)
    rows = [json.loads(x) for x in (files / "prompts.jsonl").read_text().splitlines()]
    (files / "pool.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n"
                                              for r in rows))
    pairs = [json.loads(x) for x in (files / "clients" / "shape.jsonl").read_text().splitlines()]
    plain = [dict(r, chosen=r["chosen"].replace(data.EOS, ""), rejected=r["rejected"].replace(data.EOS, ""))
             for r in pairs]
    (files / "clients" / "shape-plain.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in plain if r["rejected"].strip() and r["chosen"].strip() != r["rejected"].strip()))
    own = tmp_path / "own"
    small = [x for x in SMALL if x not in ("--methods", "avg_rm")]
    argv = small + ["--run-dir", str(own), "--setting", "own", "--sft-data", str(files / "sft.jsonl"),
                    "--prompts", str(files / "pool.jsonl"), "--eval", str(files / "eval.jsonl"),
                    "--client-data", f"color={files / 'clients' / 'color.jsonl'}",
                    "--client-data", f"shape={files / 'clients' / 'shape-plain.jsonl'}",
                    "--judge", "contains", "--max-new-tokens", "6"]
    with pytest.raises(SystemExit, match="no gold answers"):  # the oracle needs the pool's answers
        mor.main(argv + ["--methods", "oracle"])
    assert mor.main(argv + ["--methods", "mor,avg_rm"]) == 0
    res = json.loads((own / "results-own.json").read_text())
    assert set(res["methods"]) == {"mor", "avg_rm"} and set(res["rm_pair_accuracy"]) == {"color", "shape"}
    assert res["judge"] == "contains" and res["own_task"]
    pol = own / "policies" / "own" / "mor" / "seed0"
    assert json.loads((pol / "grpo_log.json").read_text())["accuracy"] == []  # no gold, no sampled accuracy
    assert len((pol / "metrics.jsonl").read_text().splitlines()) == 2  # one line per GRPO step
    assert (own / "metrics" / "own" / "reward-shape-bt.jsonl").is_file() and (own / "metrics" / "own" / "router.jsonl").is_file()
    capsys.readouterr()
    assert mor.main(["--config", str(own / "config.json"), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "runs" not in plan.replace("plan for", "") and plan.count("fresh") >= 6, plan
    assert mor.main(["--config", str(own / "config.json")]) == 0
    assert capsys.readouterr().out.count("done already") == 6


def test_a_prompt_pool_without_answers_trains_every_method_but_the_oracle(tmp_path):
    files = tmp_path / "files"
    data.export_benchmark(files, seed=0, test_per_domain=2, max_rows=6)
    rows = [json.loads(x) for x in (files / "prompts.jsonl").read_text().splitlines()]
    (files / "pool.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n"
                                              for r in rows))
    run = _run(tmp_path / "run", "--prompts", str(files / "pool.jsonl"))
    assert run.fed.pool_gold is None and data.pool_gold(run.fed) is None
    assert all(e.answer is None for e in run.fed.pool) and len(run.fed.pool) == 6
    from harness.pipeline import methods
    assert "oracle" not in methods(run) and {"mor", "avg_rm", "rm_color"} <= set(methods(run))
    with pytest.raises(SystemExit, match="--methods oracle: the prompt pool has no gold answers"):
        methods(_run(tmp_path / "run", "--prompts", str(files / "pool.jsonl"), "--methods", "oracle,mor"))
    # with answers on every row the oracle is back, and its gold is the file's
    full = _run(tmp_path / "run", "--prompts", str(files / "prompts.jsonl"))
    gold = data.pool_gold(full.fed)
    assert "oracle" in methods(full) and sorted(gold.values()) == sorted(r["answer"] for r in rows)
