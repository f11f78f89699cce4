"""Run by test_vllm.py::test_tensor_parallel_2_matches_hf in a fresh process (vLLM spawns its TP workers, so
the engine needs a ``__main__`` guard): greedy tokens of the test prompts, as one JSON line."""

import json
import sys


def main(model_dir: str, tp: int) -> None:
    import vllm

    import test_vllm as t

    llm = vllm.LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", block_size=16, enforce_eager=True,
                   max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=16 << 20, seed=0,
                   tensor_parallel_size=tp, distributed_executor_backend="mp")
    tokens, _ = t.generate(llm, t.prompts(t.TP_PROMPTS))
    print("TOKENS " + json.dumps(tokens), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
