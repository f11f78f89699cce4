"""Sparse attention as ``torch.library`` custom ops with autograd, and the kernel/reference dispatch.

The ops take plain tensors and ints (a pattern is lowered to its rule integers or its index
tables first, by :mod:`s2attn.lowering`), so ``torch.compile`` traces through them without graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import launch
from .lowering import lower
from .patterns import BlockPattern
from .reference import reference_attention, reference_attention_varlen
from .validation import warn_once

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def use_kernel(q: torch.Tensor) -> bool:
    """Triton on CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``), for the kernel dtypes and head
    dims up to :data:`MAX_HEAD_DIM`; else the PyTorch reference (a head dim too large for the kernels
    says so, once)."""
    if not (q.is_cuda or launch.interpreting()) or q.dtype not in KERNEL_DTYPES:
        return False
    if q.shape[-1] > MAX_HEAD_DIM:
        warn_once(f"head_dim={q.shape[-1]}", f"head_dim={q.shape[-1]}: the Triton kernels take head dims up to "
                  f"{MAX_HEAD_DIM}, so s2attn runs the PyTorch reference instead (exact, but many times slower); "
                  f"use heads of at most {MAX_HEAD_DIM} dims for the kernels")
        return False
    return True


def _unpack(t: Optional[tuple]) -> list:
    return list(t) if t is not None else [None, None, None]


def _pack(a, b, c):
    return None if a is None else (a, b, c)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
    rows_ptr: Optional[torch.Tensor], rows_idx: Optional[torch.Tensor], rows_bits: Optional[torch.Tensor],
    cols_ptr: Optional[torch.Tensor], cols_idx: Optional[torch.Tensor], cols_bits: Optional[torch.Tensor],
    rule: list[int], block: int, max_q: int, max_k: int, scale: float, causal: bool, has_dense: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. The column table, ``has_dense`` and ``deterministic`` are only for the backward."""
    return launch.forward(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, rule=rule,
                          rows=_pack(rows_ptr, rows_idx, rows_bits), block=block, scale=scale, causal=causal)


_attention_fwd = torch.library.custom_op("s2attn::attention_fwd", _forward, mutates_args=())


@_attention_fwd.register_fake
def _(q, k, v, cu_q, *args):
    lse_shape = (q.shape[2], q.shape[1]) if cu_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def _backward_grads(
    do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
    rows_ptr: Optional[torch.Tensor], rows_idx: Optional[torch.Tensor], rows_bits: Optional[torch.Tensor],
    cols_ptr: Optional[torch.Tensor], cols_idx: Optional[torch.Tensor], cols_bits: Optional[torch.Tensor],
    rule: list[int], block: int, max_q: int, max_k: int, scale: float, causal: bool, has_dense: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.backward(do, q, k, v, out, lse, dlse, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, rule=rule,
                           rows=_pack(rows_ptr, rows_idx, rows_bits), cols=_pack(cols_ptr, cols_idx, cols_bits),
                           block=block, scale=scale, causal=causal, has_dense=has_dense,
                           deterministic=deterministic)


_attention_bwd = torch.library.custom_op("s2attn::attention_bwd", _backward_grads, mutates_args=())


@_attention_bwd.register_fake
def _(do, dlse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_TENSOR_INPUTS = 11  # q, k, v, cu_q, cu_k and the six table tensors


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS], *output)
    ctx.meta = inputs[_TENSOR_INPUTS:]


def _backward(ctx, dout, dlse, grads=_attention_bwd):
    q, k, v, cu_q, cu_k, *tables, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _unit_stride(dout)  # only lse was used
    dq, dk, dv = grads(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *tables, *ctx.meta)
    return (dq, dk, dv) + (None,) * (_TENSOR_INPUTS - 3 + len(ctx.meta))


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, called directly: eager calls skip the custom
    op's dispatch, which cost ~0.7 ms of host time a call on an H100 machine (more than an 8k
    forward on the GPU). Under ``torch.compile`` the custom ops are traced instead."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient pass
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, _backward_grads)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit one along head_dim (views of packed qkv need no copy)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_call(q, k, v, pattern, cu_q, cu_k, max_q, max_k, scale, causal, deterministic):
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    head_dim = q.shape[-1]
    padded = max(16, 1 << (head_dim - 1).bit_length())
    if padded != head_dim:
        # zero columns change no score (the scale is explicit) and are sliced off the output;
        # the kernels then only ever see power-of-two head dims (80/96 unpadded stalled on an H100)
        q, k, v = (torch.nn.functional.pad(x, (0, padded - head_dim)) for x in (q, k, v))
    rule, rows, cols, has_dense = lower(pattern, max_k, q.device, causal)
    forward = _attention_fwd if torch.compiler.is_compiling() else _EagerAttention.apply
    out, lse = forward(q, k, v, cu_q, cu_k, *_unpack(rows), *_unpack(cols), rule, pattern.block_size,
                       max_q, max_k, scale, causal, has_dense, deterministic)
    return out[..., :head_dim], lse


class _RemappedAttention(torch.autograd.Function):
    """The kernels on packed keys through their block map (``launch.Remap``; see ``s2attn.remap``): eager only."""

    @staticmethod
    def forward(ctx, q, k, v, rule, block, scale, causal, has_dense, remap):
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient pass
        out, lse = launch.forward(q, k, v, cu_q=None, cu_k=None, max_q=q.shape[1], max_k=k.shape[1], rule=rule,
                                  rows=None, block=block, scale=scale, causal=causal, remap=remap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (rule, block, scale, causal, has_dense, remap)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        rule, block, scale, causal, has_dense, remap = ctx.meta
        dout = torch.zeros_like(out) if dout is None else _unit_stride(dout)
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = launch.backward(dout, q, k, v, out, lse, dlse, cu_q=None, cu_k=None, max_q=q.shape[1],
                                     max_k=k.shape[1], rule=rule, rows=None, cols=None, block=block, scale=scale,
                                     causal=causal, has_dense=has_dense, deterministic=False, remap=remap)
        return dq, dk, dv, None, None, None, None, None, None


def remapped_attention(q, k, v, pattern: BlockPattern, key_map: torch.Tensor, q_shift: int, own_first: int, *,
                       softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the kernels' remapped rule path (``bshd``, checked by ``s2attn.remap``): ``pattern`` a
    local-stride rule with ``causal`` its own, ``key_map`` ``(kv_heads, n_packed)`` packed -> absolute key block,
    ``q_shift`` and ``own_first`` as in ``launch.Remap``."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    head_dim = q.shape[-1]
    padded = max(16, 1 << (head_dim - 1).bit_length())
    if padded != head_dim:  # as in _kernel_call
        q, k, v = (torch.nn.functional.pad(x, (0, padded - head_dim)) for x in (q, k, v))
    rule, rows, _, has_dense = lower(pattern, k.shape[1], q.device, causal)
    assert rows is None, "remapped_attention: a local-stride rule with its own causality"
    remap = launch.Remap(key_map.to(device=q.device, dtype=torch.int32).contiguous(), q_shift, own_first)
    out, lse = _RemappedAttention.apply(q, k, v, rule, pattern.block_size, softmax_scale, causal, has_dense, remap)
    return out[..., :head_dim], lse


def attention(q, k, v, pattern: BlockPattern, *, softmax_scale: float, causal: bool, layout: str,
              return_lse: bool, deterministic: bool = False, force_kernel: bool = False):
    """Validated inputs in; kernel or reference out. Same results as ``reference_attention``. ``force_kernel``:
    launch the kernels whatever :func:`use_kernel` says (offline compiles, ``benchmarks/compile_sm90.py``)."""
    if not (force_kernel or use_kernel(q)):
        return reference_attention(q, k, v, pattern, softmax_scale=softmax_scale, causal=causal, layout=layout,
                                   return_lse=return_lse)
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = _kernel_call(q, k, v, pattern, None, None, q.shape[1], k.shape[1], softmax_scale, causal,
                            deterministic)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     pattern: BlockPattern, *, softmax_scale: float, causal: bool, return_lse: bool,
                     deterministic: bool = False, force_kernel: bool = False):
    """Packed sequences; validated inputs in. Same results as ``reference_attention_varlen``."""
    if not (force_kernel or use_kernel(q)):
        return reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern, softmax_scale=softmax_scale,
                                          causal=causal, return_lse=return_lse)
    q, k, v = (x.unsqueeze(0) for x in (q, k, v))
    # the maxima only size grids and tables: a generous max_seqlen_k past the pattern's length (every sequence
    # is within it, validated) is as good as that length, on the rule path and the mask path alike
    max_k = min(max_seqlen_k, pattern.max_seq_len)
    out, lse = _kernel_call(q, k, v, pattern, cu_seqlens_q, cu_seqlens_k, min(max_seqlen_q, max_k), max_k,
                            softmax_scale, causal, deterministic)
    out = out[0]
    return (out, lse) if return_lse else out
