"""Human feedback: a local web page where people rank or rate a model's samples (docs/feedback.md).

    python -m pipeline label runs/tiny/sft/model --prompts prompts.jsonl --out labels/
    python -m pipeline label-export labels/ --out feedback/   # reward datasets: rankings, ratings, pairs, sft

Modules: `store` (a labeling session on disk: samples, judgements, export to the reward stage's
formats), `cli` (the `label*` commands), `server` (the HTTP server, bound to 127.0.0.1), `static/` (the
page).
"""

from pipeline.labeling.store import LabelError, LabelStore, export

__all__ = ["LabelError", "LabelStore", "export"]
