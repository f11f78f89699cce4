"""Compile the training kernels for an H100 (sm_90) on any machine, in the configurations the
launchers pick, and print what each one uses (registers, spills, shared memory).

    python benchmarks/compile_sm90.py           # every configuration below
    python benchmarks/compile_sm90.py --quick   # the few that CI compiles

The CPU interpreter runs a kernel as Python and never calls Triton's compiler, so a construct only
the compiler rejects passes every interpreter test and fails on the GPU (seen: constexpr values
packed into a tuple and unpacked into a call lose their constexpr-ness). Triton ships ptxas, so
its whole pipeline down to a cubin runs without a GPU: here the public API runs on CPU tensors
with every kernel launch intercepted and compiled instead of run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

try:
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # no Gluon: no Gluon kernel is launched either
    GluonASTSource = None

from s2attn import ops
from s2attn.kernels.decode import decode_attention
from s2attn.kernels.plan import Tiles, interpreting, plan_overrides
from s2attn.patterns import from_mask, local_stride

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one program may use on an H100 (227 KiB)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def captured_launches(call) -> list[tuple[JITFunction, tuple, dict]]:
    """Run ``call()`` with every Triton launch recorded instead of run."""
    launches = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = real
    return launches


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict):
    """The launch compiled for sm_90, specialised as a GPU launch would be (integers equal to 1 and
    16-byte divisibility of integers and pointers), so the code is the code the GPU runs."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = GluonASTSource if fn.is_gluon() else ASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def ptxas_report(kernel) -> dict:
    """Registers and spilled bytes per thread (ptxas -v on the kernel's PTX), shared memory per program."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return dict(regs=int(regs.group(1)) if regs else -1, spill=int(spills.group(1)) if spills else 0,
                smem=kernel.metadata.shared)


def _attention(shape, dtype, pattern, **kw):
    """Forward + backward through the public op on CPU tensors (launches intercepted)."""
    b, s, h, hk, d = shape

    def call():
        q = torch.randn(b, s, h, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, s, hk, d, dtype=dtype, requires_grad=True) for _ in range(2))
        out = ops.attention(q, k, v, pattern, softmax_scale=d**-0.5, causal=pattern.causal, layout="bshd",
                            return_lse=False, force_kernel=True, **kw)
        out.backward(torch.randn_like(out))

    return call


def _forward_ws(shape, dtype, pattern, **settings):
    """The forward alone, as the warp-specialised Gluon kernel (off by default: ``plan_overrides``), with
    ``settings`` of :class:`~s2attn.kernels.plan.PlanOverrides` (its tiles, ping-pong)."""
    b, s, h, hk, d = shape

    def call():
        q = torch.randn(b, s, h, d, dtype=dtype)
        k, v = (torch.randn(b, s, hk, d, dtype=dtype) for _ in range(2))
        with plan_overrides(warp_specialised={"fwd": True}, **settings):
            ops.attention(q, k, v, pattern, softmax_scale=d**-0.5, causal=pattern.causal, layout="bshd",
                          return_lse=False, force_kernel=True)

    return call


def _packed(lens, heads, dim, dtype, pattern):
    """Forward + backward of packed sequences of lengths ``lens`` (varlen: plain loads, no TMA)."""

    def call():
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(sum(lens), heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        out = ops.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), pattern, softmax_scale=dim**-0.5,
                                   causal=pattern.causal, return_lse=False, force_kernel=True)
        out.backward(torch.randn_like(out))

    return call


def _remapped(heads, kv_heads, dtype, pattern, own=4, outside=(0, 3, 6, 9, 10, 11)):
    """Forward + backward on packed keys through a key block map (``s2attn.remap``): a chunk's ``own`` blocks
    after the ``outside`` ones it reads, the kernels' remapped rule path."""
    B = pattern.block_size

    def call():
        first = outside[-1] + 1
        row = list(outside) + list(range(first, first + own))
        key_map = torch.tensor([row] * kv_heads, dtype=torch.int32)
        n, d = len(row), 128
        q = torch.randn(1, own * B, heads, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, n * B, kv_heads, d, dtype=dtype, requires_grad=True) for _ in range(2))
        out, _ = ops.remapped_attention(q, k, v, pattern, key_map, first - len(outside), len(outside),
                                        softmax_scale=d**-0.5, causal=pattern.causal)
        out.backward(torch.randn_like(out))

    return call


def _decode(block, head_dim, dtype, group=4, kv_heads=2, batch=3):
    """One decode step over a paged cache of ``block``-token pages (closed-form rule)."""

    def call():
        q = torch.randn(batch, kv_heads * group, head_dim, dtype=dtype)
        k, v = (torch.randn(8, block, head_dim, dtype=dtype) for _ in range(2))
        table = torch.zeros(batch, kv_heads, 4, dtype=torch.int32)
        first, dense = (torch.zeros(kv_heads, dtype=torch.int32) for _ in range(2))
        decode_attention(q, k, v, table, torch.full((batch,), 3 * block, dtype=torch.int32),
                         torch.arange(batch, dtype=torch.int32), torch.empty_like(q), torch.empty(batch, q.shape[1]),
                         softmax_scale=head_dim**-0.5, rule=(first, dense, 2, 3), block_mask=None, force_kernel=True)

    return call


def configurations(quick: bool):
    s = 1024
    yield "default (bf16, d128, block 64)", _attention((1, s, 4, 4, 128), torch.bfloat16, local_stride(4, s, 64, 8, 16))
    long = 65536  # past 32k keys the launchers pick bigger tiles
    yield "default at 64k keys", _attention((1, long, 2, 2, 128), torch.bfloat16, local_stride(2, long, 64, 8, 16))
    yield "block 16, GQA", _attention((1, s, 4, 2, 128), torch.bfloat16, local_stride(4, s, 16, 32, 16, num_kv_heads=2))
    yield "mask tables", _attention((1, s, 2, 2, 128), torch.bfloat16,
                                    from_mask(torch.rand(s // 64, s // 64) < 0.3, 64))
    yield "bf16, d256", _attention((1, s, 2, 2, 256), torch.bfloat16, local_stride(2, s, 64, 2, 4))
    yield "bf16, d128, block 256", _attention((1, s, 2, 2, 128), torch.bfloat16, local_stride(2, 4 * s, 256, 2, 3))
    yield "bidirectional, dense heads", _attention(
        (1, s, 4, 2, 128), torch.bfloat16, local_stride(4, s, 64, 2, 4, num_kv_heads=2, num_dense_heads=1,
                                                        causal=False))
    yield "remapped keys (context parallel chunk), block 64", _remapped(4, 4, torch.bfloat16,
                                                                        local_stride(4, s, 64, 2, 3))
    yield "remapped keys, block 16, GQA, bidirectional", _remapped(
        4, 2, torch.bfloat16, local_stride(4, s, 16, 2, 3, num_kv_heads=2, causal=False))
    # the Gluon forward (off by default) at every block and head dim it takes, causal and bidirectional
    fwd_ws = [(64, 128, True), (16, 64, False)] if quick else [
        (block, dim, causal) for block in (16, 32, 64, 128, 256) for dim in (128, 64) for causal in (True, False)]
    for block, dim, causal in fwd_ws:
        yield f"Gluon forward, block {block}, d{dim}{'' if causal else ', bidirectional'}", _forward_ws(
            (1, s, 4, 2, dim), torch.bfloat16, local_stride(4, s, block, 2, 3, num_kv_heads=2, num_dense_heads=1,
                                                            causal=causal))
    # decode: the serving default, and the largest pages (read in pieces that fit shared memory)
    yield "decode bf16, d128, page 64", _decode(64, 128, torch.bfloat16)
    for block, head_dim in ((128, 256), (256, 128), (256, 256)):
        for dtype in (torch.bfloat16, torch.float32):
            yield f"decode {str(dtype)[6:]}, d{head_dim}, page {block}", _decode(block, head_dim, dtype)
    if quick:
        return
    yield "fp16, d64, block 128", _attention((1, s, 2, 2, 64), torch.float16, local_stride(2, s, 128, 2, 4))
    yield "fp32, d128", _attention((1, s, 2, 2, 128), torch.float32, local_stride(2, s, 64, 2, 4))
    yield "packed sequences (varlen)", _packed([700, 1024, 300], 2, 128, torch.bfloat16,
                                               local_stride(2, 1024, 64, 2, 4))
    yield "Gluon forward, 3 stages, fp16", _forward_ws((1, s, 2, 2, 128), torch.float16, local_stride(2, s, 64, 2, 4),
                                                       ws_fwd_tiles=Tiles(128, 128, 4, 3))
    yield "Gluon forward, 64-key tiles, no ping-pong", _forward_ws(
        (1, s, 2, 2, 128), torch.bfloat16, local_stride(2, s, 64, 2, 4), ws_fwd_tiles=Tiles(128, 64, 4, 3),
        ws_fwd_pingpong=False)
    yield "deterministic, block 32", _attention((1, s, 2, 2, 128), torch.bfloat16, local_stride(2, s, 32, 4, 8),
                                                deterministic=True)


def main(argv=None) -> int:
    if interpreting():
        sys.exit("compile_sm90: unset TRITON_INTERPRET (the interpreter never compiles)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the configurations CI compiles")
    a = ap.parse_args(argv)
    failed = 0
    print("| configuration | kernel | warps | stages | registers | spilled bytes | shared KiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    # CPU tensors, kernels launched (force_kernel) and intercepted; planned as for an H100 (Gluon kernels included)
    with plan_overrides(hopper=True):
        for name, call in configurations(a.quick):
            for fn, args, kwargs in captured_launches(call):
                t0 = time.time()
                try:
                    r = ptxas_report(compile_launch(fn, args, kwargs))
                    if r["smem"] > SMEM_LIMIT:
                        raise RuntimeError(f"needs {r['smem']} bytes of shared memory, the H100 has {SMEM_LIMIT}")
                except Exception as e:  # report every failing kernel, not just the first
                    failed += 1
                    print(f"| {name} | {fn.__name__} | FAILED: {str(e).splitlines()[0][:200]} |", flush=True)
                    continue
                print(f"| {name} | {fn.__name__} | {kwargs.get('num_warps')} | {kwargs.get('num_stages')} | "
                      f"{r['regs']} | {r['spill']} | {r['smem'] / 1024:.0f} | {time.time() - t0:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
