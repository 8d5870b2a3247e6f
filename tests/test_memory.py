"""The memory plan (harness/memory.py): parameter counts against the loaded models, the terms by
hand, and a run that cannot fit refused before any stage with the flags that would help."""
import pytest

import models
import mor
from harness import memory
from harness.pipeline import Run


def test_shape_and_lora_count_match_the_loaded_model(tiny_dirs):
    s = memory.shape_of(tiny_dirs["qwen2_vl"])
    vlm, _ = models.load_vlm(tiny_dirs["qwen2_vl"])
    assert s.params == sum(p.numel() for p in vlm.parameters())
    assert (s.hidden, s.layers, s.intermediate, s.heads, s.kv) == (128, 2, 256, 4, 64)
    assert memory.lora_params(s, 8) == models.add_lora(vlm, 8) == 8 * 2 * 2048


def test_model_need_terms_by_hand():
    s = memory.Shape(params=1000, hidden=4, layers=2, intermediate=8, vocab=10, heads=2, kv=2)
    # inference, fp32, 3 rows of 5 tokens: one layer 3*5*(40 + 32)*4 + 3*2*25*4, logits 3*5*10*4*3
    n = memory.model_need(s, 4, rows=3, tokens=5)
    assert n["weights"] == 4000 and n["trainable"] == 0 and n["optimizer"] == 0
    assert n["activations"] == 3 * 5 * 72 * 4 + 600 + 3 * 5 * 10 * 4 * memory.LOGITS_INFER
    # LoRA r = 1 training: r * L * (9H + 2kv + 3I) = 2 * 64 = 128 adapters + the RM head's 5;
    # 16 bytes each; checkpointing adds L * R * T * H * b; no LM head for the RM
    n = memory.model_need(s, 4, lora_r=1, train=True, rows=3, tokens=5, logits=False, head=True)
    assert n["trainable"] == 128 + 5 and n["optimizer"] == 133 * 16
    assert n["activations"] == 3 * 5 * 72 * 4 + 600 + 2 * 3 * 5 * 4 * 4
    # full fine-tuning: every parameter, grad + 2 moments in the weights' dtype, L layers kept
    n = memory.model_need(s, 2, train=True, rows=3, tokens=5, logits=False)
    assert n["optimizer"] == 1000 * 3 * 2 and n["activations"] == 2 * (3 * 5 * 72 * 2 + 600)
    both = memory.combine([n, memory.model_need(s, 2, rows=3, tokens=5, logits=False)])
    assert both["weights"] == 4000 and both["activations"] == n["activations"]
    assert both["total"] == both["weights"] + both["optimizer"] + both["activations"]


def test_a_run_that_cannot_fit_is_refused_with_the_flags_that_help(tmp_path, capsys):
    a = mor.parse_args(["--quick", "--run-dir", str(tmp_path / "run"), "--workers", "2", "--device", "cpu"])
    run = Run(a)
    plan = memory.pipeline_plan(run, tokens=40)
    assert set(plan) == {"sft", "reward", "router", "grpo", "eval"}
    # the grpo job: policy + its frozen reference copy (no LoRA on tiny models) + K = 3 RMs, x 2 workers
    base = memory.shape_of(run.tiny_dir("qwen2_vl"))
    assert plan["grpo"]["weights"] >= 2 * 2 * base.params * 4
    with pytest.raises(SystemExit, match=r"memory plan: .*grpo \d.* MB > 1 MB of the device; try "
                                         r"--lora-r 16.*--workers 1.*--group 4"):
        memory.check_fits(run, plan, 1.0)
    memory.check_fits(run, plan, 1e9)  # fits: nothing raised
    print(memory.plan_table(plan, 1e9))
    assert "grpo" in capsys.readouterr().out
