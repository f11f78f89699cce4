"""vLLM plugin: serve S2 / HHST checkpoints with an attention backend that reads only each head's pages.

Installed with the package (``pip install s2attn[vllm]``), vLLM loads :func:`register` from the
``vllm.general_plugins`` entry point in every engine process. It registers the backend in vLLM's
``CUSTOM`` slot; select it with ``attention_backend="CUSTOM"``::

    llm = vllm.LLM(model=DIR, attention_backend="CUSTOM", block_size=64)   # block_size: the pattern's

``DIR`` is any Llama-family checkpoint; its ``config.json`` carries ``s2attn`` (as
:func:`s2attn.models.hhst_config` writes it): sparse layers use the local-stride pattern, the
``dense_layers`` attend densely, and a config without ``s2attn`` is served densely.

Some platforms do not let a custom backend be chosen (vLLM's CPU platform always picks
``CPU_ATTN``). There, set ``S2ATTN_VLLM_REPLACE=CPU_ATTN`` (comma-separated backend names) in the
environment before the engine starts: the plugin then puts the s2attn backend in those slots too.
:func:`replace` / :func:`restore` do the same in-process.

What is served, and what is refused at engine start (with the setting named) is documented in
:mod:`.backend`; the kernels in :mod:`.paged`; the per-layer, per-rank patterns in :mod:`.patterns`.
"""

from __future__ import annotations

import os

BACKEND = "s2attn.integrations.vllm.backend.S2AttentionBackend"
REPLACE_ENV = "S2ATTN_VLLM_REPLACE"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the s2attn backend into the ``CUSTOM`` slot, and into every
    slot named in ``$S2ATTN_VLLM_REPLACE`` (idempotent; vLLM calls it once per process)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND)
    names = [n.strip() for n in os.environ.get(REPLACE_ENV, "").split(",") if n.strip()]
    if names:
        replace(*names)


def replace(*names: str) -> None:
    """Serve the backend slots ``names`` (e.g. ``"CPU_ATTN"``) with the s2attn backend, in this process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name in names:
        try:
            slot = AttentionBackendEnum[name]
        except (KeyError, ValueError):
            raise ValueError(f"{REPLACE_ENV}={name!r}: not a vLLM attention backend; expected one of "
                             f"{[m.name for m in AttentionBackendEnum]}") from None
        register_backend(slot, BACKEND)
    _forget_selection()


def restore(*names: str) -> None:
    """Undo :func:`replace` for ``names``: vLLM's own backends again."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name in names:
        AttentionBackendEnum[name].clear_override()
    _forget_selection()


def _forget_selection() -> None:
    """vLLM memoises the backend it picked per layer configuration; a changed slot must be looked up anew."""
    from vllm.v1.attention import selector

    cached = getattr(selector, "_cached_get_attn_backend", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


__all__ = ["BACKEND", "REPLACE_ENV", "register", "replace", "restore"]
