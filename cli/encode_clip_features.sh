#!/usr/bin/env bash
# Reference-compatible CLIP feature encoding; same options as encode_with_clip.py.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$(readlink -f "$0")")/encode_with_clip.py" "$@"
