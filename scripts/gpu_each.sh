#!/usr/bin/env bash
# Run the given pytest node ids each in its own process, in parallel; print exit code and time per test.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
i=0
for node in "$@"; do
  i=$((i + 1))
  ( start=$(date +%s); timeout ${EACH_TIMEOUT:-240} python3 -m pytest -q -p no:warnings "$node" > "/tmp/each.$i.log" 2>&1
    rc=$?; echo "$rc $(( $(date +%s) - start ))s $node" > "/tmp/each.$i.rc" ) &
done
wait
cat /tmp/each.*.rc | sort -k3
cat /tmp/each.*.log > "$OUT/each.log"; grep -h "^E  " /tmp/each.*.log | head -20
