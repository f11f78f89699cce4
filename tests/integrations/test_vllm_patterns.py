"""Per-layer, per-rank patterns of a served model (s2attn.integrations.vllm.patterns); needs no vLLM."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402

from s2attn.integrations import transformers as hf  # noqa: E402
from s2attn.integrations.vllm.patterns import model_patterns  # noqa: E402
from s2attn.models import hhst_config  # noqa: E402


def config(heads=8, kv_heads=4, **settings):
    base = LlamaConfig(vocab_size=64, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    kw = dict(dense_layers=[1], local=2, stride=8, block_size=16)
    kw.update(settings)
    return hhst_config(base, **kw)


@pytest.mark.parametrize("heads,kv_heads,tp", [(8, 4, 2), (8, 2, 2), (8, 2, 4), (8, 8, 2)])
def test_rank_builds_exactly_its_global_heads(heads, kv_heads, tp):
    """Rank r of tp holds query heads r*H/tp .. (r+1)*H/tp - 1 with their global offsets and dense groups
    (with fewer kv heads than ranks vLLM replicates them: one per rank)."""
    cfg = config(heads, kv_heads, num_dense_heads=1)
    n = 2048
    full = model_patterns(cfg, n, 16)
    local = heads // tp
    for rank in range(tp):
        mine = model_patterns(cfg, n, 16, rank, tp, local, max(1, kv_heads // tp))
        for layer in (0, 2):  # sparse layers
            want = full[layer].block_mask(n)[rank * local : (rank + 1) * local]
            assert torch.equal(mine[layer].block_mask(n), want), (rank, layer)
        assert mine[1].rule.num_dense_heads == mine[1].rule.num_kv_heads  # the dense layer
    # and the ranks really differ (numbering each rank's heads from 0 would not)
    sparse = [model_patterns(cfg, n, 16, r, tp, local, max(1, kv_heads // tp))[0].block_mask(n) for r in range(tp)]
    assert not all(torch.equal(sparse[0], s) for s in sparse[1:])


def test_global_pattern_is_the_transformers_one():
    cfg = config()
    assert torch.equal(model_patterns(cfg, 1024, 16)[0].block_mask(1024), hf.layer_pattern(cfg, 0, 1024).block_mask(1024))


def test_config_without_s2attn_is_dense():
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    patterns = model_patterns(cfg, 512, 32)
    assert len(patterns) == 2 and all(p.density(512) == 1.0 for p in patterns)


def test_refusals_name_the_setting():
    with pytest.raises(ValueError, match=r"block_size=32: .* blocks of 16 tokens .* block_size=16"):
        model_patterns(config(), 1024, 32)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        model_patterns(config(), 1024, 16, 0, 3)
    with pytest.raises(ValueError, match="expected 4 / 2 per rank"):
        model_patterns(config(), 1024, 16, 0, 2, 8, 4)
