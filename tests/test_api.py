"""The public API: results against the float64 reference, and every bad input rejected with a clear error."""

import warnings
from pathlib import Path

import pytest
import torch

import s2attn
from s2attn import SparseAttention, dense, local_stride, reference_attention, reference_attention_varlen
from s2attn import sparse_attention, sparse_attention_varlen

pytestmark = pytest.mark.quick  # `make test-quick`

HEADS, KV_HEADS, D, B = 4, 2, 32, 16


def pattern(max_seq_len=160, **kw):
    return local_stride(HEADS, max_seq_len, B, 2, 3, num_kv_heads=KV_HEADS, **kw)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def qkv(sq=45, sk=70, dtype=torch.float32, layout="bshd", batch=2):
    shape = (lambda s, h: (batch, s, h, D)) if layout == "bshd" else (lambda s, h: (batch, h, s, D))
    return [torch.randn(*shape(s, h), dtype=torch.float64).to(dtype)
            for s, h in ((sq, HEADS), (sk, KV_HEADS), (sk, KV_HEADS))]


# ---------------------------------------------------------------- results
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [None, False])
def test_sparse_attention_matches_reference(layout, causal):
    p = pattern()
    q, k, v = qkv(layout=layout)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = sparse_attention(*leaves, p, softmax_scale=0.2, causal=causal, layout=layout, return_lse=True)
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference_attention(*refs, p, softmax_scale=0.2, causal=causal, layout=layout, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, HEADS, 45)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for x, r in zip(leaves, refs):
        assert rel_err(x.grad, r.grad) < 1e-4


def test_sparse_attention_returns_out_only_by_default():
    q, k, v = qkv()
    out = sparse_attention(q, k, v, pattern())
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern()))


def test_autocast_runs_in_the_autocast_dtype():
    """As SDPA: fp32 inputs inside torch.autocast are attended in the autocast dtype; grads flow back in fp32."""
    p = pattern()
    q, k, v = (x.requires_grad_() for x in qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_attention(q, k, v, p)
        packed = sparse_attention_varlen(q[0], k[0], v[0], torch.tensor([0, 45], dtype=torch.int32),
                                         torch.tensor([0, 70], dtype=torch.int32), 45, 70, p)
    assert out.dtype == packed.dtype == torch.bfloat16
    ref = reference_attention(*(x.detach().bfloat16().double() for x in (q, k, v)), p)
    assert rel_err(out, ref) < 1e-2 and rel_err(packed, ref[0]) < 1e-2
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


def test_varlen_matches_reference():
    p = pattern()
    cu_q = torch.tensor([0, 9, 9, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 47, 90], dtype=torch.int32)
    q, k, v = torch.randn(40, HEADS, D), torch.randn(90, KV_HEADS, D), torch.randn(90, KV_HEADS, D)
    out, lse = sparse_attention_varlen(q, k, v, cu_q, cu_k, 31, 43, p, return_lse=True)
    ref, ref_lse = reference_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, p, return_lse=True)
    assert out.shape == q.shape and lse.shape == (HEADS, 40)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_module_forward_and_repr():
    p = pattern()
    layer = SparseAttention(p, softmax_scale=0.3)
    q, k, v = qkv()
    torch.testing.assert_close(layer(q, k, v), sparse_attention(q, k, v, p, softmax_scale=0.3))
    text = repr(layer)
    assert text.startswith("SparseAttention(BlockPattern(local_stride(")
    assert "softmax_scale=0.3" in text and "layout='bshd'" in text and "█" not in text
    assert list(layer.parameters()) == []
    with pytest.raises(TypeError, match="pattern"):
        SparseAttention("local")
    with pytest.raises(ValueError, match="layout='sbhd'"):
        SparseAttention(p, layout="sbhd")
    with pytest.raises(ValueError, match="softmax_scale=-1"):
        SparseAttention(p, softmax_scale=-1.0)


def test_package_exports():
    for name in ("sparse_attention", "sparse_attention_varlen", "SparseAttention", "combine_partitions",
                 "reference_attention", "BlockPattern", "local_stride", "dense", "from_mask"):
        assert hasattr(s2attn, name) and name in s2attn.__all__


# ---------------------------------------------------------------- bad inputs
def dense_call(**change):
    """Keyword arguments of a valid ``sparse_attention`` call, with ``change`` applied."""
    q, k, v = qkv()
    kw = dict(q=q, k=k, v=v, pattern=pattern(), softmax_scale=None, causal=None, layout="bshd", return_lse=False)
    kw.update({name: (fn(kw) if callable(fn) else fn) for name, fn in change.items()})
    return kw


BAD_DENSE = [
    # (case, change, exception, text the message must contain)
    ("q not a tensor", dict(q=lambda kw: kw["q"].numpy()), TypeError, "q: expected a torch.Tensor"),
    ("k 3-D", dict(k=lambda kw: kw["k"][0]), ValueError, "k has shape (70, 2, 32) (3-D): expected 4-D"),
    ("unknown layout", dict(layout="bsh"), ValueError, "layout='bsh'"),
    ("batch mismatch", dict(k=lambda kw: kw["k"][:1], v=lambda kw: kw["v"][:1]), ValueError, "k.shape=(1, 70, 2, 32)"),
    ("k/v seqlen mismatch", dict(v=lambda kw: kw["v"][:, :60]), ValueError, "v.shape=(2, 60, 2, 32): seqlen 60"),
    ("head_dim mismatch", dict(v=lambda kw: kw["v"][..., :16]), ValueError, "head_dim 16 differs from q's 32"),
    ("k/v heads mismatch", dict(v=lambda kw: kw["v"][:, :, :1]), ValueError, "v.shape=(2, 70, 1, 32): kv_heads 1"),
    ("heads % kv_heads", dict(k=lambda kw: torch.randn(2, 70, 3, D), v=lambda kw: torch.randn(2, 70, 3, D)),
     ValueError, "q has 4 heads and k, v have 3"),
    ("pattern heads", dict(pattern=local_stride(8, 160, B, 2, 3)), ValueError, "q heads=4: the pattern was built for 8"),
    ("pattern type", dict(pattern="local_stride"), TypeError, "pattern: expected an s2attn.BlockPattern, got str"),
    ("int dtype", dict(q=lambda kw: kw["q"].int()), TypeError, "q.dtype=torch.int32"),
    ("dtype mismatch", dict(k=lambda kw: kw["k"].half()), TypeError, "k.dtype=torch.float16: expected the dtype of q"),
    ("device mismatch", dict(v=lambda kw: kw["v"].to("meta")), ValueError, "v is on device meta"),
    ("seqlen_q > seqlen_k", dict(q=lambda kw: torch.randn(2, 71, HEADS, D)), ValueError, "seqlen_q=71 > seqlen_k=70"),
    ("pattern too short", dict(pattern=pattern(64)), ValueError, "seqlen_k=70 is longer than the pattern's max_seq_len=64"),
    ("scale negative", dict(softmax_scale=-0.5), ValueError, "softmax_scale=-0.5"),
    ("scale zero", dict(softmax_scale=0.0), ValueError, "softmax_scale=0.0"),
    ("scale nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale=nan"),
    ("scale inf", dict(softmax_scale=float("inf")), ValueError, "softmax_scale=inf"),
    ("scale tensor", dict(softmax_scale=lambda kw: torch.tensor(0.1)), TypeError, "softmax_scale=tensor(0.1000)"),
    ("scale bool", dict(softmax_scale=True), TypeError, "softmax_scale=True"),
    ("causal not bool", dict(causal="yes"), TypeError, "causal='yes'"),
    ("return_lse not bool", dict(return_lse=None), TypeError, "return_lse=None"),
]


@pytest.mark.parametrize("case,change,exc,text", BAD_DENSE, ids=[c[0] for c in BAD_DENSE])
def test_bad_inputs_raise_clear_errors(case, change, exc, text):
    kw = dense_call(**change)
    with pytest.raises(exc) as info:
        sparse_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("pattern"), **kw)
    assert text in str(info.value)


def test_float64_only_on_cpu():
    q, k, v = qkv(dtype=torch.float64)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern()), reference_attention(q, k, v, pattern()))
    q, k, v = (x.to("meta") for x in (q, k, v))
    with pytest.raises(TypeError, match="float64 is supported on the CPU only"):
        sparse_attention(q, k, v, pattern())


def test_head_dims_past_the_kernels_warn_once(monkeypatch):
    """Where the kernels run (here: the interpreter), a head dim they do not take falls back to the
    reference with one warning that says so; the CPU's documented reference path stays silent."""
    s2attn.validation.forget_warnings()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (torch.randn(1, 40, h, 264) for h in (HEADS, KV_HEADS, KV_HEADS))
    with pytest.warns(UserWarning, match=r"head_dim=264: the Triton kernels take head dims up to 256, so s2attn "
                                         r"runs the PyTorch reference"):
        out = sparse_attention(q, k, v, pattern())
    assert rel_err(out, reference_attention(q.double(), k.double(), v.double(), pattern())) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse_attention(q, k, v, pattern())  # once
        assert s2attn.ops.use_kernel(q[..., :256])
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not s2attn.ops.use_kernel(torch.randn(1, 1, 1, 300))


def test_layout_named_in_dim_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"expected 4-D \(batch, heads, seqlen, head_dim\) for layout='bhsd'"):
        sparse_attention(q[0], k, v, pattern(), layout="bhsd")


def varlen_call(**change):
    """Arguments of a valid ``sparse_attention_varlen`` call, with ``change`` applied."""
    kw = dict(q=torch.randn(40, HEADS, D), k=torch.randn(90, KV_HEADS, D), v=torch.randn(90, KV_HEADS, D),
              cu_seqlens_q=torch.tensor([0, 9, 9, 40], dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, 30, 47, 90], dtype=torch.int32), max_seqlen_q=31, max_seqlen_k=43,
              pattern=pattern())
    kw.update({name: (fn(kw) if callable(fn) else fn) for name, fn in change.items()})
    return kw


def cu(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_VARLEN = [
    ("q 4-D", dict(q=lambda kw: kw["q"][None]), ValueError, "q has shape (1, 40, 4, 32) (4-D): expected 3-D (total_q"),
    ("v 2-D", dict(v=lambda kw: kw["v"][:, 0]), ValueError, "v has shape (90, 32) (2-D): expected 3-D (total_k"),
    ("k/v tokens", dict(v=lambda kw: kw["v"][:80]), ValueError, "v.shape=(80, 2, 32): total_k 80 differs from k's 90"),
    ("cu int64", dict(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"].long()), TypeError,
     "cu_seqlens_q.dtype=torch.int64: expected torch.int32"),
    ("cu list", dict(cu_seqlens_k=[0, 30, 47, 90]), TypeError, "cu_seqlens_k: expected a torch.Tensor, got list"),
    ("cu 2-D", dict(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q.shape=(1, 4)"),
    ("cu too short", dict(cu_seqlens_q=cu(0)), ValueError, "cu_seqlens_q.shape=(1,)"),
    ("cu start", dict(cu_seqlens_k=cu(1, 30, 47, 90)), ValueError, "cu_seqlens_k[0]=1: expected 0"),
    ("cu decreasing", dict(cu_seqlens_q=cu(0, 9, 8, 40)), ValueError, "cu_seqlens_q[2]=8 < cu_seqlens_q[1]=9"),
    ("cu last", dict(cu_seqlens_k=cu(0, 30, 47, 89)), ValueError, "cu_seqlens_k[-1]=89: expected the number of packed tokens, 90"),
    ("cu lengths", dict(cu_seqlens_k=cu(0, 30, 90)), ValueError, "cu_seqlens_q has 4 entries and cu_seqlens_k 3"),
    ("cu device", dict(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"].to("meta")), ValueError, "cu_seqlens_q is on device meta"),
    ("per-sequence sq > sk", dict(cu_seqlens_q=cu(0, 9, 29, 40), max_seqlen_q=20), ValueError,
     "sequence 1: seqlen_q=20 > seqlen_k=17"),
    ("max_seqlen_q small", dict(max_seqlen_q=30), ValueError, "max_seqlen_q=30 is smaller than the longest sequence (31)"),
    ("max_seqlen_k not int", dict(max_seqlen_k=43.0), TypeError, "max_seqlen_k=43.0"),
    ("pattern too short", dict(pattern=pattern(40)), ValueError, "seqlen_k=43 is longer than the pattern's max_seq_len=40"),
    ("pattern heads", dict(pattern=dense(100, 16, num_heads=2)), ValueError, "q heads=4"),
    ("dtype", dict(k=lambda kw: kw["k"].double()), TypeError, "k.dtype=torch.float64"),
]


@pytest.mark.parametrize("case,change,exc,text", BAD_VARLEN, ids=[c[0] for c in BAD_VARLEN])
def test_bad_varlen_inputs_raise_clear_errors(case, change, exc, text):
    kw = varlen_call(**change)
    with pytest.raises(exc) as info:
        sparse_attention_varlen(**{k: kw.pop(k) for k in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                                                           "max_seqlen_q", "max_seqlen_k", "pattern")}, **kw)
    assert text in str(info.value)


def test_cu_seqlens_read_once_per_version(monkeypatch):
    """A model passes one ``cu_seqlens`` to every layer: its values are read (a host sync on a GPU) once,
    and read again after an in-place change, which is then caught."""
    from s2attn.validation import check_cu_seqlens

    real, reads = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self) or real(self))
    bounds = cu(0, 9, 9, 40)
    for _ in range(3):
        assert check_cu_seqlens("cu_seqlens_q", bounds, 40, bounds.device) == [0, 9, 9, 40]
    assert len(reads) == 1
    bounds[2] = 8
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[2\]=8 < cu_seqlens_q\[1\]=9"):
        check_cu_seqlens("cu_seqlens_q", bounds, 40, bounds.device)
    assert len(reads) == 2


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a CPU user runs it: no interpreter, the reference
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["out"].shape == scope["q"].shape
    assert (tmp_path / "pattern.png").exists()
