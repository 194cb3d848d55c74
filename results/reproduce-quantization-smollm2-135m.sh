#!/bin/sh
# The quantization experiments on the default model, sized for a shared 2-core CPU:
# RTN vs super-weight-aware RTN per block size (perplexity on 2 windows of 2048 tokens
# per source, LAMBADA at --limit 40), and the W8A8 variants (perplexity only, as in the
# paper's table), on 2 windows per source and on the whole c4-sample (38 windows).
cd "$(dirname "$0")/.." || exit 1
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$PWD/.cache/hf" SUPERWEIGHT_CACHE="$PWD/.cache/superweight"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # two experiment scripts share the two cores
superweight reproduce weight-quant smollm2-135m --block-sizes 16384,65536,262144,1048576,tensor \
    --clip zscore:9 --tasks lambada_openai --limit 40 --batch-size 4 \
    --perplexity wiki-sample,c4-sample --max-windows 2 --output results/weight-quant-smollm2-135m
superweight reproduce activation-quant smollm2-135m --perplexity wiki-sample,c4-sample --max-windows 2 \
    --output results/activation-quant-smollm2-135m
superweight reproduce activation-quant smollm2-135m --perplexity c4-sample --max-windows 38 \
    --output results/activation-quant-c4-smollm2-135m
