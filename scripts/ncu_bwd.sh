#!/usr/bin/env bash
# ncu of the backward's kernels (second call) at one length: tensor-pipe use, stalls, memory
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONPATH=$PWD
N=${1:-65536}
timeout 500 ncu -k regex:_attn_bwd --launch-skip 3 --launch-count 3 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
  -o "$OUT/bwd" python3 benchmarks/ncu_bwd.py $N > "$OUT/ncu.log" 2>&1
tail -5 "$OUT/ncu.log"
ncu -i "$OUT/bwd.ncu-rep" --print-details all > "$OUT/details.txt" 2>&1
grep -E "_attn_bwd|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit|Registers Per|Shared Memory Config|Stall|gmma|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" "$OUT/details.txt" | head -120
