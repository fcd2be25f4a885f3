#!/usr/bin/env bash
# Session 14, after the exact verification: self-speculative decoding with the fine-tuned checkpoint, then
# the per-depth table (perplexity and decoding speed through the engine).
cd "$(dirname "$0")/../../.."  # the repository root
PY=.venv/bin/python
OUT=runs/lm/long
CK=$OUT/train/checkpoint.pt
$PY benchmarks/lm_speculative.py --checkpoint $CK --threads 2 --draft base --draft-tokens 1,2,3 --draft-vocab 0,8192 \
    --min-confidence 0,0.5 --save-json $OUT/speculative.json --plot $OUT/speculative-break-even.png | tee $OUT/speculative.txt
.venv/bin/adn eval-lm --checkpoint $CK --threads 1 --eval-tokens 4096 --new-tokens 32 --repeats 2 --no-naive \
    --save-json $OUT/depth-table.json --overwrite | tee $OUT/depth-table.txt
echo MEASURED
