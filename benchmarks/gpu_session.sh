#!/usr/bin/env bash
# Every GPU check of the project in one command, sized for one device call (< 8 minutes on one H100):
# the CUDA tests, the pretraining MFU figure (seed-1.3b, seq 2048, bf16) and the decode figure
# (seed-1.3b, bf16, batch 1, eager and CUDA graphs). JSON lines and logs go to $OUT (or ./gpu-out).
#
#   scripts/fetch_device_wheels.sh          # here, once: wheels the GPU machine lacks, into .whl/
#   device run (carry .whl):  bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/model/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 270 python3 benchmarks/pretrain_throughput.py --gpu 2>"$OUT/pretrain.err" | tee "$OUT/pretrain_gpu.jsonl"
timeout 200 python3 benchmarks/decode_throughput.py --gpu --out "$OUT/decode_gpu.jsonl" 2>"$OUT/decode.err"
timeout 180 python3 benchmarks/adapter_serving.py --device cuda --preset seed-1.3b --rounds 1 2>"$OUT/adapter.err" | tee "$OUT/adapter_gpu.jsonl"
tail -3 "$OUT/pretrain.err" "$OUT/decode.err" "$OUT/adapter.err"
# issue 13: batched perplexity scoring vs one document at a time, on the GPU (the CPU bound is in RESULTS.md)
timeout 120 python3 benchmarks/eval_throughput.py --device cuda --doc-tokens 64 --batch-size 32 2>>"$OUT/eval.err" | tee "$OUT/eval_gpu.jsonl"
timeout 120 python3 benchmarks/eval_throughput.py --device cuda --batch-size 16 2>>"$OUT/eval.err" | tee -a "$OUT/eval_gpu.jsonl"
# issue 15: LoRA / QLoRA-int8 / full training memory (torch's peak allocation) and LoRA vs transformers + peft
# step time, random weights of the SmolLM2-135M shape (the real weights are not carried to the device)
timeout 150 python3 benchmarks/finetune_bench.py --device cuda --base random --methods lora,qlora,full,hf --steps 6 2>"$OUT/finetune.err" | tee "$OUT/finetune_gpu.jsonl"
