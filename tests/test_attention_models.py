"""transformers models with attn_implementation="pipeline_triton" give SDPA's logits and gradients."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline_kernels import flash_attention as fa  # noqa: E402
from pipeline_kernels import transformers_attention as ta  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not fa.is_interpreting():
    pytest.skip("pipeline_kernels.flash_attention was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

NAME = ta.register()


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)
    yield


def llama_config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def qwen3_moe_config():
    return Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                          num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                          max_position_embeddings=256)


def mixtral_config():  # MoE + sliding window (8 < sequence length): exercises the window path
    return MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=8, max_position_embeddings=256)


MODELS = {
    "llama": (LlamaForCausalLM, llama_config),
    "qwen3_moe": (Qwen3MoeForCausalLM, qwen3_moe_config),
    "mixtral_sliding": (MixtralForCausalLM, mixtral_config),
}


def make_pair(arch):
    cls, cfg_fn = MODELS[arch]
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg_fn()), attn_implementation="sdpa").to(DEVICE)
    ours = cls._from_config(copy.deepcopy(cfg_fn()), attn_implementation=NAME).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == NAME
    return ref, ours


def inputs(kind, B=2, T=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, T), generator=g)
    kw = {}
    labels = ids.clone()
    if kind == "padded":
        am = torch.ones(B, T, dtype=torch.long)
        am[0, :7] = 0  # left padding
        am[1, 17:] = 0  # right padding
        kw["attention_mask"] = am.to(DEVICE)
        labels[am == 0] = -100
    elif kind == "packed":
        pos = torch.tensor([list(range(9)) + list(range(6)) + list(range(9)),
                            list(range(13)) + list(range(11))])
        kw["position_ids"] = pos.to(DEVICE)
    return ids.to(DEVICE), labels.to(DEVICE), kw


def run(model, ids, labels, kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def count_kernel_calls(monkeypatch):
    calls = []
    orig = fa.FlashAttentionFunction.apply
    monkeypatch.setattr(fa.FlashAttentionFunction, "apply", lambda *a: (calls.append(1), orig(*a))[1])
    return calls


@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_same_logits_and_grads_as_sdpa(arch, kind, monkeypatch):
    ref, ours = make_pair(arch)
    ids, labels, kw = inputs(kind)
    calls = count_kernel_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent SDPA fallback
        lo, lossb, gb = run(ours, ids, labels, kw)
    assert len(calls) == ours.config.num_hidden_layers, "our kernel was not used for every layer"
    la, lossa, ga = run(ref, ids, labels, kw)
    assert torch.isfinite(lo).all()
    if kind == "padded":  # compare real tokens (padded rows are garbage in, garbage out in both)
        keep = kw["attention_mask"].bool()
        la, lo = la[keep], lo[keep]
    torch.testing.assert_close(lo, la, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lossb, lossa, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_packing_really_separates_documents(monkeypatch):
    """Packed documents: logits of the 2nd document equal running it alone (so attention across the
    boundary would be caught even if SDPA and we were wrong the same way)."""
    _, ours = make_pair("llama")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    pos = torch.tensor([list(range(12)) + list(range(18))]).to(DEVICE)
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = ours(input_ids=ids[:, 12:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 12:], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mixtral_sliding"])
def test_generate_with_kv_cache_matches_sdpa(arch, monkeypatch):
    """Left-padded batched greedy generation with a KV cache (prefill T == S with padding, then T = 1
    decode steps against a longer cache: bottom-right causal alignment, [B, 1, 1, S] padding masks)."""
    ref, ours = make_pair(arch)
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(7))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, :4] = 0
    ids, am = ids.to(DEVICE), am.to(DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    calls = count_kernel_calls(monkeypatch)
    ta._warned.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ref.generate(input_ids=ids, attention_mask=am, **kw)
        assert not calls
        b = ours.generate(input_ids=ids, attention_mask=am, **kw)
    assert not [w for w in caught if ta.ATTENTION_NAME in str(w.message)], "fell back to SDPA"
    assert len(calls) == 6 * ours.config.num_hidden_layers  # prefill + 5 decode steps, every layer
    assert torch.equal(a, b)
    # and the logits of the decode steps agree, not only the argmax
    with torch.no_grad():
        la = ref(input_ids=a, attention_mask=torch.cat([am, torch.ones_like(a[:, 11:])], 1)).logits
        lb = ours(input_ids=a, attention_mask=torch.cat([am, torch.ones_like(a[:, 11:])], 1)).logits
    keep = torch.cat([am, torch.ones_like(a[:, 11:])], 1).bool()
    torch.testing.assert_close(lb[keep], la[keep], atol=2e-5, rtol=1e-4)


def test_mask_to_ids_roundtrip():
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        padding_mask_function,
        sdpa_mask,
    )

    T = 13
    doc = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    pad = torch.ones(2, T, dtype=torch.bool)
    pad[1, :4] = False
    fn = and_masks(causal_mask_function, packed_sequence_mask_function(doc), padding_mask_function(pad))
    mask = sdpa_mask(batch_size=2, q_length=T, kv_length=T, mask_function=fn, allow_is_causal_skip=False)
    ids = ta.ids_from_mask(mask[:, 0], causal=True, window=None)
    assert ids is not None
    q_ids, k_ids = ids
    assert (k_ids[1, :4] == -1).all() and (q_ids[1, :4] == -2).all()
    # a pattern the id model cannot express is refused, not approximated
    weird = torch.ones(1, 4, 4, dtype=torch.bool)
    weird[0, 3, 1] = False
    assert ta.ids_from_mask(weird, causal=False, window=None) is None


def test_cu_seq_lens_kwargs_without_mask():
    """flash-attn style packed batches: no 4D mask, cu_seq_lens_q/k kwargs give the documents."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 40, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 2, 40, 16, generator=g).to(DEVICE)
    v = torch.randn(1, 2, 40, 16, generator=g).to(DEVICE)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32).to(DEVICE)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = ta.attention_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert out.shape == (1, 40, 4, 16) and out.is_contiguous()
    doc = torch.tensor([[0] * 15 + [1] * 25]).to(DEVICE)
    ref = fa.reference_attention(q.double(), k.double(), v.double(), causal=True, softmax_scale=0.25,
                                 q_ids=doc, k_ids=doc)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-5, rtol=1e-4)


def test_unsupported_mask_falls_back_to_sdpa_with_warning():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 10, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 10, 16, generator=g).to(DEVICE)
    v = torch.randn(2, 2, 10, 16, generator=g).to(DEVICE)
    mask = (torch.rand(2, 1, 10, 10, generator=g) > 0.3).to(DEVICE)
    mask[..., 0] = True
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    ta._warned.clear()
    with pytest.warns(UserWarning, match="falling back"):
        out, _ = ta.attention_forward(module, q, k, v, mask)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask)
    torch.testing.assert_close(out, ref)


def test_unsupported_features_raise():
    module = torch.nn.Module()
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(NotImplementedError):
        ta.attention_forward(module, x, x, x, None, dropout=0.1)
    with pytest.raises(NotImplementedError):
        ta.attention_forward(module, x, x, x, None, softcap=30.0)


def test_register_is_idempotent_and_name_is_safe():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert ta.register() == ta.register() == "pipeline_triton"
    for bad in ("flash", "sdpa", "flex"):
        assert bad not in NAME
    assert AttentionInterface._global_mapping[NAME] is ta.attention_forward
    assert AttentionMaskInterface._global_mapping[NAME] is sdpa_mask


def test_resolve_attention():
    assert ta.resolve_attention("sdpa", "cpu") == "sdpa"
    assert ta.resolve_attention("auto", "cpu") == "sdpa"
    assert ta.resolve_attention("auto", torch.device("cuda")) == (NAME if not fa.is_interpreting() else "sdpa")
    if fa.is_interpreting():
        assert ta.resolve_attention("triton", "cpu") == NAME
    with pytest.raises(ValueError):
        ta.resolve_attention("flash", "cpu")


def test_resolve_triton_on_cpu_without_interpreter_raises():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, sys\n"
            "from pipeline_kernels.transformers_attention import resolve_attention\n"
            "try:\n    resolve_attention('triton', 'cpu')\nexcept RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET' in str(e); print('raised')\n")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: triton resolves fine")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "raised" in r.stdout, r.stderr[-2000:]


def test_saved_checkpoint_is_portable(tmp_path):
    _, ours = make_pair("llama")
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert NAME not in json.dumps(cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation in ("sdpa", "eager")
    ids = torch.randint(0, 128, (1, 10)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.to(DEVICE)(ids, use_cache=False).logits,
                                   ours(ids, use_cache=False).logits, atol=2e-5, rtol=1e-4)
