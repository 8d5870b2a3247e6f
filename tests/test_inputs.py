"""What users hand in, checked before any training: their JSONL files and images, prompts longer
than the model's context, checkpoint directories; the bounded image cache; the benchmark
exported as files. Each test fails without the protection it names.
"""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

import data
import models
import safe_io

ROOT = Path(__file__).resolve().parent.parent


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _refused(path, kind, msg):
    with pytest.raises(safe_io.DataError, match=msg) as e:
        safe_io.load_jsonl(path, kind)
    assert "\n" not in str(e.value)  # one line
    return str(e.value)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels, with (almost) no pixel data: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


def _photo(size=(64, 64), seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def row(tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    return {"image": "a.png", "prompt": "what color is the shape?", "chosen": "red<|im_end|>",
            "rejected": "blue<|im_end|>"}


# -- images are decoded in full -----------------------------------------------------------------


def test_a_truncated_jpeg_is_refused(tmp_path, row, monkeypatch):
    buf = io.BytesIO()
    _photo((128, 128)).save(buf, "JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(tmp_path / "cut.jpg") as im:
        im.verify()  # what the loader used to check: it passes
    f = _write(tmp_path / "bad.jsonl", [row, dict(row, image="cut.jpg")])
    _refused(f, "pairs", r"bad.jsonl:2: field 'image': unreadable image \(OSError: image file is truncated")
    # even where something turned PIL's permissive mode on, and it is left as it was
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _refused(f, "pairs", "bad.jsonl:2: field 'image': unreadable image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_a_png_with_corrupt_data_is_refused(tmp_path, row):
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    raw = buf.getvalue()
    # replace the IDAT chunk's body with bytes that are not a zlib stream, with a valid CRC
    i = raw.index(b"IDAT") - 4
    n = struct.unpack(">I", raw[i:i + 4])[0]
    raw = raw[:i] + _png_chunk(b"IDAT", b"\x00garbage" * (n // 8 + 1)) + raw[i + 12 + n:]
    (tmp_path / "corrupt.png").write_bytes(raw)
    with Image.open(tmp_path / "corrupt.png") as im:
        im.verify()  # CRCs are fine: verify() passes
    f = _write(tmp_path / "bad.jsonl", [dict(row, image="corrupt.png")])
    _refused(f, "pairs", "bad.jsonl:1: field 'image': unreadable image")


def test_degenerate_elongated_and_absurd_sizes_are_refused(tmp_path, row):
    Image.new("RGB", (4, 64)).save(tmp_path / "thin.png")
    Image.new("RGB", (420, 20)).save(tmp_path / "strip.png")
    _png_header_only(tmp_path / "huge.png", 10_000, 5_000)  # 50 MP: above the limit
    _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # PIL itself calls it a bomb
    for name, msg in [("thin.png", r"degenerate size 4x64 px"), ("strip.png", r"extreme aspect ratio 420x20 px"),
                      ("huge.png", r"10000x5000 px is 50 megapixels"), ("bomb.png", r"a decompression bomb \(Image size \(400000000 pixels\)")]:
        f = _write(tmp_path / "bad.jsonl", [row, row, dict(row, image=name)])
        _refused(f, "pairs", rf"bad.jsonl:3: field 'image': {msg}")
    Image.new("RGB", (8, 160)).save(tmp_path / "edge.png")  # exactly at both limits: accepted
    safe_io.load_jsonl(_write(tmp_path / "ok.jsonl", [dict(row, image="edge.png")]), "pairs")


def test_each_distinct_image_is_decoded_once(tmp_path, row, monkeypatch):
    for k in range(3):
        _photo(seed=k).save(tmp_path / f"{k}.png")
    calls = []
    real = safe_io._check_image
    monkeypatch.setattr(safe_io, "_check_image", lambda p: calls.append(p) or real(p))
    f = _write(tmp_path / "many.jsonl", [dict(row, image=f"{i % 3}.png") for i in range(30)])
    assert len(safe_io.load_jsonl(f, "pairs")) == 30
    assert len(calls) == 3


# -- text and fields ----------------------------------------------------------------------------


def test_a_non_utf8_byte_names_its_line_and_column(tmp_path, row):
    f = tmp_path / "latin1.jsonl"
    line2 = json.dumps(dict(row, prompt="what is the caf\u00e9 shape?"), ensure_ascii=False).encode("latin-1")
    f.write_bytes(json.dumps(row).encode() + b"\n" + line2 + b"\n")
    col = line2.index(b"\xe9") + 1
    _refused(f, "pairs", rf"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column {col}\)")
    # a UTF-8 BOM and CRLF line ends are fine
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\r\n" + line2.decode("latin-1").encode() + b"\r\n")
    assert [r["_line"] for r in safe_io.load_jsonl(f, "pairs")] == [1, 2]


def test_optional_fields_when_present_are_non_empty_strings(tmp_path, row):
    base = {"image": "a.png", "prompt": "what color is the shape?"}
    cases = [
        ("prompts", dict(base, domain=3), "field 'domain' must be a non-empty string when present .*got 3"),
        ("prompts", dict(base, answer=None), "field 'answer' must be a non-empty string when present .*got null"),
        ("eval", dict(base, answer="red", domain=" "), "field 'domain' .*got \" \""),
        ("sft", dict(base, answer="red", image_id=["x"]), r"field 'image_id' .*got \[\"x\"\]"),
        ("pairs", dict(row, domain={"a": 1}), r"field 'domain' .*got \{\"a\": 1\}"),
        ("sft", base, "missing field 'answer'"),
        ("eval", dict(base, answer=7), r"field 'answer' must be a non-empty string, got 7"),
    ]
    for kind, bad, msg in cases:
        f = _write(tmp_path / "bad.jsonl", [row if kind == "pairs" else dict(base, answer="red"), bad])
        _refused(f, kind, f"bad.jsonl:2: {msg}")
    # absent optional fields: domain 'all', no answer, the image path as image_id
    f = _write(tmp_path / "pool.jsonl", [base, dict(base, domain="color", answer="red", image_id="img/1")])
    a, b = data.examples_from_rows(safe_io.load_jsonl(f, "prompts"))
    assert (a.answer, a.domain, a.image_id) == (None, "all", str((tmp_path / "a.png").resolve()))
    assert (b.answer, b.domain, b.image_id) == ("red", "color", "img/1")
    p = data.pairs_from_rows(safe_io.load_jsonl(_write(tmp_path / "p.jsonl", [row, dict(row, domain="x")]), "pairs"), "clinic")
    assert [q.domain for q in p] == ["clinic", "x"]


def test_a_prompt_or_response_longer_than_the_context_is_refused(tmp_path, tiny_dirs, row):
    d = tiny_dirs["qwen2_vl"]
    n_ctx = models.context_length(d)
    assert n_ctx == 1024
    proc = models.load_vlm(d)[1]
    rows = safe_io.load_jsonl(_write(tmp_path / "p.jsonl", [row, dict(row, prompt="what color is the shape ?" * 200),
                                                              dict(row, chosen="red " * 1000 + "<|im_end|>")]), "pairs")
    f = tmp_path / "p.jsonl"
    with pytest.raises(safe_io.DataError, match=r"p.jsonl:2: field 'prompt': \d+ tokens \(with the chat template, "
                                                 r"16 image tokens\), beyond the model's context of 1024 positions"):
        models.check_lengths(rows, f, proc, n_ctx)
    with pytest.raises(safe_io.DataError, match=r"p.jsonl:3: field 'chosen': \d+ tokens \(prompt and response, .* 1024"):
        models.check_lengths([rows[0], rows[2]], f, proc, n_ctx)
    with pytest.raises(safe_io.DataError, match="p.jsonl:1: field 'prompt': .*1000 kept for generation"):
        models.check_lengths(rows[:1], f, proc, n_ctx, reserve=1000)
    # the count is the Encoder's, exactly, for every family and for an image the cache reduces:
    # a row fits at its length, not one below
    from transformers import AutoProcessor

    _photo((300, 200)).save(tmp_path / "wide.png")
    long = dict(row, rejected="blue blue blue<|im_end|>")  # the longer response sets the length
    two = safe_io.load_jsonl(_write(tmp_path / "q.jsonl", [long, dict(long, image="wide.png")]), "pairs")
    for fam in models.FAMILIES:
        proc = AutoProcessor.from_pretrained(tiny_dirs[fam])
        for r in two:
            n = models.Encoder(proc)([r["image"]], [r["prompt"]], [r["rejected"]])["input_ids"].shape[1]
            models.check_lengths([r], f, proc, n)
            with pytest.raises(safe_io.DataError, match=f"p.jsonl:{r['_line']}: field 'rejected': {n} tokens"):
                models.check_lengths([r], f, proc, n - 1)


def test_context_length_reads_the_text_models_positions(tmp_path):
    assert models.context_length({"text_config": {"max_position_embeddings": 32768},
                                  "max_position_embeddings": 8}) == 32768
    assert models.context_length({"max_position_embeddings": 4096}) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ValueError, match="config.json: no positive max_position_embeddings"):
        models.context_length(tmp_path)


# -- checkpoint directories ---------------------------------------------------------------------


def test_check_model_dir_refuses_a_broken_checkpoint_without_loading_weights(tmp_path, tiny_dirs, monkeypatch):
    import safetensors.torch
    import transformers

    def no(*a, **k):
        raise AssertionError("check_model_dir loaded weights")

    # every way weights could load fails the test (a wall-clock bound would fail on a loaded machine)
    src = Path(tiny_dirs["qwen2_vl"])
    with monkeypatch.context() as m:
        for mod, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")):
            m.setattr(mod, name, no)
        m.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no))
        info = models.check_model_dir(src)
    assert info == {"model_type": "qwen2_vl", "context_length": 1024,
                    "vocab_size": json.loads((src / "config.json").read_text())["text_config"]["vocab_size"]}

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def rewrite(f, change):
        f.write_text(json.dumps(change(json.loads(f.read_text()))))

    cases = [
        (lambda d: (d / "config.json").write_text('{"model_type": "qwen2_vl",'), r"config.json: not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
        (lambda d: rewrite(d / "config.json", lambda c: dict(c, model_type="qwen2")),
         "config.json: model_type 'qwen2' is not an image-text-to-text model"),
        (lambda d: rewrite(d / "tokenizer_config.json", lambda c: dict(c, auto_map={"AutoTokenizer": ["x.T", None]})),
         r"tokenizer_config.json: asks for remote code"),
        (lambda d: (d / "extra.pt").write_bytes(b"x"), "refusing to load extra.pt"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
         r"model.safetensors: truncated \(\d+ bytes, the header says"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
         "model.safetensors: truncated .*shorter than its header"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json" * 4), "not a safetensors file"),
        (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer files"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "the tokenizer/processor does not load"),
        (lambda d: [f.write_text(f.read_text().replace("<|im_end|>", "<|end|>"))
                    for f in [*d.glob("*.json"), *d.glob("*.jinja")]], r"lacks the chat token\(s\)"),
        (lambda d: rewrite(d / "config.json", lambda c: dict(c, text_config=dict(c["text_config"], vocab_size=10))),
         "the tokenizer has .* tokens, the model's embedding only 10"),
    ]
    for k, (edit, msg) in enumerate(cases):
        d = broken(f"c{k}", edit)
        with pytest.raises((ValueError, FileNotFoundError), match=msg) as e:
            models.check_model_dir(d)
        assert str(d) in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        models.check_model_dir(tmp_path / "absent")
    # load_vlm's own check names the file of a broken config.json too
    with pytest.raises(ValueError, match=r"c0/config.json: not valid JSON"):
        models.load_vlm(tmp_path / "c0")


# -- the image cache ----------------------------------------------------------------------------


@pytest.fixture
def small_cache():
    old = (data.IMAGE_MAX_PIXELS, data.IMAGE_CACHE_BYTES)
    yield data.configure_image_cache
    data.configure_image_cache(*old)


def test_the_image_cache_holds_reduced_copies_within_its_bound(tmp_path, small_cache, tiny_dirs):
    big = Image.new("RGB", (3000, 2000), (240, 240, 230))
    ImageDraw.Draw(big).ellipse([200, 200, 1200, 1200], fill=(255, 0, 0))
    big.save(tmp_path / "big.jpg", quality=90)
    small_cache(max_bytes=2_000_000)
    im = data.load_image(str(tmp_path / "big.jpg"))
    assert im.width * im.height <= 448 * 448 and abs(im.width / im.height - 1.5) < 0.01
    assert np.asarray(im)[im.height * 700 // 2000, im.width * 700 // 3000].tolist() == pytest.approx([255, 0, 0], abs=8)
    # through the Encoder: the processor's budget (64x64 for the tiny models)
    enc = models.Encoder(models.load_vlm(tiny_dirs["qwen2_vl"])[1])
    assert enc.max_pixels == 4096 and data.load_image(str(tmp_path / "big.jpg"), enc.max_pixels).size == (78, 52)
    # LRU, bounded in bytes: 12 distinct images (600 KB each once reduced) never hold more
    mid = big.resize((1000, 700))
    for k in range(12):
        mid.save(tmp_path / f"b{k}.jpg")
        data.load_image(str(tmp_path / f"b{k}.jpg"))
        assert data.image_cache_stats()["bytes"] <= 2_000_000
    assert data.image_cache_stats()["images"] == 3
    a = data.load_image(str(tmp_path / "b11.jpg"))
    assert data.load_image(str(tmp_path / "b11.jpg")) is a  # the newest is still cached


def test_the_benchmark_images_stay_bit_for_bit(fed, tiny_dirs, small_cache):
    small_cache()  # empty
    paths = [*data._easy_vqa_raw("train")[3].values(), *data._easy_vqa_raw("test")[3].values()]
    for p in paths:  # every benchmark image fits every budget, so none is ever resized
        with Image.open(p) as im:
            assert im.size == (64, 64), p
    from transformers import AutoProcessor

    for fam in models.FAMILIES:
        assert models.processor_max_pixels(AutoProcessor.from_pretrained(tiny_dirs[fam])) == 64 * 64, fam
    exs = [*fed.public[:20], *fed.test["shape"][:20]]
    for e in exs:
        want = np.asarray(Image.open(e.image).convert("RGB"))
        for budget in (None, 4096):
            assert np.array_equal(np.asarray(data.load_image(e.image, budget)), want)
    assert data.image_cache_stats()["images"] == len({e.image for e in exs})  # one copy, whoever asked


# -- the benchmark as files ---------------------------------------------------------------------


def test_export_round_trip_gives_the_same_examples_and_pairs(tmp_path, fed):
    out = tmp_path / "bench"
    n = 24
    counts = data.export_benchmark(out, seed=0, max_rows=n, federation=fed)
    assert set(counts) == {*(f"clients/{c}.jsonl" for c in fed.clients), "prompts.jsonl", "eval.jsonl", "sft.jsonl"}
    same_image = lambda a, b: Path(a).read_bytes() == Path(b).read_bytes()
    for name, exs in fed.clients.items():
        f = out / "clients" / f"{name}.jsonl"
        assert all(not os.path.isabs(json.loads(x)["image"]) for x in f.read_text().splitlines())
        got = data.pairs_from_rows(safe_io.load_jsonl(f, "pairs"))
        want = data.make_pairs(exs, 0)[:n]
        assert [(p.prompt, p.chosen, p.rejected, p.domain) for p in got] == \
               [(p.prompt, p.chosen, p.rejected, p.domain) for p in want]
        assert all(same_image(a.image, b.image) for a, b in zip(got, want))
    key = lambda e: (e.prompt, e.answer, e.domain, e.image_id)
    test = [e for d in data.DOMAINS for e in fed.test[d]]
    pool = [data.Example(e.image, e.prompt, g, e.domain, e.image_id) for e, g in zip(fed.pool, fed.pool_gold)]
    for fname, kind, want in (("prompts.jsonl", "prompts", pool), ("eval.jsonl", "eval", test),
                              ("sft.jsonl", "sft", fed.public)):
        got = data.examples_from_rows(safe_io.load_jsonl(out / fname, kind))
        assert [key(e) for e in got] == [key(e) for e in want[:n]], fname
        assert all(same_image(a.image, b.image) for a, b in zip(got, want))
    assert data.by_domain(test) == fed.test  # an eval file's examples -> the test split by domain
    # a second export replaces the first; a directory that is not an export is left alone
    data.export_benchmark(out, seed=0, max_rows=2, federation=fed)
    assert len((out / "sft.jsonl").read_text().splitlines()) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a previous export"):
        data.export_benchmark(tmp_path / "mine", federation=fed, max_rows=2)


def test_export_is_a_command():
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "export", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--seed" in r.stdout


# -- preference pairs end as a policy sample does; TRL's format converts in one command ---------


def test_pairs_without_the_end_token_get_it_and_a_mixed_file_names_its_line(tmp_path, row):
    plain = dict(row, chosen="red", rejected="blue ")
    rows = safe_io.with_end_token(safe_io.load_jsonl(_write(tmp_path / "p.jsonl", [plain, plain]), "pairs"),
                                  tmp_path / "p.jsonl", data.EOS)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("red" + data.EOS, "blue" + data.EOS)] * 2
    # a file that uses the end token keeps a rejected response without it (a malformed sample)...
    kept = dict(row, rejected="blue")
    rows = safe_io.load_jsonl(_write(tmp_path / "e.jsonl", [row, kept]), "pairs")
    assert safe_io.with_end_token(rows, "e.jsonl", data.EOS)[1]["rejected"] == "blue"
    # ...but not a chosen one
    rows = safe_io.load_jsonl(_write(tmp_path / "m.jsonl", [row, plain]), "pairs")
    with pytest.raises(safe_io.DataError, match=r"m.jsonl:2: field 'chosen' does not end in <\|im_end\|>"):
        safe_io.with_end_token(rows, "m.jsonl", data.EOS)


def test_trl_preference_rows_convert_to_pairs_in_every_form(tmp_path, row):
    (tmp_path / "trl").mkdir()
    shutil.move(tmp_path / "a.png", tmp_path / "trl" / "a.png")
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    said = lambda t: [{"role": "assistant", "content": [{"type": "text", "text": t}]}]  # noqa: E731
    src = _write(tmp_path / "trl" / "prefs.jsonl", [
        {"images": ["a.png"], "prompt": "what color is the shape?", "chosen": "red", "rejected": "blue"},  # text
        {"images": [{"path": "a.png"}], "prompt": user, "chosen": said("red"), "rejected": said("blue"),
         "domain": "color"},  # conversational
        {"image": "a.png", "chosen": user + said("red"), "rejected": user + said("blue")},  # implicit prompt
    ])
    out = tmp_path / "mine" / "pairs.jsonl"
    assert safe_io.import_preference(src, out, data.EOS) == 3
    pairs = data.pairs_from_rows(safe_io.load_jsonl(out, "pairs"), "clinic")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("what color is the shape?", "red" + data.EOS, "blue" + data.EOS)] * 3
    assert {p.image for p in pairs} == {str((tmp_path / "trl" / "a.png").resolve())}
    assert [p.domain for p in pairs] == ["clinic", "color", "clinic"]
    # refusals name the line and the field; the TRL file handed to --client-data points here
    _write(src, [{"images": ["a.png", "a.png"], "prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(safe_io.DataError, match=r"prefs.jsonl:1: field 'images': expected exactly one image"):
        safe_io.import_preference(src, out, data.EOS)
    _write(src, [{"images": ["a.png"], "prompt": user + said("x"), "chosen": said("a"), "rejected": said("b")}])
    with pytest.raises(safe_io.DataError, match=r"prefs.jsonl:1: field 'prompt': a message of role 'assistant'"):
        safe_io.import_preference(src, out, data.EOS)
    _refused(src, "pairs", "looks like TRL's preference format.*python data.py import")


def test_import_is_a_command(tmp_path, row):
    src = _write(tmp_path / "prefs.jsonl", [{"images": ["a.png"], "prompt": "q?", "chosen": "a", "rejected": "b"}])
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "import", str(src), str(tmp_path / "out.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 pairs" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "import", str(tmp_path / "none.jsonl"),
                        str(tmp_path / "out2.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().endswith("none.jsonl: file not found")
    assert "Traceback" not in r.stderr
