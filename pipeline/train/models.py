"""Model construction and the causal-LM loss, on stock transformers architectures only.

dense -> `LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, GQA); moe -> `Qwen3MoeForCausalLM` (softmax
top-k routing over `n_experts`). Both save as ordinary checkpoints that load with plain
`AutoModelForCausalLM.from_pretrained` (no remote code); the attention kernel is chosen at load
time and is not stored in config.json.

Packed batches carry `position_ids` that restart at 0 at every document start; with
`use_cache=False` and no attention mask transformers turns them into a per-document causal mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.chat import IGNORE_INDEX
from pipeline.recipe.settings import LoraSettings, ModelSettings

# --- config and construction ---

def build_model_config(model: ModelSettings, vocab_size: int, bos_id: int | None, eos_id: int | None,
                       pad_id: int | None):
    """A transformers config for `model` (LlamaConfig or Qwen3MoeConfig)."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    layers, d_model, heads, kv_heads, ffn = model.dims()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d_model // heads,
        max_position_embeddings=model.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        rms_norm_eps=1e-5,
        initializer_range=model.init_std,
        tie_word_embeddings=model.tie_embeddings,
        attention_dropout=0.0,
        attention_bias=False,
        hidden_act="silu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,  # for generation after training; the loss passes use_cache=False
    )
    if model.family == "dense":
        return LlamaConfig(intermediate_size=ffn, mlp_bias=False, **common)
    return Qwen3MoeConfig(
        intermediate_size=ffn,
        moe_intermediate_size=ffn,
        num_experts=model.n_experts,
        num_experts_per_tok=model.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=model.aux_loss_coef,
        # off in the saved config: on, every forward (KV-cached decoding included, where the mask is longer
        # than the new tokens) computes the load-balancing loss and fails; causal_lm_loss asks for the logits
        output_router_logits=False,
        use_sliding_window=False,
        **common,
    )


def attn_implementation(choice: str, device=None) -> str:
    """The transformers `attn_implementation` name for a ModelSettings.attention choice.

    sdpa/eager pass through; auto is our Triton kernel on CUDA and SDPA elsewhere; triton is our
    kernel (pipeline_kernels.transformers_attention decides where it can run).
    """
    if choice in ("sdpa", "eager"):
        return choice
    if choice not in ("triton", "auto"):
        raise ValueError(f"attention: unknown choice {choice!r}; use auto, triton, sdpa or eager")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "auto" and torch.device(device).type != "cuda":
        return "sdpa"
    # Imported here, not at the top: it decorates the Triton kernels, and TRITON_INTERPRET must be set first.
    from pipeline_kernels.transformers_attention import resolve_attention

    return resolve_attention(choice, device)


def build_model(model_settings: ModelSettings, vocab_size: int, bos_id: int | None, eos_id: int | None,
                pad_id: int | None):
    """A freshly initialised fp32 causal LM (mixed precision is the accelerator's business)."""
    from transformers import AutoModelForCausalLM

    config = build_model_config(model_settings, vocab_size, bos_id, eos_id, pad_id)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation(model_settings.attention), dtype=torch.float32
    )
    if model_settings.residual_init == "zero":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(RESIDUAL_OUTPUTS):
                    p.zero_()
    return model


# the projections that write into the residual stream (Llama and Qwen3-MoE, experts' stacked ones too)
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "down_proj.weight", "down_proj")


def is_moe(config) -> bool:
    return getattr(config, "num_experts", None) is not None and hasattr(config, "num_experts_per_tok")


# --- loss ---

def _unwrapped_config(model):
    m = model
    while hasattr(m, "module"):  # DDP / DeepSpeed engine
        m = m.module
    return getattr(m, "_orig_mod", m).config  # torch.compile wrapper


def causal_lm_loss(model, batch: dict[str, torch.Tensor], settings: ModelSettings | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss on a packed batch: (loss to backprop, aux of detached tensors).

    batch: `input_ids` [B, T+1] and `position_ids` [B, T+1] (see pipeline.data.packing); the model reads
    the first T tokens and predicts the last T. Optional `labels` [B, T+1] with -100 masks targets.
    For MoE the loss adds `aux_loss_coef * load_balance + z_loss_coef * mean(logsumexp(router)^2)`.
    The transformers MoE model adds its load-balancing term only when given `labels`; we never pass
    labels, so nothing is counted twice.
    aux: ce, and for MoE aux_loss, z_loss and expert_load [layers, experts] (fraction of routed
    token slots per expert; uniform = 1/n_experts, a collapsed router shows one expert near 1).
    No host sync happens here: values stay on the device until the loop logs them.
    """
    config = _unwrapped_config(model)
    input_ids = batch["input_ids"]
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    if "labels" in batch:
        targets = batch["labels"][:, 1:]
    kwargs: dict[str, Any] = {"input_ids": inputs, "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"][:, :-1]
    moe = is_moe(config)
    if moe:
        kwargs["output_router_logits"] = True
    out = model(**kwargs)
    logits = out.logits
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    loss = ce
    aux: dict[str, torch.Tensor] = {"ce": ce.detach()}
    if moe:
        aux_coef = settings.aux_loss_coef if settings is not None else config.router_aux_loss_coef
        z_coef = settings.z_loss_coef if settings is not None else 0.0
        router_logits = out.router_logits  # tuple over layers of [B*T, n_experts]
        balance = out.aux_loss
        z = torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()
        loss = loss + aux_coef * balance + z_coef * z
        aux["aux_loss"] = balance.detach()
        aux["z_loss"] = z.detach()
        aux["expert_load"] = expert_load(router_logits, config.num_experts_per_tok, config.num_experts)
    return loss, aux


@torch.no_grad()
def expert_load(router_logits, top_k: int, n_experts: int) -> torch.Tensor:
    """[layers, experts]: fraction of top-k routing slots each expert received in each layer."""
    rows = []
    for r in router_logits:
        chosen = torch.topk(r.float(), top_k, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(chosen, minlength=n_experts).float() / max(1, chosen.numel()))
    return torch.stack(rows)


# --- FLOPs for MFU ---

def matmul_parameters(config, *, active: bool = True) -> int:
    """Parameters each token multiplies through (transformer blocks + output projection).

    Input embeddings are a lookup and do not count; `active`: only top-k experts count for MoE.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    if is_moe(config):
        experts = config.num_experts_per_tok if active else config.num_experts
        mlp = experts * 3 * d * config.moe_intermediate_size + d * config.num_experts
    else:
        mlp = 3 * d * config.intermediate_size
    return layers * (attn + mlp) + config.vocab_size * d


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (active matmul params) + 12 * layers * d_attn * seq_len (PaLM appendix B)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * matmul_parameters(config) + attn


PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of one accelerator, or None when unknown (CPU: MFU not reported)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def bits_per_byte(ce_nats_sum: float, n_bytes: int) -> float:
    return ce_nats_sum / math.log(2) / max(1, n_bytes)


# --- LoRA (PEFT) ---

def parameter_counts(model) -> dict[str, float]:
    """Parameters, those that train, and their share (ZeRO-3 partitions report their full size)."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return {"parameters": total, "trainable_parameters": trainable, "trainable_share": round(trainable / max(1, total), 6)}


def add_lora(model, lora: LoraSettings, task_type: str):
    """`model` wrapped by PEFT with LoRA on the settings' target modules (every block linear by default);
    task_type CAUSAL_LM or SEQ_CLS (the score head then trains in full)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                        target_modules=lora.target_modules or "all-linear",
                        modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    return get_peft_model(model, config)


def transposed_modules(peft_model) -> set[str]:
    """Names of the adapted modules whose weight is stored input-major (GPT-2's Conv1D)."""
    return {name.removesuffix(".base_layer") for name, m in peft_model.get_base_model().named_modules()
            if type(m).__name__ == "Conv1D"}


def merge_lora_state_dict(state: dict, scaling: float, transposed: set[str] = frozenset()) -> dict:
    """A PEFT LoRA model's full state dict (as accelerate gathers it, ZeRO-3 included) -> the base model's
    state dict with every update folded in: W + scaling * B @ A (transposed for `transposed` modules).
    Written here because PEFT merges only a model that holds its own weights (`merge_and_unload`), which a
    ZeRO-3 rank does not; tested against it."""
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            module = name.split(".base_layer.")[0]
            lora_a, lora_b = (f"{prefix}{module}.lora_{x}.default.weight" for x in "AB")
            if name.endswith(".base_layer.weight") and lora_a in state:
                delta = (state[lora_b].float() @ state[lora_a].float()) * scaling
                value = value + (delta.T if module in transposed else delta).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        name = name.replace(".modules_to_save.default.", ".")
        out[name] = value
    return out
