"""The custom ops under torch.compile: one graph (no breaks), same values and gradients as eager."""

import pytest
import torch

from torch._subclasses.fake_tensor import FakeTensor

import s2attn
from s2attn import ops
from s2attn.kernels import launch

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or launch.interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"
)


def test_compiled_fullgraph_matches_eager(monkeypatch):
    """Eager calls take the direct autograd path; torch.compile must trace the custom ops, forward and
    backward (a kernel launched on the tracer's fake tensors fails on a GPU only)."""
    direct = ops._backward_grads

    def eager_only(*args):
        assert not isinstance(args[0], FakeTensor), "the traced backward called the kernels directly"
        return direct(*args)

    monkeypatch.setattr(ops, "_backward_grads", eager_only)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pattern = s2attn.local_stride(4, 512, 16, local_blocks=2, vert_stride=3, num_kv_heads=2)

    def layer(q, k, v):
        return s2attn.sparse_attention(q, k, v, pattern).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 100, 4, 32, device=device, requires_grad=True)
    k = torch.randn(1, 100, 2, 32, device=device, requires_grad=True)
    v = torch.randn(1, 100, 2, 32, device=device, requires_grad=True)
    eager = layer(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    result = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(result, (q, k, v))
    torch.testing.assert_close(result, eager)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b)


def test_compiled_recompiles_for_new_shapes_and_scales():
    """A second call with other lengths and another softmax_scale recompiles with dynamic shapes, where the
    scale arrives as a symbolic float: validation must compare it, not call math.isfinite on it (torch
    2.11's Dynamo refused that graph; the GPU fuzz's cases 13 then 19)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pattern = s2attn.local_stride(2, 256, 16, local_blocks=2, vert_stride=3)
    compiled = torch.compile(s2attn.sparse_attention, fullgraph=True, backend="aot_eager")
    for n, scale in ((48, 0.3), (80, 0.2), (112, 0.25)):
        q, k, v = (torch.randn(1, n, 2, 16, device=device) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v, pattern, softmax_scale=scale),
                                   s2attn.sparse_attention(q, k, v, pattern, softmax_scale=scale))
    with pytest.raises(Exception, match="softmax_scale=nan"):  # fullgraph: Dynamo's error, naming ours
        compiled(q, k, v, pattern, softmax_scale=float("nan"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_forward_backward():
    """Forward and backward captured in a CUDA graph after one eager step (kernels compiled, tables and
    the long pass's launch order cached): nothing waits on the host, and replays on new inputs give the
    eager values (the long pass adds chunks atomically, so the order of fp32 sums may differ)."""
    pattern = s2attn.local_stride(4, 2048, 64, local_blocks=2, vert_stride=4, num_kv_heads=2)
    q = torch.randn(1, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1000, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(q)

    def step():
        out = s2attn.sparse_attention(q, k, v, pattern)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            for x in (q, k, v, g):
                x.copy_(torch.randn_like(x))
        graph.replay()
        for name, got, want in zip(("out", "dq", "dk", "dv"), captured, step()):
            torch.testing.assert_close(got, want, msg=name)
