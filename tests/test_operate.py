"""Operating a run directory (harness/runs.py): one invocation at a time, another process's temp
folders left alone, a missing upstream output named in one line, --config read back, --plan, and
the live metrics files."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from filelock import FileLock

import mor
import safe_io
from harness import provenance, runs
from harness.pipeline import Run


def _hold(run_dir, pid="4242"):
    """The lock as another invocation would hold it: the kernel lock and its pid file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / runs.LOCK)
    lock.acquire(timeout=0)
    (run_dir / runs.HOLDER).write_text(pid + "\n")
    return lock


def test_a_second_invocation_is_refused_in_one_line_naming_the_holder(tmp_path):
    lock = _hold(tmp_path / "run")
    try:
        with pytest.raises(SystemExit) as e:
            mor.main(["--quick", "--run-dir", str(tmp_path / "run"), "--stages", "base"])
        msg = str(e.value.code)
        assert "in use by another mor invocation (pid 4242)" in msg and "--wait" in msg and "\n" not in msg
        assert not (tmp_path / "run" / "base_init").exists() and not (tmp_path / "run" / "config.json").exists()
    finally:
        lock.release()


def test_wait_queues_behind_the_holder_and_a_dead_holder_frees_the_directory(tmp_path, capsys):
    lock = _hold(tmp_path / "run")
    got = []

    def second():
        with runs.locked(tmp_path / "run", wait=True):
            got.append((tmp_path / "run" / runs.HOLDER).read_text().strip())

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert not got  # still waiting
    lock.release()
    t.join(30)
    assert got == [str(os.getpid())]
    assert "in use by pid 4242; waiting" in capsys.readouterr().out
    # a holder killed with -9 leaves no lock behind (the kernel releases it with the process)
    code = (f"import sys; sys.path.insert(0, {str(mor.__file__.rsplit('/', 1)[0])!r}); import os\n"
            f"from harness import runs\nwith runs.locked({str(tmp_path / 'run2')!r}):\n    os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], timeout=120)
    with runs.locked(tmp_path / "run2"):
        pass


def test_atomic_writes_never_delete_a_live_processs_temp_folders(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f".out.tmp{os.getppid()}"  # our parent: alive for the whole test
    gone = tmp_path / f".out.tmp{dead.pid}"
    parked = tmp_path / f".out.old{os.getppid()}"
    for d in (live, gone, parked):
        d.mkdir()
    with safe_io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert live.is_dir() and parked.is_dir() and not gone.exists() and (tmp_path / "out" / "x").is_file()
    f_live = tmp_path / f".f.json.tmp{os.getppid()}"
    f_live.write_text("half")
    safe_io.atomic_write_json(tmp_path / "f.json", {"a": 1})
    assert f_live.read_text() == "half"


def test_a_stage_without_its_upstream_output_names_what_makes_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        mor.main(["--quick", "--run-dir", str(tmp_path), "--stages", "eval"])
    assert str(e.value.code) == (f"[eval] needs {tmp_path / 'base'}, the sft stage's output, which is missing: "
                                 "add sft to --stages")
    a = mor.parse_args(["--quick", "--run-dir", str(tmp_path), "--methods", "mor"])
    gap = runs.missing_upstream(Run(a), ["grpo"])
    assert gap.startswith("[grpo] needs") and "the sft stage's output" in gap
    gap = runs.missing_upstream(Run(a), ["base", "sft", "grpo"])
    assert "the reward stage's output" in gap
    a = mor.parse_args(["--quick", "--run-dir", str(tmp_path), "--methods", "oracle"])
    assert runs.missing_upstream(Run(a), ["base", "sft", "grpo"]) is None  # the oracle reads no RM, no router
    assert "or give --base DIR" in runs.missing_upstream(Run(a), ["sft"])


def test_config_reads_back_a_runs_invocation_and_the_command_line_overrides(tmp_path, capsys):
    a = mor.parse_args(["--quick", "--run-dir", str(tmp_path), "--group", "3", "--seeds", "1,2",
                        "--methods", "mor,avg_rm", "--no-format-guard", "--judge", "contains"])
    (tmp_path / "config.json").write_text(json.dumps({"invocation": vars(a), "stages": {}}))
    b = mor.parse_args(["--config", str(tmp_path / "config.json")])
    skip = {"config"}
    assert {k: v for k, v in vars(b).items() if k not in skip} == {k: v for k, v in vars(a).items() if k not in skip}
    c = mor.parse_args(["--config", str(tmp_path / "config.json"), "--group", "5"])
    assert c.group == 5 and c.seeds == [1, 2] and c.format_guard is False and c.judge == "contains"
    # a YAML file of flags, by flag name
    y = tmp_path / "flags.yaml"
    y.write_text("quick: true\ngrpo-steps: 7\nseeds: [0, 3]\nclient_fraction: 0.5\n")
    d = mor.parse_args(["--config", str(y)])
    assert d.quick and d.grpo_steps == 7 and d.seeds == [0, 3] and d.client_fraction == 0.5
    # mistakes are one line naming the file and the flag; ranges are the command line's
    for text, msg in [("grpo_stepz: 3\n", "unknown flag 'grpo_stepz'"), ("group: two\n", "--group expects a number"),
                      ("quick: 1\n", "--quick expects true or false"), ("group: 1\n", "--group 1: must be >= 2"),
                      ("judge: fuzzy\n", "--judge 'fuzzy': choose from"), ("[1, 2]\n", "expected an object of flags"),
                      ("a: [\n", "not valid YAML")]:
        y.write_text(text)
        with pytest.raises(SystemExit):
            mor.parse_args(["--config", str(y)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert msg in err, (text, err)


def test_plan_says_fresh_stale_or_missing_and_writes_nothing(tmp_path, capsys):
    argv = ["--quick", "--run-dir", str(tmp_path), "--stages", "base,sft"]
    assert mor.main(argv + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert "base   runs  missing  base_init" in out and "sft    runs  missing  base" in out
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "base_init").exists()
    (tmp_path / "base_init").mkdir()
    provenance.record_dir(tmp_path / "base_init", Run(mor.parse_args(argv)).base_inputs())
    assert mor.main(argv + ["--plan"]) == 0
    assert "base   kept  fresh    base_init" in capsys.readouterr().out
    assert mor.main(argv + ["--plan", "--pretrain-steps", "9"]) == 0
    assert "base   runs  stale: pretrain_steps: 5 -> 9" in capsys.readouterr().out


def test_loops_append_live_metrics_and_work_without_a_sink(tmp_path, monkeypatch):
    monkeypatch.delenv(safe_io.METRICS_ENV, raising=False)
    bar = safe_io.Progress(range(2), desc="grpo mor s0")
    for i in bar:
        bar.log(i, reward=1.0)  # no folder: nothing written, nothing fails
    monkeypatch.setenv(safe_io.METRICS_ENV, str(tmp_path / "m"))
    bar = safe_io.Progress(range(3), desc="grpo mor s0")
    for i in bar:
        bar.log(i, reward=0.5 * i, accuracy=None)
        if i == 1:  # written as the loop runs, not at its end
            assert len((tmp_path / "m" / "grpo-mor-s0.jsonl").read_text().splitlines()) == 2
    rows = [json.loads(x) for x in (tmp_path / "m" / "grpo-mor-s0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["reward"] for r in rows] == [0.0, 0.5, 1.0]
    assert "accuracy" not in rows[0]
