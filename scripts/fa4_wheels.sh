#!/usr/bin/env bash
# FlashAttention-4 for `s2attn bench`'s fa4 / flex-fa4-* providers on a GPU machine that lacks it (issue 20).
# The wheels (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1 with -libs-base/-core/-cu13, quack-kernels,
# apache-tvm-ffi, torch-c-dlpack-ext; --no-deps) sit in .whl/ (git-ignored); the cu13 libs wheel is 92 MB and
# one device call carries 64 MiB, so they travel in two parts and are joined there.
#
#   here:      bash scripts/fa4_wheels.sh split          .whl/*.whl -> .whl/fa4-1/, .whl/fa4-2/ (each < 64 MiB)
#   device 1:  carry [".whl/fa4-1"], run anything (the machine keeps it while warm)
#   device 2:  carry [".whl/fa4-2"]: bash scripts/fa4_wheels.sh install && \
#              PYTHONPATH=$(bash scripts/fa4_wheels.sh path):$PWD python3 -m s2attn bench --providers s2attn,fa4,...
# `--target` folders read no .pth files, so `path` names cutlass's dsl_packages folder itself.
set -euo pipefail
TARGET=${FA4_TARGET:-.fa4}
case ${1:-} in
  split)
    rm -rf .whl/fa4-1 .whl/fa4-2 && mkdir -p .whl/fa4-1 .whl/fa4-2
    for w in .whl/*.whl; do
      name=$(basename "$w")
      if (( $(stat -c %s "$w") > 56 * 1024 * 1024 )); then
        split -b 56M "$w" ".whl/fa4-1/$name.part-"
        for p in .whl/fa4-1/"$name".part-a[!a]; do mv "$p" .whl/fa4-2/; done
      else
        cp "$w" .whl/fa4-2/
      fi
    done
    du -sh .whl/fa4-1 .whl/fa4-2 ;;
  join)  # into .whl/fa4-joined/: every whole wheel, and every split one put back together
    rm -rf .whl/fa4-joined && mkdir -p .whl/fa4-joined
    cp .whl/fa4-2/*.whl .whl/fa4-joined/
    for first in .whl/fa4-1/*.part-aa; do
      name=$(basename "${first%.part-aa}")
      cat .whl/fa4-1/"$name".part-* .whl/fa4-2/"$name".part-* 2>/dev/null > ".whl/fa4-joined/$name"
    done
    ls .whl/fa4-joined ;;
  install)
    bash "$0" join > /dev/null
    python3 -m pip install --quiet --no-deps --target "$TARGET" .whl/fa4-joined/*.whl
    PYTHONPATH=$(bash "$0" path) python3 -c "import flash_attn.cute; print('flash_attn.cute', flash_attn.cute.__file__)" ;;
  path)
    echo "$PWD/$TARGET:$PWD/$TARGET/nvidia_cutlass_dsl/dsl_packages" ;;
  *)
    echo "usage: bash scripts/fa4_wheels.sh split|join|install|path" >&2; exit 2 ;;
esac
