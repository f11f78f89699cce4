"""Hugging Face ``transformers`` integration: ``attn_implementation="s2attn"``.

Call :func:`register` once, then build or load any Llama-family model (Llama, Mistral,
Qwen2, Qwen3) with ``attn_implementation="s2attn"``. The per-layer settings live in the
model config as a plain dict, so they are saved and loaded with it::

    config.s2attn = {"block_size": 64, "local_blocks": 8, "vert_stride": 16,
                     "dense_layers": [0], "homogeneous": False, "num_dense_heads": 0}

Keys (all optional, defaults in :data:`DEFAULTS`): ``block_size``, ``local_blocks``,
``vert_stride``, ``homogeneous``, ``num_dense_heads``, ``head_step``, ``head_offset`` are the
arguments of :func:`s2attn.local_stride`; ``dense_layers`` lists layers that attend densely
(through PyTorch SDPA); ``layer_overrides`` maps a layer index (a string, as JSON keys are)
to a dict of settings that replace the global ones for that layer.

Semantics, per batch row:

* no padding: query ``i`` of ``seqlen_q`` sits at position ``seqlen_k - seqlen_q + i`` (so the
  default ``DynamicCache`` works for ``generate``);
* a 2-D padding mask (left padding, or right padding without a cache) is honoured by packing
  the real tokens and calling :func:`s2attn.sparse_attention_varlen`: each row is attended as
  if it were alone, positions counted from its first real token (the ``position_ids`` that
  ``generate`` computes); padded query rows get output 0;
* packed batches (``position_ids`` that restart, or flash-attention ``cu_seq_lens_q`` /
  ``cu_seq_lens_k`` from ``DataCollatorWithFlattening``) go through the varlen path too;
* generation works with the default ``DynamicCache`` (every past token kept) and with
  :class:`S2Cache`, which keeps per kv head only the key blocks its pattern will read again
  (:class:`s2attn.inference.SparseKVCache`, prefill + paged decode kernel).

Everything else (static caches, sliding windows, attention dropout, soft-capping, masks
with holes, right padding during generation, beam search with :class:`S2Cache`) raises an
error that names the argument; sliding windows and soft-capping in the config already when
an HHST config (:func:`s2attn.models.hhst_config`) or an :class:`S2Cache` is built.
``transformers`` does not save ``attn_implementation``: pass it again to ``from_pretrained``
(after :func:`register`). After :func:`register`, a model whose config carries ``s2attn``
settings but runs ``"sdpa"`` (dense) warns once at its first forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from ..api import sparse_attention, sparse_attention_varlen
from ..coverage import warn_if_incomplete
from ..patterns import BlockPattern, dense, local_stride
from ..validation import boundaries, warn_once

NAME = "s2attn"
DEFAULTS: dict[str, Any] = {
    "block_size": 64,
    "local_blocks": 8,
    "vert_stride": 16,
    "homogeneous": False,
    "num_dense_heads": 0,
    "head_step": None,
    "head_offset": 0,
    "dense_layers": [],
    "layer_overrides": {},
}
_PATTERN_KEYS = ("block_size", "local_blocks", "vert_stride", "homogeneous", "num_dense_heads", "head_step",
                 "head_offset")


# ---------------------------------------------------------------------------------------------- settings
def s2attn_settings(config) -> dict[str, Any]:
    """The validated ``config.s2attn`` dict merged over :data:`DEFAULTS` (a new dict)."""
    given = getattr(config, NAME, None) or {}
    if not isinstance(given, dict):
        raise TypeError(f"config.{NAME}={given!r}: expected a dict of settings")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.{NAME} has unknown keys {unknown}; expected some of {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **given}
    layers = config.num_hidden_layers
    dense_layers = settings["dense_layers"]
    if not all(isinstance(i, int) and 0 <= i < layers for i in dense_layers):
        raise ValueError(f"config.{NAME}['dense_layers']={dense_layers!r}: expected layer indices in [0, {layers})")
    for key, override in settings["layer_overrides"].items():
        bad = sorted(set(override) - set(_PATTERN_KEYS))
        if not str(key).isdigit() or int(key) >= layers or bad:
            raise ValueError(f"config.{NAME}['layer_overrides'][{key!r}]={override!r}: expected a layer index in "
                             f"[0, {layers}) mapping to some of {list(_PATTERN_KEYS)}")
    return settings


def check_model_config(config) -> None:
    """Refuse the attention settings of ``config`` that s2attn cannot honour (sliding windows, soft-capping),
    so that they fail when a model config or cache is built rather than at the first forward."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is not None and (not layer_types or "sliding_attention" in layer_types):
        raise ValueError(f"config.sliding_window={window!r}: attn_implementation={NAME!r} has no sliding window (its "
                         f"local window is local_blocks); set config.sliding_window=None")
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is not None:
        raise ValueError(f"config.attn_logit_softcapping={cap!r}: attn_implementation={NAME!r} does not soft-cap "
                         f"attention scores; set it to None")


def layer_pattern(config, layer_idx: int, seq_len: int, causal: bool = True) -> BlockPattern | None:
    """The pattern of layer ``layer_idx`` valid up to ``seq_len`` tokens, or ``None`` for a dense layer.

    Patterns are closed-form rules (nothing quadratic is allocated) and cached per
    (layer settings, heads, length bucket), so the kernels' index tables are built once.
    """
    settings = s2attn_settings(config)
    if layer_idx in settings["dense_layers"]:
        return None
    layer = {k: settings[k] for k in _PATTERN_KEYS}
    layer.update(settings["layer_overrides"].get(str(layer_idx), {}))
    return _cached_pattern(config.num_attention_heads, config.num_key_value_heads, layer_pattern_len(config, seq_len),
                           causal, tuple(sorted(layer.items())))


def layer_pattern_len(config, seq_len: int) -> int:
    """The ``max_seq_len`` patterns are built for: the config's maximum, or the next power of two."""
    return max(int(getattr(config, "max_position_embeddings", 0) or 0), 1 << max(seq_len - 1, 0).bit_length())


@functools.lru_cache(maxsize=256)
def _cached_pattern(heads: int, kv_heads: int, max_len: int, causal: bool, layer: tuple) -> BlockPattern:
    s = dict(layer)
    pattern = local_stride(heads, max_len, s["block_size"], s["local_blocks"], s["vert_stride"], num_kv_heads=kv_heads,
                           homogeneous=s["homogeneous"], num_dense_heads=s["num_dense_heads"],
                           head_step=s["head_step"], head_offset=s["head_offset"], causal=causal)
    warn_if_incomplete(pattern, f"config.{NAME} with {heads} heads / {kv_heads} kv heads")
    return pattern


@functools.lru_cache(maxsize=64)
def _dense_pattern(max_len: int, block_size: int, causal: bool) -> BlockPattern:
    return dense(max_len, block_size, causal=causal)


# ---------------------------------------------------------------------------------------------- masks
def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry for ``"s2attn"``: the 2-D bool padding mask
    ``(batch, kv_length)``, or ``None`` when no token is padded (the pattern does the rest)."""
    if kv_offset != 0 or int(q_offset) + q_length != kv_length:
        raise ValueError(f"past_key_values: s2attn supports the default DynamicCache and S2Cache; got "
                         f"kv_length={kv_length}, kv_offset={kv_offset} for {int(q_offset)} past and {q_length} new "
                         f"tokens (a static or sliding-window cache?)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, expected kv_length={kv_length}")
    return None if bool(attention_mask.all()) else attention_mask


def _check_padding(mask: torch.Tensor, right_padding_ok: bool) -> torch.Tensor:
    """Check that each row of a ``(batch, seqlen_k)`` padding mask is one run of real tokens that ends
    at the last key (left padding) or, if ``right_padding_ok``, anywhere; returns the bool mask."""
    mask = mask.to(torch.bool)
    seqlen_k = mask.shape[1]
    count = mask.sum(1)
    first = mask.to(torch.int8).argmax(1)
    last = seqlen_k - 1 - mask.flip(1).to(torch.int8).argmax(1)
    contiguous = (count == 0) | (last - first + 1 == count)
    tail = (count == 0) | (last == seqlen_k - 1) | right_padding_ok
    if not bool((contiguous & tail).all()):
        raise ValueError("attention_mask: each row must be one run of real tokens (left padding, or right padding "
                         "when queries and keys are the same tokens); use padding_side='left' for generation")
    return mask


def _segments_from_padding(mask: torch.Tensor, seqlen_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """Row indices of the real query / key tokens of a ``(batch, seqlen_k)`` padding mask, and their cu_seqlens."""
    mask = _check_padding(mask, right_padding_ok=seqlen_q == mask.shape[1])
    count = mask.sum(1)
    q_mask = mask[:, -seqlen_q:]
    q_idx = q_mask.reshape(-1).nonzero().squeeze(1)
    k_idx = mask.reshape(-1).nonzero().squeeze(1)
    cu_q = F.pad(q_mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(count.cumsum(0), (1, 0)).to(torch.int32)
    return q_idx, k_idx, cu_q, cu_k


def _segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens of a packed row (positions restart at each new sequence), or ``None`` if not packed."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    if not bool(starts[1:].any()):
        return None
    return F.pad(starts.nonzero().squeeze(1), (0, 1), value=pos.numel()).to(torch.int32)


# ---------------------------------------------------------------------------------------------- attention
def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """Dense attention with end-aligned queries, ``(b, h, sq, d)`` in and out, through PyTorch SDPA."""
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if causal and 1 < sq < sk:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and sq == sk > 1, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _refuse_unsupported(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    if dropout:
        raise ValueError(f"dropout={dropout}: s2attn has no attention dropout; set config.attention_dropout=0")
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r}: not supported by attn_implementation='s2attn' "
                             f"(the sparse pattern replaces sliding windows); set it to None in the config")
    if getattr(module, "layer_idx", None) is None or getattr(module, "config", None) is None:
        raise ValueError(f"module {type(module).__name__}: s2attn needs an attention module with .layer_idx and "
                         f".config (Llama-family models)")


def s2attn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry for ``"s2attn"``.

    ``query (batch, heads, seqlen_q, d)``, ``key, value (batch, kv_heads, seqlen_k, d)``,
    ``attention_mask`` the 2-D padding mask from :func:`padding_mask` or ``None``. Returns
    ``(out (batch, seqlen_q, heads, d), None)``.
    """
    _refuse_unsupported(module, dropout, kwargs)
    owner = getattr(key, _CACHE_TAG, None)
    if owner is not None:
        return owner.attend(module.layer_idx, query, key, value, attention_mask, scaling), None
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    pattern = layer_pattern(module.config, module.layer_idx, seqlen_k, causal)
    varlen = _varlen_plan(query, key, attention_mask, kwargs)
    if varlen is None:
        if pattern is None:
            out = _dense_sdpa(query, key, value, scaling, causal)
        else:
            out = sparse_attention(query, key, value, pattern, softmax_scale=scaling, causal=causal, layout="bhsd")
        return out.transpose(1, 2), None

    q_idx, k_idx, cu_q, cu_k = varlen
    if pattern is None:
        block = s2attn_settings(module.config)["block_size"]
        pattern = _dense_pattern(layer_pattern_len(module.config, seqlen_k), block, causal)
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (query, key, value))
    q, k, v = q.index_select(0, q_idx), k.index_select(0, k_idx), v.index_select(0, k_idx)
    # the longest sequences, from the boundaries as validation reads them (once per tensor, not per layer)
    max_q, max_k = (max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
                    for bounds in (boundaries(cu_q), boundaries(cu_k)))
    packed = sparse_attention_varlen(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k, pattern,
                                     softmax_scale=scaling, causal=causal)
    out = packed.new_zeros(query.shape[0] * seqlen_q, query.shape[1], query.shape[3])
    out = out.index_copy(0, q_idx, packed)
    return out.view(query.shape[0], seqlen_q, query.shape[1], query.shape[3]), None


def _varlen_plan(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict):
    """``(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k)`` over the flattened ``(batch * seq)`` rows when
    the batch is padded or packed, else ``None``."""
    batch, seqlen_q, seqlen_k = query.shape[0], query.shape[2], key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is None and position_ids is not None and batch == 1 and seqlen_q == seqlen_k > 1:
        cu_q = _segments_from_positions(position_ids)
    if cu_q is None:
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, seqlen_k):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: s2attn expects the 2-D padding "
                             f"mask ({batch}, {seqlen_k}); custom 4-D masks are not supported")
        return _segments_from_padding(attention_mask, seqlen_q)
    if attention_mask is not None:
        raise ValueError("attention_mask: a padding mask together with packed sequences (cu_seq_lens_q or restarting "
                         "position_ids) is not supported; pack without padding")
    if seqlen_q != seqlen_k:
        raise ValueError(f"cu_seq_lens_q: packed sequences need as many queries as keys, got seqlen_q={seqlen_q}, "
                         f"seqlen_k={seqlen_k} (packing with a KV cache is not supported)")
    cu_k = cu_q if cu_k is None else cu_k
    bounds_q, bounds_k = boundaries(cu_q), boundaries(cu_k)  # read once per tensor, not once per layer
    if bounds_q != bounds_k or bounds_q[-1] != batch * seqlen_q:
        raise ValueError(f"cu_seq_lens_q={bounds_q}, cu_seq_lens_k={bounds_k}: expected equal boundaries "
                         f"ending at batch * seq_len = {batch * seqlen_q}")
    rows = torch.arange(batch * seqlen_q, device=query.device)
    return rows, rows, cu_q.to(torch.int32), cu_k.to(torch.int32)


# ---------------------------------------------------------------------------------------------- sparse cache
_CACHE_TAG = "_s2attn_cache"  # attribute S2Cache puts on the keys it hands to the attention function


class _S2Layer(CacheLayerMixin):
    """One layer's view of an :class:`S2Cache`: the owner counts tokens; the paged cache holds them."""

    supports_early_init = False

    def __init__(self, owner: S2Cache, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # The new keys go back to the attention function tagged with their cache: it writes them to the
        # pages and attends there (only it sees the padding mask that says which tokens are real).
        if self.index == 0:
            self.owner._new_forward(key_states.shape[2])
        setattr(key_states, _CACHE_TAG, self.owner)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return self.owner.max_seq_len

    def reset(self) -> None:
        """Nothing per layer: :meth:`S2Cache.reset` forgets the sequences."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("S2Cache does not support beam search (reorder_cache); use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("S2Cache cannot crop: evicted blocks are gone (no assisted decoding)")


class S2Cache(Cache):
    """A ``transformers`` Cache backed by :class:`s2attn.inference.SparseKVCache`.

    Each kv head keeps only the key blocks its pattern will still read, so decode memory in a
    sparse layer is about ``local + context / stride`` tokens per head. Use it with
    ``attn_implementation="s2attn"``::

        cache = S2Cache.for_model(model, max_batch_size=len(prompts), max_seq_len=4096)
        model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=...)

    Prefill goes through :func:`s2attn.inference.prefill` (left padding honoured), one-token steps
    through the paged decode kernel (the PyTorch reference off CUDA, as everywhere in s2attn).
    ``num_pages`` (per layer, or one number) defaults to what ``max_batch_size`` sequences of
    ``max_seq_len`` tokens can need, and may not be less: a sequence that would pass ``max_seq_len``
    is refused (``ValueError``) before its step changes anything, never "out of pages" part-way.
    Each forward is one cache step: one that fails part-way (an error between two layers) is undone
    when the next forward starts. Beam search and assisted decoding are refused. The paged cache
    itself is ``self.kv``.
    """

    def __init__(self, config, *, max_batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 num_pages: int | list[int] | None = None):
        from ..inference import SparseKVCache, kv_blocks_kept

        if config._attn_implementation != NAME:
            raise ValueError(f"config._attn_implementation={config._attn_implementation!r}: S2Cache needs a model "
                             f"built with attn_implementation={NAME!r}")
        check_model_config(config)
        layers = config.num_hidden_layers
        self.max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len!r}: expected a positive int (default: "
                             f"config.max_position_embeddings)")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        block = s2attn_settings(config)["block_size"]
        patterns = [layer_pattern(config, i, self.max_seq_len) or
                    _dense_pattern(layer_pattern_len(config, self.max_seq_len), block, True) for i in range(layers)]
        # blocks a sequence keeps at the longest length, plus the one being filled, per kv head
        need = [max_batch_size * int(kv_blocks_kept(p, heads, kv_heads, self.max_seq_len).sum() + kv_heads)
                for p in patterns]
        pages = need if num_pages is None else [num_pages] * layers if isinstance(num_pages, int) else list(num_pages)
        for layer, (have, want) in enumerate(zip(pages, need)):
            if have < want:
                raise ValueError(f"num_pages={num_pages!r}: layer {layer} gets {have} pages, but {max_batch_size} "
                                 f"sequences of max_seq_len={self.max_seq_len} tokens can need {want}; give at least "
                                 f"that many (the default), or a smaller max_seq_len")
        self.kv = SparseKVCache(patterns, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                num_pages=pages, max_seqs=max_batch_size, dtype=dtype, device=device,
                                max_seq_len=self.max_seq_len)
        self.slots: list[int] = []
        self._plans: dict = {}
        self._padded = False
        self._seen = 0  # columns (padding included) of the forwards that completed every layer
        self._open: int | None = None  # columns of the forward in progress
        self._attended: set[int] = set()  # its layers that wrote and attended
        super().__init__(layers=[_S2Layer(self, i) for i in range(layers)])

    @classmethod
    def for_model(cls, model, *, max_batch_size: int, max_seq_len: int | None = None,
                  num_pages: int | list[int] | None = None) -> S2Cache:
        """A cache for ``model``'s config, parameter dtype and device."""
        p = next(model.parameters())
        return cls(model.config, max_batch_size=max_batch_size, max_seq_len=max_seq_len, dtype=p.dtype,
                   device=p.device, num_pages=num_pages)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """Write the new keys/values of ``layer`` and attend over the cache: ``query (b, h, s, d)``,
        ``key, value (b, hk, s, d)`` (the step's new tokens only). Returns ``(b, s, h, d)``."""
        from ..inference import append, decode, prefill, prefill_padded

        batch, heads, seqlen_q, d = query.shape
        if layer == 0:
            self._begin_step(batch, seqlen_q, attention_mask)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if seqlen_q == 1:
            append(self.kv, layer, k[:, 0].contiguous(), v[:, 0].contiguous())
            out = decode(self.kv, layer, q[:, 0].contiguous(), plan=self._plan(batch, scaling))[:, None].clone()
        elif self._padded:
            out = prefill_padded(self.kv, layer, q, k, v, padding_side="left", softmax_scale=scaling)
        else:
            out = prefill(self.kv, layer, q.reshape(-1, heads, d), k.reshape(-1, k.shape[2], d),
                          v.reshape(-1, v.shape[2], d), softmax_scale=scaling).view(batch, seqlen_q, heads, d)
        self._attended.add(layer)
        return out

    @property
    def seen(self) -> int:
        """Columns (padding included) of the forwards that completed every layer: what transformers
        counts as cached. A forward in progress, or one that failed, does not count."""
        return self._seen + (self._open if len(self._attended) == len(self.layers) else 0)

    def _new_forward(self, columns: int) -> None:
        """Layer 0 of a new forward: finish the last one (its step ends if every layer attended, else
        it failed part-way and is undone), then count this one's ``columns`` as in progress."""
        complete = len(self._attended) == len(self.layers)
        if self.kv.current_step is not None:
            (self.kv.end_step if complete else self.kv.abort_step)()
        if complete and self._open is not None:
            self._seen += self._open
        self._open, self._attended = columns, set()

    def _begin_step(self, batch: int, seqlen_q: int, attention_mask: torch.Tensor | None) -> None:
        if not self.slots:
            self.slots = [self.kv.add_sequence() for _ in range(batch)]
        if len(self.slots) != batch:
            raise ValueError(f"input of {batch} rows: this S2Cache holds {len(self.slots)} sequences")
        new = [seqlen_q] * batch
        if attention_mask is not None:
            new = _check_padding(attention_mask, right_padding_ok=False)[:, -seqlen_q:].sum(1).tolist()
            if min(new) == 0:
                raise ValueError("attention_mask: a row has no real token in this step")
        self._padded = any(n != seqlen_q for n in new)
        self.kv.begin_step(self.slots, new)

    def _plan(self, batch: int, scaling: float | None):
        from ..inference import DecodePlan

        if (batch, scaling) not in self._plans:
            plan = self._plans[batch, scaling] = DecodePlan(self.kv, batch, softmax_scale=scaling)
            plan.set_slots(self.slots)
        return self._plans[batch, scaling]

    def reset(self) -> None:
        """Forget every sequence (the pages go back to the pools)."""
        if self.kv.current_step is not None:
            self.kv.abort_step()
        for slot in self.slots:
            self.kv.remove_sequence(slot)
        self.slots, self._plans = [], {}
        self._seen, self._open, self._attended = 0, None, set()
        super().reset()


# ---------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Make ``attn_implementation="s2attn"`` available to every ``transformers`` model (idempotent), and
    make ``"sdpa"`` warn once when it runs a model whose config carries ``s2attn`` settings (built or
    loaded without ``attn_implementation="s2attn"``: dense attention, silently different results)."""
    AttentionInterface.register(NAME, s2attn_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
    sdpa = AttentionInterface._global_mapping["sdpa"]
    if not getattr(sdpa, "_s2attn_checks_config", False):
        AttentionInterface.register("sdpa", _warning_when_config_is_s2attn(sdpa))


def _warning_when_config_is_s2attn(sdpa):
    @functools.wraps(sdpa)
    def checked(module: torch.nn.Module, *args, **kwargs):
        if getattr(getattr(module, "config", None), NAME, None):
            warn_once("s2attn config under sdpa", f"{type(module).__name__}: config.{NAME} holds s2attn settings, but "
                      f"the model runs attn_implementation='sdpa' (dense attention, different results); build or load "
                      f"it with attn_implementation={NAME!r}, after s2attn.integrations.transformers.register()")
        return sdpa(module, *args, **kwargs)

    checked._s2attn_checks_config = True
    return checked


__all__ = ["DEFAULTS", "NAME", "S2Cache", "check_model_config", "layer_pattern", "padding_mask", "register",
           "s2attn_attention_forward", "s2attn_settings"]
