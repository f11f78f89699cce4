#!/usr/bin/env bash
# One GPU session: environment, GPU tests, benchmarks; a short table last.
# Usage (device tool): bash scripts/gpu_check.sh [tests|fuzz|bench|compare|wsfwd|remap|decode|profile|extra|all]
# Results land in $OUT (default ./gpu-out).
# compare: REF=DIR (a package tree of another commit: git archive COMMIT s2attn | tar -x -C DIR) timed against
# this tree in alternation, ROUNDS times each (default 2), with the same `s2attn bench` arguments (COMPARE_ARGS).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $what == tests || $what == all ]]; then
  # compiling each kernel variant is CPU-bound: run the tests as parallel shards
  shards=$(mktemp -d)
  python3 -m pytest ${TEST_PATHS:-tests/kernels} --collect-only -q 2>/dev/null | grep "::" > "$shards/nodes"
  split -n r/${TEST_SHARDS:-8} "$shards/nodes" "$shards/shard."
  for f in "$shards"/shard.*; do
    mapfile -t ids < "$f"  # one test id a line; ids may hold spaces
    (timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:warnings "${ids[@]}" > "$f.log" 2>&1; echo "exit $?" >> "$f.log") &
  done
  wait
  cat "$shards"/shard.*.log > "$OUT/tests.log"
  grep -hE "FAILED|Error|passed|failed|exit" "$OUT/tests.log" | tail -30
fi
if [[ $what == fuzz || $what == all ]]; then
  # the differential fuzz at real sizes (decode, combine_partitions, torch.compile, the Gluon kernels too)
  timeout ${FUZZ_TIMEOUT:-420} python3 tests/differential.py --gpu --cases ${FUZZ_CASES:-2000} \
      --minutes ${FUZZ_MINUTES:-5} 2>&1 | tee "$OUT/fuzz.log" | tail -12
fi
if [[ $what == decode ]]; then
  timeout ${DECODE_TIMEOUT:-240} python3 benchmarks/bench_decode.py --out "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.md" | tail -45
fi
if [[ $what == wsfwd ]]; then
  # the Gluon forward (off by default): its GPU tests, the bisect ladder (old out store beside the new), timings
  timeout ${WSFWD_TEST_TIMEOUT:-300} python3 -m pytest -q -n 8 -p no:warnings tests/kernels/test_attention.py \
      -k warp_specialised_forward 2>&1 | tee "$OUT/wsfwd_tests.log" | tail -15
  timeout ${BISECT_TIMEOUT:-280} python3 benchmarks/ws_fwd_bisect.py --old-store --timeout 90 2>&1 | tee "$OUT/bisect.log"
  timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/profile_bwd.py --only "default,ws fwd" --rounds 2 2>&1 \
      | tee "$OUT/wsfwd_profile.log" | grep "^|"
fi
if [[ $what == remap ]]; then
  # issue 22: the remap against the table path (kernel times) and the reference, rank by rank
  timeout ${REMAP_TIMEOUT:-400} python3 benchmarks/bench_remap.py --seq 131072 524288 --world 2 --reference 2>&1 \
      | tee "$OUT/remap.log" | grep "^|"
fi
if [[ $what == profile ]]; then
  timeout ${PROFILE_TIMEOUT:-300} python3 benchmarks/profile_bwd.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -30
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m s2attn bench ${BENCH_ARGS:-} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -40
fi
if [[ $what == extra || $what == all ]]; then
  # block 16 (Merge-Q) vs block 64 at the same density; first-call time; 1M tokens
  timeout 150 python3 -m s2attn bench --seqlens 32768,131072 --block-size 16 --providers s2attn,flex-same \
      --out "$OUT/bench16" 2>&1 | tail -8
  timeout 120 python3 benchmarks/bench_long.py 2>&1 | tee "$OUT/long.log" | tail -4
fi
if [[ $what == compare ]]; then
  args=${COMPARE_ARGS:---seqlens 32768,131072 --providers s2attn}
  for round in $(seq ${ROUNDS:-2}); do
    for side in ref this; do
      path=$PWD; [[ $side == ref ]] && path=${REF:?REF=DIR of the other tree}
      PYTHONPATH=$path timeout ${COMPARE_TIMEOUT:-150} python3 -m s2attn bench $args --out "$OUT/compare-$side-$round" \
          > "$OUT/compare-$side-$round.log" 2>&1 || echo "compare $side $round: exit $?"
    done
  done
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("compare-*/results.json")):
    side, rnd = f.parent.name.split("-")[1:]
    for r in json.loads(f.read_text())["rows"]:
        rows.append((r["seqlen"], r["provider"], side, rnd, r.get("fwd_ms"), r.get("bwd_ms")))
print("| seqlen | provider | tree | round | fwd ms | bwd ms |\n|---|---|---|---|---|---|")
for row in sorted(rows):
    print("| " + " | ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in row) + " |")
PY
fi
