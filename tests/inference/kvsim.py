"""Test driver: runs a SparseKVCache through steps and checks every layer's output against
the reference attention over the full, never-evicted keys of each sequence."""

from __future__ import annotations

import torch

import s2attn
from s2attn.inference import DecodePlan, SparseKVCache, append, decode, prefill

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


class Driver:
    """A few layers of attention over one cache; ``self.keys[slot][layer]`` is the full (K, V)."""

    def __init__(self, patterns, *, num_layers: int, num_heads: int = 8, num_kv_heads: int = 2,
                 head_dim: int = 16, num_pages: int = 64, max_seqs: int = 4, dtype=torch.float32, seed: int = 0,
                 device: str = DEVICE):
        self.cache = SparseKVCache(patterns, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   head_dim=head_dim, num_pages=num_pages, max_seqs=max_seqs, dtype=dtype,
                                   device=device)
        self.patterns = [self.cache.layer(i).pattern for i in range(num_layers)]
        self.dtype, self.device, self.gen = dtype, device, torch.Generator().manual_seed(seed)
        self.keys: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.errors: list[float] = []

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def add(self) -> int:
        slot = self.cache.add_sequence()
        empty = self.rand(0, self.cache.num_kv_heads, self.cache.head_dim)
        self.keys[slot] = [(empty, empty)] * self.cache.num_layers
        return slot

    def remove(self, slot: int) -> None:
        self.cache.remove_sequence(slot)
        del self.keys[slot]

    def step(self, slots: list[int], new: list[int] | int, plan: DecodePlan | None = None) -> None:
        """Prefill when a sequence gets several tokens, else decode; check every layer."""
        new = [new] * len(slots) if isinstance(new, int) else new
        c = self.cache
        total = sum(new)
        with c.step(slots, new):
            for layer in range(c.num_layers):
                q = self.rand(total, c.num_heads, c.head_dim)
                k, v = (self.rand(total, c.num_kv_heads, c.head_dim) for _ in range(2))
                if max(new) == 1:
                    if plan is None:
                        append(c, layer, k, v)
                        out, lse = decode(c, layer, q, return_lse=True)
                    else:
                        rows = plan.batch_size - total
                        pad = lambda x: torch.cat([x, self.rand(rows, *x.shape[1:])])  # noqa: E731
                        plan.append(layer, pad(k), pad(v))
                        out, lse = (x[:total] for x in plan.run(layer, pad(q), return_lse=True))
                else:
                    out, lse = prefill(c, layer, q, k, v), None
                self._check(slots, new, layer, q, k, v, out, lse)

    def _check(self, slots, new, layer, q, k, v, out, lse) -> None:
        start = 0
        outs, refs = [], []
        for slot, n in zip(slots, new):
            K, V = self.keys[slot][layer]
            K, V = torch.cat([K, k[start : start + n]]), torch.cat([V, v[start : start + n]])
            self.keys[slot][layer] = (K, V)
            ref, ref_lse = s2attn.reference_attention(q[None, start : start + n].double(), K[None].double(),
                                                      V[None].double(), self.patterns[layer], return_lse=True)
            outs.append(out[start : start + n])
            refs.append(ref[0])
            if lse is not None:
                got = lse[start : start + n].T.double()
                assert torch.allclose(got, ref_lse[0], atol=TOL[self.dtype] * 10, rtol=0), (slot, layer)
            start += n
        err = rel_err(torch.cat(outs), torch.cat(refs))
        self.errors.append(err)
        assert err <= TOL[self.dtype], f"layer {layer}, slots {slots}, new {new}: rel err {err:.2e}"


def kv_cache_efficient(mask: torch.Tensor) -> bool:
    """No key block is skipped by a query block on or below the diagonal and read by a later one.
    (Written here because ``BlockPattern.is_kv_cache_efficient`` counts the causal upper triangle
    as skips, so it reports every explicit mask as inefficient.)"""
    n = mask.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool).tril()
    skipped = torch.cummax((~mask & below).to(torch.int8), dim=-2).values.bool()
    return not bool((mask[..., 1:, :] & skipped[..., :-1, :]).any())
