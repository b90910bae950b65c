#!/usr/bin/env bash
# Build the Dockerfile's serve and train targets and run them, on a host without a Docker
# engine or an image registry (podman and buildah, chroot isolation). docs/deploy.md records
# what it printed.
#
#   deploy/image_check.sh            build both targets, then check them
#   deploy/image_check.sh --no-build check the images built before
#
# Environment: BASE (a local Python 3.11 base image; made by deploy/make_base.sh when
# missing), WORK (scratch directory, default /var/tmp/foldserve-image-check), INDEX_PORT
# (the local package index's port on 127.0.0.1, default 18080), PYTHON (the
# host interpreter that downloads the pinned wheels; default python3), CHECK_PYTHON (the
# project's interpreter, with onnxruntime, for bench/v2_parity.py; default .venv/bin/python).
#
# Steps: the pinned wheels (deploy/constraints.txt) are downloaded on the host and served
# as a package index on 127.0.0.1, which the builds reach through --build-arg PIP_INDEX_URL
# and TORCH_INDEX_URL. The serve image then runs `python -m service` on 127.0.0.1 with a
# model repository mounted read-only at /models; the check reads /v2/health/ready, compares
# one V2 inference with ONNX Runtime run directly on the same file, runs the image's
# HEALTHCHECK command, stops the server with SIGTERM, and makes sure `import torch` fails.
# The train image trains and exports a small model into a mounted repository, which the
# serve image then loads. Needs root, podman, buildah and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=1
[ "${1:-}" = "--no-build" ] && BUILD=0
BASE=${BASE:-localhost/foldserve-base:bookworm}
WORK=${WORK:-/var/tmp/foldserve-image-check}
PYTHON=${PYTHON:-python3}
CHECK_PYTHON=${CHECK_PYTHON:-.venv/bin/python}
# A fixed index address: build arguments are part of the layer cache key, so a new port
# would rebuild every layer.
INDEX_PORT=${INDEX_PORT:-18080}
SERVE_IMAGE=localhost/foldserve:serve
TRAIN_IMAGE=localhost/foldserve:train
mkdir -p "$WORK"
say() { printf '\n== %s\n' "$*"; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

containers=()
index_pid=""
main=""
cleanup() {
  [ -n "$main" ] && kill -TERM "$main" 2>/dev/null && sleep 2
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  [ -n "$index_pid" ] && kill "$index_pid" 2>/dev/null || true
}
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
trap cleanup EXIT

if ! podman image exists "$BASE"; then
  say "base image $BASE missing: making it"
  deploy/make_base.sh "$BASE"
fi

serve_index() {
  # A PEP 503 index of the pinned wheels (and the build backend), on 127.0.0.1 only.
  local wheels="$WORK/wheels"
  mkdir -p "$wheels"
  say "downloading the pinned wheels into $wheels"
  "$PYTHON" -m pip download --quiet --dest "$wheels" -c deploy/constraints.txt \
    '.[serve,train]' setuptools
  rm -f "$wheels"/foldserve-*
  "$PYTHON" - "$wheels" "$WORK/index" <<'EOF'
import re, shutil, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(index, ignore_errors=True)
for wheel in sorted(wheels.iterdir()):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    page = index / "simple" / name
    page.mkdir(parents=True, exist_ok=True)
    (page / wheel.name).symlink_to(wheel)
    with (page / "index.html").open("a") as f:
        f.write(f'<a href="{wheel.name}">{wheel.name}</a>\n')
EOF
  if curl -s -o /dev/null "http://127.0.0.1:$INDEX_PORT/"; then
    echo "port $INDEX_PORT is taken: set INDEX_PORT to a free one"; exit 1
  fi
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" \
    >"$WORK/index.log" 2>&1 &
  index_pid=$!
  sleep 1
}

build() {
  local target=$1 image=$2
  say "building target $target as $image"
  local start end
  start=$(date +%s)
  nice -n 10 podman build --isolation chroot --format docker --target "$target" \
    --build-arg BASE="$BASE" \
    --build-arg PIP_INDEX_URL="http://127.0.0.1:$INDEX_PORT/simple" \
    --build-arg TORCH_INDEX_URL="http://127.0.0.1:$INDEX_PORT/simple" \
    -t "$image" . >"$WORK/build-$target.log" 2>&1 || { tail -n 40 "$WORK/build-$target.log"; exit 1; }
  end=$(date +%s)
  echo "build $target: $((end - start)) s"
}

if [ "$BUILD" = 1 ]; then
  serve_index
  build serve "$SERVE_IMAGE"
  build train "$TRAIN_IMAGE"
  kill "$index_pid" && index_pid=""
fi

say "images"
for image in "$BASE" "$SERVE_IMAGE" "$TRAIN_IMAGE"; do
  podman image inspect --format "{{.Size}}" "$image" |
    awk -v i="$image" '{printf "%-36s %6.0f MB\n", i, $1 / 1e6}'
done
podman image inspect --format 'serve config: user={{.Config.User}} healthcheck={{.Config.Healthcheck.Test}} stopsignal={{.Config.StopSignal}} env={{.Config.Env}}' "$SERVE_IMAGE"

say "train image: train and export a small model into a mounted repository"
repo="$WORK/repository"
rm -rf "$repo" && mkdir -p "$repo" && chown 10001:10001 "$repo"
train=$(buildah from --isolation chroot "$TRAIN_IMAGE")
containers+=("$train")
start=$(date +%s)
buildah run --isolation chroot --user 10001:10001 -v "$repo:/models" "$train" -- \
  python -m training train --model mlp --dataset breast_cancer --epochs 5 --out /tmp/run
buildah run --isolation chroot --user 10001:10001 -v "$repo:/models" "$train" -- \
  python -m training export --run /tmp/run --repository /models --name breast_cancer_mlp
echo "train + export inside the train image: $(($(date +%s) - start)) s"
ls -R "$repo" | head -n 12

say "serve image: torch is absent"
serve=$(buildah from --isolation chroot "$SERVE_IMAGE")
containers+=("$serve")
if buildah run --isolation chroot "$serve" -- python -c 'import torch' >"$WORK/torch.out" 2>&1; then
  echo "FAIL: import torch worked in the serving image"; exit 1
fi
echo "import torch -> $(grep -m 1 Error "$WORK/torch.out")"
buildah run --isolation chroot "$serve" -- python -c \
  'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
# What the CUDA provider links against: the CUDA and cuDNN majors CUDA_BASE must provide.
root=$(buildah mount "$serve")
readelf -d "$root"/opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so |
  grep -oE 'lib(cudart|cudnn|cublas)\.so\.[0-9]+' | sort -u | tr '\n' ' '
echo "<- needed by the CUDA provider"
buildah umount "$serve" >/dev/null

PORT=$(free_port)
say "serve image: python -m service on 127.0.0.1:$PORT, repository mounted read-only"
buildah run --isolation chroot -v "$repo:/models:ro" \
  --env FOLDSERVE_HOST=127.0.0.1 --env FOLDSERVE_PORT="$PORT" --env FOLDSERVE_WORKERS=2 \
  "$serve" -- python -m service >"$WORK/serve.log" 2>&1 &
server=$!
start=$(date +%s)
for _ in $(seq 1 240); do
  # The server's main process: the descendant of this `buildah run` that runs our command
  # (never another process of the same name on this machine).
  for p in $(descendants "$server"); do
    case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
      *python\ -m\ service\ ) [ "$(cat "/proc/$p/comm")" != buildah-chroot- ] && main=$p ;;
    esac
  done
  [ -n "$main" ] && curl -fsS "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "FAIL: the server exited"; cat "$WORK/serve.log"; exit 1; }
  sleep 0.5
done
echo "ready after $(($(date +%s) - start)) s: $(curl -sS "http://127.0.0.1:$PORT/v2/health/ready")"
echo "live: $(curl -sS "http://127.0.0.1:$PORT/v2/health/live")"
# The image's own HEALTHCHECK command, as Docker would run it inside the container.
health=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$SERVE_IMAGE")
mapfile -t health_cmd < <("$PYTHON" -c 'import json, sys; print(*json.loads(sys.argv[1])[1:], sep="\n")' "$health")
buildah run --isolation chroot --env FOLDSERVE_PORT="$PORT" "$serve" -- "${health_cmd[@]}" &&
  echo "HEALTHCHECK ${health_cmd[*]:0:2} ...: exit 0"
"$CHECK_PYTHON" bench/v2_parity.py "http://127.0.0.1:$PORT" "$repo" breast_cancer_mlp

say "serve image: SIGTERM stops the server"
workers=$(pgrep -c -P "$main" || true)
rss=$(for p in "$main" $(descendants "$main"); do awk '/^VmRSS/ {print $2}' "/proc/$p/status"; done |
  awk '{s += $1} END {printf "%.0f", s / 1024}')
echo "server pid $main with $workers child processes, resident memory ${rss} MiB in all"
start=$(date +%s%N)
kill -TERM "$main"
rc=0
wait "$server" || rc=$?
main=""
echo "SIGTERM: buildah run exited $rc after $((($(date +%s%N) - start) / 1000000)) ms"
tail -n 5 "$WORK/serve.log"
