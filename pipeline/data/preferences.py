"""Human feedback in the shapes people bring, turned into comparison groups for a Bradley–Terry reward model.

* pairs:    [prompt,] chosen, rejected [, margin | score_chosen + score_rejected] -> one comparison. Prompt
            and responses are strings or message lists (TRL's standard and conversational forms); without
            a prompt column (TRL's implicit prompt, as HH-RLHF and UltraFeedback ship) the prompt is the
            part chosen and rejected share. Scores give the margin (score_chosen - score_rejected).
* rankings: prompt, responses (K >= 2), ranks (0 = best) -> every pair with different ranks, K·(K−1)/2
            when there are no ties; all pairs of one prompt are trained together (InstructGPT), each
            prompt weighing the same whatever its K
* ratings:  prompt, response, rating                  -> rows grouped by prompt; every two responses whose
            ratings differ by more than `min_rating_gap` form a pair, the better-rated one preferred
* unpaired: prompt, completion, label (TRL's unpaired preference: True = desirable) -> rows grouped by
            prompt; every desirable completion is preferred to every undesirable one of the same prompt

Ties (equal ranks, equal ratings) carry no preference and form no pair: they are dropped on purpose,
not guessed; a prompt left without any pair is skipped and counted. Corrections (a person rewrites a
response) are not comparisons: they become SFT demonstrations (docs/feedback.md).
"""

from __future__ import annotations

import json
from collections import OrderedDict

FORMAT_COLUMNS = {  # the columns each format needs, in the order formats are detected
    "rankings": ("prompt", "responses", "ranks"),
    "ratings": ("prompt", "response", "rating"),
    "unpaired": ("prompt", "completion", "label"),
    "pairs": ("chosen", "rejected"),
}
PREFERENCE_FORMATS = ("pairs", "rankings", "ratings")  # what the task and the labeling page produce


def detect_format(columns: list[str]) -> str | None:
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    return None


def response_text(response) -> str:
    """A response as text: a string, or the assistant messages of a conversational completion."""
    if isinstance(response, str):
        return response
    return "\n".join(m["content"] for m in response if m.get("role", "assistant") == "assistant")


def split_implicit_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen response, rejected response) from two whole conversations or texts that share
    their prompt: messages up to the first that differs, or text up to the last word boundary before it."""
    if isinstance(chosen, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        n = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1), 0) if n < len(chosen) else n
        return chosen[:n], chosen[n:].lstrip(), rejected[n:].lstrip()
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return list(chosen[:n]), list(chosen[n:]), list(rejected[n:])


def _key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a ranking; equal ranks give no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def to_groups(rows, fmt: str, min_rating_gap: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    """Comparison groups {prompt, responses, pairs: [(better, worse, margin)]} and counts of what was dropped."""
    groups: list[dict] = []
    stats = {"rows": 0, "groups": 0, "pairs": 0, "dropped_ties": 0, "dropped_groups": 0}
    if fmt == "pairs":
        for row in rows:
            stats["rows"] += 1
            chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
            if prompt is None:  # implicit prompt: both hold the whole conversation
                prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
            chosen, rejected = response_text(chosen), response_text(rejected)
            if chosen == rejected:
                stats["dropped_ties"] += 1
                continue
            margin = row.get("margin")
            if margin is None and row.get("score_chosen") is not None and row.get("score_rejected") is not None:
                margin = float(row["score_chosen"]) - float(row["score_rejected"])
            groups.append({"prompt": prompt, "responses": [chosen, rejected], "pairs": [(0, 1, float(margin or 0.0))]})
    elif fmt == "rankings":
        for row in rows:
            stats["rows"] += 1
            ranks = list(row["ranks"])
            if len(ranks) != len(row["responses"]):
                raise ValueError(f"rankings row {stats['rows'] - 1}: {len(row['responses'])} responses but {len(ranks)} ranks")
            pairs = [(i, j, float(ranks[j] - ranks[i])) for i, j in ranking_pairs(ranks)]
            n = len(ranks)
            stats["dropped_ties"] += n * (n - 1) // 2 - len(pairs)
            if pairs:
                groups.append({"prompt": row["prompt"], "responses": [response_text(r) for r in row["responses"]],
                               "pairs": pairs})
            else:
                stats["dropped_groups"] += 1
    elif fmt in ("ratings", "unpaired"):  # unpaired: desirable rates 1, undesirable 0
        column, score = ("response", "rating") if fmt == "ratings" else ("completion", "label")
        prompts: dict[str, object] = {}
        by_prompt: OrderedDict[str, list[tuple[str, float]]] = OrderedDict()
        for row in rows:
            stats["rows"] += 1
            key = _key(row["prompt"])
            prompts.setdefault(key, row["prompt"])
            by_prompt.setdefault(key, []).append((response_text(row[column]), float(row[score])))
        for key, rated in by_prompt.items():
            prompt = prompts[key]
            pairs = []
            for i, (_, ri) in enumerate(rated):
                for j, (_, rj) in enumerate(rated):
                    if ri - rj > min_rating_gap:
                        pairs.append((i, j, ri - rj))
                    elif i < j and abs(ri - rj) <= min_rating_gap:
                        stats["dropped_ties"] += 1
            if pairs:
                groups.append({"prompt": prompt, "responses": [r for r, _ in rated], "pairs": pairs})
            else:
                stats["dropped_groups"] += 1
    else:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {', '.join(FORMAT_COLUMNS)}")
    stats["groups"] = len(groups)
    stats["pairs"] = sum(len(g["pairs"]) for g in groups)
    return groups, stats
