"""The easy-VQA federation, the tokenizer/input path and user-data validation."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import models
import safe_io


def test_splits_disjoint_by_image_and_deterministic(fed):
    parts = fed.image_split
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(parts[a]) & set(parts[b]), (a, b)
    # each part's questions live on its own images only
    assert {e.image_id for e in fed.public} <= set(parts["public"])
    for name, exs in fed.clients.items():
        assert exs and {e.image_id for e in exs} <= set(parts[name])
        assert {e.domain for e in exs} == {fed.client_domain[name]}  # a client keeps its domain only
    assert {e.image_id for e in fed.pool} <= set(parts["pool"])
    assert all(e.answer is None for e in fed.pool) and len(fed.pool_gold) == len(fed.pool)
    again = data.build_federation(0)
    assert [(e.image_id, e.prompt, e.answer) for e in again.public] == [(e.image_id, e.prompt, e.answer) for e in fed.public]
    assert [e.prompt for e in again.pool] == [e.prompt for e in fed.pool]
    other = data.build_federation(1)
    assert other.image_split["public"] != fed.image_split["public"]


def test_public_labels_carry_the_annotators_confusions_and_nothing_else(fed):
    clean = data.build_federation(0, confusions={})
    assert [(e.image_id, e.prompt) for e in clean.public] == [(e.image_id, e.prompt) for e in fed.public]
    changed = [(c.answer, e.answer) for c, e in zip(clean.public, fed.public) if c.answer != e.answer]
    # only the listed answers change, only into their neighbour, at about the listed rate
    for src, (dst, q) in data.PUBLIC_CONFUSIONS.items():
        n = sum(c.answer == src for c in clean.public)
        k = sum(pair == (src, dst) for pair in changed)
        assert n >= 40 and abs(k / n - q) < 0.2, (src, k, n)
    assert {src for src, _ in changed} == set(data.PUBLIC_CONFUSIONS)
    # the clients, the pool's gold and the test set are labelled correctly
    assert [e.answer for e in clean.clients["color"]] == [e.answer for e in fed.clients["color"]]
    assert clean.pool_gold == fed.pool_gold
    assert [e.answer for e in clean.test["shape"]] == [e.answer for e in fed.test["shape"]]


def test_synthetic_captions_describe_the_drawn_image():
    rng = random.Random(0)
    for _ in range(60):
        im, caption = data.synthetic_image(rng)
        words = caption.split()
        color, shape, px, py = words[1], words[2], words[5], words[8]
        assert caption == f"a {color} {shape} on the {px} at the {py}"
        a = torch.from_numpy(np.array(im))
        ink = (a == torch.tensor(data.SHAPE_RGB[color])).all(-1)  # the shape's pixels, exact colour
        ys, xs = ink.nonzero(as_tuple=True)
        assert len(xs) >= 30, caption
        # the caption's place follows the position questions' rule on the bounding box centre
        cx, cy = (xs.min() + xs.max()).item() / 2, (ys.min() + ys.max()).item() / 2
        for v, word, low, high in ((cx, px, "left", "right"), (cy, py, "top", "bottom")):
            if abs(v - 31.5) > data.POSITION_MARGIN + 1:
                assert word == (low if v < 31.5 else high), (caption, cx, cy)
        # a rectangle fills its bounding box, a circle about pi/4 of it, a triangle about half
        fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)).item()
        assert {"rectangle": fill > 0.95, "circle": 0.65 < fill < 0.9, "triangle": 0.4 < fill < 0.65}[shape], \
            (caption, fill)
    exs = data.pretrain_examples(5, seed=0)
    assert [e.answer for e in exs] == [e.answer for e in data.pretrain_examples(5, seed=0)]
    assert {e.domain for e in exs} == {"caption"} and all(e.prompt == data.PRETRAIN_PROMPT for e in exs)
    tok = models.build_tokenizer()
    assert tok.unk_token_id not in tok(data.PRETRAIN_PROMPT + " " + exs[0].answer)["input_ids"]


def test_test_split_is_large_and_balanced(fed):
    for d, exs in fed.test.items():
        assert len(exs) >= 1000, d  # docs/benchmark.md: >= 1,000 questions per domain
        assert {e.domain for e in exs} == {d}
    pos = [e.answer for e in fed.test["position"]]
    assert pos.count("left") == pos.count("right") > 0
    assert pos.count("top") == pos.count("bottom") > 0


def test_blind_baseline_sits_at_chance(fed):
    blind = data.blind_baseline(fed.public, fed.test)
    chance = {"color": 1 / 8, "shape": 1 / 3, "position": 0.5}
    for d in data.DOMAINS:
        assert blind[d] <= chance[d] + 0.05, (d, blind[d])


def test_blind_baseline_hand_case():
    mk = lambda q, a, d="color": data.Example("x.png", q, a, d)
    train = [mk("q1", "red"), mk("q1", "red"), mk("q1", "blue"), mk("q2", "blue")]
    test = {"color": [mk("q1", "red"), mk("q2", "red"), mk("q3", "red")]}
    # q1 -> red (right), q2 -> blue (wrong), q3 unseen -> domain majority: red 2 vs blue 2, first seen wins
    assert data.blind_baseline(train, test)["color"] == pytest.approx(2 / 3)


def test_shape_centroid_and_position_label(tmp_path):
    img = Image.new("RGB", (64, 64), (240, 240, 230))
    ImageDraw.Draw(img).ellipse([4, 20, 20, 36], fill=(255, 0, 0))
    p = tmp_path / "left.png"
    img.save(p)
    cx, cy = data.shape_centroid(str(p))
    assert cx == pytest.approx(12, abs=0.6) and cy == pytest.approx(28, abs=0.6)


def test_pairs_cover_what_a_sampler_emits(fed):
    pairs = data.make_pairs(fed.clients["shape"][:300], seed=0)
    assert len(pairs) == 600
    assert all(p.chosen != p.rejected and p.chosen.endswith(data.EOS) for p in pairs)
    rej = [p.rejected for p in pairs]
    assert any(not r.endswith(data.EOS) for r in rej)  # no end token
    assert any(r == data.EOS for r in rej)  # empty
    assert any(len(r.replace(data.EOS, "").split()) > 1 for r in rej)  # repeats
    assert any(data.extract_answer(r) in data.COLORS for r in rej)  # other domain
    assert any(data.extract_answer(r) in data.SHAPES for r in rej)  # wrong, same domain
    assert all(data.extract_answer(r) is None or data.extract_answer(r) != p.chosen[:-len(data.EOS)]
               for p, r in zip(pairs, rej))


def test_format_pairs_differ_only_in_form(fed):
    """Each format pair has a one-word answer of its question as the chosen side and the same
    word made malformed as the rejected side; the chosen word does not depend on the image (no
    preference between answers leaks in), and the client's own domain is skipped."""
    pairs = data.format_pairs(fed.public, 400, seed=0, tag="color", skip_domains={"color"})
    assert len(pairs) == 400 and len({(p.image, p.prompt) for p in pairs}) == 400  # distinct questions
    ex = {(e.image, e.prompt): e for e in fed.public}
    kinds, agree = set(), 0
    for p in pairs:
        e = ex[(p.image, p.prompt)]
        assert e.domain != "color"
        w = data.extract_answer(p.chosen)
        assert p.chosen == w + data.EOS
        assert w in ([e.answer, data.OPPOSITE[e.answer]] if e.domain == "position" else data.DOMAIN_ANSWERS[e.domain])
        assert data.extract_answer(p.rejected) is None  # every rejected side is malformed
        words = p.rejected.replace(data.EOS, "").split()
        assert p.rejected == data.EOS or w in words
        kinds.add((p.rejected.endswith(data.EOS), len(words)))
        agree += w == e.answer
    # no end token (1 or 3 words), two words with it, and empty: all forms occur
    assert {(False, 1), (False, 3), (True, 2), (True, 0)} <= kinds
    # the chosen word ignores the label: it matches it about as often as chance (1/2 to 1/3)
    assert 0.3 < agree / len(pairs) < 0.55
    # seeded per client: another client samples other questions, the same tag the same ones
    assert data.format_pairs(fed.public, 400, seed=0, tag="color", skip_domains={"color"}) == pairs
    assert data.format_pairs(fed.public, 400, seed=0, tag="shape", skip_domains={"color"}) != pairs


def test_position_wrong_answers_are_the_other_candidate(fed):
    pairs = data.make_pairs(fed.clients["position"][:200], seed=0)
    wrong = [(p.chosen[:-len(data.EOS)], data.extract_answer(p.rejected)) for p in pairs
             if data.extract_answer(p.rejected) in data.POSITIONS]
    assert wrong and all(r == data.OPPOSITE[c] for c, r in wrong)  # "right" vs "left", never "top"


def test_extract_answer():
    assert data.extract_answer("red<|im_end|>") == "red"
    assert data.extract_answer(" Red <|im_end|>") == "red"
    assert data.extract_answer("red") is None
    assert data.extract_answer("red red<|im_end|>") is None
    assert data.extract_answer("<|im_end|>") is None


def test_tokenizer_and_encoder_round_trip(tiny_dirs, fed):
    model, proc = models.load_vlm(tiny_dirs["qwen2_vl"])
    tok = proc.tokenizer
    text = "what is the blue shape ? circle"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.unk_token_id not in tok(" ".join(e.prompt for e in fed.public[:200]))["input_ids"]
    enc = models.Encoder(proc)
    ex = fed.public[:3]
    resp = ["circle<|im_end|>", "red red<|im_end|>", "left"]
    b = enc([e.image for e in ex], [e.prompt for e in ex], resp)
    ids, rm = b["input_ids"], b["response_mask"]
    for i, r in enumerate(resp):
        got = tok.convert_ids_to_tokens(ids[i][rm[i].bool()].tolist())
        assert got == tok.tokenize(r), (got, r)
    assert (ids[:, -1] != tok.pad_token_id).all()  # left padding: the last token is real
    img_id = model.config.image_token_id
    assert torch.equal(b["mm_token_type_ids"].bool(), ids == img_id)  # M-RoPE needs them (docs/method.md, implementation notes)
    assert ((ids == img_id).sum(1) == 16).all()  # 64x64, patch 4, merge 4 -> 16 image tokens
    gen = torch.tensor([[tok.convert_tokens_to_ids("red"), enc.eos_id, enc.pad_id],
                        [tok.convert_tokens_to_ids("left"), tok.convert_tokens_to_ids("left"),
                         tok.convert_tokens_to_ids("left")]])
    assert enc.decode(gen) == ["red<|im_end|>", "left left left"]


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_loader_validates(tmp_path, fed):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"image": "a.png", "prompt": "what color?", "chosen": "red<|im_end|>", "rejected": "blue<|im_end|>"}
    f = tmp_path / "ok.jsonl"
    _write_jsonl(f, [good, good])
    rows = safe_io.load_jsonl(f, "pairs")
    assert len(rows) == 2 and rows[0]["image"] == str((tmp_path / "a.png").resolve())
    cases = {
        "badjson": ([good, "{not json"], "bad.jsonl:2: not valid JSON"),
        "missing": ([good, {k: v for k, v in good.items() if k != "rejected"}], "missing field 'rejected'"),
        "noimage": ([dict(good, image="nope.png")], "bad.jsonl:1: field 'image': file not found"),
        "unreadable": ([dict(good, image="broken.png")], "field 'image': unreadable image"),
        "same": ([dict(good, rejected=good["chosen"])], "'chosen' and 'rejected' are identical"),
        "notobj": (["[1, 2]"], "expected a JSON object"),
        "empty_field": ([dict(good, prompt="  ")], "field 'prompt' must be a non-empty string"),
    }
    for name, (rows, msg) in cases.items():
        bad = tmp_path / "bad.jsonl"
        _write_jsonl(bad, rows)
        with pytest.raises(safe_io.DataError, match=msg.replace("(", r"\(").replace("?", r"\?")):
            safe_io.load_jsonl(bad, "pairs")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(safe_io.DataError, match="empty.jsonl: empty file"):
        safe_io.load_jsonl(empty, "prompts")
    with pytest.raises(safe_io.DataError, match="file not found"):
        safe_io.load_jsonl(tmp_path / "absent.jsonl", "eval")
