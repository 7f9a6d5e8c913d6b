"""Contamination check: word n-gram overlap between evaluation texts and training text.

An evaluation whose test questions leak into training data measures memory, not skill. For each
evaluation text we count the share of its word n-grams that occur anywhere in a training source (a text
shorter than n words counts as one n-gram of its own length); a text is flagged when at least
`threshold` of them occur. Reported per training source, so a leak can be traced. Check the content
under test (for templated prompts, the `source` sentence), not shared instruction templates, which
overlap by design.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    n = min(n, len(tokens))
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)} if n else set()


def overlap(tokens: list[str], grams: dict[int, set], n: int) -> float:
    """Share of the text's n-grams (n capped at its length) found in the training n-grams."""
    mine = ngrams(tokens, n)
    if not mine:
        return 0.0
    found = grams[min(n, len(tokens))]
    return sum(g in found for g in mine) / len(mine)


def contamination_report(eval_texts: list[str], sources: dict[str, Iterable[str]], n: int = 8,
                         threshold: float = 0.5) -> dict:
    """{sources: {name: {mean_overlap, flagged, flagged_fraction, examples}}}, plus `any` (all sources)."""
    eval_tokens = [words(t) for t in eval_texts]
    sizes = {min(n, len(t)) for t in eval_tokens if t}
    report: dict[str, dict] = {}
    union: dict[int, set] = {k: set() for k in sizes}
    for name, texts in sources.items():
        grams: dict[int, set] = {k: set() for k in sizes}
        for text in texts:
            tokens = words(text)
            for k in sizes:
                grams[k] |= {tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}
        for k in sizes:
            union[k] |= grams[k]
        report[name] = _summary(eval_texts, eval_tokens, grams, n, threshold)
    report["any"] = _summary(eval_texts, eval_tokens, union, n, threshold)
    return {"ngram": n, "threshold": threshold, "eval_texts": len(eval_texts), "sources": report}


def _summary(eval_texts, eval_tokens, grams, n, threshold) -> dict:
    shares = [overlap(t, grams, n) for t in eval_tokens]
    flagged = [text for text, share in zip(eval_texts, shares) if share >= threshold]
    return {"mean_overlap": round(sum(shares) / max(1, len(shares)), 4), "flagged": len(flagged),
            "flagged_fraction": round(len(flagged) / max(1, len(eval_texts)), 4), "examples": flagged[:3]}
