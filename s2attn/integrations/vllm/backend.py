"""The vLLM attention backend: classes vLLM instantiates (imports vLLM; the kernels live in :mod:`.paged`).

* :class:`S2AttentionBackend` declares what is supported (checked by vLLM at engine start) and, for
  vLLM 0.22, the cache shape ``(pages, 2, page_size, kv_heads, head_dim)``; vLLM 0.32 hands a 4-D page
  view instead. :func:`.paged.split_kv_cache` is the one adapter between the two.
* :class:`S2AttentionImpl` (one per layer) refuses what it cannot compute exactly, writes the step's
  keys/values into the pages, and attends: decode rows through the paged decode kernel, prompt
  chunks through the sparse forward kernel over the gathered context.
* :class:`S2MetadataBuilder` (one per KV-cache group) gives each of its layers its pattern (the layer
  index read off the layer name, the query heads of this tensor-parallel rank under their *global*
  indices), allocates the decode scratch once, and per step splits the batch into decodes (first:
  vLLM reorders them to the front) and prefills. Decode-only batches replay in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from . import paged
from .patterns import SUPPORTED_HEAD_SIZES, model_patterns

NAME = "CUSTOM"  # the registry slot vLLM reserves for an out-of-tree backend


def _layer_index(layer_name: str) -> int:
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ValueError(f"attention layer {layer_name!r}: s2attn reads the layer index from the layer name and "
                         f"expects exactly one number in it (Llama-family models: model.layers.N.self_attn.attn)")
    return numbers[0]


class S2AttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True  # vLLM <= 0.22 reads it: we write into the output vLLM allocates
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[S2AttentionImpl]:
        return S2AttentionImpl

    @staticmethod
    def get_builder_cls() -> type[S2MetadataBuilder]:
        return S2MetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [16, 32, 64, 128, 256]  # a page is one pattern block (s2attn.patterns.BLOCK_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """vLLM 0.22's cache allocation (0.32 ignores it and hands a 4-D page view)."""
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class S2Metadata:
    """One step's batch: ``num_decodes`` one-token requests first, then ``len(query_lens)`` prefills."""

    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    seq_lens: torch.Tensor  # (num_reqs,) int32, device
    block_table: torch.Tensor  # (num_reqs, max_pages) int32, device
    buffers: paged.DecodeBuffers
    query_lens: list[int]  # the prefill requests' new tokens (host)
    prefill_seq_lens: list[int]  # and their whole contexts (host)


class S2MetadataBuilder(AttentionMetadataBuilder[S2Metadata]):
    # Decode-only batches: the decode kernel reads the lengths on the device, and its launch depends only
    # on the (padded) batch size. Batches with a prompt chunk read lengths on the host (the gather).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        from vllm.model_executor.layers.attention import Attention

        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        max_len = vllm_config.model_config.max_model_len
        blocks = 1
        for name, layer in layers.items():
            if not isinstance(layer.impl, S2AttentionImpl):
                raise ValueError(f"layer {name}: expected an S2AttentionImpl in a group served by s2attn, got "
                                 f"{type(layer.impl).__name__}")
            layer.impl.configure(_layer_index(name), device)
            blocks = max(blocks, layer.impl.plan.blocks_read(max_len))
        impl = next(iter(layers.values())).impl
        max_batch = max(vllm_config.scheduler_config.max_num_seqs, 1)
        self.buffers = paged.DecodeBuffers(max_batch, impl.num_heads, impl.num_kv_heads, impl.head_size, blocks,
                                           device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> S2Metadata:
        m = common_attn_metadata
        if m.causal is not True:
            raise ValueError(f"causal={m.causal!r}: the s2attn backend serves causal decoder attention only")
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(m, decode_threshold=1)
        query_lens, prefill_seq_lens = [], []
        if num_prefills:
            starts = m.query_start_loc_cpu[num_decodes : num_decodes + num_prefills + 1]
            query_lens = (starts[1:] - starts[:-1]).tolist()
            prefill_seq_lens = m.seq_lens[num_decodes : num_decodes + num_prefills].tolist()
        return S2Metadata(num_actual_tokens=m.num_actual_tokens, num_decodes=num_decodes,
                          num_decode_tokens=num_decode_tokens, seq_lens=m.seq_lens, block_table=m.block_table_tensor,
                          buffers=self.buffers, query_lens=query_lens, prefill_seq_lens=prefill_seq_lens)


class S2AttentionImpl(AttentionImpl[S2Metadata]):
    """One attention layer. Everything not computed exactly is refused here, at engine start."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        refusals = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "attn_type": attn_type != AttentionType.DECODER,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
            "kv_cache_dtype": kv_cache_dtype not in S2AttentionBackend.supported_kv_cache_dtypes,
            **{name: value is not None for name, value in extra.items()},  # sinks and any newer options
        }
        given = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window, "logits_soft_cap": logits_soft_cap,
                 "attn_type": attn_type, "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
                 "kv_cache_dtype": kv_cache_dtype, **extra}
        for name, refused in refusals.items():
            if refused:
                raise ValueError(f"{name}={given[name]!r}: not supported by the s2attn vLLM backend (it serves causal "
                                 f"decoder attention without alibi, sliding windows, soft-capping, sinks or KV sharing, "
                                 f"with a KV cache in the model dtype: kv_cache_dtype in "
                                 f"{S2AttentionBackend.supported_kv_cache_dtypes})")
        if head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head_size={head_size}: the s2attn vLLM backend supports head sizes {SUPPORTED_HEAD_SIZES}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        vllm_config = get_current_vllm_config()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self._patterns = model_patterns(vllm_config.model_config.hf_config, vllm_config.model_config.max_model_len,
                                        vllm_config.cache_config.block_size, get_tensor_model_parallel_rank(),
                                        get_tensor_model_parallel_world_size(), num_heads, self.num_kv_heads)
        self.plan: paged.LayerPlan | None = None
        self.layer_index: int | None = None

    def configure(self, layer_index: int, device: torch.device) -> None:
        """Give this layer its pattern (called once by the metadata builder, at engine start)."""
        if not 0 <= layer_index < len(self._patterns):
            raise ValueError(f"layer index {layer_index}: the model config has {len(self._patterns)} layers")
        self.layer_index = layer_index
        self.plan = paged.LayerPlan.build(self._patterns[layer_index], self.num_heads, self.num_kv_heads, device)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        k_cache, v_cache = paged.split_kv_cache(kv_cache, self.head_size)
        paged.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: S2Metadata | None, output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``query (tokens, heads, head_dim)``; writes ``output (tokens, heads, head_dim)``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("output quantization (output_scale) is not supported by the s2attn backend")
        if attn_metadata is None:  # a profiling run with no cache yet
            return output
        if self.plan is None:
            raise RuntimeError(f"layer {getattr(layer, 'layer_name', '?')}: the s2attn metadata builder did not "
                               f"configure this layer")
        m = attn_metadata
        k_cache, v_cache = paged.split_kv_cache(kv_cache, self.head_size)
        page_size = k_cache.shape[1]
        if page_size != self.plan.pattern.block_size:
            raise ValueError(f"the KV cache has pages of {page_size} tokens, the pattern blocks of "
                             f"{self.plan.pattern.block_size}: serve with block_size={self.plan.pattern.block_size}")
        nd = m.num_decode_tokens
        if nd:
            q, out = query[:nd], output[:nd]
            if paged.use_kernel(q):
                paged.decode(q, k_cache, v_cache, m.block_table, m.seq_lens, out, self.plan, m.buffers, self.scale)
            else:
                out.copy_(paged.prefill(q, k_cache, v_cache, m.block_table[: m.num_decodes], [1] * m.num_decodes,
                                        m.seq_lens[: m.num_decodes].tolist(), self.plan.pattern, self.scale))
        if m.query_lens:
            end = nd + sum(m.query_lens)
            output[nd:end] = paged.prefill(query[nd:end], k_cache, v_cache, m.block_table[m.num_decodes:],
                                           m.query_lens, m.prefill_seq_lens, self.plan.pattern, self.scale)
        return output
