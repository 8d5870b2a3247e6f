"""E9: evaluation of a policy. Greedy answers to held-out questions, a judge, and the win rate.

  accuracy_d = mean over the domain's questions of judge(answer, gold)
  win rate   = mean over questions of 1 (policy right, reference wrong), 0 (the reverse), 0.5 (tie)

(docs/method.md#e9-evaluation). The judge maps (response, gold) to right or wrong: `exact_match`
on the benchmark's one-word answers, `contains_answer` for short free-form ones (JUDGES, chosen
with --judge); any function (response: str, gold: str) -> bool can be added there.
"""

from __future__ import annotations

import torch

import data
import models
from safe_io import Progress


@torch.no_grad()
def generate(model, encoder: models.Encoder, images, prompts, max_new_tokens: int = 4, greedy: bool = True,
             num_return_sequences: int = 1, share_images: bool = False, features=None) -> list[str]:
    """One `generate` call for the whole batch; vision placeholders and pad suppressed.
    share_images: run the vision tower once per distinct image of the batch and hand generate
    the features (`mm_encoder_outputs`); same answers (tested), less work when questions share
    images, as the test set's do (3.9 questions per image). features: a grpo.ImageFeatures cache
    bound to `model`'s tower (an image seen by an earlier batch or policy costs no tower run)."""
    device = next(model.parameters()).device
    if features is not None:
        batch = encoder(images, prompts, device=device)
        batch = models.with_image_features(batch, features(model, batch, images))
    elif share_images:
        batch = encoder.encode_shared(model, images, prompts, device=device)
    else:
        batch = encoder(images, prompts, device=device)  # left-padded prompts [B, T_prompt]
    # Suppressing <|image_pad|> & co. keeps sampled responses re-scorable: one stray placeholder
    # and the next forward fails with "image features and image tokens do not match" (docs/method.md, implementation notes).
    # mm_token_type_ids travels in `batch`; without it generate silently falls back to 1-D
    # positions and sampling and scoring disagree.
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         num_return_sequences=num_return_sequences, suppress_tokens=encoder.banned_ids,
                         pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id,
                         top_k=None, top_p=None, temperature=None if greedy else 1.0)
    return encoder.decode(out[:, batch["input_ids"].shape[1]:])  # new tokens only [B*n, <=max_new]


# A judge maps (the policy's response, the gold answer) to right or wrong. Swap it with --judge, or
# add your own here: any function (response: str, gold: str) -> bool works, e.g. a normaliser for
# multi-word answers or a call to a held-out grader model. `malformed` below stays the format
# check of the embedded benchmark (one word and the end token), reported beside the accuracy.


def exact_match(response: str, gold: str) -> bool:
    """The embedded judge: a well-formed one-word answer equal to the gold answer."""
    return data.extract_answer(response) == gold.strip().lower()


def contains_answer(response: str, gold: str) -> bool:
    """For short free-form answers: the gold answer's words appear, in order, among the response's
    words (case-insensitive; the end token and punctuation ignored)."""
    words = [w for w in models.WORD_RE.findall(response.replace(data.EOS, " ").lower()) if w.isalnum()]
    want = [w for w in models.WORD_RE.findall(gold.lower()) if w.isalnum()]
    return bool(want) and any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


JUDGES = {"exact": exact_match, "contains": contains_answer}


def evaluate(model, encoder: models.Encoder, test: dict[str, list[data.Example]], batch_size: int = 256,
             desc: str = "eval", judge=exact_match, max_new_tokens: int = 4, features=None) -> dict:
    """Greedy answers per domain -> {'accuracy': {domain: acc}, 'correct': {domain: [0/1 ...]},
    'malformed_share': float}. The per-question 0/1 vectors feed the win rate (E9).
    features: a grpo.ImageFeatures cache to reuse the test images' features of policies whose
    vision tower is the same (GRPO with the tower frozen); it is bound to `model` here, so a
    different tower empties it rather than serving stale features."""
    model.eval()
    if features is not None:
        features.bind(model)
    # Questions of all domains sorted by image, so a batch holds every question of its images
    # and the vision tower runs once per image (measured 2.8x faster per batch on the test set).
    # correct[d]: 0/1 per test question, in test order, so two policies' vectors align for E9's
    # win rate; malformed = not "<one word><|im_end|>", the reward-hacking signature (gate 5).
    order = sorted(((d, i) for d, exs in test.items() for i in range(len(exs))),
                   key=lambda di: (test[di[0]][di[1]].image, di))
    correct = {d: [0] * len(exs) for d, exs in test.items()}
    malformed = 0
    bar = Progress(total=len(order), desc=desc, dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        b = [test[d][i] for d, i in order[s:s + batch_size]]
        resp = generate(model, encoder, [e.image for e in b], [e.prompt for e in b], share_images=True,
                        max_new_tokens=max_new_tokens, features=features)
        for (d, i), r, e in zip(order[s:s + batch_size], resp, b):
            correct[d][i] = int(judge(r, e.answer))
        malformed += sum(data.extract_answer(r) is None for r in resp)
        bar.update(len(b))
        bar.set_postfix(acc=f"{sum(map(sum, correct.values())) / (s + len(b)):.3f}")
    bar.close()
    return {"accuracy": {d: sum(h) / max(len(h), 1) for d, h in correct.items()}, "correct": correct,
            "malformed_share": malformed / max(len(order), 1)}


def win_rate(policy_correct: list[int], ref_correct: list[int]) -> float:
    """E9: mean of 1 (policy right, reference wrong), 0 (the reverse), 0.5 (tie)."""
    scores = [0.5 if p == r else float(p > r) for p, r in zip(policy_correct, ref_correct)]
    return sum(scores) / max(len(scores), 1)
