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


def texts_dataset(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


def write_packed_data(root, n_docs: int = 240, n_val: int = 30, block_size: int = 32, seed: int = 0):
    """Tokenizer folder + packed `datasets` folder (train/validation) under `root`; returns (tok_dir, data_dir)."""
    import datasets

    from pipeline.data.packing import pack_documents

    texts = repetitive_texts(n_docs + n_val, seed)
    tok = make_tokenizer(texts)
    tok_dir, data_dir = root / "tokenizer", root / "data"
    tok.save_pretrained(tok_dir)
    datasets.DatasetDict({
        "train": pack_documents(texts_dataset(texts[:n_docs]), tok, block_size, num_proc=1),
        "validation": pack_documents(texts_dataset(texts[n_docs:]), tok, block_size, num_proc=1),
    }).save_to_disk(str(data_dir))
    return tok_dir, data_dir


def pretrain_recipe(run_dir, tok_dir, data_dir, family: str = "dense", **train) -> dict:
    """A recipe with only a pretrain stage reading local folders; `train` overrides its settings."""
    settings = {"max_steps": 6, "micro_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2,
                "eval_every": 3, "save_every": 3, "log_every": 2, "eval_batches": 2, **train}
    return {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"family": family, "size": "nano", "max_seq_len": 64, "n_experts": 4, "top_k": 2},
        "stages": {"pretrain": {"inputs": {"data": str(data_dir), "tokenizer": str(tok_dir)}, **settings}},
    }


def one_thread():
    """Generator for a module fixture: torch on one thread (2 shared cores spin badly with 2), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
