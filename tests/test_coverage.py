"""Union completeness explained: why a pattern is not, the nearest settings that are, and the warnings of defaults."""

import warnings

import pytest
import torch

from s2attn import SparseAttention, dense, from_mask, local_stride
from s2attn.coverage import NotUnionCompleteWarning, explain, nearest_union_complete, warn_if_incomplete

pytestmark = pytest.mark.quick  # `make test-quick`

SEQ = 1 << 17  # 2048 blocks of 64


def test_complete_patterns_need_no_explanation():
    assert explain(local_stride(32, SEQ, 64, 8, 8, num_kv_heads=8)) is None
    assert explain(local_stride(32, SEQ, 64, 8, 16, num_kv_heads=8, num_dense_heads=1)) is None
    assert nearest_union_complete(local_stride(32, SEQ, 64, 8, 8, num_kv_heads=8))[0][0] == {}


@pytest.mark.parametrize("kwargs, reason, missing", [
    (dict(num_kv_heads=8), "8 sparse kv-head groups cannot cover 16 offsets one each", "{1, 3, 5, 7, 9, 11, 13, 15}"),
    (dict(homogeneous=True), "homogeneous=True gives every head the same offset", "{1, 2, 3, 4, 5, 6, 7, 8, ...}"),
    (dict(head_step=2), "head_step=2 shares the factor 2 with vert_stride=16", "{1, 3, 5, 7, 9, 11, 13, 15}"),
])
def test_explanations(kwargs, reason, missing):
    why = explain(local_stride(32, SEQ, 64, 8, 16, **kwargs))
    assert reason in why and f"key blocks at offsets {missing} beyond the local window are read by no head" in why
    assert "(e.g. query block 2047 never sees key block 1)" in why


def test_mask_explanation_names_a_block_pair():
    mask = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    mask[:, 3, 1] = False
    assert explain(from_mask(mask, 16)) == "no head reads some key blocks the queries may see (e.g. query block 3 " \
                                           "never sees key block 1)"
    assert nearest_union_complete(from_mask(mask, 16)) == []


def test_nearest_settings_are_union_complete_cheapest_first():
    p = local_stride(32, SEQ, 64, 8, 16, num_kv_heads=8)
    nearest = nearest_union_complete(p)
    assert [change for change, _ in nearest] == [{"vert_stride": 8, "head_step": 1}, {"num_dense_heads": 1}]
    assert all(alt.is_union_complete() and alt.num_heads == 32 and alt.block_size == 64 for _, alt in nearest)
    densities = [alt.density(SEQ) for _, alt in nearest]
    assert densities == sorted(densities) and p.density(SEQ) < densities[0] < 1
    assert [c for c, _ in nearest_union_complete(local_stride(32, SEQ, 64, 8, 16, homogeneous=True))] == [
        {"homogeneous": False}, {"num_dense_heads": 1}]
    assert nearest_union_complete(local_stride(4, SEQ, 64, 8, 16, num_kv_heads=1)) == []  # MQA: only dense is left
    assert nearest_union_complete(dense(SEQ, 64, num_heads=4)) == []
    assert nearest_union_complete(p.heads(4, 8)) == []  # a slice: its settings are the whole pattern's


def test_warnings_name_where_why_and_what_instead():
    with pytest.warns(NotUnionCompleteWarning) as record:
        warn_if_incomplete(local_stride(32, SEQ, 64, 8, 16, num_kv_heads=8), "here")
    text = str(record[0].message)
    assert text.startswith("here: the pattern is not union complete: the vertical blocks sit at offsets")
    assert "Union complete nearby: vert_stride=8, head_step=1; num_dense_heads=1" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotUnionCompleteWarning)
        warn_if_incomplete(local_stride(32, SEQ, 64, 8, 8, num_kv_heads=8), "complete")
        warn_if_incomplete(local_stride(32, SEQ, 64, 8, 16, homogeneous=True), "asked for: the ablation")


def test_library_defaults_warn():
    """SparseAttention, hhst_config (the HF integration's defaults: stride 16) and Megatron's S2AttnSettings."""
    with pytest.warns(NotUnionCompleteWarning, match="^SparseAttention: "):
        SparseAttention(local_stride(32, SEQ, 64, 8, 16, num_kv_heads=8))
    pytest.importorskip("transformers")
    from s2attn.models import hhst_config, tiny_llama

    with pytest.warns(NotUnionCompleteWarning, match=r"^config.s2attn with 4 heads / 2 kv heads: .*\(2 sparse kv-head"):
        hhst_config(tiny_llama(heads=4, kv_heads=2, max_seq_len=1 << 15))
    megatron = pytest.importorskip("s2attn.integrations.megatron")
    with pytest.warns(NotUnionCompleteWarning, match="^S2AttnSettings: "):
        megatron._rank_pattern(megatron.S2AttnSettings(), 16, 8, False, True, 0, 1)
