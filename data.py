"""The embedded benchmark: the easy-VQA federation that the default run aligns on.

What is here, in reading order (docs/benchmark.md explains why the benchmark looks like this):
  1. Domains and questions. Three client domains, each answerable only by looking at the image:
     colour ("what color is the shape?", 8 answers), shape ("what is the blue shape?", 3 answers)
     and position ("is the blue shape on the left or the right?", 2 answers per question).
     easy-VQA's yes/no questions are dropped: they are answered 83% from the text alone, and once
     rebalanced no tiny model learns them in budget. Position takes their place because it is a
     pure image attribute that a 4x4 grid of image tokens can see. Its labels come from the
     easy-VQA images themselves: the background is one flat colour, so the shape's centroid is
     measured exactly from the pixels; only images whose shape sits clearly off-centre
     (>= POSITION_MARGIN px) get a position question, and each template is subsampled to 50/50,
     so the question text says nothing about the answer.
     Synthetic captioned images for the tiny base's generic pre-training live here too.
  2. Splits. Train images are split by image id (disjoint): public SFT split for the server's
     reference policy, one private split per client (the client keeps only its domain's questions,
     turned into preference pairs), and an unlabelled GRPO prompt pool. The test split is the
     easy-VQA test set (>= 1,000 questions per domain). The public split's labels carry a careless
     annotator's confusions (PUBLIC_CONFUSIONS): the room that alignment must recover.
  3. Preference pairs. chosen = gold answer + <|im_end|>; rejected = what a sampling policy emits
     (a reward model never shown those is hacked within a few hundred GRPO steps): wrong answers
     of the same and of other domains, no end token, repeats, empty.
  4. The blind (question-only) baseline, the benchmark's first gate.
  5. The benchmark as files (`export_benchmark`, `python data.py export DIR`): the same data in
     the JSONL form users bring their own, which loads back to identical Examples and Pairs.

Images are read through `load_image`, a bounded cache of copies downscaled to the processor's
pixel budget. The tiny checkpoints and the input path live in models.py; users' own files and
crash-safe writes in safe_io.py.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

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


# The image cache: every stage reads the same images over and over (the benchmark reuses each
# 64x64 image across questions and epochs), so decoded images are kept, but (a) downscaled to
# the pixel budget the processor would resize them to anyway (`Encoder` passes it; a 4000x4000
# photo held at full resolution costs 48 MB per worker, and eight of them added 550 MB), and
# (b) in an LRU bounded in bytes. The benchmark's 64x64 images (12 KB each, 5,000 in all) fit
# within both bounds and are kept bit for bit.
IMAGE_MAX_PIXELS = 448 * 448  # the budget when the caller names none (and the cap of any budget)
IMAGE_CACHE_BYTES = 256 << 20
# path -> (image, the budget it was made for, whether it is the full image): a full image serves
# every budget it fits in, so the 64x64 benchmark images are held once, whoever asks.
_IMAGE_CACHE: OrderedDict[str, tuple[Image.Image, int, bool]] = OrderedDict()
_IMAGE_CACHE_LOCK = threading.Lock()
_image_cache_bytes = 0


def configure_image_cache(max_pixels: int | None = None, max_bytes: int | None = None) -> None:
    """Set the default (and largest) pixel budget of `load_image` and the cache's size in
    bytes; the cache is emptied."""
    global IMAGE_MAX_PIXELS, IMAGE_CACHE_BYTES, _image_cache_bytes
    with _IMAGE_CACHE_LOCK:
        if max_pixels is not None:
            IMAGE_MAX_PIXELS = int(max_pixels)
        if max_bytes is not None:
            IMAGE_CACHE_BYTES = int(max_bytes)
        _IMAGE_CACHE.clear()
        _image_cache_bytes = 0


def image_cache_stats() -> dict:
    """{'images': n, 'bytes': RGB bytes held}: what the cache costs this process."""
    with _IMAGE_CACHE_LOCK:
        return {"images": len(_IMAGE_CACHE), "bytes": _image_cache_bytes}


def bounded_size(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) scaled down, aspect kept, to at most `max_pixels` pixels; unchanged if within."""
    if w * h <= max_pixels:
        return w, h
    r = (max_pixels / (w * h)) ** 0.5
    return max(1, int(w * r)), max(1, int(h * r))


def image_budget(max_pixels: int | None = None) -> int:
    """The pixel budget `load_image` applies when asked for `max_pixels`."""
    return min(max_pixels or IMAGE_MAX_PIXELS, IMAGE_MAX_PIXELS)


def load_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """RGB PIL image of at most `max_pixels` pixels (IMAGE_MAX_PIXELS when None, and never more),
    cached (LRU, IMAGE_CACHE_BYTES in all). The image is shared: callers must not modify it."""
    global _image_cache_bytes
    budget = image_budget(max_pixels)
    key = str(path)
    with _IMAGE_CACHE_LOCK:
        hit = _IMAGE_CACHE.get(key)
        if hit is not None and (hit[1] == budget or (hit[2] and hit[0].width * hit[0].height <= budget)):
            _IMAGE_CACHE.move_to_end(key)
            return hit[0]
    with Image.open(path) as f:
        full = f.size
        size = bounded_size(*full, budget)
        if size != full:
            f.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, not the full frame
        img = f.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    with _IMAGE_CACHE_LOCK:
        old = _IMAGE_CACHE.pop(key, None)
        if old is not None:
            _image_cache_bytes -= old[0].width * old[0].height * 3
        _IMAGE_CACHE[key] = (img, budget, size == full)
        _image_cache_bytes += img.width * img.height * 3
        while _image_cache_bytes > IMAGE_CACHE_BYTES and len(_IMAGE_CACHE) > 1:
            _, (gone, _, _) = _IMAGE_CACHE.popitem(last=False)
            _image_cache_bytes -= gone.width * gone.height * 3
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


# Generic pre-training data for the tiny base (docs/benchmark.md, "the measured pitfalls"): synthetic images
# drawn in easy-VQA's style (one flat shape of a pure colour on a light background, 64x64) with
# a caption naming its colour, shape and place: "a teal circle on the left at the middle". They
# belong to no client and to no split; the tiny base learns to *see* from them, the way a real
# VLM arrives pre-trained, so that shape is learnable from the small public split (measured at
# 300 SFT steps: shape 47% from scratch, 82% after 600 steps of this pre-training) and so that RL
# can reach answers the reference SFT under-weights (docs/benchmark.md, gate-4 probes).
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
    pool_gold: list[str] | None  # None: a user's --prompts file without an answer on every row
    test: dict[str, list[Example]]
    image_split: dict[str, list[str]] = field(default_factory=dict)


def pool_gold(fed, domain: str | None = None) -> dict[tuple[str, str], str] | None:
    """{(image, prompt): gold answer} of a federation's GRPO pool (one domain's when given), for
    the oracle reward and the logs' sampled accuracy; None when the pool has no answers (every
    method but the oracle trains without them)."""
    if fed.pool_gold is None:
        return None
    return {(e.image, e.prompt): g for e, g in zip(fed.pool, fed.pool_gold) if domain is None or e.domain == domain}


DEFAULT_SPLIT = {"public": 600, "color": 800, "shape": 1200, "position": 800, "pool": 600}

# The server's public split was labelled by a careless annotator who confuses one answer of each
# domain with a neighbour: answer -> (what the annotator wrote, how often). Why the benchmark
# needs it (docs/benchmark.md, gate-4 probes): a reference SFT'd on clean labels sits at its ceiling on colour
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
    sum must be <= 4,000. The shape client gets the most images: shape needs volume (docs/benchmark.md).
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
# 4. The benchmark as files: the same data in the form users bring their own
# ----------------------------------------------------------------------------------------------

EXPORT_FORMAT = "mor-benchmark-export/1"


def examples_from_rows(rows: list[dict]) -> list:
    """`load_jsonl` rows of kind 'prompts', 'eval' or 'sft' -> `Example`s, in file order.
    A row without a domain gets 'all'; without an answer (a prompt pool) None; without an
    image_id its image path."""
    return [Example(r["image"], r["prompt"], r.get("answer"), r.get("domain", "all"), r.get("image_id", r["image"]))
            for r in rows]


def pairs_from_rows(rows: list[dict], domain: str = "") -> list:
    """`load_jsonl` rows of kind 'pairs' -> `Pair`s, in file order; a row's own 'domain'
    field wins over `domain` (a user client passes its name)."""
    return [Pair(r["image"], r["prompt"], r["chosen"], r["rejected"], r.get("domain", domain)) for r in rows]


def by_domain(examples: list[Example]) -> dict[str, list[Example]]:
    """{domain: its examples}, domains in order of first appearance (an eval file -> `Federation.test`)."""
    out: dict[str, list[Example]] = {}
    for e in examples:
        out.setdefault(e.domain, []).append(e)
    return out


def export_benchmark(out_dir, seed: int = 0, test_per_domain: int | None = None,
                     max_rows: int | None = None, federation: Federation | None = None) -> dict[str, int]:
    """Write the embedded benchmark of data seed `seed` as the JSONL files a user brings, with
    its images; returns {file: rows}. The files (image paths relative to each file):

      clients/<name>.jsonl  kind 'pairs': `make_pairs(client's questions, seed)` for each client of
                            `build_federation(seed)` (image, prompt, chosen, rejected, domain)
      prompts.jsonl         kind 'prompts': the GRPO pool in its shuffled order, with domain and
                            the gold answer (the oracle reward reads it; the trainer must not)
      eval.jsonl            kind 'eval': the test split, domain by domain in DOMAINS order
      sft.jsonl             kind 'sft': the public split as the server's SFT data, with the
                            careless annotator's labels it carries (PUBLIC_CONFUSIONS)
      images/<split>/<id>.png   copies of the easy-VQA images the rows use
      manifest.json         format, seed, test_per_domain, rows per file

    Every row also carries the easy-VQA image_id. Loading the files back (`safe_io.load_jsonl`,
    then `examples_from_rows` / `pairs_from_rows`) gives the Examples and Pairs of the embedded path
    in the same order with the same strings; only `image` differs, a path to a byte-identical
    copy. max_rows: only the first rows of each file (for tests); federation: the result of
    `build_federation(seed, test_per_domain=test_per_domain)` when the caller has it already.
    The directory appears whole or not at all, and replaces only a previous export (one with a
    manifest.json).

    Run it as `python data.py export DIR [--seed N] [--test-per-domain N]`.
    """
    import json
    import shutil
    from pathlib import Path

    import safe_io  # here, not at the top: safe_io imports torch, which nothing else here needs

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ValueError(f"{out_dir}: exists and is not a previous export (no manifest.json); "
                         "choose an empty or new directory")
    fed = federation or build_federation(seed, test_per_domain=test_per_domain)
    cut = (lambda rows: rows[:max_rows]) if max_rows is not None else (lambda rows: rows)
    test = [e for d in DOMAINS for e in fed.test.get(d, [])]
    pool = [replace(e, answer=a) for e, a in zip(fed.pool, fed.pool_gold)]
    ids = {e.image: e.image_id for e in [*fed.public, *test, *pool, *(e for v in fed.clients.values() for e in v)]}
    files: dict[str, list[dict]] = {}
    for name, exs in fed.clients.items():
        files[f"clients/{name}.jsonl"] = [
            {"image": p.image, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "domain": p.domain,
             "image_id": ids[p.image]} for p in cut(make_pairs(exs, seed))]
    for fname, exs in (("prompts.jsonl", pool), ("eval.jsonl", test), ("sft.jsonl", fed.public)):
        files[fname] = [{"image": e.image, "prompt": e.prompt, "answer": e.answer, "domain": e.domain,
                         "image_id": e.image_id} for e in cut(exs)]
    with safe_io.atomic_dir(out_dir) as tmp:
        copied: dict[str, str] = {}  # source path -> path relative to out_dir
        for fname, rows in files.items():
            up = "../" * fname.count("/")  # clients/*.jsonl sit one level down
            lines = []
            for r in rows:
                src = r["image"]
                if src not in copied:
                    copied[src] = f"images/{r['image_id']}{Path(src).suffix}"  # image_id: "train/17"
                    (tmp / copied[src]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, tmp / copied[src])
                lines.append(json.dumps(dict(r, image=up + copied[src]), ensure_ascii=False))
            (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
            (tmp / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts = {fname: len(rows) for fname, rows in files.items()}
        safe_io.atomic_write_json(tmp / "manifest.json", {"format": EXPORT_FORMAT, "seed": seed,
                                                          "test_per_domain": test_per_domain, "max_rows": max_rows,
                                                          "rows": counts, "images": len(copied)})
    return counts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The embedded easy-VQA benchmark as files.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write clients/*.jsonl, prompts.jsonl, eval.jsonl, sft.jsonl and the images")
    ex.add_argument("dir")
    ex.add_argument("--seed", type=int, default=0, help="data seed (the split, the pairs, the careless labels)")
    ex.add_argument("--test-per-domain", type=int, default=None, help="first N test questions per domain")
    im = sub.add_parser("import", help="TRL's preference format (JSONL: prompt / chosen / rejected as text or "
                                       "messages, images) -> a --client-data pairs file")
    im.add_argument("src")
    im.add_argument("out")
    a = ap.parse_args()
    if a.command == "import":
        import safe_io

        try:
            print(f"{a.out}: {safe_io.import_preference(a.src, a.out, EOS)} pairs")
        except safe_io.DataError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        for fname, n in export_benchmark(a.dir, a.seed, a.test_per_domain).items():
            print(f"{a.dir}/{fname}: {n} rows")
