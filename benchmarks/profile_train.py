"""Where a training step of ``s2attn train`` spends its time, per variant (GPU).

    python benchmarks/profile_train.py --seq-len 8192 --batch-size 4

For each variant: wall time per step (synchronised), then the CUDA kernels that take most of
it under torch.profiler. Uses the same model shapes and data as ``s2attn train``.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from s2attn.apps import data
from s2attn.apps.train import VARIANTS, add_model_args, build_config, build_model


def step_fn(model, opt, batch):
    ids, labels = (x.cuda(non_blocking=True) for x in batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    add_model_args(ap)
    args = ap.parse_args()
    batch = next(data.batches("passkey", args.batch_size, args.seq_len))
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = build_model(build_config(variant, args, args.seq_len), "cuda").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(3):
            step_fn(model, opt, batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step_fn(model, opt, batch)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step_fn(model, opt, batch)
            torch.cuda.synchronize()
        gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1e3
        print(f"\n## {variant}: {ms:.1f} ms/step wall, {gpu_ms:.1f} ms/step on the GPU, "
              f"{args.batch_size * args.seq_len / ms * 1e3:,.0f} tokens/s")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
        del model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
