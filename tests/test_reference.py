"""reference.py against torch's scaled_dot_product_attention with the expanded token mask (float64)."""

import pytest
import torch
import torch.nn.functional as F

from s2attn import from_mask, local_stride, reference_attention, reference_attention_varlen
from s2attn.reference import attend

pytestmark = pytest.mark.quick  # `make test-quick`


def sdpa(q, k, v, mask, scale):
    """Dense float64 attention ``(b, h, sq, d)`` under a token mask ``(heads or 1, sq, sk)``; GQA by repeat.

    Returns ``out`` and ``lse`` (natural log of the sum of exp of the masked, scaled scores).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask[None], float("-inf"))
    return out, scores.logsumexp(-1)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


PATTERNS = {
    "hetero": lambda: local_stride(4, 256, 16, 2, 4),
    "gqa": lambda: local_stride(6, 256, 16, 2, 3, num_kv_heads=2),
    "mqa_dense_head": lambda: local_stride(4, 256, 16, 1, 4, num_kv_heads=2, num_dense_heads=1),
    "homo_offset": lambda: local_stride(4, 256, 32, 1, 3, homogeneous=True, head_offset=1),
    "bidirectional": lambda: local_stride(4, 256, 16, 2, 4, causal=False),
    "shared_mask": lambda: from_mask(torch.ones(16, 16, dtype=torch.bool).tril() & (torch.rand(16, 16) < 0.5)
                                     | torch.eye(16, dtype=torch.bool), 16),
}
KV_HEADS = {"gqa": 2, "mqa_dense_head": 2}


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("sq,sk", [(77, 77), (29, 200), (1, 131)])
def test_matches_sdpa(name, layout, sq, sk):
    p = PATTERNS[name]()
    heads, kv_heads, d, scale = 6 if name == "gqa" else 4, KV_HEADS.get(name, 4), 24, 0.37
    q, k, v = rand(2, heads, sq, d), rand(2, kv_heads, sk, d), rand(2, kv_heads, sk, d)
    for x in (q, k, v):
        x.requires_grad_()
    exp_out, exp_lse = sdpa(q, k, v, p.to_token_mask(sq, sk), scale)
    args = (q, k, v) if layout == "bhsd" else (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out, lse = reference_attention(*args, p, softmax_scale=scale, layout=layout, return_lse=True)
    out = out if layout == "bhsd" else out.transpose(1, 2)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-10)
    grad = rand(*out.shape)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(exp_out, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_default_scale_and_causal_override():
    p = local_stride(2, 128, 16, 2, 4)
    q, k, v = rand(1, 2, 40, 16), rand(1, 2, 90, 16), rand(1, 2, 90, 16)
    exp, _ = sdpa(q, k, v, p.to_token_mask(40, 90), 16 ** -0.5)
    torch.testing.assert_close(reference_attention(q, k, v, p, layout="bhsd"), exp)
    # causal=False on a causal pattern: the block pattern alone decides
    qpos, kpos = torch.arange(50, 90), torch.arange(90)
    exp, _ = sdpa(q, k, v, p.token_mask_rows(qpos, kpos, causal=False), 16 ** -0.5)
    torch.testing.assert_close(reference_attention(q, k, v, p, layout="bhsd", causal=False), exp)


@pytest.mark.parametrize("name", ["gqa", "bidirectional"])
def test_varlen_matches_sdpa_per_sequence(name):
    p = PATTERNS[name]()
    heads, kv_heads, d = 6 if name == "gqa" else 4, KV_HEADS.get(name, 4), 16
    lens_q, lens_k = [5, 0, 70, 33], [5, 19, 100, 33]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), heads, d), rand(sum(lens_k), kv_heads, d), rand(sum(lens_k), kv_heads, d)
    out, lse = reference_attention_varlen(q, k, v, cu_q, cu_k, p, return_lse=True)
    assert out.shape == q.shape and lse.shape == (heads, sum(lens_q))
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        bhsd = lambda x: x.transpose(0, 1)[None]  # noqa: E731
        exp_out, exp_lse = sdpa(bhsd(q[sq]), bhsd(k[sk]), bhsd(v[sk]), p.to_token_mask(lq, lk), d ** -0.5)
        torch.testing.assert_close(bhsd(out[sq]), exp_out)
        torch.testing.assert_close(lse[:, sq], exp_lse[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_rows_give_zero_and_minus_inf(dtype):
    mask = torch.ones(2, 6, 6, dtype=torch.bool).tril()
    mask[0, 2] = False  # head 0, query block 2 reads nothing
    mask[1, :, :] = False
    mask[1, 4, 1] = True  # head 1 reads only key block 1 from query block 4
    p = from_mask(mask, 16)
    q, k, v = (rand(1, 96, 2, 8, dtype=dtype).requires_grad_() for _ in range(3))
    out, lse = reference_attention(q, k, v, p, return_lse=True)
    empty = torch.ones(2, 96, dtype=torch.bool)  # (heads, seqlen)
    empty[0] = False
    empty[0, 32:48] = True
    empty[1, 64:80] = False
    assert torch.isfinite(out).all()
    assert (out[0].transpose(0, 1)[empty] == 0).all() and (out[0].transpose(0, 1)[~empty] != 0).all()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (lse[0][empty] == float("-inf")).all() and torch.isfinite(lse[0][~empty]).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0].transpose(0, 1)[empty] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_low_precision_inputs_computed_in_fp32(dtype, tol):
    p = local_stride(4, 256, 16, 2, 4, num_kv_heads=2)
    q, k, v = rand(1, 100, 4, 32), rand(1, 100, 2, 32), rand(1, 100, 2, 32)
    exp = reference_attention(q, k, v, p)
    out, lse = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), p, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert ((out.double() - exp).norm() / exp.norm()).item() < tol


def test_chunking_does_not_change_the_result():
    p = local_stride(2, 256, 16, 2, 4)
    q, k, v = rand(1, 2, 100, 8), rand(1, 2, 150, 8), rand(1, 2, 150, 8)
    whole = attend(q, k, v, p, 0.5, True)
    chunked = attend(q, k, v, p, 0.5, True, chunk_size=7)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq_k", [0, 40])
def test_zero_queries_keep_the_graph(seq_k):
    """No queries (and then maybe no keys): empty out and lse, and a backward that reaches q, k, v with zero
    gradients (it raised: the empty output had no grad_fn)."""
    p = local_stride(2, 256, 16, 2, 4)
    q = rand(2, 0, 2, 320, dtype=torch.float64).requires_grad_()
    k, v = (rand(2, seq_k, 2, 320, dtype=torch.float64).requires_grad_() for _ in range(2))
    out, lse = reference_attention(q, k, v, p, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and (k.grad == 0).all() and (v.grad == 0).all()
