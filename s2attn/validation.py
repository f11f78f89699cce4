"""Input checks for the public API: each raises an error naming the argument, its value and what was expected.

Every function here is small and independent so that the API (and later the kernel layer) can
compose exactly the checks it needs. Shape checks never touch tensor data; only the
``cu_seqlens`` checks read values (one small host copy).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch

from .patterns import BlockPattern

LAYOUTS = ("bshd", "bhsd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Dims:
    """Sizes read off ``q``, ``k``, ``v`` (for varlen, ``batch`` is the number of sequences and the
    ``seqlen`` fields are the longest sequence)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int


_WARNED: set[str] = set()  # keys of the warnings given in this process


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` comes up in this process: for a fallback that
    is correct but not what the user asked for, said once rather than at every call."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def forget_warnings() -> None:
    """Let every :func:`warn_once` warning be given again (tests that check one)."""
    _WARNED.clear()


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_dim(name: str, x: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)} ({x.dim()}-D): expected {ndim}-D {shape_doc}")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    return layout  # type: ignore[return-value]


def check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q in fp16/bf16/fp32/fp64 (fp64 on the CPU only), and k, v of the same dtype."""
    if q.dtype not in DTYPES:
        raise TypeError(f"q.dtype={q.dtype}: expected one of {', '.join(map(str, DTYPES))}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={x.dtype}: expected the dtype of q ({q.dtype})")
    if q.dtype == torch.float64 and q.device.type != "cpu":
        raise TypeError(f"q.dtype=torch.float64 on device {q.device}: float64 is supported on the CPU only "
                        f"(use float32, bfloat16 or float16 on {q.device.type})")


def check_devices(q: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.device != q.device:
            raise ValueError(f"{name} is on device {x.device}: expected the device of q ({q.device})")


def check_softmax_scale(softmax_scale: object) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale={softmax_scale!r}: expected None or a positive finite float")
    # compared, not math.isfinite: under torch.compile a new scale can arrive as a symbolic float (NaN fails both)
    if not 0 < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale={softmax_scale!r}: expected None or a positive finite float")


def check_flag(name: str, value: object, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    raise TypeError(f"{name}={value!r}: expected {'None or ' if allow_none else ''}a bool")


def check_pattern(pattern: object, heads: int | None = None, seqlen_k: int | None = None) -> BlockPattern:
    """A :class:`BlockPattern`, covering ``heads`` query heads and keys up to ``seqlen_k`` when given."""
    if not isinstance(pattern, BlockPattern):
        raise TypeError(f"pattern: expected an s2attn.BlockPattern, got {type(pattern).__name__}")
    if heads is not None:
        pattern.check_heads(heads, "q heads")
    if seqlen_k is not None:
        pattern.check_seq_len(seqlen_k, "seqlen_k")
    return pattern


def check_qkv_sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, s_axis: int | None, h_axis: int) -> Dims:
    """Compare batch (axis 0 unless varlen), sequence, head and head_dim sizes of q, k and v.

    ``s_axis`` is the sequence axis (``None`` for packed varlen tensors, whose token counts are
    checked against ``cu_seqlens`` instead), ``h_axis`` the head axis; head_dim is last.
    """
    if s_axis is not None:
        for name, x in (("k", k), ("v", v)):
            if x.shape[0] != q.shape[0]:
                raise ValueError(f"{name}.shape={tuple(x.shape)}: batch {x.shape[0]} differs from q's "
                                 f"{q.shape[0]} (q.shape={tuple(q.shape)})")
        if v.shape[s_axis] != k.shape[s_axis]:
            raise ValueError(f"v.shape={tuple(v.shape)}: seqlen {v.shape[s_axis]} differs from k's "
                             f"{k.shape[s_axis]} (k.shape={tuple(k.shape)})")
    elif v.shape[0] != k.shape[0]:
        raise ValueError(f"v.shape={tuple(v.shape)}: total_k {v.shape[0]} differs from k's {k.shape[0]}")
    for name, x in (("k", k), ("v", v)):
        if x.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name}.shape={tuple(x.shape)}: head_dim {x.shape[-1]} differs from q's "
                             f"{q.shape[-1]} (q.shape={tuple(q.shape)})")
    if q.shape[-1] < 1:
        raise ValueError(f"q.shape={tuple(q.shape)}: head_dim must be at least 1")
    heads, kv_heads = q.shape[h_axis], k.shape[h_axis]
    if v.shape[h_axis] != kv_heads:
        raise ValueError(f"v.shape={tuple(v.shape)}: kv_heads {v.shape[h_axis]} differs from k's {kv_heads}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads and k, v have {kv_heads}: expected heads to be a positive "
                         f"multiple of kv_heads (GQA/MQA)")
    if s_axis is None:
        return Dims(batch=0, seqlen_q=0, seqlen_k=0, heads=heads, kv_heads=kv_heads, head_dim=q.shape[-1])
    seqlen_q, seqlen_k = q.shape[s_axis], k.shape[s_axis]
    check_seqlens("seqlen_q", seqlen_q, "seqlen_k", seqlen_k)
    return Dims(batch=q.shape[0], seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads,
                head_dim=q.shape[-1])


def check_seqlens(name_q: str, seqlen_q: int, name_k: str, seqlen_k: int) -> None:
    if seqlen_q > seqlen_k:
        raise ValueError(f"{name_q}={seqlen_q} > {name_k}={seqlen_k}: queries are aligned to the end of the keys, "
                         f"so there must be at least as many keys as queries")


_BOUNDS: dict[int, tuple] = {}  # id(cu_seqlens) -> (weak reference, in-place version, boundaries)


def boundaries(cu: torch.Tensor) -> list[int]:
    """``cu.tolist()``, read once per tensor and in-place version: a model passes the same
    ``cu_seqlens`` to every layer, and each read from a GPU waits for it (a host sync). Tensors made
    under ``torch.inference_mode`` (vLLM's) keep no version counter: they are read every time."""
    if cu.is_inference():
        return cu.tolist()
    seen = _BOUNDS.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == cu._version:
        return seen[2]
    if seen is None or seen[0]() is not cu:
        weakref.finalize(cu, _BOUNDS.pop, id(cu), None)  # forget it with the tensor
    bounds = cu.tolist()
    _BOUNDS[id(cu)] = (weakref.ref(cu), cu._version, bounds)
    return bounds


def check_cu_seqlens(name: str, cu_seqlens: object, total: int, device: torch.device) -> list[int]:
    """``cu_seqlens``: int32, 1-D ``(batch + 1,)``, starts at 0, non-decreasing, ends at ``total``.

    Returns the boundaries as a Python list (one small device-to-host copy per tensor, see
    :func:`boundaries`).
    """
    cu = check_tensor(name, cu_seqlens)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}.dtype={cu.dtype}: expected torch.int32")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name}.shape={tuple(cu.shape)}: expected 1-D (batch + 1,) with batch >= 1")
    if cu.device != device:
        raise ValueError(f"{name} is on device {cu.device}: expected the device of q ({device})")
    bounds = boundaries(cu)
    if bounds[0] != 0:
        raise ValueError(f"{name}[0]={bounds[0]}: expected 0")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(f"{name}[{i}]={bounds[i]} < {name}[{i - 1}]={bounds[i - 1]}: expected non-decreasing")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1]={bounds[-1]}: expected the number of packed tokens, {total}")
    return bounds


def check_max_seqlen(name: str, value: object, lengths: list[int]) -> None:
    actual = max(lengths)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected an int >= the longest sequence ({actual})")
    if value < actual:
        raise ValueError(f"{name}={value} is smaller than the longest sequence ({actual})")


def check_attention_inputs(q: object, k: object, v: object, pattern: object, *, softmax_scale: object,
                           causal: object, layout: object, return_lse: object) -> Dims:
    """All checks for :func:`s2attn.sparse_attention`."""
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    layout = check_layout(layout)
    shape_doc = "(batch, seqlen, heads, head_dim)" if layout == "bshd" else "(batch, heads, seqlen, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dim(name, x, 4, f"{shape_doc} for layout={layout!r}")
    check_dtypes(q, k, v)
    check_devices(q, k=k, v=v)
    s_axis, h_axis = (1, 2) if layout == "bshd" else (2, 1)
    dims = check_qkv_sizes(q, k, v, s_axis=s_axis, h_axis=h_axis)
    check_pattern(pattern, dims.heads, dims.seqlen_k)
    check_softmax_scale(softmax_scale)
    check_flag("causal", causal, allow_none=True)
    check_flag("return_lse", return_lse)
    return dims


def check_varlen_inputs(q: object, k: object, v: object, cu_seqlens_q: object, cu_seqlens_k: object,
                        max_seqlen_q: object, max_seqlen_k: object, pattern: object, *, softmax_scale: object,
                        causal: object, return_lse: object) -> Dims:
    """All checks for :func:`s2attn.sparse_attention_varlen`."""
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    for name, x, total in (("q", q, "total_q"), ("k", k, "total_k"), ("v", v, "total_k")):
        check_dim(name, x, 3, f"({total}, heads, head_dim) for varlen")
    check_dtypes(q, k, v)
    check_devices(q, k=k, v=v)
    dims = check_qkv_sizes(q, k, v, s_axis=None, h_axis=1)
    bounds_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    bounds_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q has {len(bounds_q)} entries and cu_seqlens_k {len(bounds_k)}: "
                         f"expected the same number of sequences")
    lens_q = [b - a for a, b in zip(bounds_q, bounds_q[1:])]
    lens_k = [b - a for a, b in zip(bounds_k, bounds_k[1:])]
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        check_seqlens(f"sequence {i}: seqlen_q", lq, "seqlen_k", lk)
    check_max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
    dims = Dims(batch=len(lens_q), seqlen_q=max(lens_q), seqlen_k=max(lens_k), heads=dims.heads,
                kv_heads=dims.kv_heads, head_dim=dims.head_dim)
    check_pattern(pattern, dims.heads, dims.seqlen_k)
    check_softmax_scale(softmax_scale)
    check_flag("causal", causal, allow_none=True)
    check_flag("return_lse", return_lse)
    return dims
