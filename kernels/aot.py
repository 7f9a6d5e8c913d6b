"""Ahead-of-time compilation of every flash-attention kernel for real GPUs, without a GPU.

``python -m pipeline_kernels.aot [--archs 80 90] [--dtypes fp16 bf16] [--head-dims 64 128] [--out DIR]``

For each architecture x dtype x head dim x kernel (fwd, bwd_preprocess, bwd_dkdv, bwd_dq) x variant it
runs the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) with the exact block sizes,
warps and stages :func:`pipeline_kernels.flash_attention.block_config` uses at run time. This catches the rules
the interpreter does not enforce (``tl.dot`` operand shapes >= 16, layouts, register/shared-memory
limits). Shared memory is checked against the architecture's per-block limit and, when the shipped
``cuobjdump`` is available, register use and spills are read from the cubin and reported.

Variants: ``plain`` (the hot path: causal, no ids, no window) and ``full`` (causal + ids + window: every
masking branch); ``--all-variants`` compiles all 8 combinations of causal / ids / window.
Exit status is non-zero if anything fails to compile or exceeds shared memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import flash_attention as fa

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
POINTER_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
STAT_ARGS = {"LSE", "DELTA"}
ID_ARGS = {"QIDS", "KIDS", "KVLO", "KVHI", "QLO", "QHI"}
FLOAT_ARGS = {"qk_scale", "sm_scale"}
VARIANTS = {
    "plain": dict(CAUSAL=True, HAS_IDS=False, HAS_WINDOW=False),
    "full": dict(CAUSAL=True, HAS_IDS=True, HAS_WINDOW=True),
}


def _jit(kernel) -> JITFunction:
    """The compilable JITFunction even when the module was imported under TRITON_INTERPRET=1."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)


def build_source(kernel_name: str, dtype: str, head_dim: int, variant: dict):
    kernel = _jit(fa.KERNELS[kernel_name])
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = fa.block_config(kernel_name, head_dim, torch_dtype, interpreting=False)
    constexprs = dict(D=head_dim, BLOCK_D=fa.block_d_for(head_dim), BLOCK_M=cfg["BLOCK_M"])
    if kernel_name != "bwd_preprocess":
        constexprs.update(variant, UPCAST=False, ACC_FP64=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                          BLOCK_N=cfg["BLOCK_N"])
    else:
        constexprs.update(ACC_FP64=False)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in POINTER_ARGS:
            signature[name] = "*" + DTYPES[dtype]
        elif name in STAT_ARGS:
            signature[name] = "*fp32"
        elif name in ID_ARGS:
            signature[name] = "*i32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), cfg


def _resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            txt = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except Exception:  # pragma: no cover - diagnostics only
            return {}
    out = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        m = re.search(pat, txt)
        if m:
            out[key] = int(m.group(1))
    return out


def compile_one(arch: int, dtype: str, head_dim: int, kernel_name: str, variant_name: str,
                out_dir: Path | None = None) -> dict:
    variant = VARIANTS.get(variant_name) or _parse_variant(variant_name)
    src, cfg = build_source(kernel_name, dtype, head_dim, variant)
    target = GPUTarget("cuda", arch, 32)
    t0 = time.time()
    compiled = triton.compile(src, target=target,
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    secs = time.time() - t0
    shared = int(compiled.metadata.shared)
    rec = dict(kernel=kernel_name, arch=f"sm_{arch}", dtype=dtype, head_dim=head_dim, variant=variant_name,
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
               BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg.get("BLOCK_N"), shared=shared,
               shared_limit=SHARED_LIMIT.get(arch), compile_s=round(secs, 2),
               cubin_bytes=len(compiled.asm["cubin"]))
    rec.update(_resource_usage(compiled.asm["cubin"]))
    rec["ok"] = rec["shared_limit"] is None or shared <= rec["shared_limit"]
    if out_dir is not None:
        stem = f"{kernel_name}_{variant_name}_sm{arch}_{dtype}_d{head_dim}"
        (out_dir / f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
        (out_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])
    return rec


def _parse_variant(name: str) -> dict:
    flags = set(name.split("+"))
    return dict(CAUSAL="causal" in flags, HAS_IDS="ids" in flags, HAS_WINDOW="window" in flags)


def _job(args):
    try:
        return compile_one(*args)
    except Exception as e:  # report, keep going
        arch, dtype, hd, kname, vname = args[:5]
        return dict(kernel=kname, arch=f"sm_{arch}", dtype=dtype, head_dim=hd, variant=vname, ok=False,
                    error=f"{type(e).__name__}: {str(e)[:2000]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--kernels", nargs="+", default=list(fa.KERNELS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="plain, full, or '+'-joined flags among causal/ids/window (e.g. ids+window)")
    ap.add_argument("--all-variants", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write cubin/ptx files and manifest.json here")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    if shutil.which("ptxas") is None and not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        print("ptxas not found (it ships with the triton wheel)", file=sys.stderr)
        return 2
    if args.all_variants:
        variants = ["+".join(n for n, on in zip(("causal", "ids", "window"), bits) if on) or "noncausal"
                    for bits in itertools.product([False, True], repeat=3)]
    else:
        variants = args.variants
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for arch, dtype, hd, kname in itertools.product(args.archs, args.dtypes, args.head_dims, args.kernels):
        for vname in (variants if kname != "bwd_preprocess" else ["plain"]):
            jobs.append((arch, dtype, hd, kname, vname, args.out))
    t0 = time.time()
    if args.jobs > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")  # compile-only: no CUDA state
        with ctx.Pool(args.jobs) as pool:
            records = pool.map(_job, jobs)
    else:
        records = [_job(j) for j in jobs]
    failed = [r for r in records if not r.get("ok")]
    for r in records:
        status = "ok  " if r.get("ok") else "FAIL"
        extra = r.get("error") or (f"shared={r['shared']}/{r['shared_limit']} regs={r.get('registers', '?')} "
                                   f"local={r.get('local', '?')} warps={r['num_warps']} stages={r['num_stages']} "
                                   f"M={r['BLOCK_M']} N={r['BLOCK_N']} {r['compile_s']}s")
        print(f"{status} {r['arch']} {r['dtype']} d{r['head_dim']} {r['kernel']:<15} {r['variant']:<18} {extra}")
    print(f"compiled {len(records) - len(failed)}/{len(records)} kernels in {time.time() - t0:.1f}s")
    if args.out is not None:
        (args.out / "manifest.json").write_text(json.dumps(records, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
