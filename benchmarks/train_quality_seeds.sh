#!/usr/bin/env bash
# Issue 23: dense vs HHST (heterogeneous) vs homogeneous HHST, several seeds each, at the same token budget,
# on one GPU, in pieces that each fit one call; benchmarks/train_quality_seeds.py aggregates what exists.
#
# The recipe of benchmarks/results/train_quality_long/ (its reasons: benchmarks/train_quality.sh): 4 layers,
# d_model 512, 8 heads of 64, passkey data with the loss on the key, a length curriculum from 64 tokens
# over the first half of the steps, then 8192; 3200 steps x 4 x 8192 tokens = 104.9M tokens a model. HHST:
# layer 0 dense, local 512 tokens + every 8th block of 64, one stride offset per kv head (`homo`: all heads
# on the same offset). `--seed` seeds the initial weights and the training batches; a seed gives all
# variants the same weights and batches.
#
# A run is one (variant, seed): train, then the held-out loss (`--eval-tokens`: the same held-out set for
# every run, at 1k-16k tokens), then the needle grid (1k-16k tokens, beyond the 8k of training; depths
# 0-90% and 100% apart, since at 100% the needle sits right before the question). Its files go to
# $RESULTS/<variant>-s<seed>/: run.log (everything printed), run.json (times, device, versions, the
# arguments), summary.json (train: final loss, tokens/s, held-out loss), train_log.csv (every step),
# needle.csv, needle.png. A run is written to <name>.partial and renamed when it is complete, so a run
# directory that exists is finished: it is skipped (resume by running the same command again; train has
# no mid-run checkpoints, so a run killed part-way starts over). Checkpoints stay in $WORK.
#
# Which runs: VARIANTS (default dense,hhst,homo) x SEEDS (default 0,1,2), seed by seed, or the list RUNS
# (RUNS=homo-s0,dense-s1: those, in that order; VARIANTS and SEEDS are then ignored). BUDGET_S: start a
# run only if it should end within this many seconds of the script's start (the estimate: the longest
# finished run of that variant in $RESULTS, else EST_S); 0 = no limit. BUNDLE=path.tar.gz: after each run,
# that file holds every run directory finished in this call (one file to carry back). JOBS=N: up to N runs at
# once on the one GPU (the model is small, so they share it well); run.json records it, and the aggregation
# takes tokens/s only from runs with JOBS=1. COMMIT=sha: the commit run.json records (default: git's HEAD, "+dirty"
# if the tree differs; the device tool's copy of .git can be older than the tree it sends, so pass it from where
# the call is made). Settings are environment variables or NAME=value arguments:
#
#   bash benchmarks/train_quality_seeds.sh VARIANTS=dense,hhst SEEDS=0 BUDGET_S=530 BUNDLE=$OUT/runs.tar.gz
#
# CPU smoke (seconds): DEVICE=cpu SEQ=128 MIN_LEN=32 STEPS=4 BATCH=2 D_MODEL=32 LAYERS=2 HEADS=4 KV_HEADS=2
# BLOCK=16 LOCAL=32 STRIDE=2 NEEDLE_LENGTHS=64,128,256 EVAL_TOKENS=256 NEEDLE_SAMPLES=2 RESULTS=/tmp/r.
set -euo pipefail
cd "$(dirname "$0")/.."

KNOWN=" PYTHON RESULTS WORK RUNS VARIANTS SEEDS JOBS BUDGET_S EST_S BUNDLE COMMIT DEVICE SEQ MIN_LEN BATCH STEPS LR TASK LOSS \
D_MODEL LAYERS HEADS KV_HEADS DENSE_LAYERS LOCAL STRIDE BLOCK EVAL_TOKENS EVAL_LENGTHS NEEDLE_LENGTHS NEEDLE_DEPTHS \
NEEDLE_SAMPLES NEEDLE_BATCH "
for arg in "$@"; do
  if [[ $arg != *=* || $KNOWN != *" ${arg%%=*} "* ]]; then
    echo "train_quality_seeds.sh: error: argument '$arg': expected NAME=value, NAME one of:$KNOWN" >&2
    exit 2
  fi
  export "${arg?}"
done

PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results/train_quality_seeds}
WORK=${WORK:-${TMPDIR:-/tmp}/s2attn-train-quality-seeds}
VARIANTS=${VARIANTS:-dense,hhst,homo} SEEDS=${SEEDS:-0,1,2} RUNS=${RUNS:-}
JOBS=${JOBS:-1} BUDGET_S=${BUDGET_S:-0} EST_S=${EST_S:-240} BUNDLE=${BUNDLE:-}
DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-8192} MIN_LEN=${MIN_LEN:-64} BATCH=${BATCH:-4} STEPS=${STEPS:-3200} LR=${LR:-2e-3}
TASK=${TASK:-passkey} LOSS=${LOSS:-answer}
D_MODEL=${D_MODEL:-512} LAYERS=${LAYERS:-4} HEADS=${HEADS:-8} KV_HEADS=${KV_HEADS:-8}
DENSE_LAYERS=${DENSE_LAYERS:-0} LOCAL=${LOCAL:-512} STRIDE=${STRIDE:-8} BLOCK=${BLOCK:-64}
NEEDLE_LENGTHS=${NEEDLE_LENGTHS:-1024,2048,4096,8192,16384}
EVAL_TOKENS=${EVAL_TOKENS:-262144} EVAL_LENGTHS=${EVAL_LENGTHS:-$NEEDLE_LENGTHS}
NEEDLE_DEPTHS=${NEEDLE_DEPTHS:-0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1} NEEDLE_SAMPLES=${NEEDLE_SAMPLES:-20}
NEEDLE_BATCH=${NEEDLE_BATCH:-8}
mkdir -p "$RESULTS" "$WORK"
rm -rf "$RESULTS"/*.partial  # runs killed part-way in an earlier call

MODEL=(--d-model "$D_MODEL" --layers "$LAYERS" --heads "$HEADS" --kv-heads "$KV_HEADS" --dense-layers "$DENSE_LAYERS"
       --local "$LOCAL" --stride "$STRIDE" --block-size "$BLOCK")

estimate() {  # seconds a run of variant $1 should take: the longest finished one in $RESULTS that ran with as
  # many JOBS, else the longest alone times JOBS, else $EST_S
  "$PY" - "$EST_S" "$JOBS" "$RESULTS/$1"-s*/run.json <<'EOF'
import json, sys
jobs = int(sys.argv[2])
runs = [json.load(open(f)) for f in sys.argv[3:] if not f.endswith("*/run.json")]
same = [r["wall_s"] for r in runs if r.get("jobs", 1) == jobs]
alone = [r["wall_s"] * jobs for r in runs if r.get("jobs", 1) == 1]
print(round(max(same or alone or [float(sys.argv[1])])))
EOF
}

if [[ -z $RUNS ]]; then
  for seed in ${SEEDS//,/ }; do
    for variant in ${VARIANTS//,/ }; do
      RUNS+=${RUNS:+,}$variant-s$seed
    done
  done
fi
for name in ${RUNS//,/ }; do
  if [[ ! $name =~ ^(dense|hhst|homo)-s[0-9]+$ ]]; then
    echo "train_quality_seeds.sh: error: RUNS=$RUNS: '$name' is not <dense|hhst|homo>-s<seed>" >&2
    exit 2
  fi
done

one_run() {  # train and evaluate run $1 (<variant>-s<seed>) into $RESULTS/$1
  local name=$1 variant=${1%-s*} seed=${1##*-s}
  local run=$RESULTS/$1.partial work=$WORK/$1
  rm -rf "$work"
  mkdir -p "$run" "$work"
  TRAIN=(train --variants "$variant" --seed "$seed" --task "$TASK" --loss "$LOSS" --seq-len "$SEQ"
         --min-len "$MIN_LEN" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --device "$DEVICE"
         --eval-tokens "$EVAL_TOKENS" --eval-lengths "$EVAL_LENGTHS" --out "$work/train" "${MODEL[@]}")
  NEEDLE=(needle --checkpoint "$work/train/$variant/checkpoint" --lengths "$NEEDLE_LENGTHS"
          --depths "$NEEDLE_DEPTHS" --samples "$NEEDLE_SAMPLES" --batch-size "$NEEDLE_BATCH" --device "$DEVICE"
          --out "$run")
  # train and needle in one process: one interpreter start and CUDA initialisation a run, not two
  PYTHONUNBUFFERED=1 PYTHONPATH=. "$PY" - "$variant" "$seed" "$run" "$JOBS" "${TRAIN[@]}" -- "${NEEDLE[@]}" <<'EOF' \
    2>&1 | tee "$run/run.log"
import json, os, platform, shlex, shutil, subprocess, sys, time
from pathlib import Path

import torch

from s2attn.apps.cli import main

variant, seed, run, jobs = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
cut = sys.argv.index("--")
train, needle = sys.argv[5:cut], sys.argv[cut + 1:]
t0 = time.time()
if main(train) or main(needle):
    sys.exit(1)
t1 = time.time()
out = Path(train[train.index("--out") + 1])
for name in ("summary.json", "train_log.csv"):
    shutil.copy(out / name, run / name)
versions = {"torch": torch.__version__}
for module in ("triton", "transformers"):
    try:
        versions[module] = __import__(module).__version__
    except ImportError:
        versions[module] = None
git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
commit = os.environ.get("COMMIT") or (git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None
cuda = "cuda" in train[train.index("--device") + 1]
record = {"variant": variant, "seed": seed, "wall_s": round(t1 - t0, 1), "jobs": jobs,
          "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
          "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", **versions,
          "commit": commit,
          "train": shlex.join(["s2attn", *train]), "needle": shlex.join(["s2attn", *needle])}
(run / "run.json").write_text(json.dumps(record, indent=1) + "\n")
print(f"{variant} seed {seed}: {t1 - t0:.0f} s")
EOF
  mv "$run" "$RESULTS/$name"
}

finished_runs() {  # the runs started in this call that are finished, one a line
  local name
  for name in "${started[@]}"; do
    if [[ -d $RESULTS/$name ]]; then echo "$name"; fi
  done
}

bundle() {  # $BUNDLE: every run directory finished in this call
  local done
  mapfile -t done < <(finished_runs)
  if [[ -n $BUNDLE && ${#done[@]} -gt 0 ]]; then
    tar czf "$BUNDLE" -C "$RESULTS" "${done[@]}"
  fi
}

start=$(date +%s)
started=() skipped=() over_budget=()
for name in ${RUNS//,/ }; do
  if [[ -d $RESULTS/$name ]]; then
    skipped+=("$name")
    continue
  fi
  while (($(jobs -rp | wc -l) >= JOBS)); do
    wait -n || true
    bundle
  done
  if ((BUDGET_S > 0)); then
    est=$(estimate "${name%-s*}") elapsed=$(($(date +%s) - start))
    if ((elapsed + est > BUDGET_S)); then
      echo "== $name: not started, ~${est} s from ${elapsed} s would pass BUDGET_S=$BUDGET_S"
      over_budget+=("$name")
      continue
    fi
  fi
  echo "== $name"
  started+=("$name")
  if ((JOBS > 1)); then
    one_run "$name" > /dev/null &  # its output is in its run.log
  else
    one_run "$name"
  fi
done
while (($(jobs -rp | wc -l) > 0)); do
  wait -n || true
  bundle
done
bundle
mapfile -t finished < <(finished_runs)

echo "== $(($(date +%s) - start)) s: finished ${finished[*]:-none}; already there ${skipped[*]:-none}; left for" \
     "another call ${over_budget[*]:-none}"
echo "aggregate: python benchmarks/train_quality_seeds.py --results $RESULTS"
