"""Small shared pieces for the pretraining tests: a tiny byte-level BPE tokenizer and corpora.

Kept out of conftest.py (owned by the pipeline) so these tests are self-contained.
"""

from __future__ import annotations

import random

REPETITIVE_SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine.",
    "all that glitters is not gold.",
    "to be or not to be, that is the question.",
    "the early bird catches the worm.",
]


def repetitive_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Documents made of a few fixed sentences: a small model learns them within ~50 steps."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(REPETITIVE_SENTENCES) for _ in range(rng.randint(2, 6))) for _ in range(n_docs)]


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE `PreTrainedTokenizerFast` with <bos>, <eos>, <pad> (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
