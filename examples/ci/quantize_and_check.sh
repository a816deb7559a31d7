#!/usr/bin/env bash
# A release job for any CI: install onnxq, quantize with the committed onnxq.toml, gate the model
# with `onnxq check` (thresholds, the last release's card as a baseline, the card's provenance),
# time it with `onnxq bench`, and leave model, card, JUnit report and figures in $ARTIFACTS.
#
# Exit codes: 0 the model passed every gate; 3 a gate failed (check.junit.xml says which);
# 2 bad input; anything else a failed step. Artifacts are written in every case that got that far.
#
# Settings (environment): MODEL, CALIB (calibration data), DATA (feeds the gate measures on; keep
# them apart from CALIB), ARTIFACTS (output folder), BASELINE (the last release's card), MAX_DROP,
# MIN_COSINE, MAX_SIZE_RATIO, MAX_REGRESSION, INSTALL (1: pip install onnxq from this checkout).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODEL="${MODEL:-$ROOT/models/bundled/digit_cnn.onnx}"
CALIB="${CALIB:-$ROOT/models/bundled/digit_cnn_calib.npz}"
DATA="${DATA:-$HERE/digit_cnn_gate.npz}"  # 64 evaluation digits, never calibrated on
ARTIFACTS="${ARTIFACTS:-artifacts}"
BASELINE="${BASELINE:-$HERE/baseline/digit_cnn.int8.card.json}"
MAX_DROP="${MAX_DROP:-0.01}"
MIN_COSINE="${MIN_COSINE:-0.99}"
MAX_SIZE_RATIO="${MAX_SIZE_RATIO:-0.5}"
MAX_REGRESSION="${MAX_REGRESSION:-0.002}"
PYTHON="${PYTHON:-python}"

if [ "${INSTALL:-1}" = "1" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "$ROOT"
fi
mkdir -p "$ARTIFACTS"
OUT="$ARTIFACTS/model.int8.onnx"

"$PYTHON" -m onnxq quantize "$MODEL" "$OUT" --calib "$CALIB" --config "$HERE/onnxq.toml" --json \
  > "$ARTIFACTS/quantize.json"

status=0
"$PYTHON" -m onnxq check "$MODEL" "$OUT" --data "$DATA" --max-drop "$MAX_DROP" \
  --min-cosine "$MIN_COSINE" --max-size-ratio "$MAX_SIZE_RATIO" \
  --baseline "$BASELINE" --max-regression "$MAX_REGRESSION" \
  --junit "$ARTIFACTS/check.junit.xml" --json > "$ARTIFACTS/check.json" || status=$?
# The card must describe the file next to it (sha256) and its recorded fidelity must hold.
"$PYTHON" -m onnxq check --card "$ARTIFACTS/model.int8.card.json" "$MODEL" "$OUT" --data "$CALIB" \
  --junit "$ARTIFACTS/card.junit.xml" --json > "$ARTIFACTS/card_check.json" || status=$((status ? status : $?))
"$PYTHON" -m onnxq bench "$MODEL" "$OUT" --runs 50 --json > "$ARTIFACTS/bench.json"

if [ "$status" -eq 0 ]; then
  echo "onnxq: $OUT passed every gate; artifacts in $ARTIFACTS"
else
  echo "onnxq: $OUT failed a gate (exit $status); see $ARTIFACTS/check.json" >&2
fi
exit "$status"
