"""s2attn: sparsely-sharded (S2) block-sparse attention for PyTorch, with Triton kernels."""

from .api import sparse_attention, sparse_attention_varlen
from .combine import combine_partitions
from .module import SparseAttention
from .patterns import BlockPattern, dense, from_mask, local_stride
from .reference import reference_attention, reference_attention_varlen

__all__ = [
    "BlockPattern", "SparseAttention", "combine_partitions", "dense", "from_mask", "local_stride",
    "reference_attention", "reference_attention_varlen", "sparse_attention", "sparse_attention_varlen",
]
__version__ = "0.1.0"
