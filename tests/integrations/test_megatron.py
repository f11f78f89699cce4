"""S2CoreAttention inside Megatron-core transformer layers.

On the CPU (gloo): a layer built with our spec equals the same layer whose core attention is a
plain dense softmax under the pattern's expanded token mask, and tensor-/context-parallel copies of
it (weights sliced as Megatron shards them) equal the single-process layer, values and gradients.
With CUDA: the same layer also equals Megatron's own ``DotProductAttention`` under the expanded mask.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 's2attn[megatron]')")

from _gloo import run_workers  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from s2attn.integrations.distributed import zigzag_split  # noqa: E402
from s2attn.integrations.megatron import S2AttnSettings, S2CoreAttention, get_s2attn_layer_spec, with_s2attn  # noqa: E402

SETTINGS = S2AttnSettings(block_size=16, local_blocks=2, vert_stride=3, max_seq_len=4096)
HEADS, GROUPS, HIDDEN, SEQ, BATCH = 8, 4, 64, 96, 2
COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


class ExpandedMaskAttention(MegatronModule):
    """Test double: dense softmax attention under the pattern's token mask, for one process."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.pattern = SETTINGS.pattern(config.num_attention_heads, config.num_query_groups, layer_number)
        self.scale = config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, h, d = query.shape
        group = h // key.shape[2]
        k, v = (x.repeat_interleave(group, 2) for x in (key, value))
        scores = torch.einsum("sbhd,tbhd->bhst", query, k) * self.scale
        scores = scores.masked_fill(~self.pattern.to_token_mask(s, s)[None], float("-inf"))
        out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
        return out.reshape(s, b, h * d)


def _config(dtype=torch.float64, **extra) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
                             ffn_hidden_size=2 * HIDDEN, attention_dropout=0.0, hidden_dropout=0.0,
                             use_cpu_initialization=True, params_dtype=dtype, gradient_accumulation_fusion=False,
                             **extra)


def _layer(spec, config, seed: int = 0, layer_number: int = 2):
    torch.manual_seed(seed)
    return build_module(spec, config=config, layer_number=layer_number).to(config.params_dtype)


def _run(layer, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_()
    y, _ = layer(x, attention_mask=None)
    (y * dy).sum().backward()
    return y.detach(), x.grad


def _shard(state: dict, tp_rank: int, tp: int) -> dict:
    """The tensor-parallel shard of a full layer's state dict, as Megatron partitions it."""
    out = {}
    for name, value in state.items():
        if name.endswith(COLUMN_PARALLEL):
            value = value.chunk(tp, 0)[tp_rank]
        elif name.endswith(ROW_PARALLEL):
            value = value.chunk(tp, 1)[tp_rank]
        out[name] = value
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _layer_worker(rank: int, world: int, meshes: list[tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    dy = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    parallel_state.initialize_model_parallel(1, 1)
    config = _config()
    reference = _layer(with_s2attn(get_gpt_layer_local_spec()), config)
    reference.self_attention.core_attention = ExpandedMaskAttention(config, 2, AttnMaskType.causal, "self")
    y_ref, dx_ref = _run(reference, x, dy)
    ours = _layer(get_s2attn_layer_spec(SETTINGS), config)
    ours.load_state_dict(reference.state_dict())
    y, dx = _run(ours, x, dy)
    assert _rel(y, y_ref) < 1e-10 and _rel(dx, dx_ref) < 1e-10
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert _rel(p.grad, q.grad) < 1e-10, name
    state = reference.state_dict()
    for tp, cp in meshes:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        cp_rank, cp_size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
        layer = _layer(get_s2attn_layer_spec(SETTINGS), _config(tensor_model_parallel_size=tp,
                                                                context_parallel_size=cp))
        layer.load_state_dict(_shard(state, tp_rank, tp))
        y, dx = _run(layer, zigzag_split(x, cp_rank, cp_size, 0), zigzag_split(dy, cp_rank, cp_size, 0))
        assert _rel(y, zigzag_split(y_ref, cp_rank, cp_size, 0)) < 1e-10, (tp, cp)
        assert _rel(dx, zigzag_split(dx_ref, cp_rank, cp_size, 0)) < 1e-10, (tp, cp)
    parallel_state.destroy_model_parallel()


def test_layer_matches_expanded_mask_attention_and_its_parallel_copies():
    run_workers(_layer_worker, 2, [(2, 1), (1, 2)])


def test_layer_on_a_tensor_and_context_parallel_mesh():
    run_workers(_layer_worker, 4, [(2, 2)])


def _module_worker(rank: int, world: int) -> None:
    parallel_state.initialize_model_parallel(1, 1)
    config = _config()
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        S2CoreAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    with pytest.raises(ValueError, match="attn_mask_type"):
        S2CoreAttention(config, 1, AttnMaskType.padding, "self")
    # settings from the config; layer 1 is dense
    config.s2attn = S2AttnSettings(block_size=16, dense_layers=(1,), max_seq_len=4096)
    assert S2CoreAttention(config, 1, AttnMaskType.causal, "self").pattern.density(4096) == 1.0
    assert S2CoreAttention(config, 2, AttnMaskType.causal, "self").pattern.density(4096) < 0.5
    parallel_state.destroy_model_parallel()


def test_module_settings_and_errors():
    run_workers(_module_worker, 1)


def test_packed_sequences_equal_separate_sequences():
    from megatron.core.packed_seq_params import PackedSeqParams

    config = _config()
    attn = S2CoreAttention.with_settings(SETTINGS)(config, 2, AttnMaskType.causal, "self", pg_collection=None)
    lengths = [37, 20]
    q, k, v = (torch.randn(sum(lengths), h, 8, dtype=torch.float64) for h in (HEADS, GROUPS, GROUPS))
    cu = torch.tensor([0, 37, 57], dtype=torch.int32)
    out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                                 cu_seqlens_kv=cu))
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        single = attn(*(x[a:e, None] for x in (q, k, v)), None)
        assert _rel(out[a:e], single[:, 0]) < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's DotProductAttention needs CUDA")
def test_layer_matches_megatron_dot_product_attention_on_gpu():
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        _compare_with_dot_product_attention()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _compare_with_dot_product_attention() -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    config = _config(torch.float32)
    default = _layer(get_gpt_layer_local_spec(), config).cuda()
    ours = _layer(get_s2attn_layer_spec(SETTINGS), config).cuda()
    ours.load_state_dict(default.state_dict())
    x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda")
    dy = torch.randn(SEQ, BATCH, HIDDEN, device="cuda")
    blocked = ~SETTINGS.pattern(HEADS, GROUPS, 2).to_token_mask(SEQ, SEQ).cuda()[None]  # Megatron: True = masked
    xd = x.clone().requires_grad_()
    y_default, _ = default(xd, attention_mask=blocked)
    (y_default * dy).sum().backward()
    y, dx = _run(ours, x, dy)
    assert _rel(y, y_default.detach()) < 1e-3 and _rel(dx, xd.grad) < 1e-3  # fp32 kernels may use tf32 dots
