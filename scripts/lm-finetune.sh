#!/usr/bin/env bash
# The language-model experiment of docs/language-models.md, end to end (about 85 minutes on 2 CPU cores):
#   1. SmolLM2-135M-Instruct converted (4 stages of decoder layers 1-7, 8-14, 15-21, 22-27, the last half of
#      each skippable, SKIPPABLE=half: the base-net runs 18 of 30 layers; SKIPPABLE=1 is the split measured in
#      docs/language-models.md before issue 26, 26 of 30; 16 sub-networks); held-out perplexity of every sub-network before fine-tuning, which
#      is exactly naive removal of the same layers; decoding tokens/s per depth;
#   2. Algorithm 1 fine-tuning (--train near-skipped, with the base-net's own label loss --base-ce $BASE_CE) for at
#      most $MINUTES minutes;
#   3. perplexity of every sub-network after, next to naive removal, and tokens/s per depth;
#   4. self-speculative decoding (base-net and TTFF drafts, k = 2, 3, 4) against plain greedy decoding:
#      acceptance rate, speed-up, identical output;
#   5. the baseline (BASELINE=1, the default): the base-net alone (the model with the same layers removed)
#      fine-tuned on the same tokens (adn train-lm --method alone, same steps and settings), and its perplexity.
# Results in $OUT: before.{txt,json}, train/ (checkpoint.pt, log.jsonl, summary.json), after.{txt,json},
# speculative-{before,after}.{txt,json}, sample.txt. Settings through the environment, e.g. THREADS=2 MINUTES=60.
set -euo pipefail
ADN=${ADN:-.venv/bin/adn}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/lm/smollm2}
THREADS=${THREADS:-2}
MINUTES=${MINUTES:-60}
STEPS=${STEPS:-400}          # the cosine schedule's length: 48 min on 2 idle cores of an AMD EPYC (7.2 s/step; ~28 est. on an Intel Xeon)
LR=${LR:-2e-4}               # 2e-4 reached in 200 steps what 1e-4 reached in 300 (docs/language-models.md, session 14)
BASE_CE=${BASE_CE:-0.5}      # the base-net's own label loss: 2.33x its super-net, 1.5% above the baseline (session 15); 0: the paper
EVAL_TOKENS=${EVAL_TOKENS:-8192}
SKIPPABLE=${SKIPPABLE:-half}  # skippable layers per stage: half, or a number (the speculative "before" run uses half)
export OMP_NUM_THREADS=$THREADS
bash scripts/get-smollm2.sh
bash scripts/get-lm-corpus.sh
mkdir -p "$OUT"
start=$(date +%s)
echo "== 1. before fine-tuning: every sub-network = naive removal of its skipped layers =="
$ADN eval-lm --skippable "$SKIPPABLE" --threads "$THREADS" --eval-tokens "$EVAL_TOKENS" --repeats 3 --save-json "$OUT/before.json" \
    | tee "$OUT/before.txt"
$PY benchmarks/lm_speculative.py --threads "$THREADS" --draft base,TTFF --draft-tokens 2,3,4 \
    --save-json "$OUT/speculative-before.json" | tee "$OUT/speculative-before.txt"
echo "== 2. Algorithm 1 fine-tuning, at most $MINUTES minutes =="
$ADN train-lm --skippable "$SKIPPABLE" --threads "$THREADS" --output-dir "$OUT/train" --train near-skipped --steps "$STEPS" \
    --time-limit "$MINUTES" -b 4 --seq-len 256 --lr "$LR" --base-ce "$BASE_CE" --eval-every 100 --eval-tokens 2048 --save-every 25 --overwrite
echo "== 3. after fine-tuning, next to naive removal =="
$ADN eval-lm --checkpoint "$OUT/train/checkpoint.pt" --threads "$THREADS" --eval-tokens "$EVAL_TOKENS" --repeats 3 \
    --save-json "$OUT/after.json" | tee "$OUT/after.txt"
echo "== 4. self-speculative decoding =="
$PY benchmarks/lm_speculative.py --checkpoint "$OUT/train/checkpoint.pt" --threads "$THREADS" --draft base,TTFF \
    --draft-tokens 2,3,4 --save-json "$OUT/speculative-after.json" | tee "$OUT/speculative-after.txt"
$ADN generate --checkpoint "$OUT/train/checkpoint.pt" --threads "$THREADS" --chat --max-new-tokens 64 --speculative \
    --prompt "What is a Python list comprehension?" 2>&1 | tee "$OUT/sample.txt"
if [ "${BASELINE:-1}" = 1 ]; then
  echo "== 5. the baseline: the base-net alone, fine-tuned on the same tokens =="
  $ADN train-lm --skippable "$SKIPPABLE" --threads "$THREADS" --output-dir "$OUT/alone" --method alone --train near-skipped \
      --steps "$STEPS" -b 4 --seq-len 256 --lr "$LR" --eval-every 100 --eval-tokens 2048 --save-every 25 --overwrite
  $ADN eval-lm --checkpoint "$OUT/alone/checkpoint.pt" --threads "$THREADS" --eval-tokens "$EVAL_TOKENS" --skip super,base \
      --no-speed --save-json "$OUT/alone.json" | tee "$OUT/alone.txt"
fi
echo "experiment took $(( $(date +%s) - start )) s; results in $OUT"
