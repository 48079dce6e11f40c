#!/bin/sh
# Entrypoint of the Lynx runtime images: SGLang's own server with metrics on; the Lynx plugin is
# loaded by SGLang's plugin entry point (LYNX_ENABLED=1 is the images' default). Extra
# arguments (the compose `command`) are passed to sglang.launch_server unchanged.
set -eu
: "${MODEL_PATH:?set MODEL_PATH (a checkpoint folder or a Hugging Face model id)}"
exec python3 -m sglang.launch_server \
    --model-path "${MODEL_PATH}" \
    --served-model-name "${MODEL_NAME:-lynx-moe}" \
    --host 0.0.0.0 --port "${PORT:-30000}" \
    --enable-metrics \
    "$@"
