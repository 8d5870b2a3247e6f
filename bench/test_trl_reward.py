"""MoR's reward inside TRL (harness/trl_reward.py), in the bench venv (trl pinned in
bench/requirements.txt):

  bench/.venv/bin/python -m pytest -q bench/test_trl_reward.py

A run directory is built from tiny checkpoints: the reference (base/), two client RMs of two
families (Qwen2-VL, LLaVA-OneVision: different tokenizers and image tokens) with random heads and
reward statistics, and a seeded router. TRL's GRPOTrainer trains the reference for 2 steps with
mor_reward as its only reward; every batch it scored is then re-scored by the project's own GRPO
path (grpo.response_batch -> the reference's token forward -> router.pool_features ->
mixture.MixedReward), and the two must agree on every sample."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import data  # noqa: E402
import grpo  # noqa: E402
import mixture  # noqa: E402
import models  # noqa: E402
import reward  # noqa: E402
import router  # noqa: E402
from harness.trl_reward import mor_reward  # noqa: E402

G = 2  # TRL's num_generations
FAMILIES = {"color": "llava_onevision", "shape": "qwen2_vl"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    models.build_tiny("qwen2_vl", run / "base", seed=0)
    for i, (name, fam) in enumerate(FAMILIES.items()):
        init = models.build_tiny(fam, run / "init" / fam, seed=i + 1)
        vlm, proc = models.load_vlm(init)
        torch.manual_seed(i)
        rm = reward.RewardModel(vlm, proc, mean=0.1 * i, std=1.0 + i, info={"client": name})
        rm.save(run / "clients" / name / f"reward-{fam}")
    H = json.loads((run / "base" / "config.json").read_text())["text_config"]["hidden_size"]
    torch.manual_seed(0)
    r = router.Router(2 * H, len(FAMILIES), hidden=8)
    save_file({k: v.contiguous() for k, v in r.state_dict().items()}, str(run / "router-heterogeneous.safetensors"))
    (run / "router-heterogeneous.json").write_text(json.dumps({"rms": list(FAMILIES)}))
    (run / "rm_matrix-heterogeneous.json").write_text(json.dumps({"families": FAMILIES}))
    return run


def test_trl_grpo_with_mor_reward_equals_the_projects_reward(run_dir, tmp_path):
    from datasets import Dataset, Features, Image, Value
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    fed = data.build_federation(0)
    rows = fed.pool[:4]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.prompt}] for e in rows],
                            "image": [e.image for e in rows]},
                           features=Features({"prompt": [{"role": Value("string"), "content": Value("string")}],
                                              "image": Image()}))
    mor = mor_reward(run_dir)
    calls = []

    def recorded(prompts, completions, completion_ids=None, image=None, **kw):
        out = mor(prompts, completions, completion_ids=completion_ids, image=image, **kw)
        calls.append((mor.image_paths(image), [list(c) for c in completion_ids], [p for p in prompts], out))
        return out

    recorded.__name__ = "mor_soft"
    cfg = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2 * G, num_generations=G,
                     max_completion_length=4, max_steps=2, learning_rate=1e-4, beta=0.04, use_cpu=True, seed=0,
                     model_init_kwargs={"dtype": "float32"}, save_strategy="no", report_to="none", logging_steps=1,
                     remove_unused_columns=False, disable_tqdm=True, bf16=False, activation_checkpointing=False,
                     generation_kwargs={"suppress_tokens": mor.banned_ids})
    trainer = GRPOTrainer(model=str(run_dir / "base"), reward_funcs=[recorded], args=cfg, train_dataset=ds)
    trainer.train()
    assert trainer.state.global_step == 2 and len(calls) >= 2

    # the project's own GRPO path on the same samples (grpo.train_grpo, steps 2-3)
    ref, enc = mor.ref, mor.encoder
    project = mixture.MixedReward(mor.rms, mor.router)
    seen = []
    for images, ids, prompts, got in calls:
        texts = [mor_question(p) for p in prompts]
        assert texts[::G] == texts[1::G]  # TRL's groups: num_generations consecutive rows
        pb = enc(images[::G], texts[::G])
        T = max(len(x) for x in ids)
        new = torch.full((len(ids), T), enc.pad_id)
        for i, x in enumerate(ids):
            new[i, :len(x)] = torch.tensor(x)
        rb = grpo.response_batch(pb, new, G, enc.eos_id)
        with torch.no_grad():
            feats = models.image_features(ref, pb, list(range(len(texts) // G)))
            _, h = grpo.token_logprobs(ref, rb, grpo._expand(feats, G), enc.banned_ids, hidden=True)
            e = router.pool_features(h, rb["attention_mask"], rb["response_mask"])
            want = project(images, texts, enc.decode(new), e)
        assert torch.allclose(torch.tensor(got), want.float(), atol=1e-4), (got, want)
        seen += got
    assert len(set(round(x, 4) for x in seen)) > 1  # a reward that varies: the comparison has teeth


def mor_question(prompt):
    from harness.trl_reward import _question

    return _question(prompt)
