#!/usr/bin/env bash
# Installs the benchmark's optional anchors and plotting (none of them is a runtime dependency of smollm):
#   - matplotlib into the venv (the PNG plot),
#   - llama-cpp-python into the venv (the one-stream llama.cpp anchor), compiled from source,
#   - llama.cpp's llama-server, built from that package's source distribution's vendored llama.cpp, into
#     bench/.deps/bin/llama-server (gitignored).
# Both llama.cpp builds target AVX2/AVX-512 explicitly: a -march=native build died with an illegal
# instruction on these machines.
# Environment: VENV (default .venv), LLAMA_CPP_PYTHON_VERSION (default: latest), JOBS (default 2).
# Each part is attempted even if another failed; the exit status says whether all succeeded.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
DEPS="$ROOT/bench/.deps"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
SPEC="llama-cpp-python${VERSION:+==$VERSION}"
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DLLAMA_CURL=OFF"
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
    $NICE cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release $FLAGS \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF || return 1
    $NICE cmake --build "$src/build" --target llama-server -j "$JOBS" || return 1
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
