"""Packing documents into fixed-size training blocks, and token byte lengths for bits per byte.

Layout (what `pack_documents` produces and `pipeline.train.models.causal_lm_loss` consumes):

* Every document becomes `[BOS] tokens [EOS]` (BOS only when the tokenizer has one); documents are
  concatenated, in dataset order, into one token stream.
* Block i holds stream[i*T : i*T + T + 1]: T+1 tokens, consecutive blocks overlap by one token. The
  model reads the first T and predicts the last T, so every stream token after the first is a
  target exactly once (no token is lost at block edges, and bits per byte covers the whole text).
* `position_ids` restart at 0 at every document start AND at every block start (a document longer
  than a block continues in the next block without attention across the block edge: standard).
  transformers derives the per-document causal mask from these resets (with use_cache=False).
* The tail of the stream that does not fill a whole block is dropped.

Tokenisation runs in parallel (`datasets.map`, all cores); packing is one vectorised pass over the
whole stream, so the blocks do not depend on the number of processes: the result is deterministic.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch


def _num_proc(n_docs: int, num_proc: int | None) -> int:
    if num_proc is None:
        num_proc = os.cpu_count() or 1
    # process start-up costs more than tokenising a few hundred documents
    return max(1, min(num_proc, n_docs // 500))


def tokenize_documents(dataset, tokenizer, num_proc: int | None = None):
    """`dataset` (column `text`) -> dataset with one column `ids`: [BOS] tokens [EOS] per document."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token: documents could not be separated")
    prefix = [bos] if bos is not None else []

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [prefix + x + [eos] for x in ids]}

    return dataset.map(encode, batched=True, batch_size=256, num_proc=_num_proc(len(dataset), num_proc),
                       remove_columns=dataset.column_names, desc="tokenize")


def pack_stream(stream: np.ndarray, doc_lens: np.ndarray, block_size: int,
                chunk_blocks: int = 1 << 16) -> dict[str, np.ndarray]:
    """Flat token stream + document lengths -> {'input_ids', 'position_ids'} int32 [n_blocks, T+1].

    Works through the blocks in chunks, so memory stays near the size of the output.
    """
    stream = np.asarray(stream)
    starts = np.cumsum(np.asarray(doc_lens, dtype=np.int64)) - np.asarray(doc_lens, dtype=np.int64)
    n_blocks = max(0, (stream.size - 1) // block_size)
    width = block_size + 1
    ids = np.empty((n_blocks, width), dtype=np.int32)
    positions = np.empty((n_blocks, width), dtype=np.int32)
    offsets = np.arange(width)
    for lo in range(0, n_blocks, chunk_blocks):
        hi = min(n_blocks, lo + chunk_blocks)
        idx = np.arange(lo, hi)[:, None] * block_size + offsets[None, :]
        doc_start = starts[np.searchsorted(starts, idx, side="right") - 1]
        ids[lo:hi] = stream[idx]
        positions[lo:hi] = np.minimum(idx - doc_start, offsets[None, :])  # restart at each block start too
    return {"input_ids": ids, "position_ids": positions}


def pack_documents(dataset, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenise `dataset` (column `text`) and pack it into blocks of `block_size + 1` tokens.

    Returns a `datasets.Dataset` with int32 columns `input_ids` and `position_ids` (see module doc).
    """
    import datasets
    import pyarrow as pa

    if block_size < 2:
        raise ValueError(f"block_size: must be at least 2, got {block_size}")
    tokenized = tokenize_documents(dataset, tokenizer, num_proc)
    column = tokenized.data.column("ids").combine_chunks() if len(tokenized) else pa.array([], pa.list_(pa.int64()))
    stream = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    lens = column.value_lengths().to_numpy(zero_copy_only=False)
    packed = pack_stream(stream, lens, block_size)
    width = block_size + 1
    table = pa.table({
        name: pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), pa.int32()), width)
        for name, arr in packed.items()
    })
    return datasets.Dataset(datasets.table.InMemoryTable(table))  # features: fixed-length int32 lists


class ShiftedBlocks:
    """Packed blocks read at a new offset every epoch after the first (`shift_blocks: true`).

    Epoch 0 reads the blocks as stored; epoch e >= 1 reads window i as the stream shifted by
    o_e in [1, T): blocks[i][o:] + blocks[i+1][1:o+1] (the next block starts with block i's last
    token, so the window is T+1 consecutive stream tokens). Over several passes the model then sees
    every token in new contexts instead of memorising the same T-token blocks (nanoGPT draws random
    windows for the same reason); measured on Tiny Shakespeare: -0.009 bpb at 2.3 passes.
    Position ids restart where the stored ones mark a document start (index >= 1, unambiguous) and at
    the window start; the last window wraps to the stream start with a restart there too. The
    offset is a function of (seed, epoch), so a resumed run reads the same windows.
    """

    def __init__(self, blocks, seed: int):
        self.blocks, self.seed = blocks, seed
        self.width = len(blocks[0]["input_ids"])

    def __len__(self) -> int:
        return len(self.blocks)

    def offset(self, epoch: int) -> int:
        if epoch == 0 or self.width < 3:
            return 0
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return int(torch.randint(1, self.width - 1, (1,), generator=gen))

    def rows_for_epoch(self, indices: list[int], epoch: int) -> list[dict]:
        o, n = self.offset(epoch), len(self.blocks)
        rows = read_rows(self.blocks, indices)
        if o == 0:
            return rows
        nxt = read_rows(self.blocks, [(i + 1) % n for i in indices])
        width = self.width
        j = np.arange(width)
        out = []
        for i, a, b in zip(indices, rows, nxt):
            row = {k: np.concatenate([np.asarray(a[k])[o:], np.asarray(b[k])[1:o + 1]]) for k in a}
            start = np.asarray(row["position_ids"]) == 0  # document starts (all at index >= 1 of a block)
            if i == n - 1:
                start[width - o] = True  # wrapped to the stream start
            row["position_ids"] = (j - np.maximum.accumulate(np.where(start, j, 0))).astype(np.int32)
            out.append(row)
        return out


def read_rows(data, indices: list[int]) -> list:
    """data[i] for each index; a `datasets.Dataset` reads them in one batched Arrow call (6x faster)."""
    getitems = getattr(data, "__getitems__", None)
    return getitems(indices) if getitems is not None else [data[i] for i in indices]


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of a packed dataset -> LongTensor batch {'input_ids', 'position_ids'} [B, T+1]."""
    return {key: torch.tensor(np.stack([np.asarray(r[key]) for r in rows]), dtype=torch.long) for key in rows[0]}


# --- bits per byte ---

def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())

    def has_byte_level(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(n) for key in ("decoders", "pretokenizers") for n in node.get(key) or [])

    return has_byte_level(spec.get("decoder")) or has_byte_level(spec.get("pre_tokenizer"))


def token_byte_lengths(tokenizer) -> torch.LongTensor:
    """[vocab]: UTF-8 bytes of text each token stands for; special tokens count 0.

    Byte-level BPE writes each byte as one printable character, so a token's byte length is its
    string length. Other tokenizers: bytes of the token decoded alone (approximate for SentencePiece
    word-boundary markers).
    bits per byte = sum(CE nats over targets with bytes > 0) / ln 2 / sum(their bytes); targets with
    0 bytes (BOS/EOS) are left out of both sums, so document separators of different tokenizers do
    not change the number.
    """
    vocab_size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            continue
        if byte_level and i not in tokenizer.added_tokens_decoder:
            lengths[i] = len(tok)
        else:
            lengths[i] = len(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return lengths
