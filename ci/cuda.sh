#!/usr/bin/env bash
# The `cuda` feature, built on a machine with no GPU and no CUDA toolkit, and checked on one that
# has a GPU (CI has none, so this is run by hand where a GPU is lent).
#   ci/cuda.sh build   # CUDA 13.0 compiler and headers from NVIDIA's PyPI wheels, link-time stubs
#                      # of the driver and cuBLAS/cuRAND/NVRTC, then the `it` test binary and the
#                      # CLI with `--features cuda` for sm_90 (H100/H200); both land in .gpu/
#   ci/cuda.sh check   # on the GPU machine, from the repository root: the GPU tests, the autotune
#                      # tests, `hyperfunc autotune --quick`, `bench-autotune`; logs under $OUT
#   ci/cuda.sh shapes  # on the GPU machine: quick tuning of Task B's network at three populations
# The stubs only satisfy the linker: the binaries load the real libcuda.so.1 (driver) and the
# CUDA 13 libcublas/libcurand found on the GPU machine (PyTorch's wheels there).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${HYPERFUNC_CUDA_WORK:-/tmp/hyperfunc-cuda}"
CUDA_VERSION="13.0"

build() {
  local wheels="$WORK/wheels" x="$WORK/toolkit" stub="$WORK/stubs" root="$WORK/root"
  mkdir -p "$wheels" "$x" "$stub" "$root"
  if [ ! -x "$x/nvidia/cu13/bin/nvcc" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$wheels" \
      "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*" \
      "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*" \
      "nvidia-cuda-cccl==$CUDA_VERSION.*"
    for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$x"; done
    chmod +x "$x"/nvidia/cu13/bin/* "$x"/nvidia/cu13/nvvm/bin/*
  fi
  # Link-time stubs: every function cudarc declares, under the real libraries' sonames.
  (cd "$ROOT" && cargo fetch -q)
  local crate cudarc
  crate="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name 'cudarc-0.19.*.crate' | sort | tail -1)"
  [ -n "$crate" ] || { echo "cudarc 0.19 not in cargo's cache after cargo fetch"; exit 1; }
  tar -xzf "$crate" -C "$WORK"
  cudarc="$WORK/$(basename "$crate" .crate)"
  for spec in "driver cuda 1" "nvrtc nvrtc 13" "curand curand 10" "cublas cublas 13" "cublaslt cublasLt 13"; do
    set -- $spec
    grep -oE "pub unsafe fn [a-zA-Z0-9_]+" "$cudarc/src/$1/sys/mod.rs" \
      | awk '{print "void " $4 "(void){}"}' | sort -u > "$stub/$2.c"
    gcc -shared -fPIC -Wl,-soname,"lib$2.so.$3" -o "$stub/lib$2.so" "$stub/$2.c"
    ln -sf "lib$2.so" "$stub/lib$2.so.$3"
  done
  cp "$x/nvidia/cu13/lib/libcudart.so.13" "$stub/"
  ln -sf libcudart.so.13 "$stub/libcudart.so"
  ln -sfn "$x/nvidia/cu13/include" "$root/include"
  ln -sfn "$stub" "$root/lib"
  export CUDA_ROOT="$root" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export PATH="$x/nvidia/cu13/bin:$PATH"
  cd "$ROOT"
  local exe
  exe="$(cargo test --features cuda --test it --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)"
  [ -n "$exe" ] || { echo "the cuda test build failed: cargo test --features cuda --test it --no-run shows why"; exit 1; }
  cargo build --release --no-default-features --features cli,llm,ui,cuda --bin hyperfunc
  mkdir -p .gpu
  objcopy --strip-debug "$exe" .gpu/it
  objcopy --strip-debug target/release/hyperfunc .gpu/hyperfunc
  # Where the tests look for the CLI (CARGO_BIN_EXE_hyperfunc); xz keeps .gpu under the 64 MiB
  # a device call carries.
  echo "$ROOT/target/debug/hyperfunc" > .gpu/bin-path
  xz -f -T2 .gpu/it .gpu/hyperfunc
  grep -qx "/.gpu/" "$(git rev-parse --git-path info/exclude)" \
    || echo "/.gpu/" >> "$(git rev-parse --git-path info/exclude)"
  ls -la .gpu
}

# On the GPU machine: the CUDA 13 libraries on the loader's path, the binaries unpacked.
gpu_env() {
  set +e
  cd "$ROOT"
  out="${OUT:-/tmp/hyperfunc-cuda-out}"
  local dirs="" n f
  mkdir -p "$out"
  nvidia-smi -L
  for n in libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    f="$(find /opt /usr/local /usr/lib /usr/lib64 -name "$n" 2>/dev/null | head -1)"
    [ -n "$f" ] && dirs="$dirs:$(dirname "$f")"
  done
  export LD_LIBRARY_PATH="${dirs#:}:${LD_LIBRARY_PATH:-}"
  export HYPERFUNC_AUTOTUNE_DIR="$out/autotune" RUST_BACKTRACE=1
  for f in .gpu/*.xz; do [ -e "$f" ] && xz -d -f "$f"; done
}

# Quick tuning, dense and rank 1, of Task B's network (64-32-10, 256 rows) at P = 256, 1 024
# and 4 096 and of a wide one (512-512-10) at P = 1 024: where the GPU starts to pay.
shapes() {
  gpu_env
  local spec rank
  for spec in "64,32,10 256,1024,4096" "512,512,10 1024"; do
    set -- $spec
    for rank in "" "--rank 1"; do
      # shellcheck disable=SC2086
      .gpu/hyperfunc autotune tensor --mlp "$1" --rows 256 --pop "$2" $rank --quick --no-save \
        2>&1 | tee -a "$out/shapes.md" | grep -E "^## |^chosen|^\| (cuda:0|cpu) " | head -12
    done
  done
}

check() {
  gpu_env
  # The CLI test runs the binary from the path it was built at.
  local bin
  bin="$(cat .gpu/bin-path)"
  mkdir -p "$(dirname "$bin")" && cp .gpu/hyperfunc "$bin"
  timeout 240 .gpu/it gpu:: autotune:: --skip endpoint --skip capacity --skip tuned_settings \
    --test-threads=1 --nocapture > "$out/tests.log" 2>&1
  echo "tests: exit $?"; grep -E "^test |test result" "$out/tests.log"
  timeout 120 .gpu/hyperfunc autotune --quick > "$out/autotune-quick.txt" 2>&1
  echo "autotune --quick: exit $?"; grep -E "^chosen|^## |saved|not saved" "$out/autotune-quick.txt"
  .gpu/hyperfunc autotune show 2>&1 | grep -E "^## |^chosen" | head -8
  timeout "${BENCH_S:-400}" .gpu/hyperfunc bench-autotune --json --rounds "${ROUNDS:-3}" \
    > "$out/bench-autotune.json" 2> "$out/bench-autotune.err"
  echo "bench-autotune: exit $?"; tail -c 1500 "$out/bench-autotune.json"
}

case "${1:-}" in
  build) build ;;
  check) check ;;
  shapes) shapes ;;
  *) echo "usage: ci/cuda.sh build|check|shapes"; exit 2 ;;
esac
