#!/usr/bin/env bash
# Every GPU figure in one run, on a CUDA machine (no downloads: the features are the hard synthetic set, the
# extraction tower is Qwen2.5-VL-3B's published config with random weights):
#   1. the hard benchmark cache (synth_features.py, 600 images)       CPU, ~1 min
#   2. one epoch of subspace training with bf16 autocast (--amp)      GPU
#   3. bench.py on it: quality, ms/sample vs exact SVD and the GEMM floor, profile   GPU, fp32, batch 64
#   4. random-3b extraction img/s at batch 8 and 32                   GPU, bf16
#   5. vqa_eval.py with the full real-size Qwen2.5-VL-3B (random weights, bf16, batches of 32): cost per condition
#      (prefill ms, ms per decoding step, peak memory) on 40 demo images (random-3b features, a rank-64 subspace
#      model trained for one epoch)
#   6. bench_vqa.py: answers per second at batch 1, 8 and 32 with the same full model (target: >= 8x at 32)
# then prints one table. Usage: ./bench_gpu.sh [work_dir]   (default bench_gpu_work; the cache is reused if present)
# A dry run of the plumbing on CPU (what the tests do):
#   DEVICE=cpu NUM=12 DEMO_NUM=8 RANKS=16 BATCH=4 VQA_LIMIT=2 EXTRACT_MODEL=tiny-random EXTRACT_BATCHES=2,4 VQA_BATCHES=1,2 \
#       NEW_TOKENS=2 ./bench_gpu.sh /tmp/bench_gpu_dry
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0; fi
W=${1:-bench_gpu_work}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
mkdir -p "$W"
if [[ "$DEVICE" == cuda ]]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device: bench_gpu.sh measures the GPU')"
fi
[[ -f "$W/hard/manifest.json" ]] || $PY synth_features.py --out "$W/hard" --num "${NUM:-600}"
$PY train_real_data.py --cache_dir "$W/hard" --arch subspace --rank 128 --epochs 1 --amp --device "$DEVICE" \
    --results_dir "$W/results" --resplit 2>&1 | tee "$W/train.log"
$PY bench.py --results_dir "$W/results" --device "$DEVICE" --batch_size "${BATCH:-64}" --ranks "${RANKS:-16,32,64,128}" --profile 2>&1 | tee "$W/bench.log"
$PY bench_extract.py --model "${EXTRACT_MODEL:-random-3b}" --device "$DEVICE" --batch_sizes "${EXTRACT_BATCHES:-8,32}" \
    --json "$W/extract.json" 2>&1 | tee "$W/extract.log"
M=${EXTRACT_MODEL:-random-3b}
[[ -d "$W/demo" ]] || $PY demo_data.py --out "$W/demo" --num "${DEMO_NUM:-40}" --shards 1
$PY qwenvl_dataloader.py --dataset_dir "$W/demo" --model "$M" --cache_dir "$W/cache_vqa" --device "$DEVICE" \
    2>&1 | tail -3
$PY train_real_data.py --cache_dir "$W/cache_vqa" --arch subspace --rank 64 --epochs 1 --device "$DEVICE" \
    --results_dir "$W/results_vqa" --resplit 2>&1 | tail -3
$PY vqa_eval.py --results_dir "$W/results_vqa" --model "$M" --device "$DEVICE" --split train --limit "${VQA_LIMIT:-8}" \
    --svd_ranks 64 --nn_ranks 64 --rules leverage --keep 64 --zeros --restart --batch_size 32 \
    --max_new_tokens "${NEW_TOKENS:-16}" 2>&1 | tee "$W/vqa.log"
$PY bench_vqa.py --model "$M" --device "$DEVICE" --batch_sizes "${VQA_BATCHES:-1,8,32}" --num "${VQA_BENCH_NUM:-64}" \
    --max_new_tokens "${NEW_TOKENS:-8}" --json "$W/vqa_bench.json" 2>&1 | tee "$W/vqa_bench.log"
$PY - "$W" <<'PYEOF'
import json, sys, torch
W = sys.argv[1]
v = json.load(open(f"{W}/results_vqa/vqa_train.json"))
b = json.load(open(f"{W}/results/bench.json"))
h = json.load(open(f"{W}/results/history.json"))
e = json.load(open(f"{W}/extract.json"))
vb = json.load(open(f"{W}/vqa_bench.json"))
dev = torch.cuda.get_device_name() if b["device"].startswith("cuda") else "CPU (a dry run: these are not GPU figures)"
print(f"\n== bench_gpu.sh on {dev}, torch {torch.__version__}, features {b['features']} n={b['n_test']} ==")
print(f"{'what':<44}{'rank':>5}{'cosine':>9}{'gap':>9}{'worst':>9}{'ms/sample':>11}{'x linalg.svd':>13}{'x floor':>9}")
for r in b["rows"]:
    q = (f"{r['cosine']:>9.4f}{r['gap']:>9.4f}{r['worst_gap']:>9.4f}" if "cosine" in r else " " * 27)
    print(f"{r['method'][:43]:<44}{r['rank']:>5}{q}{r['ms_per_sample']:>11.3f}{r['speedup_vs_linalg_svd']:>13.1f}"
          f"{r['x_gemm_floor']:>9.1f}")
last = h[-1]
print(f"{'train, 1 epoch bf16 amp (s), val cosine':<44}{'128':>5}{last['val_cosine']:>9.4f}{'':>18}{last['seconds']:>11.1f}")
for r in e["rows"]:
    print(f"{e['model'] + ' extraction img/s, batch ' + str(r['batch']):<44}{'':>32}{r['both_img_s']:>11.1f}"
          f"   (tower only {r['tower_img_s']:.1f})")
for r in v["summary"]:
    print(f"{v['settings']['model'] + ' VQA ms/sample: ' + r['condition']:<44}{'':>32}{r['ms_per_sample']:>11.1f}"
          f"   (prefill {r['prefill_ms']:.1f} ms per batch of {r['batch_size']:.0f}, {r['prefill_flops'] / 1e12:.2f} TFLOPs/answer)")
for r in vb["rows"]:
    print(f"{vb['model'] + ' answers/s, batch ' + str(r['batch_size']):<44}{'':>32}{r['answers_per_s']:>11.2f}"
          f"   (x{r['speedup']:.1f} batch {vb['rows'][0]['batch_size']}, same answers: {r['equal_to_first']})")
if e["peak_gib"] is not None:
    print(f"peak GPU memory: extraction {e['peak_gib']:.2f} GiB, full model VQA {v['peak_gpu_gib']:.2f} GiB")
PYEOF
