"""Registration of the Triton FlashAttention-2 kernel with transformers (5.x) under one name.

Usage::

    from pipeline_kernels.transformers_attention import register, resolve_attention
    name = resolve_attention("auto", device)           # "pipeline_triton" on CUDA, "sdpa" on CPU
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

``register()`` adds :func:`attention_forward` to ``AttentionInterface`` and transformers' ``sdpa_mask``
to ``AttentionMaskInterface`` under :data:`ATTENTION_NAME` (without the mask registration transformers
would silently drop padding and packed-document masks for an unknown name). The name avoids the
substrings "flash", "sdpa" and "flex", which transformers tests for to change its behaviour.

How the mask reaches the kernel (in order):

1. ``attention_mask`` is a 4D mask (bool, or additive float with only ``0``/very negative values), which
   transformers builds for padding (2D ``attention_mask`` with zeros) and for packed documents
   (``position_ids`` that restart, ``use_cache=False``). It is turned into per-token ids (consecutive
   query rows sharing an allowed key form one document; a key's id is the id of the first query
   attending it, ``-1`` if none; a query attending nothing gets ``-2``) and the ids are *verified*: the mask rebuilt from them (``causal & window & q_id == k_id``) must equal the
   given one exactly. The result is cached per mask tensor, so the O(T*S) work happens once per
   forward, not once per layer. A mask the id model cannot express (e.g. bidirectional image blocks,
   per-head masks, real-valued biases) falls back to transformers' SDPA path with a one-time warning.
2. No mask but ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs (flash-attn style packed batches, e.g.
   ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): documents come from them.
3. Otherwise plain causal (or bidirectional for ``module.is_causal == False``) attention.

``position_ids`` alone are deliberately NOT used to split documents: transformers only separates packed
documents when it builds the mask (``use_cache=False``), and matching SDPA exactly is the contract.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from . import flash_attention as _fa

ATTENTION_NAME = "pipeline_triton"

__all__ = ["ATTENTION_NAME", "register", "attention_forward", "resolve_attention", "ids_from_mask"]

_registered = False
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def register() -> str:
    """Register the attention function and its mask function with transformers; idempotent."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for bad in ("flash", "sdpa", "flex"):
        assert bad not in ATTENTION_NAME
    if not _registered or AttentionInterface._global_mapping.get(ATTENTION_NAME) is not attention_forward:
        AttentionInterface.register(ATTENTION_NAME, attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


def resolve_attention(choice: str, device) -> str:
    """Map the recipe setting ``auto | triton | sdpa`` (also ``eager``) to an ``attn_implementation``.

    * ``auto``: our Triton kernel on CUDA devices, ``"sdpa"`` elsewhere.
    * ``triton``: always ours; on a non-CUDA device only when the kernels run under the Triton
      interpreter (``TRITON_INTERPRET=1`` set before ``pipeline_kernels.flash_attention`` was imported).
    * ``sdpa`` / ``eager``: passed through.
    """
    choice = (choice or "auto").lower()
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if choice in ("sdpa", "eager"):
        return choice
    if choice == "auto":
        if dev.type == "cuda" and not _fa.is_interpreting():
            return register()
        return "sdpa"
    if choice == "triton":
        if dev.type == "cuda":
            if _fa.is_interpreting():
                raise RuntimeError("attention=triton on CUDA but TRITON_INTERPRET=1 is set: unset it")
            return register()
        if _fa.is_interpreting():
            return register()
        raise RuntimeError(
            f"attention=triton needs a CUDA device (got {dev}). On CPU it only runs under the Triton "
            "interpreter: set TRITON_INTERPRET=1 before anything imports pipeline_kernels.flash_attention "
            "(very slow; meant for tests). Use attention=auto or sdpa instead.")
    raise ValueError(f"unknown attention choice {choice!r}: expected auto, triton or sdpa")


# --------------------------------------------------------------------------------------------------
# 4D mask -> ids
# --------------------------------------------------------------------------------------------------


def _mask_to_bool(mask: torch.Tensor) -> torch.Tensor | None:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    neg = torch.finfo(mask.dtype).min / 2
    ok = (mask == 0) | (mask <= neg)
    if not bool(ok.all()):
        return None  # a real-valued bias: not expressible as ids
    return mask == 0


def ids_from_mask(allowed: torch.Tensor, causal: bool, window: int | None):
    """``allowed``: ``[B, T, S]`` bool. Returns ``(q_ids, k_ids)`` int32 reproducing ``allowed`` exactly
    under ``causal``/``window`` masking, or ``None`` when no such ids exist."""
    B, T, S = allowed.shape
    dev = allowed.device
    a8 = allowed.to(torch.uint8)
    has_q = allowed.any(-1)
    # consecutive query rows belong to the same document iff they share an allowed key (holds for
    # causal, bidirectional and sliding-window documents); ids = running count of segment starts
    new_seg = torch.ones(B, T, dtype=torch.bool, device=dev)
    if T > 1:
        new_seg[:, 1:] = ~(allowed[:, 1:] & allowed[:, :-1]).any(-1)
    seg = new_seg.cumsum(-1) - 1
    q_ids = torch.where(has_q, seg, -2).to(torch.int32)
    has_k = allowed.any(1)
    first_q = a8.argmax(1)  # first query attending each key
    k_ids = torch.where(has_k, q_ids.gather(1, first_q), -1).to(torch.int32)
    rebuilt = q_ids[:, :, None] == k_ids[:, None, :]
    i = torch.arange(T, device=dev)[:, None]
    j = torch.arange(S, device=dev)[None, :]
    if causal:
        rebuilt &= j <= i + (S - T)
    if window is not None:
        rebuilt &= j > i + (S - T) - window
    if not torch.equal(rebuilt, allowed):
        return None
    return q_ids, k_ids


_cache: dict = {}


def _ids_for_mask(mask: torch.Tensor, B: int, T: int, S: int, causal: bool, window: int | None):
    """Cached (one entry: the same mask object is handed to every layer of one forward)."""
    key = (mask.data_ptr(), tuple(mask.shape), mask.dtype, mask._version, B, T, S, causal, window)
    ref = _cache.get("ref")
    if ref is not None and ref() is mask and _cache.get("key") == key:
        return _cache["val"]
    val = _compute_ids(mask, B, T, S, causal, window)
    _cache.clear()
    _cache.update(ref=weakref.ref(mask), key=key, val=val)
    return val


def _compute_ids(mask, B, T, S, causal, window):
    if mask.dim() != 4:
        return None
    m = mask[..., :S] if mask.shape[-1] > S else mask
    if m.shape[-1] != S or m.shape[-2] != T:
        return None
    allowed = _mask_to_bool(m)
    if allowed is None:
        return None
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None  # per-head masks
        allowed = allowed[:, :1]
    allowed = allowed[:, 0].expand(B, T, S)
    return ids_from_mask(allowed, causal, window)


# --------------------------------------------------------------------------------------------------
# The attention function transformers calls
# --------------------------------------------------------------------------------------------------


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, why):
    _warn_once(f"{ATTENTION_NAME}: {why}; falling back to torch SDPA for this call")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, Hq, T, D]``, ``key/value [B, Hkv, S, D]`` ->
    ``(out [B, T, Hq, D], None)``."""
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"{ATTENTION_NAME} does not implement attention dropout (got {dropout})")
    if softcap is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} does not implement attention logit softcapping")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} does not implement position_bias")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} does not implement attention sinks (s_aux)")
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"{ATTENTION_NAME} needs equal q/k/v head dims")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    B, H, T, D = query.shape
    S = key.shape[2]

    q_ids = k_ids = None
    cu_seqlens = None
    if attention_mask is not None:
        ids = _ids_for_mask(attention_mask, B, T, S, causal, sliding_window)
        if ids is None:
            return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                  dict(kwargs, sliding_window=sliding_window),
                                  "attention mask not expressible as causal/window + document/padding ids")
        q_ids, k_ids = ids
    else:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None and T > 1:
            if T != S or (cu_k is not None and not torch.equal(cu_q, cu_k)):
                raise NotImplementedError(f"{ATTENTION_NAME}: cu_seq_lens_q != cu_seq_lens_k is not supported")
            cu_seqlens = cu_q
        elif causal and T > 1 and S > T:
            # same as transformers' SDPA path: prefill into an empty static cache (keys past T are unused)
            key, value, S = key[:, :, :T], value[:, :, :T], T

    out = _fa.flash_attention(
        query, key, value, causal=causal, softmax_scale=scaling, cu_seqlens=cu_seqlens,
        sliding_window=sliding_window, q_ids=q_ids, k_ids=k_ids)
    return out.transpose(1, 2), None  # [B, T, H, D], contiguous
