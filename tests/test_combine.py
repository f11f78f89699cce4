"""combine_partitions: attention over disjoint key sets, merged by log-sum-exp, equals attention over their union."""

import pytest
import torch

from s2attn import combine_partitions, from_mask, local_stride, reference_attention

pytestmark = pytest.mark.quick  # `make test-quick`


def split(pattern, seq_len, parts):
    """Patterns whose block masks partition ``pattern``'s (each block to one random part)."""
    full = pattern.block_mask(seq_len)
    owner = torch.randint(parts, full.shape)
    return [from_mask(full & (owner == i), pattern.block_size, causal=pattern.causal) for i in range(parts)]


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_disjoint_parts_equal_the_whole(parts, causal):
    seq = 16 * 9 + 5
    p = local_stride(4, seq, 16, 3, 3, num_kv_heads=2, causal=causal)
    q = torch.randn(2, seq - 20, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, seq, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, seq, 2, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(q)

    whole, whole_lse = reference_attention(q, k, v, p, return_lse=True)
    pieces = [reference_attention(q, k, v, part, return_lse=True) for part in split(p, seq, parts)]
    assert any(torch.isinf(lse).any() for _, lse in pieces)  # some rows are empty in some part
    out, lse = combine_partitions(pieces)
    # combine_partitions currently merges in fp32 (see test_float64_stays_float64): fp32-level tolerances
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), whole_lse, rtol=1e-5, atol=1e-6)

    got = torch.autograd.grad((out * grad).sum() + lse.sum(), (q, k, v))
    want = torch.autograd.grad((whole * grad).sum() + whole_lse.sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_rows_empty_everywhere_stay_zero():
    out1, out2 = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    lse1, lse2 = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    lse1[0, 1, 2] = lse2[0, 1, 2] = float("-inf")
    out1.requires_grad_()
    out, lse = combine_partitions([(out1, lse1), (out2, lse2)])
    assert (out[0, 2, 1] == 0).all() and lse[0, 1, 2] == float("-inf")
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(out1.grad).all()


def test_single_part_is_identity_and_bad_parts_raise():
    out, lse = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 5)
    got, got_lse = combine_partitions([(out, lse)])
    torch.testing.assert_close(got, out)
    torch.testing.assert_close(got_lse, lse)
    with pytest.raises(ValueError, match="at least one"):
        combine_partitions([])
    with pytest.raises(ValueError, match="part 1"):
        combine_partitions([(out, lse), (out[:, :4], lse[..., :4])])
    with pytest.raises(ValueError, match="lse shape"):
        combine_partitions([(out, lse.transpose(-1, -2))])


def test_float64_stays_float64():
    out1, out2 = torch.randn(1, 5, 2, 4, dtype=torch.float64), torch.randn(1, 5, 2, 4, dtype=torch.float64)
    lse1, lse2 = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    out, lse = combine_partitions([(out1, lse1), (out2, lse2)])
    w1 = torch.exp(lse1 - torch.logaddexp(lse1, lse2)).transpose(-1, -2)[..., None]
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, w1 * out1 + (1 - w1) * out2, rtol=1e-12, atol=1e-12)
