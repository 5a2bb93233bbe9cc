#!/usr/bin/env bash
# Build the horovod 0.28.1 wheel against the TensorFlow installed in the given Python, with
# Gloo (no MPI). The wheel is cached in WHEEL_DIR/tf-<TensorFlow version> (it is built against
# that TensorFlow's ABI), so only the first run pays the build (2-7 minutes on 2 cores).
# Prints the wheel's path.
#   usage: deploy/horovod/build-wheel.sh PYTHON WHEEL_DIR
set -euo pipefail
python=$1
version=0.28.1
tf_version=$("$python" -c "import tensorflow as tf; print(tf.__version__)" 2>/dev/null)
wheel_dir="$2/tf-$tf_version"
mkdir -p "$wheel_dir"
existing=$(ls "$wheel_dir"/horovod-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$existing" ]; then
    echo "$existing"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: "horovod==$version" -d "$work"
tar -xzf "$work"/horovod-"$version".tar.gz -C "$work"
src="$work/horovod-$version"
# Its XLA ops need highwayhash and farmhash headers, which the tensorflow wheel does not ship.
sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
"$python" -m pip install --quiet cmake
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$wheel_dir" "$src" >&2
ls "$wheel_dir"/horovod-"$version"-*.whl
