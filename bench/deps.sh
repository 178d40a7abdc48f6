#!/usr/bin/env bash
# Installs the benchmark's optional anchors and plotting (none of them is a runtime dependency of smollm):
#   - matplotlib into the venv (the PNG plot),
#   - llama-cpp-python into the venv (the one-stream llama.cpp anchor), compiled from source,
#   - llama.cpp's llama-server, built from that package's source distribution's vendored llama.cpp, into
#     bench/.deps/bin/llama-server (gitignored).
# Both llama.cpp builds target the CPU at hand (GGML_NATIVE), so the anchor runs what llama.cpp would run there:
# AVX2 on an AVX2-only CPU, AVX-512/VNNI/BF16 where the CPU has them (not AMX: see below). (An unconditional -DGGML_AVX512=ON build
# cannot run on an AVX2-only CPU.) For a build made on one machine and run on another (a container image),
# LLAMA_PORTABLE=1 builds llama-server with ggml's runtime-dispatched CPU variants (one shared library per ISA
# level, the best one picked at start) and llama-cpp-python for an AVX2 baseline.
# To approximate an AVX2-only CPU on an AVX-512 one, build with LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
# -DGGML_AVX512=OFF" into a fresh bench/.deps, and run the bench with ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 (fbgemm's int8 kernels stay AVX-512: bench/machine.py).
# Environment: VENV (default .venv), LLAMA_CPP_PYTHON_VERSION (default: latest), JOBS (default 2),
# LLAMA_PORTABLE (default 0), LLAMA_CPU_FLAGS (overrides the CPU flags of both builds).
# Each part is attempted even if another failed; the exit status says whether all succeeded.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
DEPS="$ROOT/bench/.deps"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
SPEC="llama-cpp-python${VERSION:+==$VERSION}"
if [ "${LLAMA_PORTABLE:-0}" = 1 ]; then
    CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    SERVER_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
    SERVER_SHARED=ON  # the dispatched variants are shared libraries loaded at start
else
    CPU_FLAGS="-DGGML_NATIVE=ON"
    SERVER_CPU_FLAGS="$CPU_FLAGS"
    SERVER_SHARED=OFF
    # Native, but without ggml's AMX kernels: on a Xeon with AMX (2026-11-30, a 2-vCPU VM) both builds crashed in
    # their first matmul (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat, a worker thread): Linux grants AMX
    # tile state per thread and ggml asks for it on the main thread only (llama.cpp issue #20824, PR #26954).
    # GCC and clang keep an explicit -mno-* over -march=native. On CPUs without AMX these flags change nothing.
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CFLAGS="${CFLAGS:+$CFLAGS }$NO_AMX" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$NO_AMX"
fi
CPU_FLAGS="${LLAMA_CPU_FLAGS:-$CPU_FLAGS}"
SERVER_CPU_FLAGS="${LLAMA_CPU_FLAGS:-$SERVER_CPU_FLAGS}"
FLAGS="$CPU_FLAGS -DLLAMA_CURL=OFF"
NICE="nice -n 19"  # other work shares the cores: build at the lowest priority
failed=()

mkdir -p "$DEPS/src" "$DEPS/bin"

"$VENV/bin/pip" install --quiet matplotlib || failed+=(matplotlib)

if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already installed"
else
    CMAKE_ARGS="$FLAGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        $NICE "$VENV/bin/pip" install --no-cache-dir --no-binary llama-cpp-python "$SPEC" || failed+=(llama-cpp-python)
fi

build_llama_server() {
    if ! ls "$DEPS"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$DEPS/src" "$SPEC" || return 1
    fi
    local sdist src
    sdist="$(ls "$DEPS"/src/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"
    src="${sdist%.tar.gz}"
    [ -d "$src" ] || tar -xzf "$sdist" -C "$DEPS/src" || return 1
    # shellcheck disable=SC2086  # FLAGS is a list of words on purpose
    $NICE cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release $SERVER_CPU_FLAGS \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
        -DBUILD_SHARED_LIBS="$SERVER_SHARED" || return 1
    if [ "$SERVER_SHARED" = ON ]; then
        $NICE cmake --build "$src/build" -j "$JOBS" || return 1  # the server and every CPU variant's library
        cp "$src"/build/bin/*.so "$DEPS/bin/" || return 1  # ggml looks for its CPU variants next to the binary
    else
        $NICE cmake --build "$src/build" --target llama-server -j "$JOBS" || return 1
    fi
    cp "$src/build/bin/llama-server" "$DEPS/bin/llama-server"
}

if [ -x "$DEPS/bin/llama-server" ]; then
    echo "llama-server already built: $DEPS/bin/llama-server"
elif build_llama_server; then
    echo "llama-server built: $DEPS/bin/llama-server"
else
    failed+=(llama-server)
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "bench/deps.sh: could not install: ${failed[*]} (the benchmark runs without them and says so)" >&2
    exit 1
fi
echo "bench/deps.sh: all anchors installed"
