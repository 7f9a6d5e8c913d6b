"""Packing documents into blocks, and token byte lengths for bits per byte."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import make_tokenizer, repetitive_texts, texts_dataset  # noqa: E402

from pipeline.data.packing import ShiftedBlocks, pack_documents, pack_stream, token_byte_lengths  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(repetitive_texts(200) + ["héllo wörld ☃ 日本語 ünïcödé"])


def test_pack_stream_layout():
    # three documents of 3, 5 and 4 tokens; T=4 -> blocks of 5 overlapping by one token
    docs = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31, 32, 33]]
    stream = np.concatenate(docs)
    out = pack_stream(stream, np.array([len(d) for d in docs]), 4)
    assert out["input_ids"].shape == (2, 5)  # 12 tokens: (12 - 1) // 4 = 2 blocks, tail dropped
    assert out["input_ids"].tolist() == [[10, 11, 12, 20, 21], [21, 22, 23, 24, 30]]
    # positions restart at each document start and at each block start
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # every stream token after the first is a target exactly once
    targets = np.concatenate([b[1:] for b in out["input_ids"]])
    assert targets.tolist() == stream[1:1 + targets.size].tolist()


def test_pack_stream_chunking_does_not_change_blocks():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, 300)
    stream = rng.integers(0, 1000, lens.sum())
    whole, chunked = pack_stream(stream, lens, 16), pack_stream(stream, lens, 16, chunk_blocks=7)
    for key in whole:
        assert np.array_equal(whole[key], chunked[key])
    doc_pos = np.arange(stream.size) - np.repeat(np.cumsum(lens) - lens, lens)
    idx = np.arange(len(whole["input_ids"]))[:, None] * 16 + np.arange(17)
    assert np.array_equal(whole["position_ids"], np.minimum(doc_pos[idx], np.arange(17)))


def test_shifted_blocks_read_the_stream_at_a_new_offset_each_epoch():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 30, 80)
    stream = rng.integers(0, 1000, lens.sum())
    T = 16
    packed = pack_stream(stream, lens, T)
    blocks = [{k: packed[k][i] for k in packed} for i in range(len(packed["input_ids"]))]
    view = ShiftedBlocks(blocks, seed=3)
    n = len(view)
    assert n == len(blocks)
    rows = view.rows_for_epoch(list(range(n)), 0)  # the first epoch reads the blocks as stored
    assert all(np.array_equal(r["input_ids"], b["input_ids"]) for r, b in zip(rows, blocks))
    offsets = [view.offset(e) for e in range(1, 8)]
    assert all(1 <= o < T for o in offsets) and len(set(offsets)) > 1
    assert offsets == [ShiftedBlocks(blocks, seed=3).offset(e) for e in range(1, 8)]  # a resumed run agrees
    for epoch in (1, 2):
        o = view.offset(epoch)
        rows = view.rows_for_epoch(list(range(n)), epoch)
        # window i is the stream packed from offset o: same tokens, positions restarting at the window
        # start and at every document start inside it
        doc_start = np.cumsum(lens) - lens
        first = np.searchsorted(doc_start, o, side="right") - 1
        shifted_lens = np.concatenate([[doc_start[first] + lens[first] - o], lens[first + 1:]])
        expected = pack_stream(stream[o:], shifted_lens, T)
        for i in range(n - 1):
            assert np.array_equal(rows[i]["input_ids"], expected["input_ids"][i]), (epoch, i)
            assert np.array_equal(rows[i]["position_ids"], expected["position_ids"][i]), (epoch, i)
        # the last window wraps to the stream start, with positions restarting there
        last = rows[n - 1]
        assert np.array_equal(last["input_ids"], np.concatenate([stream[(n - 1) * T + o:n * T + 1], stream[1:o + 1]]))
        assert last["position_ids"][T + 1 - o] == 0


def test_pack_documents_adds_bos_eos_and_is_deterministic(tokenizer):
    texts = repetitive_texts(1000, seed=3)
    one = pack_documents(texts_dataset(texts), tokenizer, 64, num_proc=1)
    two = pack_documents(texts_dataset(texts), tokenizer, 64, num_proc=2)
    assert one.column_names == ["input_ids", "position_ids"]
    assert one["input_ids"] == two["input_ids"] and one["position_ids"] == two["position_ids"]
    ids, pos = np.array(one["input_ids"]), np.array(one["position_ids"])
    assert ids.shape[1] == 65
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = np.concatenate([ids[0], *(row[1:] for row in ids[1:])])  # undo the one-token overlap
    expected = []
    for text in texts[:5]:
        expected += [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    assert stream[: len(expected)].tolist() == expected
    # a new document (BOS) always sits at position 0, right after an EOS
    rows, cols = np.nonzero(ids == bos)
    assert (pos[rows, cols] == 0).all()
    inner = cols > 0
    assert (ids[rows[inner], cols[inner] - 1] == eos).all()
    # every document ends with EOS: count them once (the last column repeats the next block's first)
    assert (ids[:, :-1] == eos).sum() + (ids[-1, -1] == eos) in (len(texts), len(texts) - 1)


def test_token_byte_lengths_sum_to_utf8_bytes(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert lengths.dtype == torch.long and lengths.numel() == len(tokenizer)
    for special in tokenizer.all_special_ids:
        assert lengths[special] == 0
    for text in ["héllo wörld ☃ 日本語 ünïcödé", "to be or not to be", "naïve café \U0001F600"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
