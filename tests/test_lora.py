"""LoRA for real checkpoints (models.add_lora / merge_lora): the trainable count by hand, the
reference as the base with adapters off, GRPO and the RM training adapters only, and adapters
saved so that peft loads them. Run on the tiny Qwen2-VL (the code path is the real one's)."""
import copy

import pytest
import torch

import data
import grpo
import models
import reward


@pytest.fixture
def vlm_enc(tiny_dirs):
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    return vlm, models.Encoder(proc)


def _logits(vlm, batch):
    with torch.no_grad():
        return vlm(**{k: v for k, v in batch.items() if k != "response_mask"}).logits


def test_lora_trainable_count_and_reference_is_the_base(vlm_enc, fed):
    vlm, enc = vlm_enc
    base = copy.deepcopy(vlm)
    n = models.add_lora(vlm, r=4)
    # per layer r * (d_in + d_out) over q (128+128), k (128+64), v (128+64), o (128+128),
    # gate (128+256), up (128+256), down (256+128) = r * 2048; tiny: 2 layers (kv width 2 x 32)
    assert n == 4 * 2 * 2048
    trainable = {k for k, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k and "language_model" in k for k in trainable)
    assert all(p.dtype == torch.float32 for p in vlm.parameters() if p.requires_grad)
    assert vlm.is_activation_checkpointing
    exs = fed.pool[:2]
    batch = enc([e.image for e in exs], [e.prompt for e in exs], ["red" + data.EOS, "circle" + data.EOS])
    for k, p in vlm.named_parameters():  # B != 0: the adapted model now differs from the base
        if "lora_B" in k:
            p.data.normal_(0, 0.05)
    assert not torch.allclose(_logits(vlm, batch), _logits(base, batch), atol=1e-4)
    with grpo.reference(vlm, None) as pi_ref:  # adapters off: exactly the base
        assert torch.allclose(_logits(pi_ref, batch), _logits(base, batch), atol=1e-5)
    assert not torch.allclose(_logits(vlm, batch), _logits(base, batch), atol=1e-4)  # back on
    with pytest.raises(ValueError, match="needs a policy with LoRA"):
        with grpo.reference(base, None):
            pass


def test_grpo_with_lora_trains_adapters_only_and_peft_loads_them(vlm_enc, fed, tiny_dirs, tmp_path):
    from peft import PeftModel

    vlm, enc = vlm_enc
    models.add_lora(vlm, r=4)
    frozen = {k: p.detach().clone() for k, p in vlm.named_parameters() if not p.requires_grad}
    lora = {k: p.detach().clone() for k, p in vlm.named_parameters() if p.requires_grad}

    def longer(images, prompts, responses, e):  # varies within a group: non-zero advantages
        return torch.tensor([float(len(r)) for r in responses])

    cfg = grpo.GRPOConfig(steps=2, prompts=2, group=4, max_new_tokens=3, lr=1e-2, beta=0.04, format_guard=False)
    log = grpo.train_grpo(vlm, None, enc, fed.pool[:4], longer, cfg, seed=0)
    # step 1 starts at B = 0: the policy is its reference, KL exactly 0
    assert log["kl"][0] == pytest.approx(0.0, abs=1e-6) and len(log["kl"]) == 2
    assert all(torch.equal(p, frozen[k]) for k, p in vlm.named_parameters() if k in frozen)
    assert any(not torch.equal(p, lora[k]) for k, p in vlm.named_parameters() if k in lora)
    exs = fed.pool[:2]
    batch = enc([e.image for e in exs], [e.prompt for e in exs], ["red" + data.EOS, "blue" + data.EOS])
    want = _logits(vlm, batch)
    models.merge_lora(vlm, tmp_path / "adapter")
    assert not any("lora_" in k for k, _ in vlm.named_parameters())
    assert torch.allclose(_logits(vlm, batch), want, atol=1e-4)  # merged == adapted
    base, _ = models.load_vlm(tiny_dirs["qwen2_vl"])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.allclose(_logits(peft_model, batch), want, atol=1e-4)


def test_rm_with_lora_saves_adapters_and_merged_backbone(tiny_dirs, fed, tmp_path):
    vlm, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    torch.manual_seed(0)
    rm = reward.RewardModel(vlm, proc)
    pairs = data.make_pairs(fed.clients["color"][:12], 0)
    cfg = reward.RMConfig(sft_steps=2, sft_batch=4, sft_lr=1e-3, steps=3, batch=4, lr=1e-3, lora_r=4)
    log = reward.train_reward_model(rm, pairs, cfg, seed=0)
    assert len(log["sft_loss"]) == 2 and len(log["loss"]) == 3
    assert rm.head.weight.dtype == torch.float32 and rm.head.weight.requires_grad
    before = reward.pair_scores(rm, pairs[:6])
    rm.save(tmp_path / "rm")
    assert (tmp_path / "rm" / "adapter" / "adapter_model.safetensors").is_file()
    back = reward.RewardModel.load(tmp_path / "rm")
    after = reward.pair_scores(back, pairs[:6])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))


def test_recipe_switches_for_real_checkpoints_and_explicit_flags_win(tiny_dirs, tmp_path):
    import mor
    from harness.pipeline import REAL, REAL_LORA_R, TINY, Run

    tiny = mor.parse_args(["--quick", "--run-dir", str(tmp_path)])
    assert {k: getattr(tiny, k) for k in TINY} == TINY and Run(tiny).lora_r(None) == 0
    real = mor.parse_args(["--quick", "--run-dir", str(tmp_path), "--base", tiny_dirs["qwen2_vl"],
                           "--client-model", f"color={tiny_dirs['llava_onevision']}", "--grpo-lr", "3e-5"])
    assert real.sft_lr == REAL["sft_lr"] and real.rm_sft_lr == REAL["rm_sft_lr"] and real.grpo_lr == 3e-5
    run = Run(real)
    assert run.lora_r(None) == REAL_LORA_R and run.lora_r("color") == REAL_LORA_R and run.lora_r("shape") == 0
    cfg = run.rm_config("color")
    assert (cfg.sft_lr, cfg.sft_batch, cfg.lr, cfg.batch, cfg.lora_r) == (
        REAL["rm_sft_lr"], REAL["rm_sft_batch"], REAL["rm_lr"], REAL["rm_batch"], REAL_LORA_R)
    off = Run(mor.parse_args(["--quick", "--run-dir", str(tmp_path), "--base", tiny_dirs["qwen2_vl"], "--lora-r", "0"]))
    assert off.lora_r(None) == 0
