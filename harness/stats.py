"""Paired comparisons of methods across GRPO seeds, and the claims they settle.

Every method is trained once per seed from the same reference, and a seed fixes the prompt order
and the sampler's random stream for all methods alike, so two methods are compared seed by seed:

  d_s  = acc_A(s) - acc_B(s)                     s = 1..n seeds (overall or one domain)
  mean = sum_s d_s / n,   se = std(d_s) / sqrt(n)           (std: unbiased)
  95% interval   mean +/- t_{0.975, n-1} * se
  p              two-sided paired t-test:  2 * (1 - F_{n-1}(|mean| / se))
  wins           #{s : d_s > 0}  (the sign count, beside the t-test that assumes normal d_s)

F_nu is Student's t CDF, computed through the regularised incomplete beta function (no scipy):
  F_nu(t) = 1 - I_{nu / (nu + t^2)}(nu / 2, 1 / 2) / 2     for t >= 0.

A claim "A beats B" holds at 95% when the interval lies above 0, does not hold when it lies
below 0, and is not settled when it contains 0.
"""

from __future__ import annotations

import math


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, nu: int) -> float:
    """Student's t CDF with nu degrees of freedom."""
    tail = 0.5 * betainc(nu / 2.0, 0.5, nu / (nu + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, nu: int) -> float:
    """Inverse of t_cdf by bisection (q in (0.5, 1); enough for a 95% interval)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, nu) < q else (lo, mid)
    return (lo + hi) / 2


def paired(a: list[float], b: list[float]) -> dict:
    """a, b: one value per seed, same seed order. -> {mean, ci95_low, ci95_high, p, wins, n}
    (the interval and p are None with fewer than 2 seeds; p is 0 when every difference is equal
    and non-zero, 1 when they are all zero)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    out = {"mean": mean, "ci95_low": None, "ci95_high": None, "p": None, "wins": sum(x > 0 for x in d), "n": n}
    if n < 2:
        return out
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    if se == 0.0:
        out.update(ci95_low=mean, ci95_high=mean, p=1.0 if mean == 0 else 0.0)
        return out
    half = t_quantile(0.975, n - 1) * se
    out.update(ci95_low=mean - half, ci95_high=mean + half, p=2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1)))
    return out


def crn_widths(a: list[float], b: list[float]) -> dict | None:
    """What the common random numbers buy (same prompt order and sampler stream per seed for
    every method): the 95% interval's width when seed s of A is paired with seed s of B, against
    its mean width over the n - 1 cyclic mismatches (seed s of A with seed s + k of B), which is
    what independent runs of the two methods would give. {paired, mismatched, ratio}; None with
    fewer than 3 seeds (a mismatch of 2 seeds is the same pairs with the sign flipped)."""
    n = len(a)
    if n < 3:
        return None

    def width(x, y):
        c = paired(x, y)
        return c["ci95_high"] - c["ci95_low"]

    w = width(a, b)
    mis = sum(width(a, b[k:] + b[:k]) for k in range(1, n)) / (n - 1)
    return {"paired": w, "mismatched": mis, "ratio": w / mis if mis > 0 else None}


def verdict(c: dict, margin: float = 0.0) -> str:
    """'holds' / 'does not hold' / 'not settled' for the claim "mean > margin" at 95%."""
    if c["ci95_low"] is None:
        return "not settled (1 seed)"
    if c["ci95_low"] > margin:
        return "holds"
    if c["ci95_high"] < margin:
        return "does not hold"
    return "not settled"
