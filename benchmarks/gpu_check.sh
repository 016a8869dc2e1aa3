#!/usr/bin/env bash
# GPU check, under 5 minutes on one NVIDIA machine (e.g. an H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. installs what it needs (TensorFlow with CUDA; from ./.whl when present, for
#    machines without network), 2. runs the GPU-relevant tests, 3. trains the
#    `paper` preset for a fixed number of steps under MirroredStrategy over all
#    GPUs, 4. runs the throughput benchmark in float32 and bfloat16 with a batch
#    that fills the GPU. Everything it prints is also written to OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD

if ! python3 -c "import tensorflow, sklearn, matplotlib, tensorflow_datasets" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --find-links .whl "tensorflow[and-cuda]==2.21.*" \
      tensorboard tensorflow-datasets scikit-learn matplotlib pytest importlib_resources
  else
    python3 -m pip install -q "tensorflow[and-cuda]==2.21.*" tensorboard tensorflow-datasets \
      scikit-learn matplotlib pytest importlib_resources
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import tensorflow as tf; print('TF', tf.__version__, 'GPUs:', tf.config.list_physical_devices('GPU'))"

echo "== 1. GPU-relevant tests"
timeout 150 python3 -m pytest -q -m gpu tests/test_scale.py
timeout 120 python3 -m pytest -q tests/test_scale.py -k bfloat16

echo "== 2. paper preset, 300 steps, MirroredStrategy over all GPUs, bfloat16"
timeout 150 python3 train_keras.py --preset paper --steps 300 --logdir "$OUT/paper" \
  --export-dir "$OUT/exports" --no-report --set train.precision=mixed_bfloat16 \
  --set train.eval_every=300 --set train.checkpoint_every=300 --set train.log_every=50 \
  --set train.steps_per_call=50 | tr '\r' '\n' | grep -v "━" | tail -5

echo "== 3. throughput, paper preset, float32 and bfloat16"
for prec in float32 mixed_bfloat16; do
  timeout 120 python3 benchmarks/train_throughput.py --preset paper --calls 5 \
    --set train.batch_size=1024 --set train.steps_per_call=10 --set train.precision=$prec
done
