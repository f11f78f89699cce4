"""Which kernels a call runs, with which tiles: one frozen :class:`LaunchPlan` per call, built by
:func:`make_plan` from the shapes, the dtype, the tensors' alignment and the GPU (the role of
FlashAttention-3's ``tile_size.h`` / ``heuristics.h``). ``repr(plan)`` lists the kernels in launch order,
each with its tiles, loads, splits and why.

Tests and benchmarks change the choices through :func:`plan_overrides` (a context manager; it nests), never
by writing this module's settings::

    with plan_overrides(tiles={"dq": Tiles(64, 64, 4, 2)}, poison=True, observe=print):
        out = sparse_attention(q, k, v, pattern)  # prints each plan it runs
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.3: plain loads everywhere
    TensorDescriptor = None

try:  # the warp-specialised kernels for Hopper, in Gluon as of Triton 3.6 (its API moves between releases)
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 6):
        raise ImportError("the Gluon kernels are written for, and tested with, Triton 3.6")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError:  # the Triton kernels everywhere
    gl = GluonDescriptor = None

TABLE_BLOCK_M = 64  # query tile of every kernel on the table path (the tables are built for it)
DKDV_CHUNK = 8  # fewest query tiles per dK/dV program on a long column (load balance vs atomics)
DKDV_SPLITS = 4  # aim to cut the longest column into about this many chunks (H100, 8k-64k: 2 or 8 no better)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pairs: bool = False  # forward / dQ: unmasked key blocks two at a time (when block_n == pattern block)


# the warp-specialised kernels (Gluon, Hopper): tiles of 64 rows a warpgroup (two compute warpgroups and a loader
# warp, 12 warps in 64K registers: 240 a compute thread, 24 a loader); 2 stages (H100, 128k: 3 stages no faster,
# long pass 34.2-35.9 ms against 34.2-35.4, dQ 22.4-22.6 against 22.4-22.5)
WS_TILES = Tiles(64, 128, 12, 2)
WS_DQ_STAGES = 2
WS_DQ_FROM = 32768  # the Gluon dQ past this many keys (below it Triton's 64-query tiles are faster)
# the Gluon forward (off unless asked for: its GPU tests not yet passed): 128 queries (64 a warpgroup) against tiles
# of 128 keys, K and V each in a ring of 2 stages (d128: 160 KiB of shared memory; 3 stages, 224 KiB, also fit)
WS_FWD_TILES = Tiles(128, 128, 4, 2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tiles(kernel: str, block: int, head_dim: int, table: bool, itemsize: int = 2, seqlen: int = 0) -> Tiles:
    """Tile shapes per kernel. The forward and dQ read keys in tiles of ``min(block, 64)`` so a small
    pattern block wastes nothing; the dK/dV kernels set small blocks side by side in 64-key tiles
    (the long pass: 64 or 128 keys) and mask per key row; queries in tiles of 32–128, so small pattern
    blocks merge (Merge-Q). Rows wider than 512 bytes (fp32 at head_dim 256) take 32-key tiles,
    unpipelined, to fit shared memory. The two dK/dV kernels may take different query tiles: a long
    column's full tiles start at a multiple of both (``OPEN_ALIGN``). ``seqlen`` is the number of keys."""
    row_bytes = head_dim * itemsize
    if row_bytes > 512:
        return Tiles(TABLE_BLOCK_M if table else 32, min(block, 32), 4, 1)
    if kernel == "fwd" and not table and row_bytes <= 256 and block >= 64:
        # 64-query tiles, keys through TMA three deep, two programs per SM (H100, 32k: 2.12 -> 1.65 ms, 128k:
        # 20.3 -> 18.5 against 128-query tiles reading key blocks in pairs with plain loads)
        return Tiles(64, 64, 4, 3)
    if kernel == "dq" and not table and row_bytes <= 256 and block >= 64:
        if seqlen <= 32768:
            # 64-query tiles in <= 96 KiB of shared memory, two programs per SM (H100: 8k 0.40 -> 0.34 ms,
            # 32k 2.50 -> 2.19 ms)
            return Tiles(64, 64, 4, 2)
        return Tiles(128, 64, 8, 3)  # 128-query tiles, three single blocks deep (128k: 26.1 -> 23.9 ms)
    if kernel == "dkdv_long" and row_bytes <= 256:
        # columns side by side in 128-key tiles past 8k keys, 64-key tiles up to it (H100, block 64, launched
        # most work first: 128k 40.3 vs 45.3 ms, 32k 2.42-2.53 vs 2.75-2.88, 16k 0.67 vs 0.70, 8k 0.22 vs 0.18)
        block_n = 128 if seqlen > 8192 else 64
    elif kernel == "dkdv" and not table and block < 64:
        block_n = 64  # consecutive small blocks in one key tile, each query tile loaded once for all of them
    else:
        block_n = min(block, 64)
    wide = head_dim > 128
    if table:
        block_m = TABLE_BLOCK_M
    elif kernel.startswith("dkdv"):  # dK, dV accumulators stay in registers: short query tiles (H100: 73 -> 51 ms)
        block_m = 32
    else:
        block_m = 64 if (wide or block < 64) else 128
    warps = 8 if max(block_m, block_n) * max(head_dim, 64) >= 128 * 128 else 4
    stages = 2 if (wide or (kernel == "dq" and block_m == 128)) else 3
    # blocks under 64 keys: unmasked ones two at a time (block 16, 128k: forward 29.4 -> 24.2 ms); a
    # doubled key tile of 512-byte rows (fp32 d128, bf16 d256) would not fit in shared memory
    pairs = kernel in ("fwd", "dq") and not table and row_bytes <= 256
    return Tiles(block_m, block_n, warps, stages, pairs)


# --------------------------------------------------------------------------------------------- overrides
@dataclass(frozen=True)
class PlanOverrides:
    """What tests, tuning runs and users may change in the plans (empty / None: the defaults above).

    ``tiles``: kernel (``"fwd"``, ``"dq"``, ``"dkdv"``, ``"dkdv_long"``) -> :class:`Tiles`; ``use_tma``: kernel ->
    False for plain loads; ``warp_specialised``: ``"dq"`` / ``"dkdv_long"`` -> False for the Triton kernel on
    Hopper, ``"fwd"`` -> True for the Gluon forward (off by default); ``ws_tiles``, ``ws_dq_stages``,
    ``ws_dq_from``, ``ws_fwd_tiles`` (keys a tile: 64 or 128; stages), ``ws_fwd_pingpong``: the Gluon kernels'
    settings; ``dkdv_splits`` and
    ``dkdv_chunk``: how long columns are cut across programs; ``hopper``: plan as if the GPU were (not) an sm_90;
    ``poison``: outputs start as NaN, so an element no kernel writes fails a test; ``observe``: called with
    every plan made."""

    tiles: Mapping[str, Tiles] = field(default_factory=dict)
    use_tma: Mapping[str, bool] = field(default_factory=dict)
    warp_specialised: Mapping[str, bool] = field(default_factory=dict)
    ws_tiles: Tiles = WS_TILES
    ws_dq_stages: int = WS_DQ_STAGES
    ws_dq_from: int = WS_DQ_FROM
    ws_fwd_tiles: Tiles = WS_FWD_TILES
    ws_fwd_pingpong: bool = True
    dkdv_splits: int = DKDV_SPLITS
    dkdv_chunk: int = DKDV_CHUNK
    hopper: Optional[bool] = None
    poison: bool = False
    observe: Optional[Callable[["LaunchPlan"], None]] = None


_active = [PlanOverrides()]  # the innermost plan_overrides() last; read by make_plan on whatever thread runs it


@contextlib.contextmanager
def plan_overrides(**settings) -> Iterator[PlanOverrides]:
    """Plans made inside (by any thread: the autograd engine runs backward on its own) take ``settings``, fields
    of :class:`PlanOverrides`, over those of any enclosing ``plan_overrides``."""
    merged = dataclasses.replace(_active[-1], **settings)
    _active.append(merged)
    try:
        yield merged
    finally:
        _active.remove(merged)


# --------------------------------------------------------------------------------------------- the GPU
@functools.lru_cache
def _has_tma(device: torch.device) -> bool:
    """TMA descriptors: Triton 3.3+, and a Hopper or newer GPU (or the interpreter / an offline compile)."""
    return TensorDescriptor is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9)


@functools.lru_cache
def _sm90(device: torch.device) -> bool:
    """An sm_90 GPU: ``wgmma``, which the warp-specialised kernels are written in (Blackwell has not got it)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def is_hopper(device: torch.device) -> bool:
    """Whether plans take ``device`` for an sm_90 GPU (``plan_overrides(hopper=...)`` says otherwise)."""
    forced = _active[-1].hopper
    return _sm90(device) if forced is None else forced


def tma_strides(x: torch.Tensor):
    """The strides a TMA descriptor of ``x`` takes, or None where TMA cannot address it: an empty tensor (no
    queries), base or strides not 16-byte aligned (a view may not be)."""
    if x.numel() == 0:
        return None
    strides = list(x.stride())
    for i in range(x.dim() - 2, -1, -1):  # a size-1 dim's stride is arbitrary: give it one TMA accepts
        if x.shape[i] == 1:
            strides[i] = strides[i + 1] * x.shape[i + 1]
    if x.data_ptr() % 16 or any(s == 0 or s * x.element_size() % 16 for s in strides[:-1]):
        return None
    return strides


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class KernelLaunch:
    """One kernel of a plan: its tiles, whether it reads tiles through TMA, how many programs share a column
    (adding atomically when more than one), whether its warpgroups issue their products in turn (the Gluon
    forward), and why."""

    kernel: str
    tiles: Tiles
    tma: bool = False
    splits: int = 1
    why: str = ""
    pingpong: bool = False

    @property
    def warp_specialised(self) -> bool:
        return self.kernel.endswith("_ws")

    @property
    def atomic(self) -> bool:
        return self.splits > 1

    def __repr__(self) -> str:
        t = self.tiles
        loads = "TMA" if self.tma else "plain loads"
        pairs = ", key blocks in pairs" if t.pairs else ""
        split = f", {self.splits} programs a column (atomic adds)" if self.atomic else ""
        pingpong = ", ping-pong" if self.pingpong else ""
        return (f"{self.kernel}: {t.block_m}x{t.block_n} tiles, {t.num_warps} warps, {t.num_stages} stages, "
                f"{loads}{pairs}{split}{pingpong}" + (f"  ({self.why})" if self.why else ""))


@dataclass(frozen=True, repr=False)
class LaunchPlan:
    """The kernels of one forward or backward call, in launch order (None: not launched). ``chunk``: query tiles a
    dK/dV program takes on a long column; ``open_align``: where a long column's two dK/dV passes meet."""

    call: str
    fwd: Optional[KernelLaunch] = None
    dq: Optional[KernelLaunch] = None
    dkdv_long: Optional[KernelLaunch] = None
    dkdv: Optional[KernelLaunch] = None
    chunk: int = 0
    open_align: int = 0
    poison: bool = False

    @property
    def launches(self) -> list[KernelLaunch]:
        return [x for x in (self.fwd, self.dq, self.dkdv_long, self.dkdv) if x is not None]

    def __repr__(self) -> str:
        return "\n  ".join([f"LaunchPlan({self.call})"] + [repr(x) for x in self.launches])


def _tma(kernel: str, o: PlanOverrides, t: Tiles, varlen: bool, a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Whether ``kernel`` reads ``a`` and ``b`` (keys for the forward and dQ, queries for the short-column kernel)
    through TMA descriptors. Fewer registers (dQ 252 -> 186 at 32k) and faster on the H100: dQ 2.19 -> 2.12 ms at
    32k and 23.2-23.9 -> 22.5-22.8 at 128k, short columns 1.52 -> 1.45 and 6.4 -> 6.0-6.1. Not in a kernel that
    also reads key-block pairs (plain loads): the forward past 8k lost (32k 2.09 -> 2.25 ms, 128k 21.2 -> 23.2);
    nor in the long pass (128k 38.8 -> 44.8). Nor for packed sequences: a tile overhanging a sequence's end (or
    start) would read the neighbour's rows, not the zeros TMA gives past the tensor's, and P = 0 times a NaN there
    is NaN."""
    if t.pairs:
        return False, "pairs read with plain loads"
    if varlen:
        return False, "packed sequences"
    if not o.use_tma.get(kernel, True):
        return False, "overridden"
    if a.element_size() > 2:
        return False, "fp32: TMA tiles would overflow shared memory"
    if not _has_tma(a.device):
        return False, "no TMA on this Triton or GPU"
    if tma_strides(a) is None or tma_strides(b) is None:
        return False, "a view TMA cannot address"
    return True, ""


def warp_specialised_blocker(q, k, v, do, lse, varlen: bool, table: bool) -> str:
    """Why the warp-specialised kernels cannot run (empty where they can): they need Gluon of Triton 3.6, an sm_90
    GPU, a closed-form rule, no packed sequences (a TMA tile would read the neighbour's rows), 16-bit tensors, head
    dims 64 or 128, and tensors TMA can address (alignment). The forward's call has no ``do`` and ``lse`` (None)."""
    reasons = [(GluonDescriptor is None, "no Gluon (Triton 3.6)"), (table, "mask tables"),
               (varlen, "packed sequences"), (q.element_size() != 2, "not 16-bit"),
               (q.shape[-1] not in (64, 128), f"head dim {q.shape[-1]}"),
               (lse is not None and lse.stride(-1) != 1, "lse strided"), (not is_hopper(q.device), "not an sm_90 GPU")]
    for blocked, why in reasons:
        if blocked:
            return why
    if any(tma_strides(x) is None for x in (q, k, v) + (() if do is None else (do,))):
        return "a view TMA cannot address"
    return ""


def _column_chunks(max_q: int, block_m: int, deterministic: bool, o: PlanOverrides) -> tuple[int, int]:
    """Query tiles per program on one key column, and how many programs (about ``dkdv_splits``): a column
    holds at most ``cdiv(max_q, block_m) + 1`` tiles, so the split follows from the shapes (no sync)."""
    q_tiles = triton.cdiv(max_q, block_m) + 1
    chunk = 1 << 30 if deterministic else max(o.dkdv_chunk, triton.cdiv(q_tiles, o.dkdv_splits))
    return chunk, triton.cdiv(q_tiles, chunk)


def make_plan(call: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, max_q: int, max_k: int,
              varlen: bool, table: bool, do: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
              deterministic: bool = False, remap: bool = False) -> LaunchPlan:
    """The plan of a ``"forward"`` or ``"backward"`` call (the backward's needs ``do`` and ``lse``) on tensors as
    the launchers take them (4-D ``(batch, seq, heads, head_dim)`` views); ``table``: the pattern comes as mask
    tables; ``remap``: the rule through a packed key map (``s2attn.remap``). Reads the active
    :func:`plan_overrides` and calls its ``observe``."""
    o = _active[-1]
    head_dim, itemsize = q.shape[-1], q.element_size()
    form = "mask tables" if table else "remapped rule" if remap else "rule"
    what = (f"{call}, {form}, block {block}, {str(q.dtype).replace('torch.', '')}, "
            f"head dim {head_dim}, {max_q} queries, {max_k} keys{', packed' if varlen else ''}")

    def pick(kernel: str, seqlen: int = 0) -> Tiles:
        return o.tiles.get(kernel) or tiles(kernel, block, head_dim, table, itemsize, seqlen)

    if call == "forward":
        blocker = warp_specialised_blocker(q, k, v, None, None, varlen, table)
        if remap and not blocker:
            blocker = "remap: the Gluon kernels do not take the key map"
        if not blocker and o.warp_specialised.get("fwd", False):
            fwd = KernelLaunch("_attn_fwd_ws", o.ws_fwd_tiles, True, why="warp-specialised",
                               pingpong=o.ws_fwd_pingpong)
        else:
            t = pick("fwd", max_k)
            tma, why = _tma("fwd", o, t, varlen, k, v)
            gluon = (f"Triton: {blocker}" if blocker else
                     "Triton: the Gluon forward is off unless plan_overrides(warp_specialised={'fwd': True})")
            fwd = KernelLaunch("_attn_fwd", t, tma, why=", ".join(x for x in (why, gluon) if x))
        plan = LaunchPlan(what, fwd=fwd, poison=o.poison)
    else:
        blocker = warp_specialised_blocker(q, k, v, do, lse, varlen, table)
        if remap and not blocker:
            blocker = "remap: the Gluon kernels do not take the key map"
        ws_long = not blocker and o.warp_specialised.get("dkdv_long", True)
        if not blocker and o.warp_specialised.get("dq", True) and max_k > o.ws_dq_from and block >= 64:
            dq = KernelLaunch("_attn_bwd_dq_ws", Tiles(128, min(block, 64), 4, o.ws_dq_stages), True,
                              why="warp-specialised")
        else:
            t = pick("dq", max_k)
            tma, why = _tma("dq", o, t, varlen, k, v)
            if not blocker:
                why = ", ".join(x for x in (why, f"Triton: block {block}" if block < 64 else
                                            f"Triton: {max_k} keys <= {o.ws_dq_from}" if max_k <= o.ws_dq_from
                                            else "Triton: overridden") if x)
            if remap:
                why = ", ".join(x for x in (why, "remap: Triton, no Gluon kernels") if x)
            dq = KernelLaunch("_attn_bwd_dq", t, tma, why=why)
        t = pick("dkdv")
        long = None
        if table:  # table columns are split across programs instead
            chunk, splits = _column_chunks(max_q, t.block_m, deterministic, o)
            open_align = t.block_m
        elif remap:
            # no long pass: its columns sit ``stride`` absolute blocks apart, which packed keys are not (a first
            # version: a long column's query tiles all run in one dK/dV program)
            chunk, splits, open_align = 0, 1, t.block_m
        else:
            lt = o.ws_tiles if ws_long else pick("dkdv_long", max_k)
            open_align = max(lt.block_m, t.block_m)  # where a long column's two passes meet (powers of two)
            chunk, long_splits = _column_chunks(max_q, lt.block_m, deterministic, o)
            why = "warp-specialised" if ws_long else (f"Triton: {blocker}" if blocker else "Triton: overridden")
            long = KernelLaunch("_attn_bwd_dkdv_long_ws" if ws_long else "_attn_bwd_dkdv_long", lt, ws_long,
                                long_splits, why=why + (", deterministic" if deterministic else ""))
            splits = 1
        tma, why = _tma("dkdv", o, t, varlen, q, do)
        if remap:
            why = ", ".join(x for x in (why, "remap: long columns whole here, no long pass") if x)
        dkdv = KernelLaunch("_attn_bwd_dkdv", t, tma, splits, why=why)
        plan = LaunchPlan(what, dq=dq, dkdv_long=long, dkdv=dkdv, chunk=chunk, open_align=open_align,
                          poison=o.poison)
    if o.observe is not None:
        o.observe(plan)
    return plan
