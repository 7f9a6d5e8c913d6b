"""Forward / backward TFLOP/s of the Triton FlashAttention-2 kernel vs torch SDPA (flash backend) and the
``flash_attn`` package (when installed).

    python benchmarks/bench_attention.py                       # causal bf16, head dim 64 and 128, 512..16k
    python benchmarks/bench_attention.py --head-dims 128 --seqlens 4096 --json out.json

FLOPs follow the FlashAttention papers: forward ``4 * B * H * T * S * D`` (halved when causal), backward
2.5x the forward. Each sequence length uses ``B = tokens // T`` so that every row does the same work.
Without a CUDA GPU it prints that and exits 0 (the kernels are only proven on CPU by the interpreter).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seqlen per measurement")
    ap.add_argument("--model-dim", type=int, default=2048, help="query heads = model_dim // head_dim")
    ap.add_argument("--kv-heads", type=int, default=0, help="0 = same as query heads (MHA)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU on this machine; nothing to measure (the kernels are verified on "
              "CPU by the Triton interpreter tests, and compiled for sm_80/sm_90 by `python -m pipeline_kernels.aot`).")
        return 0

    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline_kernels.flash_attention import flash_attention

    try:
        from flash_attn import flash_attn_func  # type: ignore
    except Exception:  # not installed / no wheel for this torch
        flash_attn_func = None

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    causal = not args.non_causal
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}  dtype={args.dtype} causal={causal} "
          f"flash_attn={'yes' if flash_attn_func else 'not installed'}")
    rows = []
    for D in args.head_dims:
        H = max(1, args.model_dim // D)
        HKV = args.kv_heads or H
        for T in args.seqlens:
            B = max(1, args.tokens // T)
            q = torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, HKV, T, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, HKV, T, D, device=dev, dtype=dtype, requires_grad=True)
            do = torch.randn(B, H, T, D, device=dev, dtype=dtype)
            flops_fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)

            def ours(q=q, k=k, v=v):
                return flash_attention(q, k, v, causal=causal)

            def sdpa(q=q, k=k, v=v, gqa=HKV != H):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                            enable_gqa=gqa)

            providers = {"triton (ours)": ours, "torch sdpa flash": sdpa}
            if flash_attn_func is not None:
                qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                dot_ = do.transpose(1, 2).contiguous()

                def fa2(qt=qt, kt=kt, vt=vt):
                    return flash_attn_func(qt, kt, vt, causal=causal)

                providers["flash_attn"] = fa2
            ref = None
            for name, fn in providers.items():
                try:
                    out = fn()
                    if ref is None:
                        ref = out.detach().float()
                        err = 0.0
                    else:
                        o = out.detach().float()
                        if name == "flash_attn":  # [B, T, H, D]
                            o = o.transpose(1, 2)
                        err = float((o - ref).abs().max())
                    g = dot_ if name == "flash_attn" else do
                    t_fwd = triton.testing.do_bench(fn)
                    o = fn()
                    t_bwd = triton.testing.do_bench(lambda o=o, g=g: o.backward(g, retain_graph=True))
                    row = dict(provider=name, head_dim=D, seqlen=T, batch=B, heads=H, kv_heads=HKV,
                               fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_tflops=flops_fwd / t_fwd * 1e-9,
                               bwd_tflops=2.5 * flops_fwd / t_bwd * 1e-9, max_abs_diff_vs_ours=err)
                except Exception as e:  # report and continue (e.g. SDPA flash unsupported for a shape)
                    row = dict(provider=name, head_dim=D, seqlen=T, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                if "error" in row:
                    print(f"D={D:<4} T={T:<6} {name:<18} ERROR {row['error']}")
                else:
                    print(f"D={D:<4} T={T:<6} B={B:<3} {name:<18} fwd {row['fwd_tflops']:7.1f} TFLOP/s "
                          f"({row['fwd_ms']:.3f} ms)  bwd {row['bwd_tflops']:7.1f} TFLOP/s ({row['bwd_ms']:.3f} ms)"
                          f"  max|diff| {row['max_abs_diff_vs_ours']:.2e}")
            del q, k, v, do
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
