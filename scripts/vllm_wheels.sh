#!/usr/bin/env bash
# vLLM 0.22.1 for benchmarks/bench_vllm.py on the GPU machine (issue 16), which has no internet and takes at most
# 64 MiB of working tree per device call. The image already has torch 2.11.0 (CUDA 13), triton 3.6.0,
# transformers 5.17.0, numpy, aiohttp, httpx, anyio, PIL, cv2, regex, psutil, ... (KINDS.md); what vLLM needs
# beyond that to start `vllm.LLM(load_format="dummy")` on a Llama and generate travels here, --no-deps.
#
# What travels (sizes compressed, MiB):
#   vllm-0.22.1 slimmed, ~122: _C (65.3), _C_stable_libtorch (12.9), vllm_flash_attn/_vllm_fa3_C (36.6, FA3:
#       the FLASH_ATTN backend, vLLM's default on Hopper, i.e. the dense baseline), Python (~6.8).
#       Dropped: _vllm_fa2_C (77.6; Hopper picks FA3), _moe_C (30.9; imported under suppress(ImportError), only
#       MoE models call it), vllm-rs (11.4; the Rust frontend, only with VLLM_USE_RUST_FRONTEND=1),
#       third_party/deep_gemm (5.7; FP8 GEMMs; without it has_deep_gemm() is False), _flashmla_C and
#       _flashmla_extension_C (1.0; MLA models, import guarded). RECORD is rewritten to match.
#       FA3 is needed at all because vllm/model_executor/layers/attention/__init__.py (imported by llama.py)
#       imports fa_utils, which imports vllm.vllm_flash_attn, whose __init__ raises ImportError unless FA2 or
#       FA3 loads. VLLM_FA3=0 drops FA3 too and patches that raise away (2 carries instead of 3), but then vLLM's
#       auto-selection still picks FLASH_ATTN on Hopper and fails at the first forward: the dense run must
#       then pass attention_backend="TRITON_ATTN" explicitly (bench_vllm.py does not, as of this script).
#   dependency wheels, ~17 (.whl/vllm-deps/, `fetch`): pydantic 2.14.4 + pydantic-core 2.50.5 + annotated-types
#       + typing-inspection (config classes), msgspec, pyzmq, cbor2, pybase64, blake3, cachetools, gguf
#       (imported by vllm.tokenizers), openai 2.54.0 + jiter + distro + sniffio and openai-harmony
#       (entrypoints/chat_utils.py, imported by vllm.entrypoints.llm), fastapi + starlette + opentelemetry-api
#       (entrypoints/pooling/factories.py), partial-json-parser, llguidance + xgrammar + apache-tvm-ffi
#       (v1/structured_output: class annotations resolve the lazy modules when the scheduler is imported),
#       depyf + astor + dill (torch.compile's debug paths; tiny, insurance).
#       Found by importing vLLM's CUDA path on a CPU machine (CudaPlatform forced, libcuda stubbed) with torch
#       2.11.0 and the image's package versions until nothing was missing, then vllm.LLM up to the GPU worker.
#
# Three device calls, back to back (a machine keeps ignored files only while warm: 30 s idle after a call), each
# carrying one part (parts <= 56 MiB; the tracked tree adds ~4 MiB; the limit is 64 MiB):
#   here:     bash scripts/vllm_wheels.sh fetch && bash scripts/vllm_wheels.sh slim && bash scripts/vllm_wheels.sh split
#   device 1: carry [".whl/vllm-1"]  ls -l .whl/vllm-1   (or anything without vLLM, e.g.
#             python3 benchmarks/bench_vllm.py --kernel | tee $OUT/kernel.md   -- no --out: it imports vllm)
#   device 2: carry [".whl/vllm-2"]  ls -l .whl/vllm-1 .whl/vllm-2
#   device 3: carry [".whl/vllm-3"]
#     set -o pipefail; bash scripts/vllm_wheels.sh install || exit 1
#     export PYTHONPATH=$(bash scripts/vllm_wheels.sh path):$PWD
#     python3 benchmarks/bench_vllm.py --contexts 2048 --new-tokens 8 2>&1 | tee $OUT/smoke.log    # both engines
#     then the real runs (bench_vllm.py --out $OUT/vllm.json ...), in this call or later ones on the warm machine:
#     .whl/vllm-site/ stays there while warm, so a later call needs no carry, only the `export PYTHONPATH=...`.
# If the machine went cold between calls, `install` fails at `join` (a part missing): start again at device 1.
# Environment: nothing is required. VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core in-process) works too, but
# bench_vllm.py builds two engines in one process and an in-process engine may keep its GPU memory after
# `del llm`, so leave it unset there. attention_backend="CUSTOM" picks s2attn; no backend named picks FLASH_ATTN
# (FA3) on Hopper; "TRITON_ATTN" is the other dense backend that needs nothing more.
#
# `install` also writes a one-entry-point dist-info (s2attn's `vllm.general_plugins` entry point from
# pyproject.toml) into the target: the repo is not pip-installed there and *.egg-info is git-ignored, so without
# it vLLM would not load the plugin and attention_backend="CUSTOM" would have no class.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${VLLM_TARGET:-.whl/vllm-site}
FA3=${VLLM_FA3:-1}
NAME=vllm-0.22.1-cp38-abi3-manylinux_2_28_x86_64.whl
ORIG=.whl/vllm/$NAME
SLIM=.whl/vllm-slim/$NAME
DEPS=.whl/vllm-deps
PART_MB=56
# Exact versions, all absent from the GPU image (KINDS.md; .whl/vllm/device-freeze.txt), resolved against it.
PINS="annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 astor==0.8.1 blake3==1.0.11 cachetools==8.0.3
cbor2==6.3.0 depyf==0.20.0 dill==0.4.1 distro==1.9.0 fastapi==0.165.0 gguf==0.19.0 jiter==0.19.0 llguidance==1.6.1
msgspec==0.23.0 openai==2.54.0 openai-harmony==0.0.8 opentelemetry-api==1.45.3 partial-json-parser==0.2.1.1.post7
pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5 pyzmq==27.3.0 sniffio==1.3.1 starlette==1.10.0
typing-inspection==0.4.5 xgrammar==0.2.9"
DROP=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C.abi3.so vllm/vllm-rs 'vllm/third_party/deep_gemm/*'
      vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so)
[[ $FA3 == 1 ]] || DROP+=(vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so)

parts() { ls -d .whl/vllm-[0-9]* 2>/dev/null | sort -V; }

case ${1:-} in
  fetch)  # the dependency wheels, cp312 manylinux x86_64, into .whl/vllm-deps/
    mkdir -p "$DEPS"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$DEPS" $PINS
    ls "$DEPS" | wc -l; du -sh "$DEPS" ;;
  slim)  # the vLLM wheel without what a Llama on Hopper never loads, RECORD to match, into .whl/vllm-slim/
    [[ -f $ORIG ]] || { echo "missing $ORIG (pip download --no-deps vllm==0.22.1 -d .whl/vllm)" >&2; exit 1; }
    rm -rf .whl/vllm-slim && mkdir -p .whl/vllm-slim && cp "$ORIG" "$SLIM"
    zip -q -d "$SLIM" "${DROP[@]}"
    FA3=$FA3 python3 - "$SLIM" <<'EOF'
import base64, csv, hashlib, io, os, sys, zipfile
path = sys.argv[1]
z = zipfile.ZipFile(path)
names = set(z.namelist())
record = next(n for n in names if n.endswith(".dist-info/RECORD"))
rows = [r for r in csv.reader(io.StringIO(z.read(record).decode())) if r and r[0] in names]
patched = {}
if os.environ["FA3"] != "1":  # no FA kernel at all: let vllm.vllm_flash_attn import anyway (fa_utils needs the names)
    init = "vllm/vllm_flash_attn/__init__.py"
    src = z.read(init).decode()
    old = "if not (FA2_AVAILABLE or FA3_AVAILABLE):"
    assert old in src, init
    patched[init] = src.replace(old, "if False:  # s2attn vllm_wheels.sh: no FA kernels carried").encode()
z.close()
for name, data in patched.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rows = [[name, f"sha256={digest}", str(len(data))] if r[0] == name else r for r in rows]
out = io.StringIO()
csv.writer(out, lineterminator="\n").writerows(rows)
patched[record] = out.getvalue().encode()
# rewrite the changed members: zip -d them, then append (zipfile cannot replace in place)
os.system("zip -q -d " + path + " " + " ".join(f"'{n}'" for n in patched))
with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z:
    for name, data in patched.items():
        z.writestr(name, data)
print(f"{path}: {len(rows)} files in RECORD")
EOF
    ls -la "$SLIM" ;;
  split)  # .whl/vllm-N/, each <= 56 MiB: the slim wheel in pieces, then the dependency wheels whole after it
    [[ -f $SLIM ]] || { echo "run slim first" >&2; exit 1; }
    compgen -G "$DEPS/*.whl" > /dev/null || { echo "run fetch first" >&2; exit 1; }
    rm -rf .whl/vllm-[0-9]* .whl/vllm-split && mkdir -p .whl/vllm-split
    split -b ${PART_MB}M -a 2 "$SLIM" ".whl/vllm-split/$NAME.part-"
    n=0
    for p in .whl/vllm-split/*.part-*; do n=$((n + 1)); mkdir -p .whl/vllm-$n; mv "$p" .whl/vllm-$n/; done
    rmdir .whl/vllm-split
    for w in "$DEPS"/*.whl; do  # first fit, the last part first (it holds the wheel's short tail)
      size=$(stat -c %s "$w"); placed=
      for d in $(parts | sort -rV); do
        if (( $(du -sb "$d" | cut -f1) + size <= PART_MB * 1024 * 1024 )); then cp "$w" "$d/"; placed=1; break; fi
      done
      [[ -n $placed ]] || { n=$((n + 1)); mkdir -p .whl/vllm-$n; cp "$w" .whl/vllm-$n/; }
    done
    for d in $(parts); do echo "$d: $(du -sb "$d" | cut -f1) bytes, $(ls "$d" | wc -l) files"; done ;;
  join)  # into .whl/vllm-joined/: the wheel put back together, and every dependency wheel
    rm -rf .whl/vllm-joined && mkdir -p .whl/vllm-joined
    n=$(ls .whl/vllm-[0-9]*/*.part-* 2>/dev/null | sed 's/.*part-//' | sort -u | wc -l)
    have=$(ls .whl/vllm-[0-9]*/"$NAME".part-* 2>/dev/null | wc -l)
    [[ $have -ge 1 && $have -eq $n ]] || { echo "parts of $NAME: $have; carried: $(parts | tr '\n' ' ')" >&2; exit 1; }
    # shellcheck disable=SC2046  # in suffix order (aa, ab, ...), whichever part folder holds each
    cat $(ls .whl/vllm-[0-9]*/"$NAME".part-* | awk -F'part-' '{print $2" "$0}' | sort | cut -d' ' -f2) \
      > .whl/vllm-joined/$NAME
    cp $(ls .whl/vllm-[0-9]*/*.whl) .whl/vllm-joined/
    python3 -c "import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip())" .whl/vllm-joined/$NAME ||
      { echo "$NAME does not join: a part is missing or stale (machine went cold?)" >&2; exit 1; }
    ls .whl/vllm-joined | wc -l ;;
  install)  # join, pip install --no-deps into $TARGET, the plugin's entry point, one import check
    bash "$0" join > /dev/null
    rm -rf "$TARGET"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$TARGET" .whl/vllm-joined/*.whl
    mkdir -p "$TARGET/s2attn_vllm_plugin-0.0.dist-info"
    info=$TARGET/s2attn_vllm_plugin-0.0.dist-info
    printf 'Metadata-Version: 2.1\nName: s2attn-vllm-plugin\nVersion: 0.0\n' > "$info/METADATA"
    printf '[vllm.general_plugins]\ns2attn = s2attn.integrations.vllm:register\n' > "$info/entry_points.txt"
    rm -rf .whl/vllm-joined
    PYTHONPATH=$(bash "$0" path):$PWD python3 -c "
import importlib.metadata as m, vllm, vllm._C, vllm._C_stable_libtorch
from vllm import LLM
print('vllm', vllm.__version__, vllm.__file__,
      'plugins:', [e.value for e in m.entry_points(group='vllm.general_plugins')])" ;;
  path)
    echo "$PWD/$TARGET" ;;
  *)
    echo "usage: bash scripts/vllm_wheels.sh fetch|slim|split|join|install|path  (VLLM_FA3=0: 2 parts, no FA3)" >&2
    exit 2 ;;
esac
