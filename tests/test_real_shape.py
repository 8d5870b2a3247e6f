"""The real-shape smoke (slow tier): Qwen2-VL-2B's widths with one layer through every stage on
CPU, and the memory plan within 20% of each stage's measured peak (bench/real_shape.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_real_shape_one_layer_every_stage_and_the_plan_within_20_percent(tmp_path):
    out = tmp_path / "real_shape.json"
    r = subprocess.run([sys.executable, "-m", "bench.real_shape", "--shape", "qwen2-vl-2b", "--layers", "1",
                        "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["stages"]) == ["sft", "reward", "router", "grpo", "eval"]
    for stage, s in res["stages"].items():
        assert set(s) >= {"params", "trainable", "peak_mb", "predicted_mb", "seconds"}
        assert s["params"] > 3e8  # the 152k x 1536 embedding alone is 233M
        assert abs(s["predicted_mb"] / s["peak_mb"] - 1) <= 0.2, (stage, s)
    # LoRA r = 16 on one layer: 16 * (9 * 1536 + 2 * 256 + 3 * 8960) trainable, the RM + its head
    assert res["stages"]["sft"]["trainable"] == 16 * (9 * 1536 + 2 * 256 + 3 * 8960)
    assert res["stages"]["reward"]["trainable"] == 16 * (9 * 1536 + 2 * 256 + 3 * 8960) + 1537
