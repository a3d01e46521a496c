#!/usr/bin/env bash
# Regenerate the toy world's weights, quality table and sample grids (about 75 min on 2 CPU cores).
# Usage: scripts/toy_regenerate.sh [SEED]
set -euo pipefail
SEED="${1:-0}"
export HF_HUB_OFFLINE=1
python -m stereo.toy.train --seed "$SEED" --threads 1
python -m stereo.toy.quality --json stereo/toy/weights/quality.json
python -m stereo.toy.grid --out docs/img
