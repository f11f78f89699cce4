"""s2attn as the core attention of Megatron-core transformer layers.

:class:`S2CoreAttention` fills the ``core_attention`` slot of a Megatron-core layer spec (where
``DotProductAttention`` or ``TEDotProductAttention`` usually sit) and takes the same arguments.
It follows the layer's parallel groups:

* tensor parallel: the rank's ``heads / tp`` query heads attend with the layer's pattern sliced
  to their global head range, so the result equals those heads of the unsplit layer;
* context parallel: Megatron feeds each rank chunks ``r`` and ``2 * cp - 1 - r`` of the sequence
  (zig-zag), which is the layout of :func:`s2attn.integrations.distributed.context_parallel_attention`;
  the module hands its queries to it.

The pattern of each layer comes from :class:`S2AttnSettings`, given to
:func:`get_s2attn_layer_spec` (or set as ``config.s2attn`` on the ``TransformerConfig``).
Requires ``megatron-core`` (``pip install s2attn[megatron]``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

try:
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
except ImportError as err:  # pragma: no cover - exercised only without megatron-core
    raise ImportError("s2attn.integrations.megatron needs megatron-core: pip install 's2attn[megatron]'") from err

from ..api import sparse_attention, sparse_attention_varlen
from ..coverage import warn_if_incomplete
from ..reference import resolve_scale
from ..patterns import BlockPattern, dense, local_stride
from .distributed import context_parallel_attention, shard_heads


@dataclass(frozen=True)
class S2AttnSettings:
    """The sparse pattern of every attention layer of a model.

    ``local_blocks``, ``vert_stride``, ``num_dense_heads``, ``homogeneous``, ``head_step`` and
    ``head_offset`` are those of :func:`s2attn.local_stride`. Layers whose 1-based Megatron
    ``layer_number`` is in ``dense_layers`` attend densely (hybrid models). ``num_kv_heads``
    overrides the config's ``num_query_groups``: set it when ``num_query_groups < tensor parallel
    size``, because Megatron then hands the core attention a config copy whose
    ``num_query_groups`` is the tensor-parallel size.
    """

    block_size: int = 64
    local_blocks: int = 8
    vert_stride: int = 16
    num_dense_heads: int = 0
    homogeneous: bool = False
    head_step: int | None = None
    head_offset: int = 0
    dense_layers: tuple[int, ...] = ()
    max_seq_len: int = 1 << 20
    num_kv_heads: int | None = None

    def pattern(self, num_heads: int, num_kv_heads: int, layer_number: int, causal: bool = True) -> BlockPattern:
        """The full (all heads) pattern of layer ``layer_number``."""
        return self.layer_pattern(num_heads, num_kv_heads, layer_number in self.dense_layers, causal)

    def layer_pattern(self, num_heads: int, num_kv_heads: int, dense_layer: bool, causal: bool = True) -> BlockPattern:
        """The full pattern of a dense or a sparse layer."""
        if dense_layer:
            return dense(self.max_seq_len, self.block_size, causal=causal)
        return local_stride(num_heads, self.max_seq_len, self.block_size, self.local_blocks, self.vert_stride,
                            num_kv_heads=self.num_kv_heads or num_kv_heads, homogeneous=self.homogeneous,
                            num_dense_heads=self.num_dense_heads, head_step=self.head_step,
                            head_offset=self.head_offset, causal=causal)


@functools.lru_cache(maxsize=None)
def _rank_pattern(settings: S2AttnSettings, heads: int, kv_heads: int, dense_layer: bool, causal: bool,
                  tp_rank: int, tp: int) -> BlockPattern:
    """One pattern object per distinct layer kind, so layers share its cached index tables and
    context-parallel plans instead of building them once per layer."""
    pattern = settings.layer_pattern(heads, kv_heads, dense_layer, causal)
    warn_if_incomplete(pattern, "S2AttnSettings")
    return shard_heads(pattern, tp_rank, tp)


def _group_rank_size(group) -> tuple[int, int]:
    return (0, 1) if group is None else (group.rank(), group.size())


class S2CoreAttention(MegatronModule):
    """Megatron-core core attention computed by :func:`s2attn.sparse_attention`.

    ``forward(query, key, value, attention_mask, ...)`` takes ``[s, b, heads / tp, d]`` query and
    ``[s, b, kv_heads / tp, d]`` key/value (``[t, heads / tp, d]`` for packed ``thd`` sequences)
    and returns ``[s, b, heads / tp * d]`` (``[t, heads / tp * d]``). ``attention_mask`` is ignored:
    the pattern and ``attn_mask_type`` (``causal`` or ``no_mask``) define the mask.
    """

    settings: S2AttnSettings | None = None  # set on the subclasses made by with_settings()

    @classmethod
    def with_settings(cls, settings: S2AttnSettings) -> type["S2CoreAttention"]:
        """A subclass bound to ``settings``, to put in a layer spec."""
        return type(cls.__name__, (cls,), {"settings": settings, "__module__": cls.__module__})

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        settings = self.settings or getattr(config, "s2attn", None) or S2AttnSettings()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: s2attn has no attention dropout; "
                             f"set config.attention_dropout=0.0")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"attn_mask_type={attn_mask_type}: s2attn supports causal and no_mask "
                             f"(padding is expressed by packed sequences)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"config.softmax_type={config.softmax_type!r}: s2attn supports 'vanilla' only")
        if pg_collection is not None:
            tp_group, self.cp_group = pg_collection.tp, getattr(pg_collection, "cp", None)
        elif parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
            self.cp_group = parallel_state.get_context_parallel_group()
        else:
            tp_group, self.cp_group = None, None
        tp_rank, tp = _group_rank_size(tp_group)
        self.cp_size = _group_rank_size(self.cp_group)[1]
        self.attn_mask_type = attn_mask_type
        self.causal = attn_mask_type == AttnMaskType.causal
        self.layer_number = layer_number
        heads = config.num_attention_heads
        dense_layer = layer_number in settings.dense_layers
        self.pattern = _rank_pattern(settings, heads, config.num_query_groups or heads, dense_layer, self.causal,
                                     tp_rank, tp)
        self.softmax_scale = resolve_scale(softmax_scale, config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias: s2attn supports no additive attention bias")
        if attn_mask_type is not None and attn_mask_type != self.attn_mask_type:
            raise ValueError(f"attn_mask_type={attn_mask_type}: this layer was built for {self.attn_mask_type}")
        common = dict(softmax_scale=self.softmax_scale, causal=self.causal)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.cp_size > 1:
                raise NotImplementedError("packed (thd) sequences with context parallelism are not supported yet")
            p = packed_seq_params
            lengths = [(p.cu_seqlens_q, p.max_seqlen_q), (p.cu_seqlens_kv, p.max_seqlen_kv)]
            (cu_q, max_q), (cu_k, max_k) = [(cu.to(torch.int32), m or int((cu[1:] - cu[:-1]).max()))
                                            for cu, m in lengths]
            out = sparse_attention_varlen(query, key, value, cu_q, cu_k, max_q, max_k, self.pattern, **common)
            return out.reshape(out.shape[0], -1)
        q, k, v = (x.permute(1, 0, 2, 3) for x in (query, key, value))  # [s, b, h, d] -> [b, s, h, d]
        if self.cp_size > 1:
            out = context_parallel_attention(q, k, v, self.pattern, self.cp_group, **common)
        else:
            out = sparse_attention(q, k, v, self.pattern, **common)
        return out.permute(1, 0, 2, 3).reshape(query.shape[0], query.shape[1], -1)


def with_s2attn(layer_spec, settings: S2AttnSettings | None = None):
    """A copy of a Megatron-core transformer layer spec whose self-attention uses :class:`S2CoreAttention`."""
    spec = copy.deepcopy(layer_spec)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = S2CoreAttention if settings is None else S2CoreAttention.with_settings(settings)
    return spec


def get_s2attn_layer_spec(settings: S2AttnSettings | None = None, *, transformer_engine: bool = False, **kwargs):
    """Megatron-core's GPT layer spec with s2attn as core attention.

    ``transformer_engine=False`` starts from ``get_gpt_layer_local_spec(**kwargs)`` (pure
    Megatron-core modules), ``True`` from ``get_gpt_layer_with_transformer_engine_spec(**kwargs)``.
    Without ``settings``, the layers read ``config.s2attn`` (or use the defaults).

    Example::

        config = TransformerConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                                   attention_dropout=0.0, ...)
        spec = get_s2attn_layer_spec(S2AttnSettings(local_blocks=8, vert_stride=16, dense_layers=(1, 12)))
        model = GPTModel(config, transformer_layer_spec=spec, vocab_size=..., max_sequence_length=...)
    """
    from megatron.core.models.gpt import gpt_layer_specs

    build = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec if transformer_engine
             else gpt_layer_specs.get_gpt_layer_local_spec)
    return with_s2attn(build(**kwargs), settings)


__all__ = ["S2AttnSettings", "S2CoreAttention", "get_s2attn_layer_spec", "with_s2attn"]
