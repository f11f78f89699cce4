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
