"""The lowering step: a pattern into the kernels' forms (rule, tables, decode form), memoised beside the pattern."""

import gc
import weakref

import torch

from s2attn import lowering
from s2attn.kernels.rule import KernelRule
from s2attn.patterns import from_mask, local_stride


def test_rule_fields_by_name():
    pattern = local_stride(8, 1024, 64, local_blocks=2, vert_stride=4, num_kv_heads=4, num_dense_heads=1)
    low = lowering.lower(pattern, 1024, torch.device("cpu"), causal=True)
    assert low.rows is None and low.cols is None and low.has_dense
    assert low.rule == KernelRule(local=2, stride=4, step=1, offset=0, heads_per_group=2, head_base=0,
                                  sparse_groups=3, homogeneous=0, pattern_heads=8)
    assert "pattern_heads" not in low.rule.closed_form() and len(low.rule.closed_form()) == len(KernelRule._fields) - 1


def test_masks_and_other_causality_take_tables():
    rule = local_stride(2, 512, 64, local_blocks=2, vert_stride=3)
    for pattern, causal in ((from_mask(rule.block_mask(512), 64), True), (rule, False)):
        low = lowering.lower(pattern, 512, torch.device("cpu"), causal)
        assert low.rule == KernelRule.for_tables(pattern.pattern_heads) and low.rows is not None


def test_memo_lives_beside_the_pattern_and_goes_with_it():
    pattern = from_mask(torch.rand(8, 8) < 0.5, 64)
    tables = lowering.block_tables(pattern, 512, 64, torch.device("cpu"))
    assert lowering.block_tables(pattern, 512, 64, torch.device("cpu")) is tables  # built once
    assert not any(isinstance(v, dict) for v in vars(pattern).values())  # nothing written on the pattern
    ref = weakref.ref(pattern)
    del pattern, tables
    gc.collect()
    assert ref() is None and ref not in lowering._MEMO
