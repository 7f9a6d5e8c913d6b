"""Triton FlashAttention-2 vs a float64 plain-torch reference.

On machines without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET must be set
before ``pipeline_kernels.flash_attention`` is imported (``import torch`` does not import triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from pipeline_kernels import flash_attention as fa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not fa.is_interpreting():
    pytest.skip("pipeline_kernels.flash_attention was imported before TRITON_INTERPRET=1 was set (see conftest note "
                "in docs/kernels.md)", allow_module_level=True)

# (output, gradient) tolerances relative to max(1, max |reference|)
TOL = {
    torch.float32: (2e-5, 5e-5),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float64: (1e-10, 1e-10),
}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN: an element a kernel forgets to write shows up."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)
    yield


def _rand(shape, dtype, gen, noncontig=False):
    if noncontig:  # transformers hands over [B, T, H, D] memory viewed as [B, H, T, D]
        b, h, t, d = shape
        x = torch.randn((b, t, h, d), generator=gen, dtype=torch.float32).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return x.to(DEVICE).requires_grad_()


def _check(name, got, ref, tol):
    assert got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: NaN/inf (unwritten poison or overflow)"
    ref = ref.detach()
    scale = max(1.0, float(ref.abs().max()))
    err = float((got.detach().double() - ref).abs().max()) / scale
    assert err <= tol, f"{name}: max rel error {err:.3g} > {tol:.3g}"


def run_case(B, H, HKV, T, S, D, dtype, causal=True, seed=0, noncontig=False, scale=None, window=None,
             q_ids=None, k_ids=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    q = _rand((B, H, T, D), dtype, gen, noncontig)
    k = _rand((B, HKV, S, D), dtype, gen, noncontig)
    v = _rand((B, HKV, S, D), dtype, gen, noncontig)
    do = torch.randn((B, H, T, D), generator=gen).to(dtype).to(DEVICE)
    out = fa.flash_attention(q, k, v, causal=causal, softmax_scale=scale, sliding_window=window,
                             q_ids=q_ids, k_ids=k_ids, **kw)
    out.backward(do)

    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    if q_ids is None and kw:
        q_ids, k_ids = _ids_from_kwargs(B, T, S, **kw)
    ref = fa.reference_attention(qr, kr, vr, causal=causal, softmax_scale=scale, sliding_window=window,
                                 q_ids=None if q_ids is None else q_ids.to(DEVICE),
                                 k_ids=None if k_ids is None else k_ids.to(DEVICE))
    ref.backward(do.double())
    otol, gtol = TOL[dtype]
    _check("out", out, ref, otol)
    _check("dq", q.grad, qr.grad, gtol)
    _check("dk", k.grad, kr.grad, gtol)
    _check("dv", v.grad, vr.grad, gtol)
    return out, ref, (q, k, v), (qr, kr, vr)


def _ids_from_kwargs(B, T, S, cu_seqlens=None, position_ids=None, key_padding_mask=None):
    """Independent (python loop) construction of the id model for the reference."""
    doc = torch.zeros(B, T, dtype=torch.long)
    if cu_seqlens is not None:
        flat = torch.zeros(B * T, dtype=torch.long)
        for i, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            flat[a:b] = i
        doc = flat.view(B, T)
    elif position_ids is not None:
        pos = position_ids.expand(B, T).cpu()
        for b in range(B):
            d = 0
            for t in range(T):
                if t > 0 and pos[b, t] != pos[b, t - 1] + 1:
                    d += 1
                doc[b, t] = d
    kd = doc.clone()
    if key_padding_mask is not None:
        kd[~key_padding_mask.bool().cpu()] = -1
    return doc, kd


# ------------------------------------------------------------------------------------------- cases

CASES = {
    # name: (B, H, HKV, T, S, D, dtype, causal, extra)
    "causal_fp32": (1, 2, 2, 128, 128, 32, torch.float32, True, {}),
    "noncausal_fp32": (2, 2, 2, 96, 96, 64, torch.float32, False, {}),
    "gqa8x2_ragged_fp32": (1, 8, 2, 100, 100, 64, torch.float32, True, {}),
    "mqa_noncausal_fp32": (2, 4, 1, 70, 70, 32, torch.float32, False, {}),
    "headdim40_ragged_noncontig": (2, 4, 2, 77, 77, 40, torch.float32, True, {"noncontig": True}),
    "headdim128_scale": (1, 2, 1, 65, 65, 128, torch.float32, True, {"scale": 0.3}),
    "headdim256": (1, 2, 1, 40, 40, 256, torch.float32, True, {}),
    "kv_longer_than_q_causal": (1, 4, 2, 30, 90, 64, torch.float32, True, {}),
    "sliding_window": (1, 4, 2, 150, 150, 32, torch.float32, True, {"window": 37}),
    # window wider than a tile: exercises the unmasked-interior-tile split with a window on both sides
    "sliding_window_wide_gqa": (1, 4, 2, 256, 256, 32, torch.float32, True, {"window": 150}),
    "noncausal_window": (1, 2, 1, 200, 200, 32, torch.float32, False, {"window": 90}),
    "gqa8x2_fp16": (1, 8, 2, 100, 100, 64, torch.float16, True, {}),
    "gqa8x2_bf16": (1, 8, 2, 100, 100, 64, torch.bfloat16, True, {}),
    "noncausal_bf16": (1, 4, 4, 80, 80, 32, torch.bfloat16, False, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    B, H, HKV, T, S, D, dtype, causal, extra = CASES[name]
    run_case(B, H, HKV, T, S, D, dtype, causal=causal, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_documents_cu_seqlens(dtype):
    lens = [40, 1, 64, 45, 7]  # ragged, crossing block boundaries, a 1-token document
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out, ref, (q, k, v), _ = run_case(1, 8, 2, T, T, 32, dtype, causal=True, cu_seqlens=cu.to(DEVICE))
    # independent check: each document on its own gives the same output as the packed run
    otol = TOL[dtype][0]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = fa.reference_attention(q[:, :, a:b].detach().double(), k[:, :, a:b].detach().double(),
                                       v[:, :, a:b].detach().double(), causal=True)
        _check(f"doc {a}:{b}", out[:, :, a:b], alone, otol)


def test_packed_documents_position_ids_noncausal():
    pos = torch.tensor([list(range(33)) + list(range(50)) + list(range(17)),
                        list(range(64)) + list(range(36))])
    run_case(2, 4, 2, 100, 100, 32, torch.float32, causal=False, position_ids=pos.to(DEVICE))


def test_position_ids_and_cu_seqlens_agree():
    pos = torch.tensor([list(range(10)) + list(range(5)) + list(range(20))])
    cu = torch.tensor([0, 10, 15, 35])
    a = fa.doc_ids_from_position_ids(pos)
    b = fa.doc_ids_from_cu_seqlens(cu, 1, 35)
    assert torch.equal(a, b)
    assert a.tolist()[0] == [0] * 10 + [1] * 5 + [2] * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_left_and_right(dtype):
    B, T = 3, 90
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, :25] = False  # left padded
    kpm[1, 70:] = False  # right padded
    out, ref, (q, k, v), _ = run_case(B, 4, 2, T, T, 64, dtype, causal=True, key_padding_mask=kpm.to(DEVICE))
    # left padding: the first 25 queries of row 0 attend nothing -> exact zeros, zero gradient
    assert torch.equal(out[0, :, :25].float().cpu(), torch.zeros_like(out[0, :, :25].float().cpu()))
    assert torch.equal(q.grad[0, :, :25].float().cpu(), torch.zeros_like(q.grad[0, :, :25].float().cpu()))
    # padded keys receive no gradient
    assert float(k.grad[0, :, :25].abs().max()) == 0.0 and float(v.grad[1, :, 70:].abs().max()) == 0.0
    # valid tokens of a padded row equal the unpadded computation of that sequence alone
    alone = fa.reference_attention(q[0:1, :, 25:].detach().double(), k[0:1, :, 25:].detach().double(),
                                   v[0:1, :, 25:].detach().double(), causal=True)
    _check("left-padded row", out[0:1, :, 25:], alone, TOL[dtype][0])


def test_padding_and_documents_together():
    T = 120
    pos = torch.tensor([list(range(50)) + list(range(70))])
    kpm = torch.ones(1, T, dtype=torch.bool)
    kpm[0, 110:] = False
    run_case(1, 4, 2, T, T, 32, torch.float32, causal=True, position_ids=pos.to(DEVICE),
             key_padding_mask=kpm.to(DEVICE))


def test_arbitrary_ids_noncontiguous_documents():
    # ids that interleave (doc 0, 1, 0, 1 ...) must still be exact (ranges are only bounds)
    T = 70
    ids = (torch.arange(T) // 9 % 2).view(1, T).to(torch.int32)
    kid = ids.clone()
    kid[0, 5] = -1
    run_case(1, 2, 1, T, T, 32, torch.float32, causal=True, q_ids=ids.to(DEVICE), k_ids=kid.to(DEVICE))


def test_ranges_skip_tiles_outside_documents():
    """Per-token key/query ranges are tight for contiguous documents (whole tiles get skipped)."""
    doc = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4])
    kid = doc.clone()
    kid[0, 11] = -1  # padded key
    kv_lo, kv_hi, q_lo, q_hi = fa._ranges_from_ids(doc.int(), kid.int(), causal=True, window=None)
    assert kv_lo.tolist()[0] == [0] * 5 + [5] * 3 + [8] * 4
    assert kv_hi.tolist()[0] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11]
    assert q_lo.tolist()[0][:11] == list(range(11)) and q_lo[0, 11] > 10**9
    assert q_hi.tolist()[0][:11] == [5] * 5 + [8] * 3 + [12] * 3 and q_hi[0, 11] == 0
    kv_lo, kv_hi, _, _ = fa._ranges_from_ids(doc.int(), doc.int(), causal=False, window=None)
    assert kv_hi.tolist()[0] == [5] * 5 + [8] * 3 + [12] * 4
    kv_lo, kv_hi, q_lo, q_hi = fa._ranges_from_ids(doc.int(), doc.int(), causal=True, window=2)
    assert kv_lo.tolist()[0] == [0, 0, 1, 2, 3, 5, 5, 6, 8, 8, 9, 10]
    assert q_hi.tolist()[0] == [2, 3, 4, 5, 5, 7, 8, 8, 10, 11, 12, 12]


def test_fully_masked_rows_are_zero_not_nan():
    T = 40
    q_ids = torch.zeros(1, T, dtype=torch.int32)
    q_ids[0, 10:20] = -2  # these queries attend nothing
    out, *_ = run_case(1, 2, 2, T, T, 32, torch.float32, causal=False, q_ids=q_ids.to(DEVICE),
                       k_ids=torch.zeros(1, T, dtype=torch.int32).to(DEVICE))
    assert float(out.detach()[0, :, 10:20].abs().max()) == 0.0


def test_poison_is_active():
    """The poisoning the other tests rely on really fills buffers with NaN."""
    assert fa.POISON_OUTPUTS
    assert torch.isnan(fa._alloc((3, 4), torch.float32, DEVICE)).all()


def test_every_output_element_written_with_odd_shapes():
    # shapes where every block is partial in T and D; poison is on (autouse fixture)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 1, 33, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(2, 1, 129, 33, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(2, 1, 129, 33, generator=gen).to(DEVICE).requires_grad_()
    out = fa.flash_attention(q, k, v, causal=True)
    out.sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()
    ref = fa.reference_attention(q.detach().double(), k.detach().double(), v.detach().double(), causal=True)
    _check("decode-style T=1", out, ref, 2e-5)


def _gradcheck_inputs(T=9, D=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _gradcheck_fn(q, k, v):  # GQA (2 query heads over 1 KV head), causal, two packed documents
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    return fa.flash_attention(q, k, v, causal=True, position_ids=pos)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 kernels are an interpreter-only feature")
def test_gradcheck_float64_fast_mode():
    """float64 kernels (fp64 accumulators under the interpreter): gradcheck in fast mode (random
    projections of the Jacobian, a handful of kernel calls)."""
    assert torch.autograd.gradcheck(_gradcheck_fn, _gradcheck_inputs(), eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=True)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="float64 kernels are an interpreter-only feature")
def test_gradcheck_float64_full():
    """Full Jacobian gradcheck (about a minute under the interpreter)."""
    assert torch.autograd.gradcheck(_gradcheck_fn, _gradcheck_inputs(), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_input_validation():
    x = torch.randn(1, 3, 8, 16, device=DEVICE)
    y = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError):
        fa.flash_attention(x, y, y)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError):
        fa.flash_attention(y, y, y, key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError):
        fa.flash_attention(y, y[:, :, :4], y[:, :, :4], cu_seqlens=torch.tensor([0, 8]))


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 20, 32, generator=gen).to(DEVICE) for _ in range(3))
    a = fa.flash_attention(q, k, v, causal=True)
    b = fa.flash_attention(q, k, v, causal=True, softmax_scale=1 / math.sqrt(32))
    assert torch.equal(a, b)
