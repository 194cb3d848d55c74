#!/bin/sh
# Table 1 and the sensitivity sweep on the default model, sized for a shared 2-core CPU:
# Table 1 with the seven tasks at --limit 20 and perplexity on 2 windows of 2048 tokens
# per source; the sweep with two tasks at --limit 20 and wiki-sample perplexity.
cd "$(dirname "$0")/.." || exit 1
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$PWD/.cache/hf" SUPERWEIGHT_CACHE="$PWD/.cache/superweight"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # two experiment scripts share the two cores
superweight reproduce table1 smollm2-135m --limit 20 --batch-size 4 --max-windows 2 \
    --output results/table1-smollm2-135m
superweight reproduce sensitivity smollm2-135m --factors 0,0.2,0.5,0.8,1,1.5,2,3 --limit 20 --batch-size 4 \
    --tasks arc_easy,lambada_openai --perplexity wiki-sample --max-windows 2 \
    --output results/sensitivity-smollm2-135m
