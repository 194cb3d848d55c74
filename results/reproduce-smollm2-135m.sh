#!/bin/sh
# Table 1 and the sensitivity sweep on the default model, sized for a 2-core CPU.
# With the two runs side by side, one thread each, they took about 2 hours on a
# machine that other jobs shared. Perplexity uses windows of 2048 tokens: all 38
# windows of c4-sample (the whole source), and the first 38 of the 218 windows of
# wiki-sample (the same 77,824 tokens).
# Table 1: the seven tasks at --limit 100. Sensitivity: the seven tasks at --limit 40.
# Either command can be interrupted and rerun: finished configurations are kept.
cd "$(dirname "$0")/.." || exit 1
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$PWD/.cache/hf" SUPERWEIGHT_CACHE="$PWD/.cache/superweight"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the two runs share the two cores
superweight reproduce table1 smollm2-135m --limit 100 --batch-size 8 --max-windows 38 \
    --output results/table1-smollm2-135m &
superweight reproduce sensitivity smollm2-135m --factors 0,0.2,0.5,0.8,1,1.5,2,3 --limit 40 --batch-size 8 \
    --perplexity c4-sample --max-windows 38 --output results/sensitivity-smollm2-135m &
wait
