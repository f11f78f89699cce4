"""Serving with a sparse pattern: a per-head paged KV cache that frees the blocks a head will
never read again, prefill (packed, padded, chunked) and a Triton decode kernel.

A step, for every layer::

    with cache.step(slots, num_new_tokens):        # reserve pages in all layers (or raise)
        for layer in range(num_layers):
            out = prefill(cache, layer, q, k, v)   # prompts or chunks: attention + write
            # or, one token per sequence:
            append(cache, layer, k, v); out = decode(cache, layer, q)
    # leaving the block frees the pages no later query reads; an exception escaping it (or
    # cache.abort_step()) undoes the step in every layer: lengths, page tables, free lists

For CUDA graphs, build a :class:`DecodePlan` once and call ``plan.append`` / ``plan.run``
inside the captured region; ``cache.begin_step`` / ``end_step`` stay outside it.
"""

from .cache import SparseKVCache, Step, append, kv_blocks_kept, last_readers, sequences_that_fit
from .decode import DecodePlan, decode
from .prefill import prefill, prefill_padded

__all__ = [
    "DecodePlan", "SparseKVCache", "Step", "append", "decode", "kv_blocks_kept", "last_readers", "prefill",
    "prefill_padded", "sequences_that_fit",
]
