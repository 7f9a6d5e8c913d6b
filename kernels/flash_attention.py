"""FlashAttention-2 forward and backward in Triton (pointer arithmetic, Triton 3.9).

Layout and masking model
------------------------
``q``: ``[B, Hq, T, D]``, ``k``/``v``: ``[B, Hkv, S, D]`` (any strides with a unit stride on ``D``;
transformers' transposed views are used as they are). ``Hq`` must be a multiple of ``Hkv``; query head
``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never repeated in memory.

Query ``i`` may attend key ``j`` iff

* ``causal``: ``j <= i + (S - T)`` (bottom-right alignment, as transformers/flash-attn with a KV cache);
* ``sliding_window=W``: ``j > i + (S - T) - W`` (transformers' ``sliding_window_overlay``);
* with per-token ids (packed documents / padding): ``q_ids[b, i] == k_ids[b, j]``.

Packed documents (from ``cu_seqlens`` or restarting ``position_ids``) and key padding masks are all
lowered to the two int32 id arrays; a padded key gets id ``-1`` so nobody attends it. A query row
that may attend nothing produces zeros (not NaN) and gets ``lse = +inf`` so its backward is zero.
For id-based masking, the wrapper also builds per-token key ranges ``[kv_lo, kv_hi)`` (and per-key
query ranges for the dK/dV kernel) so that whole tiles outside a document are skipped, not only
masked.

Numerics: online softmax in base 2 with fp32 statistics and accumulators (fp64 when the inputs are
fp64, which only makes sense under the interpreter for ``gradcheck``). Under ``TRITON_INTERPRET=1``
the kernels upcast loaded tiles to fp32 because the interpreter computes bf16 ``tl.dot`` and bf16
arithmetic wrongly; on GPU the dots take fp16/bf16 operands with fp32 accumulation.

Backward is FlashAttention-2 style and atomics-free: a preprocess kernel computes
``delta = rowsum(dO * O)``; a dK/dV kernel owns one KV block of one KV head and loops over all the
query heads of its group and their query blocks (so GQA gradients are summed in registers); a dQ
kernel owns one query block.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "flash_attention",
    "FlashAttentionFunction",
    "is_interpreting",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_position_ids",
    "block_config",
    "POISON_OUTPUTS",
]

# When True, every buffer the wrapper allocates for kernel outputs is filled with NaN first, so tests
# can prove that the kernels wrote every element (tests flip this; production leaves it False).
POISON_OUTPUTS = bool(int(os.environ.get("KERNELS_POISON_OUTPUTS", "0")))

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, qid, KIDS_b,
               stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, start, stop,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax over key tiles [start, stop). MASKED=False: tiles known to be fully visible."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            n_valid = offs_n < S
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=d_valid[:, None], other=0.0)
        if UPCAST:
            kt = tl.cast(kt, acc.dtype)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = tl.cast(s, acc.dtype) * qk_scale
        if MASKED:
            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
            if HAS_WINDOW:
                allowed = allowed & (offs_n[None, :] > offs_m[:, None] + OFFSET - WINDOW)
            if HAS_IDS:
                kid = tl.load(KIDS_b + offs_n, mask=n_valid, other=-4)
                allowed = allowed & (qid[:, None] == kid[None, :])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=d_valid[None, :], other=0.0)
        if UPCAST:
            v = tl.cast(v, acc.dtype)
        acc += tl.dot(tl.cast(p, v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_range(lo, hi, full_lo, full_hi, LIMIT, BLOCK: tl.constexpr):
    """Split [lo, hi) (lo a multiple of BLOCK) into masked [lo, a), unmasked [a, b), masked [b, hi):
    [a, b) is [full_lo, full_hi) snapped inwards to whole tiles that also end before LIMIT."""
    a = tl.maximum(full_lo, lo)
    a = ((a + BLOCK - 1) // BLOCK) * BLOCK
    a = tl.minimum(a, hi)
    b = tl.minimum(tl.minimum(full_hi, hi), LIMIT)
    b = tl.maximum(b, 0)
    b = (b // BLOCK) * BLOCK
    b = tl.maximum(b, a)
    return a, b


@triton.jit
def _query_block_key_ranges(QIDS, KVLO, KVHI, b, offs_m, m_valid, pid_m, T, S, OFFSET, WINDOW,
                            CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of one query block, shared by the forward and dQ kernels: (qid, lo, a, b2, hi) with
    [lo, a) and [b2, hi) to visit masked and [a, b2) unmasked. With document ids every tile is masked."""
    if HAS_IDS:
        qid = tl.load(QIDS + b * T + offs_m, mask=m_valid, other=-3)
        lo = tl.min(tl.load(KVLO + b * T + offs_m, mask=m_valid, other=2147483647), axis=0)
        hi = tl.max(tl.load(KVHI + b * T + offs_m, mask=m_valid, other=0), axis=0)
    else:
        qid = 0
        lo = 0
        hi = S
        if CAUSAL:
            hi = tl.minimum(hi, pid_m * BLOCK_M + BLOCK_M + OFFSET)
        if HAS_WINDOW:
            lo = tl.maximum(lo, pid_m * BLOCK_M + OFFSET - WINDOW + 1)
    lo = tl.maximum(lo, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_IDS:
        a = hi
        b2 = hi
    else:
        # key tiles visible to every row of this query block need no masking
        full_lo = 0
        full_hi = S
        if CAUSAL:
            full_hi = pid_m * BLOCK_M + OFFSET + 1
        if HAS_WINDOW:
            full_lo = pid_m * BLOCK_M + BLOCK_M + OFFSET - WINDOW
        a, b2 = _split_range(lo, hi, full_lo, full_hi, S, BLOCK_N)
    return qid, lo, a, b2, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    QIDS, KIDS, KVLO, KVHI,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, S, GROUP, OFFSET, WINDOW,
    qk_scale,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    # heaviest (causal) query blocks first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = pid_bh % H
    kvh = tl.cast(h // GROUP, tl.int64)
    h = tl.cast(h, tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < D

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = tl.cast(q, acc_t)

    qid, lo, a, b2, hi = _query_block_key_ranges(QIDS, KVLO, KVHI, b, offs_m, m_valid, pid_m, T, S, OFFSET, WINDOW,
                                                 CAUSAL, HAS_IDS, HAS_WINDOW, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_t)
    l_i = tl.zeros([BLOCK_M], dtype=acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)
    KIDS_b = KIDS + b * S
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, qid, KIDS_b,
        stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, lo, a,
        True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, qid, KIDS_b,
        stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, a, b2,
        False, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, qid, KIDS_b,
        stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, b2, hi,
        True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))

    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], tl.cast(out, O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * T + offs_m, tl.cast(lse, LSE.dtype.element_ty), mask=m_valid)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    D: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = tl.cast(pid_bh % H, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=msk, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=msk, other=0.0)
    delta = tl.sum(tl.cast(o, acc_t) * tl.cast(do, acc_t), axis=1)
    tl.store(DELTA + pid_bh * T + offs_m, tl.cast(delta, DELTA.dtype.element_ty), mask=offs_m < T)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, m_valid, qid, KIDS_b,
              stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, start, stop,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < S
        if MASKED:
            dn_mask = d_valid[:, None] & n_valid[None, :]
        else:
            dn_mask = d_valid[:, None]
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=dn_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=dn_mask, other=0.0)
        if UPCAST:
            kt = tl.cast(kt, dq.dtype)
            vt = tl.cast(vt, dq.dtype)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = tl.cast(s, dq.dtype) * qk_scale
        if MASKED:
            allowed = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
            if HAS_WINDOW:
                allowed = allowed & (offs_n[None, :] > offs_m[:, None] + OFFSET - WINDOW)
            if HAS_IDS:
                kid = tl.load(KIDS_b + offs_n, mask=n_valid, other=-4)
                allowed = allowed & (qid[:, None] == kid[None, :])
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (tl.cast(dp, dq.dtype) - delta[:, None])
        dq += tl.dot(tl.cast(ds, kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, LSE_bh, DELTA_bh, offs_n, offs_m0, offs_d, d_valid, n_valid, kid,
                QIDS_b, stride_qt, stride_dot, T, OFFSET, WINDOW, qk_scale, start, stop,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + offs_m0
        m_valid = offs_m < T
        if MASKED:
            md_mask = m_valid[:, None] & d_valid[None, :]
        else:
            md_mask = d_valid[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=md_mask, other=0.0)
        if UPCAST:
            q = tl.cast(q, dk.dtype)
            do = tl.cast(do, dk.dtype)
        if MASKED:
            lse = tl.load(LSE_bh + offs_m, mask=m_valid, other=0.0)
            delta = tl.load(DELTA_bh + offs_m, mask=m_valid, other=0.0)
        else:
            lse = tl.load(LSE_bh + offs_m)
            delta = tl.load(DELTA_bh + offs_m)
        # transposed scores: rows = keys, columns = queries
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        st = tl.cast(st, dk.dtype) * qk_scale
        if MASKED:
            allowed = n_valid[:, None] & m_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[:, None] <= offs_m[None, :] + OFFSET)
            if HAS_WINDOW:
                allowed = allowed & (offs_n[:, None] > offs_m[None, :] + OFFSET - WINDOW)
            if HAS_IDS:
                qid = tl.load(QIDS_b + offs_m, mask=m_valid, other=-3)
                allowed = allowed & (kid[:, None] == qid[None, :])
            pt = tl.where(allowed, tl.exp2(st - lse[None, :]), 0.0)
        else:
            pt = tl.exp2(st - lse[None, :])
        dv += tl.dot(tl.cast(pt, do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (tl.cast(dpt, dk.dtype) - delta[None, :])
        dk += tl.dot(tl.cast(dst, q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    QIDS, KIDS, QLO, QHI,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, HKV, T, S, GROUP, OFFSET, WINDOW,
    qk_scale, sm_scale,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = tl.cast(pid_bkv // HKV, tl.int64)
    kvh = tl.cast(pid_bkv % HKV, tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]

    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=nd_mask, other=0.0)
    if UPCAST:
        k = tl.cast(k, acc_t)
        v = tl.cast(v, acc_t)

    if HAS_IDS:
        kid = tl.load(KIDS + b * S + offs_n, mask=n_valid, other=-4)
        lo = tl.min(tl.load(QLO + b * S + offs_n, mask=n_valid, other=2147483647), axis=0)
        hi = tl.max(tl.load(QHI + b * S + offs_n, mask=n_valid, other=0), axis=0)
    else:
        lo = 0
        hi = T
        if CAUSAL:
            lo = tl.maximum(lo, pid_n * BLOCK_N - OFFSET)
        if HAS_WINDOW:
            hi = tl.minimum(hi, pid_n * BLOCK_N + BLOCK_N - 1 - OFFSET + WINDOW)
    lo = tl.maximum(lo, 0)
    lo = (lo // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_t)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_t)

    QIDS_b = QIDS + b * T
    if HAS_IDS:
        a = hi
        b2 = hi
    else:
        kid = 0
        # query tiles in which every row sees every key of this block need no masking
        full_lo = 0
        full_hi = T
        if CAUSAL:
            full_lo = pid_n * BLOCK_N + BLOCK_N - 1 - OFFSET
        if HAS_WINDOW:
            full_hi = pid_n * BLOCK_N - OFFSET + WINDOW
        a, b2 = _split_range(lo, hi, full_lo, full_hi, T, BLOCK_M)
        if pid_n * BLOCK_N + BLOCK_N > S:  # ragged key block: keep everything masked
            a = hi
            b2 = hi
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        LSE_bh = LSE + bh * T
        DELTA_bh = DELTA + bh * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, LSE_bh, DELTA_bh, offs_n, offs_m0, offs_d, d_valid,
                             n_valid, kid, QIDS_b, stride_qt, stride_dot, T, OFFSET, WINDOW, qk_scale, lo, a,
                             True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, LSE_bh, DELTA_bh, offs_n, offs_m0, offs_d, d_valid,
                             n_valid, kid, QIDS_b, stride_qt, stride_dot, T, OFFSET, WINDOW, qk_scale, a, b2,
                             False, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, LSE_bh, DELTA_bh, offs_n, offs_m0, offs_d, d_valid,
                             n_valid, kid, QIDS_b, stride_qt, stride_dot, T, OFFSET, WINDOW, qk_scale, b2, hi,
                             True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_M)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             tl.cast(dk, DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             tl.cast(dv, DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    QIDS, KIDS, KVLO, KVHI,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, S, GROUP, OFFSET, WINDOW,
    qk_scale, sm_scale,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = pid_bh % H
    kvh = tl.cast(h // GROUP, tl.int64)
    h = tl.cast(h, tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=md_mask, other=0.0)
    if UPCAST:
        q = tl.cast(q, acc_t)
        do = tl.cast(do, acc_t)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_valid, other=0.0)

    qid, lo, a, b2, hi = _query_block_key_ranges(QIDS, KVLO, KVHI, b, offs_m, m_valid, pid_m, T, S, OFFSET, WINDOW,
                                                 CAUSAL, HAS_IDS, HAS_WINDOW, BLOCK_M, BLOCK_N)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)
    KIDS_b = KIDS + b * S
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, m_valid, qid,
                   KIDS_b, stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, lo, a,
                   True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, m_valid, qid,
                   KIDS_b, stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, a, b2,
                   False, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_n0, offs_d, d_valid, m_valid, qid,
                   KIDS_b, stride_kt, stride_vt, S, OFFSET, WINDOW, qk_scale, b2, hi,
                   True, CAUSAL, HAS_IDS, HAS_WINDOW, UPCAST, DOT_PRECISION, BLOCK_N)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             tl.cast(dq, DQ.dtype.element_ty), mask=md_mask)


KERNELS = {
    "fwd": _attn_fwd_kernel,
    "bwd_preprocess": _attn_bwd_preprocess_kernel,
    "bwd_dkdv": _attn_bwd_dkdv_kernel,
    "bwd_dq": _attn_bwd_dq_kernel,
}


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------


def is_interpreting() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    return type(_attn_fwd_kernel).__name__ == "InterpretedFunction"


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def block_config(kernel: str, head_dim: int, dtype: torch.dtype | None = None, interpreting: bool | None = None,
                 capability: tuple[int, int] | None = None) -> dict:
    """Block sizes / warps / stages of one kernel.

    A small static table (no autotuning, so that the exact same configurations are compiled ahead of
    time by :mod:`pipeline_kernels.aot`). The interpreter gets big 64x64 tiles because it is per-program slow.
    ``dtype`` and ``capability`` are accepted so that the table can be refined per dtype/arch once it has
    been measured on a GPU; today fp16 and bf16 share the same entries.
    """
    if interpreting is None:
        interpreting = is_interpreting()
    bd = block_d_for(head_dim)
    if interpreting:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if bd > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    big = bd >= 256
    if dtype in (torch.float32, torch.float64):  # 4-byte tiles: halve the key tile / stages for smem
        cfg = block_config(kernel, head_dim, torch.float16, False, capability)
        if kernel != "bwd_preprocess":
            if kernel == "bwd_dkdv":
                cfg["BLOCK_M"] = max(16, cfg["BLOCK_M"] // 2)
            else:
                cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
            cfg["num_stages"] = min(cfg["num_stages"], 2)
        return cfg
    if kernel == "fwd":
        if big:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        if bd == 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if kernel == "bwd_preprocess":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if kernel == "bwd_dkdv":  # BLOCK_N keys owned, BLOCK_M query tile streamed
        if big:
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1)
        if bd == 128:
            return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2)
    if kernel == "bwd_dq":  # BLOCK_M queries owned, BLOCK_N key tile streamed
        if big:
            return dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1)
        if bd == 128:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2)
    raise KeyError(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact (ieee) products; fp16/bf16: the value is ignored by tl.dot.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _alloc(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


# --------------------------------------------------------------------------------------------------
# Document ids / ranges (torch side)
# --------------------------------------------------------------------------------------------------


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """``[B, T]`` int32 document ids from cumulative sequence lengths over the flattened ``B*T`` tokens.

    ``cu_seqlens`` is the flash-attn ``varlen`` convention: ``[0, len0, len0+len1, ..., B*T]``
    (int32/int64, 1-D). Tokens beyond ``cu_seqlens[-1]`` get their own trailing document. Documents
    are expected not to straddle batch rows (with ``B == 1``, the usual packed layout, they cannot).
    """
    cu = cu_seqlens.to(torch.int64).flatten()
    tok = torch.arange(batch * seqlen, device=cu.device)
    ids = torch.searchsorted(cu[1:].contiguous(), tok, right=True).view(batch, seqlen)
    ids = ids - ids[:, :1]  # per-row renumbering keeps ids in [0, T)
    return ids.to(torch.int32)


def doc_ids_from_position_ids(position_ids: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Document ids from position ids that restart at each packed document (transformers' rule:
    a new document starts wherever ``position_ids[t] != position_ids[t-1] + 1``)."""
    pos = position_ids
    if pos.dim() == 1:
        pos = pos[None]
    if batch is not None and pos.shape[0] != batch:
        pos = pos.expand(batch, -1)
    first = pos[:, :1] - 1
    diff = torch.diff(pos, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1).to(torch.int32)


def _ranges_from_ids(q_ids: torch.Tensor, k_ids: torch.Tensor, causal: bool, window: int | None):
    """Per-query key ranges ``[kv_lo, kv_hi)`` and per-key query ranges ``[q_lo, q_hi)`` (int32).

    Ids must lie in ``[0, max(T, S))`` for real tokens; negative ids never match anything
    (``-1`` = padded key, ``-2`` = query that attends nothing). Ranges are conservative bounds (exact
    for contiguous documents); the kernels still mask by id equality inside the range.
    """
    B, T = q_ids.shape
    S = k_ids.shape[1]
    off = S - T
    dev = q_ids.device
    n = max(T, S) + 1
    big = torch.iinfo(torch.int32).max
    qi = q_ids.long()
    ki = k_ids.long()
    q_idx = torch.where(qi >= 0, qi, n - 1)
    k_idx = torch.where(ki >= 0, ki, n - 1)
    kpos = torch.arange(S, device=dev).expand(B, S)
    qpos = torch.arange(T, device=dev).expand(B, T)
    kfirst = torch.full((B, n), S, device=dev, dtype=torch.long).scatter_reduce(1, k_idx, kpos, "amin")
    klast = torch.full((B, n), -1, device=dev, dtype=torch.long).scatter_reduce(1, k_idx, kpos, "amax")
    qfirst = torch.full((B, n), T, device=dev, dtype=torch.long).scatter_reduce(1, q_idx, qpos, "amin")
    qlast = torch.full((B, n), -1, device=dev, dtype=torch.long).scatter_reduce(1, q_idx, qpos, "amax")

    kv_lo = kfirst.gather(1, q_idx)
    kv_hi = klast.gather(1, q_idx) + 1
    q_lo = qfirst.gather(1, k_idx)
    q_hi = qlast.gather(1, k_idx) + 1
    if causal:
        kv_hi = torch.minimum(kv_hi, qpos + off + 1)
        q_lo = torch.maximum(q_lo, kpos - off)
    if window is not None:
        kv_lo = torch.maximum(kv_lo, qpos + off - window + 1)
        q_hi = torch.minimum(q_hi, kpos - off + window)
    q_empty = (qi < 0) | (kv_lo >= kv_hi)
    k_empty = (ki < 0) | (q_lo >= q_hi)
    kv_lo = torch.where(q_empty, big, kv_lo).to(torch.int32).contiguous()
    kv_hi = torch.where(q_empty, 0, kv_hi).to(torch.int32).contiguous()
    q_lo = torch.where(k_empty, big, q_lo).to(torch.int32).contiguous()
    q_hi = torch.where(k_empty, 0, q_hi).to(torch.int32).contiguous()
    return kv_lo, kv_hi, q_lo, q_hi


# --------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_device(*ts):
    interp = is_interpreting()
    for t in ts:
        if interp and t.device.type != "cpu":
            raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1: inputs must be CPU tensors")
        if not interp and t.device.type != "cuda":
            raise RuntimeError(
                "Triton flash attention needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                "pipeline_kernels.flash_attention for the slow CPU interpreter)")


class FlashAttentionFunction(torch.autograd.Function):
    """``out[B, Hq, T, D]`` (a transposed view of a ``[B, T, Hq, D]`` buffer)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, window, q_ids, k_ids):
        B, H, T, D = q.shape
        _, HKV, S, _ = k.shape
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        has_ids = q_ids is not None
        interp = is_interpreting()
        if has_ids:
            kv_lo, kv_hi, q_lo, q_hi = _ranges_from_ids(q_ids, k_ids, causal, window)
        else:
            dummy = torch.empty(1, dtype=torch.int32, device=q.device)
            q_ids = k_ids = kv_lo = kv_hi = q_lo = q_hi = dummy
        acc_fp64 = q.dtype == torch.float64
        o = _alloc((B, T, H, D), q.dtype, q.device).transpose(1, 2)  # [B, H, T, D] view
        lse = _alloc((B, H, T), torch.float64 if acc_fp64 else torch.float32, q.device)
        cfg = block_config("fwd", D, q.dtype, interp)
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
        common = dict(
            D=D, CAUSAL=bool(causal), HAS_IDS=has_ids, HAS_WINDOW=window is not None, UPCAST=interp,
            ACC_FP64=acc_fp64, DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d_for(D))
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, q_ids, k_ids, kv_lo, kv_hi,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            H, T, S, H // HKV, S - T, window if window is not None else 0,
            sm_scale * LOG2E,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)
        ctx.save_for_backward(q, k, v, o, lse, q_ids, k_ids, kv_lo, kv_hi, q_lo, q_hi)
        ctx.sm_scale = sm_scale
        ctx.window = window
        ctx.common = common
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_ids, k_ids, kv_lo, kv_hi, q_lo, q_hi = ctx.saved_tensors
        B, H, T, D = q.shape
        _, HKV, S, _ = k.shape
        do = _unit_last(do)
        common = ctx.common
        interp = common["UPCAST"]
        sm_scale = ctx.sm_scale
        window = ctx.window if ctx.window is not None else 0
        delta = _alloc((B, H, T), lse.dtype, q.device)
        cfg = block_config("bwd_preprocess", D, q.dtype, interp)
        _attn_bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            o, do, delta,
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            H, T, D=D, ACC_FP64=common["ACC_FP64"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=common["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

        dq = _alloc((B, T, H, D), q.dtype, q.device).transpose(1, 2)
        dk = _alloc((B, S, HKV, D), k.dtype, k.device).transpose(1, 2)
        dv = _alloc((B, S, HKV, D), v.dtype, v.device).transpose(1, 2)

        cfg = block_config("bwd_dkdv", D, q.dtype, interp)
        _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * HKV)](
            q, k, v, do, lse, delta, dk, dv, q_ids, k_ids, q_lo, q_hi,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            H, HKV, T, S, H // HKV, S - T, window,
            sm_scale * LOG2E, sm_scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)

        cfg = block_config("bwd_dq", D, q.dtype, interp)
        _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, q_ids, k_ids, kv_lo, kv_hi,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, T, S, H // HKV, S - T, window,
            sm_scale * LOG2E, sm_scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashAttention-2 (Triton). Returns ``[B, Hq, T, D]`` (a view of a ``[B, T, Hq, D]`` buffer:
    ``out.transpose(1, 2)`` is contiguous, which is what transformers wants).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, no repeat).
            fp16, bf16, fp32 (fp64 only under the interpreter). ``D`` up to 256 (padded to a power of 2).
        causal: causal masking, bottom-right aligned when ``S > T``.
        softmax_scale: defaults to ``D ** -0.5``.
        cu_seqlens: packed documents, cumulative lengths over the flattened ``B*T`` tokens
            (flash-attn varlen convention). Requires ``S == T``.
        position_ids: ``[B, T]`` or ``[1, T]`` positions restarting at each packed document (the
            document ids are derived as in transformers). Requires ``S == T``.
        key_padding_mask: ``[B, S]`` bool/int, 1 = real token, 0 = padding (transformers' 2D
            ``attention_mask``). Padded keys are never attended; query rows with nothing to attend
            (e.g. left padding under a causal mask) return zeros.
        sliding_window: keep keys with ``j > i + (S - T) - sliding_window`` (transformers semantics).
        q_ids, k_ids: low-level: ``[B, T]`` / ``[B, S]`` int ids, a query attends a key only if the
            ids are equal; valid ids must be in ``[0, max(T, S))``, negative ids never match.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, T, D]")
    B, H, T, D = q.shape
    Bk, HKV, S, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if H % HKV != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HKV})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share a dtype")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if q.dtype == torch.float64 and not is_interpreting():
        raise TypeError("float64 is only supported under TRITON_INTERPRET=1")
    if D > 256:
        raise ValueError("head_dim > 256 is not supported")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError("sliding_window must be positive")
    _check_device(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)

    if q_ids is None and k_ids is None:
        doc = None
        if cu_seqlens is not None:
            if S != T:
                raise ValueError("cu_seqlens needs self-attention shapes (S == T)")
            doc = doc_ids_from_cu_seqlens(cu_seqlens.to(q.device), B, T)
        elif position_ids is not None:
            if S != T:
                raise ValueError("position_ids packing needs self-attention shapes (S == T)")
            doc = doc_ids_from_position_ids(position_ids.to(q.device), B)
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(q.device).bool()
            if kpm.shape != (B, S):
                raise ValueError(f"key_padding_mask must be [B, S] = {(B, S)}, got {tuple(kpm.shape)}")
            if doc is None:
                q_ids = torch.zeros(B, T, dtype=torch.int32, device=q.device)
                k_ids = torch.where(kpm, 0, -1).to(torch.int32)
            else:
                q_ids = doc
                k_ids = torch.where(kpm, doc, -1).to(torch.int32)
        elif doc is not None:
            q_ids = k_ids = doc
    elif q_ids is None or k_ids is None:
        raise ValueError("pass both q_ids and k_ids")
    if q_ids is not None:
        q_ids = q_ids.to(device=q.device, dtype=torch.int32).expand(B, T).contiguous()
        k_ids = k_ids.to(device=q.device, dtype=torch.int32).expand(B, S).contiguous()
    return FlashAttentionFunction.apply(q, k, v, bool(causal), float(softmax_scale), sliding_window, q_ids, k_ids)


def reference_attention(q, k, v, *, causal=True, softmax_scale=None, q_ids=None, k_ids=None,
                        sliding_window=None, dtype=torch.float64):
    """Plain-torch reference (same masking model; fully-masked rows give zeros). For tests."""
    B, H, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    g = H // HKV
    qf, kf, vf = q.to(dtype), k.to(dtype).repeat_interleave(g, 1), v.to(dtype).repeat_interleave(g, 1)
    s = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)[None, None]
    if causal:
        allowed = allowed & (j <= i + S - T)
    if sliding_window is not None:
        allowed = allowed & (j > i + S - T - sliding_window)
    if q_ids is not None:
        allowed = allowed & (q_ids[:, None, :, None] == k_ids[:, None, None, :])
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", p, vf)
