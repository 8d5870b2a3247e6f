"""The embedded default: the easy-VQA federation (DESIGN section 4), the tiny VLM checkpoints,
and the one input-building path that every stage (SFT, reward models, routing features, GRPO,
eval) uses for tiny and real checkpoints alike.

What is here, in reading order:
  1. Domains and questions. Three client domains, each answerable only by looking at the image:
     colour ("what color is the shape?", 8 answers), shape ("what is the blue shape?", 3 answers)
     and position ("is the blue shape on the left or the right?", 2 answers per question).
     easy-VQA's yes/no questions are dropped: DESIGN 4 measured that they are answered 83% from
     the text alone, and that once rebalanced no tiny model learns them in budget. Position takes
     their place because it is a pure image attribute that a 4x4 grid of image tokens can see.
     Its labels come from the easy-VQA images themselves: the background is one flat colour, so
     the shape's centroid is measured exactly from the pixels; only images whose shape sits
     clearly off-centre (>= POSITION_MARGIN px) get a position question, and each template is
     subsampled to 50/50, so the question text says nothing about the answer.
     Synthetic captioned images for the tiny base's generic pre-training live here too.
  2. Splits. Train images are split by image id (disjoint): public SFT split for the server's
     reference policy, one private split per client (the client keeps only its domain's questions,
     turned into preference pairs), and an unlabelled GRPO prompt pool. The test split is the
     easy-VQA test set (>= 1,000 questions per domain). The public split's labels carry a careless
     annotator's confusions (PUBLIC_CONFUSIONS): the room that alignment must recover.
  3. Preference pairs. chosen = gold answer + <|im_end|>; rejected = what a sampling policy emits
     (DESIGN 4, "reward hacking"): wrong answers of the same domain, answers of other domains,
     no end token, repeats, empty.
  4. Tokenizer and tiny checkpoints: a word-level tokenizer over the benchmark's vocabulary plus the
     chat special tokens, and tiny Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision built from small configs
     with the real transformers classes, saved with save_pretrained and loaded back with the Auto
     classes exactly like a downloaded checkpoint directory.
  5. `Encoder`: chat template -> processor (image tokens, mm_token_type_ids, left padding) -> tensors.
  6. Domain-balanced batches and the guarded optimizer step the training loops share.
  7. JSONL loading of users' own data with validation (file + line + field in every error).
  8. Crash-safe writes (temp file beside the target, then a rename) for every stage output.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# 1. Domains and questions
# ----------------------------------------------------------------------------------------------

COLORS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
SHAPES = ["circle", "rectangle", "triangle"]
POSITIONS = ["left", "right", "top", "bottom"]
DOMAINS = ["color", "shape", "position"]
DOMAIN_ANSWERS = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
POSITION_MARGIN = 6.0  # px the shape's centroid must be off the image centre to ask about it
# Position questions name the two candidate answers, so the blind baseline is exactly 50%.
POSITION_TEMPLATES = {
    "x": ["is the {c} {s} on the left or the right?", "is the {s} on the left or on the right?"],
    "y": ["is the {c} {s} at the top or the bottom?", "is the {s} at the top or at the bottom?"],
}
# Words the synthetic pre-training captions use ("a red circle on the left").
CAPTION_WORDS = ["a", "on", "the", "at", "in", "middle"]


@dataclass
class Example:
    """One visual question. `image` is a path (loaded lazily, cached by `load_image`), or a PIL
    image for the synthetic pre-training data."""

    image: str
    prompt: str
    answer: str | None  # None in the unlabelled GRPO prompt pool
    domain: str
    image_id: str = ""


def question_domain(answer: str) -> str | None:
    a = answer.lower()
    for d, answers in DOMAIN_ANSWERS.items():
        if a in answers:
            return d
    return None  # yes/no: dropped (see module docstring)


_IMAGE_CACHE: dict[str, Image.Image] = {}


def load_image(path: str) -> Image.Image:
    """RGB PIL image, cached: the benchmark reuses each 64x64 image across questions and epochs."""
    img = _IMAGE_CACHE.get(path)
    if img is None:
        with Image.open(path) as f:
            img = f.convert("RGB")
        _IMAGE_CACHE[path] = img
    return img


def shape_centroid(path: str) -> tuple[float, float]:
    """(x, y) centroid in pixels of everything that differs from the flat background colour."""
    im = np.asarray(load_image(path), dtype=np.int16)
    mask = np.abs(im - im[0, 0]).sum(-1) > 30
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 31.5, 31.5
    return float(xs.mean()), float(ys.mean())


def _easy_vqa_raw(split: str):
    import easy_vqa

    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return qs, ans, ids, paths


def _position_questions(image_ids, paths, rng: random.Random, split: str, colors_shapes) -> list[Example]:
    """Balanced position questions: per axis, as many 'left' as 'right' (and 'top' as 'bottom')."""
    by_answer: dict[str, list[Example]] = {p: [] for p in POSITIONS}
    for iid in image_ids:
        path = paths[iid]
        cx, cy = shape_centroid(path)
        c, s = colors_shapes.get(iid, ("", "shape"))
        for axis, v in (("x", cx), ("y", cy)):
            if abs(v - 31.5) < POSITION_MARGIN:
                continue  # ambiguous: the shape sits near the centre on this axis
            ans = ("left" if v < 31.5 else "right") if axis == "x" else ("top" if v < 31.5 else "bottom")
            tmpl = rng.choice(POSITION_TEMPLATES[axis])
            q = tmpl.format(c=c, s=s) if c else tmpl.replace("{c} ", "").format(s=s)
            by_answer[ans].append(Example(path, q, ans, "position", f"{split}/{iid}"))
    out = []
    for a, b in (("left", "right"), ("top", "bottom")):
        n = min(len(by_answer[a]), len(by_answer[b]))
        for k in (a, b):
            rng.shuffle(by_answer[k])
            out += by_answer[k][:n]
    out.sort(key=lambda e: e.image_id)
    return out


def easy_vqa_examples(split: str, seed: int = 0) -> dict[str, list[Example]]:
    """All questions of the three domains on easy-VQA's `split` ('train' or 'test'), by domain.

    Colour and shape questions are easy-VQA's own; position questions are derived (module doc).
    The position rebalancing is seeded, so the same seed gives the same questions.
    """
    qs, ans, ids, paths = _easy_vqa_raw(split)
    out: dict[str, list[Example]] = {d: [] for d in DOMAINS}
    colors_shapes: dict[int, tuple[str, str]] = {}
    for q, a, iid in zip(qs, ans, ids):
        d = question_domain(a)
        if d is None:
            continue
        out[d].append(Example(paths[iid], q, a, d, f"{split}/{iid}"))
        c, s = colors_shapes.get(iid, ("", "shape"))
        colors_shapes[iid] = (a, s) if d == "color" else (c, a)
    rng = random.Random(f"position-{split}-{seed}")
    out["position"] = _position_questions(sorted(paths), paths, rng, split, colors_shapes)
    return out


# Generic pre-training data for the tiny base (DESIGN 4, "vision too coarse"): synthetic images
# drawn in easy-VQA's style (one flat shape of a pure colour on a light background, 64x64) with
# a caption naming its colour, shape and place: "a teal circle on the left at the middle". They
# belong to no client and to no split; the tiny base learns to *see* from them, the way a real
# VLM arrives pre-trained, so that shape is learnable from the small public split (measured at
# 300 SFT steps: shape 47% from scratch, 82% after 600 steps of this pre-training) and so that RL
# can reach answers the reference SFT under-weights (README, gate 4).
SHAPE_RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
             "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}
PRETRAIN_PROMPT = "what is in the image?"


def synthetic_image(rng: random.Random) -> tuple[Image.Image, str]:
    """One easy-VQA-style image and its caption. Sizes span easy-VQA's (8-32 px, measured)."""
    im = Image.new("RGB", (64, 64), tuple(rng.randint(225, 255) for _ in range(3)))
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    w = rng.randint(8, 32)
    h = rng.randint(8, 32) if shape == "rectangle" else w
    x0, y0 = rng.randint(0, 64 - w), rng.randint(0, 64 - h)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=SHAPE_RGB[color])
    elif shape == "rectangle":
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=SHAPE_RGB[color])
    else:
        draw.polygon([(x0 + w / 2, y0), (x0, y0 + h), (x0 + w, y0 + h)], fill=SHAPE_RGB[color])

    def place(v, low, high):  # off-centre by more than POSITION_MARGIN, else the middle (a
        # position question is also asked at exactly the margin; captions call that the middle)
        return low if v < 31.5 - POSITION_MARGIN else high if v > 31.5 + POSITION_MARGIN else "middle"

    px, py = place(x0 + w / 2, "left", "right"), place(y0 + h / 2, "top", "bottom")
    return im, f"a {color} {shape} on the {px} at the {py}"


def pretrain_examples(n: int, seed: int) -> list[Example]:
    """n captioned synthetic images (PIL images in memory, 12 KB each) as one 'caption' domain."""
    rng = random.Random(f"pretrain-{seed}")
    out = []
    for i in range(n):
        im, caption = synthetic_image(rng)
        out.append(Example(im, PRETRAIN_PROMPT, caption, "caption", f"synthetic/{i}"))
    return out


# ----------------------------------------------------------------------------------------------
# 2. Splits
# ----------------------------------------------------------------------------------------------


@dataclass
class Federation:
    """Everything the embedded benchmark is made of, after the split.

    public:    labelled questions of every domain on the public images (server's SFT data)
    clients:   {client name: its domain's labelled questions on its private images}
    client_domain: {client name: domain}
    pool:      GRPO prompt pool, every domain, answer=None for the trainer (gold kept apart in
               `pool_gold` for on-the-fly accuracy that only the evaluator reads)
    test:      {domain: labelled test questions}
    """

    public: list[Example]
    clients: dict[str, list[Example]]
    client_domain: dict[str, str]
    pool: list[Example]
    pool_gold: list[str]
    test: dict[str, list[Example]]
    image_split: dict[str, list[str]] = field(default_factory=dict)


DEFAULT_SPLIT = {"public": 600, "color": 800, "shape": 1200, "position": 800, "pool": 600}

# The server's public split was labelled by a careless annotator who confuses one answer of each
# domain with a neighbour: answer -> (what the annotator wrote, how often). Why the benchmark
# needs it (README, "gate 4"): a reference SFT'd on clean labels sits at its ceiling on colour
# and position (95-99%), so no reward, not even the oracle, can show a gain there. With these
# confusions the reference says "green" for most teal shapes, yet the right answer keeps real
# probability mass (the pre-trained base knows teal), which is room that RL can recover, and
# recover only if its reward knows better: the clients' clean private data do, the server's
# labels do not. Measured (default run, 3 seeds): reference 79.2 / 54.7 / 73.5 %, oracle GRPO
# +20.2 / +23.9 / +25.3 points. Triangle is confused less often: at 0.6 the reference fell to
# 40% on shape, within 10 points of the blind baseline (gate 2a). The test set, the pool and
# the clients' data are untouched.
PUBLIC_CONFUSIONS = {"teal": ("green", 0.6), "brown": ("red", 0.6), "triangle": ("rectangle", 0.45),
                     "bottom": ("top", 0.6)}


def careless_labels(examples: list[Example], seed: int,
                    confusions: dict[str, tuple[str, float]] | None = None) -> list[Example]:
    """The public split as its annotator labelled it: each answer in `confusions` is replaced by
    its neighbour with the given probability (seeded; the same seed relabels the same rows)."""
    conf = PUBLIC_CONFUSIONS if confusions is None else confusions
    rng = random.Random(f"careless-{seed}")
    out = []
    for e in examples:
        if e.answer in conf and rng.random() < conf[e.answer][1]:
            e = replace(e, answer=conf[e.answer][0])
        out.append(e)
    return out


def build_federation(seed: int = 0, split_sizes: dict[str, int] | None = None,
                     test_per_domain: int | None = None,
                     confusions: dict[str, tuple[str, float]] | None = None) -> Federation:
    """Deterministic, seeded, disjoint-by-image split of easy-VQA train into the federation.

    split_sizes: number of train images per part (public / one per client domain / pool); their
    sum must be <= 4,000. The shape client gets the most images: shape needs volume (DESIGN 4).
    confusions: the public annotator's (PUBLIC_CONFUSIONS when None; {} for clean labels).
    """
    sizes = dict(DEFAULT_SPLIT if split_sizes is None else split_sizes)
    train = easy_vqa_examples("train", seed)
    all_ids = [f"train/{i}" for i in sorted(_easy_vqa_raw("train")[3])]
    total = sum(sizes.values())
    if total > len(all_ids):
        raise ValueError(f"split sizes ask for {total} train images, easy-VQA has {len(all_ids)}")
    perm = np.random.RandomState(seed).permutation(len(all_ids))
    parts, start = {}, 0
    for name in ["public", *DOMAINS, "pool"]:
        n = sizes.get(name, 0)
        parts[name] = {all_ids[i] for i in perm[start:start + n]}
        start += n

    def on(ids, domains):
        return [e for d in domains for e in train[d] if e.image_id in ids]

    public = careless_labels(on(parts["public"], DOMAINS), seed, confusions)
    clients = {d: on(parts[d], [d]) for d in DOMAINS}
    pool_full = on(parts["pool"], DOMAINS)
    random.Random(seed).shuffle(pool_full)
    pool = [Example(e.image, e.prompt, None, e.domain, e.image_id) for e in pool_full]
    test = easy_vqa_examples("test", 0)  # the test set never depends on the run's seed
    if test_per_domain is not None:
        test = {d: v[:test_per_domain] for d, v in test.items()}
    return Federation(public=public, clients=clients, client_domain={d: d for d in DOMAINS},
                      pool=pool, pool_gold=[e.answer for e in pool_full], test=test,
                      image_split={k: sorted(v) for k, v in parts.items()})


# ----------------------------------------------------------------------------------------------
# 3. Preference pairs
# ----------------------------------------------------------------------------------------------

EOS = "<|im_end|>"


@dataclass
class Pair:
    image: str
    prompt: str
    chosen: str  # response text, end token included when the response ends properly
    rejected: str
    domain: str = ""


def make_pairs(examples: list[Example], seed: int, per_question: int = 2) -> list[Pair]:
    """Turn labelled questions into preference pairs whose rejected side covers what a sampling
    policy emits: a wrong answer of the same domain (most often), an answer of another domain,
    the right answer without the end token, the right answer repeated, an empty response, and a
    wrong answer repeated. Without the malformed kinds an RM is hacked within ~150 GRPO steps.
    """
    rng = random.Random(f"pairs-{seed}")
    all_answers = [a for d in DOMAINS for a in DOMAIN_ANSWERS[d]]
    kinds = ["wrong"] * 5 + ["other_domain", "no_eos", "repeat", "empty", "wrong_repeat"]
    pairs = []
    for e in examples:
        same = [a for a in DOMAIN_ANSWERS[e.domain] if a != e.answer] if e.domain in DOMAIN_ANSWERS else []
        if e.answer in OPPOSITE:
            # A position question names its two candidates ("left or right?"): the wrong answer a
            # policy gives is the other candidate. Measured: with "top" allowed as a wrong answer
            # to a left/right question, the position RM scored 95% on its held-out pairs but only
            # 72.5% on left-vs-right, no better than the reference policy, and GRPO on it did not
            # improve position while the oracle reward did (+20 points).
            same = [OPPOSITE[e.answer]]
        if not same:
            same = [a for a in all_answers if a != e.answer]
        for _ in range(per_question):
            kind = rng.choice(kinds)
            wrong = rng.choice(same)
            rejected = {
                "wrong": wrong + EOS,
                "other_domain": rng.choice([a for a in all_answers if a not in DOMAIN_ANSWERS.get(e.domain, same)
                                            and a != e.answer]) + EOS,
                "no_eos": e.answer,
                "repeat": f"{e.answer} {e.answer}" + EOS,
                "empty": EOS,
                "wrong_repeat": f"{wrong} {wrong} {wrong}",
            }[kind]
            pairs.append(Pair(e.image, e.prompt, e.answer + EOS, rejected, e.domain))
    return pairs


def format_pairs(examples: list[Example], n: int, seed: int, tag: str = "",
                 skip_domains: frozenset | set = frozenset()) -> list[Pair]:
    """Format-only pairs on `n` of `examples` (a seeded sample of the public split's questions,
    those of `skip_domains` left out): the chosen side is a one-word answer + end token, the
    rejected side the same word made malformed (no end token, repeated, empty, or run into a
    second answer word like a caption). The chosen word is drawn uniformly from the question's
    candidate answers (its domain's answers; a position question's two named sides), whatever
    the image shows: the pairs carry no preference between answers, only that a one-word answer
    that ends beats what is not one.

    Why: a client's own pairs only show it its own domain's questions, and a client RM used
    alone was hacked on the other domains' prompts (figures in grpo.format_guard) although its
    in-domain pairs reject exactly those forms. A client skips its own domain, which its pairs
    cover.

    Off by default (mor.py --format-share 0), because it costs the RMs their content. Measured
    (data seed 0, heterogeneous, held-out in-domain pair accuracy colour / shape / position, and
    the largest 10-step malformed share of each RM alone under GRPO, seed 0):
      share 0 (default):   96.0 / 95.3 / 100.0    malformed 29.8 / 29.9 / 10.0 % (3-seed means)
      share 1/3:           88.4 / 90.5 /  88.7    malformed  0.5 /  0.9 /  1.7 %
      share 0.1:           98.5 / 91.9 /  84.4    malformed  0.4 /  0.3 / (not run) %
    The loss is in the wrong-answer pairs (share 1/3: 76 / 82 / 80% right, against 92 / 91 / 100),
    i.e. in what the RM knows, not in its sense of form. The default guards the form at the
    server instead (grpo.format_guard). An earlier variant that used the public label as the
    chosen word and kept the client's own domain dropped position to 90.1: the careless "top"
    for "bottom" leaked in."""
    rng = random.Random(f"format-{tag}-{seed}")
    all_answers = [a for d in DOMAINS for a in DOMAIN_ANSWERS[d]]
    pool = [e for e in examples if e.domain not in skip_domains]
    out = []
    for e in rng.sample(pool, min(n, len(pool))):
        cands = [e.answer, OPPOSITE[e.answer]] if e.answer in OPPOSITE else DOMAIN_ANSWERS.get(e.domain, all_answers)
        w = rng.choice(sorted(cands))
        v = rng.choice([a for a in all_answers if a != w])
        rejected = rng.choice([w, f"{w} {w}" + EOS, EOS, f"{v} {w}" + EOS, f"{w} {v}" + EOS, f"{w} {w} {w}"])
        out.append(Pair(e.image, e.prompt, w + EOS, rejected, "format"))
    return out


def flip_pairs(pairs: list[Pair], share: float, seed: int) -> list[Pair]:
    """A careless annotator: each pair's preference is reversed with probability `share` (seeded).
    At share 0.5 the pairs carry no preference signal at all: the bucket-effect client."""
    rng = random.Random(f"flip-{seed}")
    return [Pair(p.image, p.prompt, p.rejected, p.chosen, p.domain) if rng.random() < share else p for p in pairs]


def extract_answer(response: str) -> str | None:
    """The answer of a *well-formed* response: exactly one word followed by the end token.
    Anything else (no end token, several words, empty) is malformed and returns None."""
    if not response.endswith(EOS):
        return None
    body = response[: -len(EOS)].strip()
    if not body or len(body.split()) != 1 or "<|" in body:
        return None
    return body.lower()


# ----------------------------------------------------------------------------------------------
# 4. Tokenizer and tiny checkpoints
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]
ROLE_WORDS = ["system", "user", "assistant"]
WORD_RE = re.compile(r"\w+|[^\w\s]+")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]

# Qwen-style chat template; `{IMAGE}` is the family's image placeholder (the processor expands it
# to one token per merged vision patch).
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- 'IMAGE' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
IMAGE_PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                     "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                     "llava_onevision": "<image>"}


def benchmark_vocab() -> list[str]:
    """Every word of easy-VQA's questions and answers, the position questions, the captions of
    the synthetic pre-training and the chat roles; sorted, so ids are stable."""
    qs_tr, a_tr, _, _ = _easy_vqa_raw("train")
    qs_te, a_te, _, _ = _easy_vqa_raw("test")
    words = set()
    for text in [*qs_tr, *a_tr, *qs_te, *a_te, *[t for v in POSITION_TEMPLATES.values() for t in v],
                 *POSITIONS, *CAPTION_WORDS, *ROLE_WORDS]:
        words.update(WORD_RE.findall(text.lower().replace("{c}", "").replace("{s}", "")))
    return sorted(words)


def build_tokenizer(family: str = "qwen2_vl"):
    """Word-level tokenizer (HF `tokenizers`), lower-casing, whitespace pre-tokenizer. The chat
    template's newlines vanish in pre-tokenization, which is what we want for a tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in benchmark_vocab():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=None, eos_token=EOS, pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<pad>", "<unk>", EOS)],
        padding_side="left", truncation_side="left", model_max_length=1024)
    tok.chat_template = _TEMPLATE.replace("IMAGE", IMAGE_PLACEHOLDER[family])
    return tok


# Sizes of the tiny models. Patch 4 on 64x64 gives a 16x16 patch grid, merged 4x4 into 16 image
# tokens. Measured (shape questions only, batch 64, lr 1e-3, 1 thread): patch 8 / merge 2 reached
# 62% shape accuracy after 600 steps; patch 4 / merge 4 reached 87% after 300 steps at 2.8x the
# cost per step, so the shape domain is learnable from one client's data (DESIGN 4 asked for patch
# 8 "or better"). The language model still sees 16 image tokens, as with patch 8 / merge 2.
# rope_theta 10, not Qwen's 1e6: the image tokens' only absolute position is M-RoPE's (h, w), a 4x4
# grid, and with theta 1e6 a step of one grid cell turns the h/w frequencies by < 0.03 rad, so the
# model can barely tell left from right (measured, position questions only, 300 steps: 62% with
# 1e6, 99% with 10). Text positions stay < 100, so theta 10 costs the text nothing.
TINY = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vision_depth=2, vision_dim=64,
            vision_heads=4, patch=4, merge=4, image=64, llava_patch=16,
            rope_theta=10.0)


def _qwen_rope(head_dim: int, theta: float) -> dict:
    # The default mrope_section [16, 24, 24] assumes head_dim 128; it must sum to head_dim / 2.
    return {"rope_type": "default", "rope_theta": theta,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0, size: dict | None = None) -> str:
    """Build a randomly initialised tiny checkpoint of `family` and save it like a real one.

    The directory holds config.json, generation_config.json, model.safetensors, the tokenizer
    and the processor; `load_vlm(out_dir)` reads it back through the Auto classes.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    s = dict(TINY, **(size or {}))
    tok = build_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids[EOS], pad_token_id=ids["<pad>"])
    head_dim = s["hidden"] // s["heads"]
    text = dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], hidden_act="silu", max_position_embeddings=1024,
                rms_norm_eps=1e-6, attention_dropout=0.0, use_sliding_window=False, **special)
    if family == "qwen2_vl":
        text["rope_parameters"] = _qwen_rope(head_dim, s["rope_theta"])
        vision = dict(depth=s["vision_depth"], embed_dim=s["vision_dim"], num_heads=s["vision_heads"],
                      hidden_size=s["hidden"], mlp_ratio=4, patch_size=s["patch"], temporal_patch_size=2,
                      spatial_merge_size=s["merge"], in_channels=3)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        cls = tf.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = _qwen_rope(head_dim, s["rope_theta"])
        # window = 2x2 merged units (window_size is in pixels); the last block attends globally.
        vision = dict(depth=s["vision_depth"], hidden_size=s["vision_dim"], num_heads=s["vision_heads"],
                      intermediate_size=4 * s["vision_dim"], out_hidden_size=s["hidden"],
                      patch_size=s["patch"], temporal_patch_size=2, spatial_merge_size=s["merge"], in_channels=3,
                      window_size=s["patch"] * s["merge"] * 2, fullatt_block_indexes=[s["vision_depth"] - 1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                     vision_start_token_id=ids["<|vision_start|>"],
                                     vision_end_token_id=ids["<|vision_end|>"])
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        # SigLIP tower at patch 16 -> 4x4 = 16 base tokens, one 64x64 anyres tile adds 16 more plus
        # 4 row-newline tokens (36 in all). LLaVA has no patch merger, so a finer patch costs 4x
        # the tokens: it serves the colour client, which needs no fine detail.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": s["rope_theta"]}
        text["model_type"] = "qwen2"
        vision = dict(model_type="siglip_vision_model", hidden_size=s["vision_dim"],
                      intermediate_size=4 * s["vision_dim"], num_hidden_layers=s["vision_depth"],
                      num_attention_heads=s["vision_heads"], image_size=s["image"], patch_size=s["llava_patch"],
                      num_channels=3)
        config = tf.LlavaOnevisionConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                         image_token_id=ids["<image>"], video_token_id=ids["<video>"],
                                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                                         image_grid_pinpoints=[[s["image"], s["image"]]],
                                         vision_aspect_ratio="anyres_max_1")
        cls = tf.LlavaOnevisionForConditionalGeneration
    for k, v in special.items():  # otherwise Qwen's 151643/151645 leak through (DESIGN 7)
        setattr(config, k, v)
        setattr(config.get_text_config(), k, v)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    model.generation_config = tf.GenerationConfig(**special, do_sample=False)
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _build_processor(family, tok, s).save_pretrained(out_dir)
    return out_dir


def _build_processor(family: str, tok, s: dict):
    import transformers as tf

    px = s["image"] * s["image"]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        ip = tf.Qwen2VLImageProcessor(patch_size=s["patch"], merge_size=s["merge"], temporal_patch_size=2,
                                      size={"shortest_edge": px, "longest_edge": px})
        proc_cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        return proc_cls(image_processor=ip, tokenizer=tok, video_processor=tf.Qwen2VLVideoProcessor(),
                        chat_template=tok.chat_template)
    ip = tf.LlavaOnevisionImageProcessor(size={"height": s["image"], "width": s["image"]},
                                         crop_size={"height": s["image"], "width": s["image"]},
                                         image_grid_pinpoints=[[s["image"], s["image"]]], do_pad=True)
    return tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok,
                                      video_processor=tf.LlavaOnevisionVideoProcessor(),
                                      chat_template=tok.chat_template, num_image_tokens=(s["image"] // s["llava_patch"]) ** 2,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")


def _refuse_unsafe_dir(path: str) -> None:
    """A checkpoint directory is an upload from outside: only safetensors weights, no code."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    bad = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".py", ".ckpt")]
    if bad:
        raise ValueError(f"{path}: refusing to load {', '.join(sorted(bad))}: only safetensors weights "
                         "and JSON configs are accepted (no pickle, no remote code)")
    if not any(f.suffix == ".safetensors" for f in p.iterdir()):
        raise ValueError(f"{path}: no .safetensors weights found")
    cfg = json.loads((p / "config.json").read_text())
    if "auto_map" in cfg:
        raise ValueError(f"{path}/config.json: asks for remote code (auto_map); refused")


def load_vlm(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model, processor) from a checkpoint directory, tiny or real, via the Auto classes.

    safetensors only, no trust_remote_code. Real checkpoints default to bf16 on CUDA, tiny ones
    to fp32 on CPU: the caller passes dtype/device; nothing else differs between them.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(path)
    _refuse_unsafe_dir(path)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    _check_chat_tokens(path, processor)  # before the weights: a wrong checkpoint fails in a second
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=False).to(device)
    return model, processor


def _check_chat_tokens(path: str, processor) -> None:
    """Every stage builds its rows with the chat template and reads <|im_end|> as the end of a
    response (data.Encoder). A tokenizer without them would silently map them to <unk> (the RM
    then scores every response's end as the same unknown token), so it is refused up front."""
    tok = processor.tokenizer
    need = ["<|im_start|>", EOS, getattr(processor, "image_token", None) or "<|image_pad|>"]
    vocab = tok.get_vocab()
    missing = [t for t in need if t not in vocab]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks the chat token(s) {missing}; mor needs a chat "
                         "VLM checkpoint (Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision style)")
    if not (getattr(processor, "chat_template", None) or tok.chat_template):
        raise ValueError(f"{path}: no chat template in the tokenizer or processor config")


# ----------------------------------------------------------------------------------------------
# 5. The one input-building path
# ----------------------------------------------------------------------------------------------


class Encoder:
    """Turns (image, prompt[, response]) triples into model inputs, identically for every stage.

    Layout of one row (left-padded): [pad ... pad | chat prompt with image tokens | response].
    Left padding puts every sequence's last token at index -1 (the RM reads its reward there)
    and lets `generate` append to a batch directly.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id
        self.eos_id = self.tok.convert_tokens_to_ids(EOS)
        # Tokens a policy must never emit: the vision placeholders (re-scoring would fail with
        # "image features and image tokens do not match") and pad.
        self.banned_ids = []
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<image>",
                  "<video>", "<pad>", "<unk>"):
            i = self.tok.convert_tokens_to_ids(t)
            if i is not None and (i != self.tok.unk_token_id or t == "<unk>"):
                self.banned_ids.append(i)
        self._prompt_cache: dict[str, str] = {}

    def prompt_text(self, prompt: str) -> str:
        text = self._prompt_cache.get(prompt)
        if text is None:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            self._prompt_cache[prompt] = text
        return text

    def __call__(self, images: list[str] | list[Image.Image], prompts: list[str],
                 responses: list[str] | None = None, device: str | torch.device = "cpu") -> dict:
        """Batch dict for the model. With `responses`, each row is prompt + response and
        `response_mask` [B, T] marks the response tokens (1) vs prompt/pad (0)."""
        pil = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        texts = [self.prompt_text(p) for p in prompts]
        if responses is not None:
            texts = [t + r for t, r in zip(texts, responses)]
        enc = self.processor(text=texts, images=pil, padding=True, return_tensors="pt")
        enc = dict(enc)
        if responses is not None:
            # Response length in tokens, from the response text alone (no second pass over the
            # images): the prompt ends at the assistant turn's newline, and neither the word-level
            # nor Qwen's BPE pre-tokenizer merges across it. Left padding puts every response
            # at the end of its row: response_mask = the last n_i positions of row i.
            n_resp = torch.tensor([len(ids) for ids in
                                   self.tok(list(responses), add_special_tokens=False)["input_ids"]])
            T = enc["input_ids"].shape[1]
            pos = torch.arange(T).unsqueeze(0)
            enc["response_mask"] = (pos >= T - n_resp.unsqueeze(1)).long()
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in enc.items()}

    def encode_shared(self, vlm, images: list, prompts: list[str], responses: list[str] | None = None,
                      device: str | torch.device = "cpu") -> dict:
        """Like __call__, but the vision tower runs once per *distinct* image (by path, or by
        object for PIL images). A preference pair shows one image twice (chosen, rejected) and a
        GRPO group G times: encoding it once per row would repeat the dominant cost of the
        forward (the tiny Qwen tower is ~70% of a training step on CPU).

        Returns the batch with `pixel_values` replaced by `mm_encoder_outputs` (transformers 5.x
        accepts pre-encoded image features in every VLM forward); gradients flow into the vision
        tower through the shared features as usual."""
        batch = self(images, prompts, responses, device)
        first: dict = {}
        source = [first.setdefault(im if isinstance(im, (str, os.PathLike)) else id(im), i)
                  for i, im in enumerate(images)]
        return share_images(vlm, batch, source)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids [B, T] -> response strings with the end token kept (it decides whether
        a response is well-formed) and pad dropped."""
        out = []
        for row in ids.tolist():
            toks = []
            for i in row:
                if i == self.pad_id:
                    continue
                toks.append(i)
                if i == self.eos_id:
                    break
            words = self.tok.decode([t for t in toks if t != self.eos_id], skip_special_tokens=True).strip()
            out.append(words + (EOS if toks and toks[-1] == self.eos_id else ""))
        return out


def image_features(vlm, batch: dict, rows: list[int]) -> tuple:
    """Vision-tower features of the images of `rows` of an Encoder batch: a tuple with one
    [tokens_i, H] tensor per row (the form `mm_encoder_outputs` takes).

    Qwen2-VL / 2.5-VL: pixel_values [sum_i patches_i, C*t*p*p] (flattened over images, split by
    image_grid_thw); LLaVA-OneVision: pixel_values [N, tiles, C, H, W] with image_sizes [N, 2]."""
    pv = batch["pixel_values"]
    model = vlm.model  # the VLM body: get_image_features lives there for every family
    if "image_grid_thw" in batch:
        grid = batch["image_grid_thw"]  # [N, 3]
        chunks = pv.split(grid.prod(-1).tolist())
        out = model.get_image_features(torch.cat([chunks[r] for r in rows]), grid[rows], return_dict=True)
    else:
        out = model.get_image_features(pv[rows], batch["image_sizes"][rows], return_dict=True)
    return tuple(out.pooler_output)


def with_image_features(batch: dict, feats: tuple) -> dict:
    """The batch with pixel_values replaced by pre-computed per-row image features.
    image_grid_thw / image_sizes stay: they drive the placeholder count and Qwen's 3-D rope."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    b = {k: v for k, v in batch.items() if k != "pixel_values"}
    b["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
    return b


def share_images(vlm, batch: dict, source: list[int]) -> dict:
    """batch (one image per row) -> same batch where row i uses the image features of row
    source[i]; the vision tower runs only on the distinct rows named in `source`."""
    uniq = sorted(set(source))
    slot = {r: j for j, r in enumerate(uniq)}
    feats = image_features(vlm, batch, uniq)
    return with_image_features(batch, tuple(feats[slot[s]] for s in source))


def balanced_batches(examples: list, batch_size: int, seed: int):
    """Endless batches with an equal share of every domain (shuffled epochs per domain).

    Colour is learned in a few dozen steps and shape needs hundreds (DESIGN 4); sampling the
    domains evenly keeps the slow domains from being starved by the easy, frequent one."""
    rng = random.Random(seed)  # its own RNG: the batch order depends on the seed and nothing else
    by_dom: dict[str, list] = {}
    for e in examples:
        by_dom.setdefault(e.domain, []).append(e)
    doms = sorted(by_dom)
    orders = {d: [] for d in doms}
    while True:
        batch = []
        for j, d in enumerate(doms):
            # k rows of domain d; the remainder of batch_size / n_domains goes to the first ones
            k = batch_size // len(doms) + (j < batch_size % len(doms))
            while len(orders[d]) < k:
                perm = by_dom[d][:]
                rng.shuffle(perm)
                orders[d] += perm
            batch += orders[d][:k]
            orders[d] = orders[d][k:]
        yield batch


def image_batches(pairs: list, batch_size: int, seed: int):
    """Endless batches of whole image groups: all pairs that share an image land in the same
    batch (images in shuffled epochs), until the batch holds >= batch_size pairs. With
    `Encoder.encode_shared` the vision tower then runs once per image, not once per row:
    measured 3x faster per BT step on the tiny Qwen models."""
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for p in pairs:
        groups.setdefault(p.image, []).append(p)
    keys, order = sorted(groups), []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = keys[:]
                rng.shuffle(order)
            batch += groups[order.pop()]
        yield batch


def guarded_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, desc: str,
                 max_norm: float | None = 1.0) -> bool:
    """zero_grad -> backward -> clip the global grad norm (none if max_norm is None) -> step.
    False (and a log line) when the loss or the gradient is NaN/inf: the batch is skipped rather
    than poisoning the AdamW moments (one NaN there makes every later step NaN)."""
    if not torch.isfinite(loss):
        tqdm.write(f"{desc}: non-finite loss ({loss.item()}), batch skipped")
        return False
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # what clip_grad_norm_ computes
    if not torch.isfinite(norm):  # finite loss, inf gradient (an overflow inside the backward)
        opt.zero_grad(set_to_none=True)
        tqdm.write(f"{desc}: non-finite gradient, batch skipped")
        return False
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    opt.step()
    return True


# ----------------------------------------------------------------------------------------------
# 7. Users' own data: JSONL with validation
# ----------------------------------------------------------------------------------------------

JSONL_KEYS = {"pairs": ("image", "prompt", "chosen", "rejected"), "prompts": ("image", "prompt"),
              "eval": ("image", "prompt", "answer")}


class DataError(ValueError):
    """Bad user data; the message names the file, the line and the field."""


def load_jsonl(path: str | os.PathLike, kind: str) -> list[dict]:
    """Rows of a user JSONL file of `kind` ('pairs', 'prompts' or 'eval').

    Image paths are relative to the file. Errors name file:line and the field: a line that is not
    JSON or not an object, a missing or non-string field, an image that is missing or unreadable,
    chosen == rejected, and an empty file.
    """
    if kind not in JSONL_KEYS:
        raise ValueError(f"unknown JSONL kind {kind!r}; one of {sorted(JSONL_KEYS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in JSONL_KEYS[kind]:
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}' (needs {', '.join(JSONL_KEYS[kind])})")
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{where}: field '{key}' must be a non-empty string")
            img = (path.parent / row["image"]).resolve()
            if not img.is_file():
                raise DataError(f"{where}: field 'image': file not found: {img}")
            try:
                with Image.open(img) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for a corrupt file
                raise DataError(f"{where}: field 'image': unreadable image {img} ({type(e).__name__})") from None
            if kind == "pairs" and row["chosen"].strip() == row["rejected"].strip():
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
            row = dict(row, image=str(img))
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


def blind_baseline(train: list[Example], test: dict[str, list[Example]]) -> dict[str, float]:
    """Accuracy per domain of the best question-only guesser: the majority training answer for
    each exact question string (falling back to the domain's majority). Gate 1 of the benchmark:
    it must sit at chance, or the images are not needed to answer."""
    from collections import Counter, defaultdict

    by_q: dict[str, Counter] = defaultdict(Counter)
    by_d: dict[str, Counter] = defaultdict(Counter)
    for e in train:
        by_q[e.prompt][e.answer] += 1
        by_d[e.domain][e.answer] += 1
    acc = {}
    for d, exs in test.items():
        hits = 0
        for e in exs:
            guess = (by_q.get(e.prompt) or by_d[d]).most_common(1)[0][0]
            hits += guess == e.answer
        acc[d] = hits / max(len(exs), 1)
    return acc


# ----------------------------------------------------------------------------------------------
# 8. Crash-safe writes: beside the target, then a rename (atomic on POSIX). A killed run leaves
#    the previous good state or nothing, never half a file. Here rather than in mor.py because
#    the Flower apps (flower_fed.py) ship this module to the sites and write the same way.
# ----------------------------------------------------------------------------------------------


def _atomic(path: str | Path, write) -> None:
    """write(tmp) to a hidden temp path beside `path`, then rename it over `path`. Temp files a
    killed process left for the same target (kill -9 skips every cleanup) are removed first; a
    failed write leaves the old file and no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # after a success tmp is already gone
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` through a temp file, fsynced before the rename."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_file(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors through a temp file (metadata values are stored as strings)."""
    meta = {k: str(v) for k, v in metadata.items()} if metadata else None
    _atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                        str(tmp), metadata=meta))


def atomic_savefig(fig, path: str | Path) -> None:
    """A matplotlib figure as PNG (format given: the temp name has no .png suffix)."""
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed (kill -9 skips the cleanup below): its half-written
    # temp dir, or the previous output parked aside between the two renames.
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    for parked in path.parent.glob(f".{path.name}.old*"):
        if path.exists():
            shutil.rmtree(parked, ignore_errors=True)
        else:  # killed between the renames: the parked copy is the last good output
            os.replace(parked, path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: the old output moves aside, the new one takes its name. A kill between them
    # leaves the previous good copy under .old*, never a half-written directory under `path`.
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
