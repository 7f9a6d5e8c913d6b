"""Data: where text and datasets come from and how they become model inputs.

    from pipeline.data.sources import load_dataset_input, load_tokenizer_input
    from pipeline.data.packing import pack_documents        # token blocks, position ids restart per document
    from pipeline.data import chat                          # chat rendering, assistant masks, stop tokens

Modules: `corpus` (the embedded default corpus), `sources` (a stage input -> a `datasets` object or a
path: local files and folders, `builtin:`, `hub:`), `packing` (documents -> fixed blocks, and their
readers), `chat` (the chat template's prompts, responses and loss masks), `preferences` (pairs, K-wise
rankings and ratings -> reward-model groups), `contamination` (n-gram overlap of evaluation and training
data). Nothing is imported here: `corpus` is read while recipes parse, which must not import torch.
"""

__all__ = ["chat", "contamination", "corpus", "packing", "preferences", "sources"]
