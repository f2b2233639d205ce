#!/usr/bin/env bash
# The refresh benchmark on a CUDA machine that has JAX and PyTorch but not galore-torch:
# galore-torch and its import-time dependency bitsandbytes come as wheels in .whl/
# (pip download them where an index is reachable). Writes the log and JSON under $OUT (or /tmp).
set -uo pipefail
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m benchmarks.refresh --layers 12 --repeats 5 --torch-device cuda 2>&1 | grep -v -i warn | tee "$out/refresh-gpu.log"
cp benchmarks/results/refresh-gpu.json "$out/" 2>/dev/null
exit 0
