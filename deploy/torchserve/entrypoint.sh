#!/bin/sh
# PID 1 of the TorchServe image.
#
# `torchserve --start --foreground` is a Python launcher that waits on the Java frontend. If
# the launcher were PID 1, `docker stop` / ECS would kill it and Java with its workers would
# die uncleanly when the container goes away. Here the shell keeps PID 1, and on SIGTERM it
# runs `torchserve --stop`, which lets Java finish in-flight requests and stop its workers.
set -eu

: "${TS_CONFIG_FILE:=/home/model-server/config.properties}"
: "${MODEL_PATH:=/home/model-server/model-store}"
: "${BAKED_MODELS:=/home/model-server/baked}"
: "${SERVE_LOG_CONFIG:=/home/model-server/torchserve-log4j2.xml}"
: "${TEMP:=/tmp}"
# TorchServe writes its token authorization keys (key_file.json, mode 0600) into its working
# directory: this one, a volume the API's container mounts too (compose: torchserve-keys; ECS:
# the task's shared volume). The health check reads it through TORCHSERVE_KEY_FILE.
: "${TS_KEY_DIR:=/home/model-server/keys}"
export TS_CONFIG_FILE TEMP
if [ "$#" -gt 0 ]; then
  exec "$@"  # e.g. `docker run IMAGE torchserve --version` or a shell for debugging
fi

# TEMP holds the pid file `torchserve --stop` looks for and the unpacked archives.
mkdir -p "$TEMP"

# The model store is a volume. Add the archives baked into this image that it lacks: a named
# volume keeps what it first held, so a rebuilt image's new archive would otherwise be missing.
# Archive versions are immutable, so one already there is never replaced.
for mar in "$BAKED_MODELS"/*.mar; do
  [ -e "$mar" ] || continue
  [ -e "$MODEL_PATH/${mar##*/}" ] || cp "$mar" "$MODEL_PATH/"
done

# Which archives to register at start, as TorchServe's --models takes them (NAME=FILE ...).
# 1. SERVE_MODELS when set; 2. else what `promote` saved in the model store (.defaults.json:
# the promoted default first, then the other registered versions), so a restart comes back on
# the promoted version; 3. else the archive baked into the image, dr_$MODEL_VERSION.mar.
if [ -z "${SERVE_MODELS:-}" ]; then
  SERVE_MODELS=$(python -m scripts.serving.registry --model-store "$MODEL_PATH" serve-models dr 2>/dev/null || true)
fi
: "${SERVE_MODELS:=dr=dr_${MODEL_VERSION:?set MODEL_VERSION or SERVE_MODELS}.mar}"

mkdir -p "$TS_KEY_DIR"
cd "$TS_KEY_DIR"

# SERVE_MODELS is a space-separated list: word splitting is wanted here.
# shellcheck disable=SC2086
torchserve --start --foreground --ncs \
  --ts-config "$TS_CONFIG_FILE" \
  --log-config "$SERVE_LOG_CONFIG" \
  --model-store "$MODEL_PATH" \
  --models $SERVE_MODELS &
launcher=$!

stop() {
  torchserve --stop --foreground || true
  wait "$launcher" || true
  exit 0
}
trap stop TERM INT

# `wait` returns early when a trapped signal arrives; the trap then takes over.
status=0
wait "$launcher" || status=$?
exit "$status"
