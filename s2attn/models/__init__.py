"""Model helpers: the HHST config (sparse heterogeneous layers plus a few dense ones) and a tiny Llama."""

from .hhst import hhst_config, tiny_llama

__all__ = ["hhst_config", "tiny_llama"]
