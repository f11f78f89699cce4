"""Integrations with the engines users already run: ``torch.distributed`` (:mod:`.distributed`),
Megatron-core (:mod:`.megatron`) and Hugging Face ``transformers`` (:mod:`.transformers`).

Import the submodule you need; this package imports no optional dependency itself.
"""
