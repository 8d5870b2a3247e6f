"""Tiny checkpoints of all three families: built from configs, loaded back like real ones."""
import json
import os
import pickle
import shutil

import pytest
import torch

import data
import models

EXPECTED = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


@pytest.mark.parametrize("family", models.FAMILIES)
def test_tiny_family_loads_forward_generate(family, tiny_dirs, fed):
    d = tiny_dirs[family]
    assert os.path.isfile(f"{d}/model.safetensors")
    cfg = json.load(open(f"{d}/config.json"))
    assert cfg["architectures"] == [EXPECTED[family]]
    model, proc = models.load_vlm(d)
    assert type(model).__name__ == EXPECTED[family]
    # the special ids were written everywhere, not Qwen's 151643/151645 defaults
    assert model.config.get_text_config().eos_token_id == proc.tokenizer.convert_tokens_to_ids(data.EOS)
    enc = models.Encoder(proc)
    ex = fed.public[:3]
    b = enc([e.image for e in ex], [e.prompt for e in ex], ["red<|im_end|>"] * 3)
    b.pop("response_mask")
    with torch.no_grad():
        logits = model(**b).logits
    assert logits.shape == (3, b["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(logits).all()
    g = enc([e.image for e in ex], [e.prompt for e in ex])
    torch.manual_seed(0)
    out = model.generate(**g, max_new_tokens=4, do_sample=True, suppress_tokens=enc.banned_ids,
                         pad_token_id=enc.pad_id)
    new = out[:, g["input_ids"].shape[1]:]
    assert new.shape[0] == 3 and 1 <= new.shape[1] <= 4
    assert not set(new.flatten().tolist()) & (set(enc.banned_ids) - {enc.pad_id})
    assert all(isinstance(r, str) for r in enc.decode(new))


def test_same_seed_same_weights(tmp_path):
    a = models.build_tiny("qwen2_vl", tmp_path / "a", seed=3)
    b = models.build_tiny("qwen2_vl", tmp_path / "b", seed=3)
    assert open(f"{a}/model.safetensors", "rb").read() == open(f"{b}/model.safetensors", "rb").read()


def test_load_refuses_pickle_and_remote_code(tmp_path, tiny_dirs):
    d = tmp_path / "upload"
    shutil.copytree(tiny_dirs["qwen2_vl"], d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="pytorch_model.bin.*no pickle"):
        models.load_vlm(d)
    (d / "pytorch_model.bin").unlink()
    cfg = json.load(open(d / "config.json"))
    cfg["auto_map"] = {"AutoModel": "evil.Model"}
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="remote code"):
        models.load_vlm(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_vlm(tmp_path)


def test_trainer_outputs_load_weight_pickles_refused(tmp_path, tiny_dirs, capsys):
    """An HF Trainer / TRL output directory (training_args.bin, optimizer.pt beside the
    safetensors) loads, with the ignored files named; any weight pickle is still refused."""
    d = tmp_path / "trainer_out"
    shutil.copytree(tiny_dirs["qwen2_vl"], d)
    for f in ("training_args.bin", "optimizer.pt", "rng_state.pth", "modeling_extra.py"):
        (d / f).write_bytes(pickle.dumps({"x": 1}))
    models.check_model_dir(d)
    err = capsys.readouterr().err
    assert "ignoring modeling_extra.py, optimizer.pt, rng_state.pth, training_args.bin" in err
    for bad in ("pytorch_model-00001-of-00002.bin", "weights.pkl", "adapter.pt"):
        (d / bad).write_bytes(pickle.dumps({"x": 1}))
        with pytest.raises(ValueError, match=f"refusing to load {bad}: .*no pickle"):
            models.check_model_dir(d)
        (d / bad).unlink()
