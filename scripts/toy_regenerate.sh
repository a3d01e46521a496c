#!/usr/bin/env bash
# Regenerate the toy world's weights, quality table and sample grids (about 65 min on 2 CPU cores:
# training 58 min, quality 4 min, grids 1 min).
# Usage: scripts/toy_regenerate.sh [SEED]
set -euo pipefail
SEED="${1:-0}"
export HF_HUB_OFFLINE=1
python -m stereo.toy.pretrain --seed "$SEED"
python -m stereo.toy.quality --images 128 --json stereo/toy/weights/quality.json
python -m stereo.toy.grid --out docs/img
