#!/usr/bin/env bash
# Reference-compatible DINOv2 feature encoding; same options as encode_with_dino.py.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$(readlink -f "$0")")/encode_with_dino.py" "$@"
