"""HHST: the Head-Heterogeneous Strided Transformer, as a ``transformers`` config.

An HHST is any Llama-family model whose attention is ``attn_implementation="s2attn"``:
most layers use the local-stride pattern (each kv-head group reads a different rotation of
the vertical stride, so the heads together cover the whole context), and the layers in
``dense_layers`` attend densely. Nothing here downloads weights: models are built from configs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence


def hhst_config(
    base_config,
    *,
    dense_layers: Sequence[int] = (),
    local: int = 8,
    stride: int = 16,
    block_size: int = 64,
    homogeneous: bool = False,
    num_dense_heads: int = 0,
):
    """A copy of ``base_config`` (any ``transformers`` Llama-family config) that builds an HHST.

    ``local`` is the local window in blocks, ``stride`` the vertical stride in blocks,
    ``homogeneous=True`` gives every head the same stride offset (the ablation),
    ``num_dense_heads`` makes the last kv-head groups of the sparse layers dense. A heterogeneous
    sparse layer whose heads together miss key blocks (not union complete: ``stride`` above the
    number of sparse kv-head groups) issues a :class:`~s2attn.coverage.NotUnionCompleteWarning`
    that names union-complete settings nearby. The settings
    are stored in ``config.s2attn`` (saved with ``save_pretrained``) and the attention
    implementation is set to ``"s2attn"`` (pass ``attn_implementation="s2attn"`` again to
    ``from_pretrained``: ``transformers`` does not save it; a model loaded without it warns once).
    A base config with a sliding window or soft-capping is refused.
    """
    from ..integrations import transformers as hf  # needs transformers: imported on use

    hf.check_model_config(base_config)
    hf.register()
    config = copy.deepcopy(base_config)
    setattr(config, hf.NAME, {
        "block_size": block_size, "local_blocks": local, "vert_stride": stride, "homogeneous": homogeneous,
        "num_dense_heads": num_dense_heads, "dense_layers": sorted(int(i) for i in dense_layers),
    })
    hf.s2attn_settings(config)  # validates layer indices and keys
    for layer in range(config.num_hidden_layers):  # validates the patterns now (and warns if not union complete)
        hf.layer_pattern(config, layer, 1)
    config._attn_implementation = hf.NAME
    return config


def tiny_llama(
    *,
    vocab_size: int = 256,
    d_model: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    max_seq_len: int = 8192,
    ffn_mult: int = 4,
    rope_theta: float = 10000.0,
    attn_implementation: str = "sdpa",
):
    """A from-scratch ``LlamaConfig`` (head dim ``d_model // heads``, SwiGLU width ``ffn_mult * d_model``)."""
    from transformers import LlamaConfig

    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=ffn_mult * d_model, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, attention_dropout=0.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return config
