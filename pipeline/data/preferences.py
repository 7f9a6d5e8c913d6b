"""Human feedback in three shapes, turned into comparison groups for a Bradley–Terry reward model.

* pairs:    prompt, chosen, rejected [, margin]      -> one comparison
* rankings: prompt, responses (K >= 2), ranks (0 = best) -> every pair with different ranks, K·(K−1)/2
            when there are no ties; all pairs of one prompt are trained together (InstructGPT), each
            prompt weighing the same whatever its K
* ratings:  prompt, response, rating                  -> rows grouped by prompt; every two responses whose
            ratings differ by more than `min_rating_gap` form a pair, the better-rated one preferred

Ties (equal ranks, equal ratings) carry no preference and form no pair: they are dropped on purpose,
not guessed; a prompt left without any pair is skipped and counted. Corrections (a person rewrites a
response) are not comparisons: they become SFT demonstrations (docs/feedback.md).
"""

from __future__ import annotations

from collections import OrderedDict

FORMAT_COLUMNS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "rankings": ("prompt", "responses", "ranks"),
    "ratings": ("prompt", "response", "rating"),
}
PREFERENCE_FORMATS = tuple(FORMAT_COLUMNS)  # the one list of preference formats (recipes, task, labeling)


def detect_format(columns: list[str]) -> str | None:
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    return None


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
            if row["chosen"] == row["rejected"]:
                stats["dropped_ties"] += 1
                continue
            margin = float(row.get("margin") or 0.0)
            groups.append({"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]], "pairs": [(0, 1, margin)]})
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
                groups.append({"prompt": row["prompt"], "responses": list(row["responses"]), "pairs": pairs})
            else:
                stats["dropped_groups"] += 1
    elif fmt == "ratings":
        by_prompt: OrderedDict[str, list[tuple[str, float]]] = OrderedDict()
        for row in rows:
            stats["rows"] += 1
            by_prompt.setdefault(row["prompt"], []).append((row["response"], float(row["rating"])))
        for prompt, rated in by_prompt.items():
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
