"""Which pattern each layer of a served model uses, on one tensor-parallel rank (no vLLM imported).

The settings are the ones the Hugging Face integration saves in ``config.json`` (``config.s2attn``,
written by :func:`s2attn.models.hhst_config`): layers in ``dense_layers`` attend densely, the others use
the local-stride pattern over the model's query / kv heads. A config without ``s2attn`` is a dense
model, and every layer attends densely.

Under tensor parallelism rank ``r`` of ``t`` holds query heads ``r * H / t ... (r + 1) * H / t - 1``;
its patterns are the global pattern's rows of exactly those heads (:meth:`BlockPattern.heads`), so each
head keeps its vertical offset and dense group. Numbering the rank's heads from 0 would give every rank
rank 0's offsets: a different model, silently.
"""

from __future__ import annotations

from ...patterns import BLOCK_SIZES, BlockPattern, dense
from .. import transformers as hf

SUPPORTED_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def model_patterns(hf_config, max_model_len: int, block_size: int, tp_rank: int = 0, tp_size: int = 1,
                   num_heads: int | None = None, num_kv_heads: int | None = None) -> list[BlockPattern]:
    """One pattern per layer over this rank's query heads (dense layers: a dense pattern shared by all heads).

    ``block_size`` is vLLM's page size and must equal the pattern's block size (a page is a pattern block).
    ``num_heads`` / ``num_kv_heads`` are the rank's own counts, checked against the config's.
    """
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size}: the model's {heads} query heads do not split evenly")
    local = heads // tp_size
    local_kv = max(1, kv_heads // tp_size)  # vLLM replicates kv heads when there are fewer than ranks
    if (num_heads, num_kv_heads) not in ((None, None), (local, local_kv)):
        raise ValueError(f"the attention layer has {num_heads} query / {num_kv_heads} kv heads on rank {tp_rank} of "
                         f"{tp_size}, the config {heads} / {kv_heads} in all: expected {local} / {local_kv} per rank")
    layers = hf_config.num_hidden_layers
    settings = getattr(hf_config, hf.NAME, None)
    if settings is None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={block_size}: the s2attn backend serves pages of {BLOCK_SIZES} tokens")
        return [dense(max_model_len, block_size)] * layers
    pattern_block = hf.s2attn_settings(hf_config)["block_size"]
    if block_size != pattern_block:
        raise ValueError(f"block_size={block_size}: this model's s2attn pattern has blocks of {pattern_block} tokens "
                         f"(config.s2attn['block_size']); serve it with block_size={pattern_block} (vLLM's "
                         f"--block-size), so that a KV-cache page is one pattern block")
    out = []
    for i in range(layers):
        pattern = hf.layer_pattern(hf_config, i, max_model_len)
        if pattern is None:
            out.append(dense(hf.layer_pattern_len(hf_config, max_model_len), block_size))
        else:
            out.append(pattern.heads(tp_rank * local, (tp_rank + 1) * local))
    return out


__all__ = ["SUPPORTED_HEAD_SIZES", "model_patterns"]
