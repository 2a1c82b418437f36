# Sourced on a lent GPU machine before GPU tests or benchmarks (`source tools/gpu_env.sh`):
# unpacks the Python wheels carried in .data/wheels312 (those the machine lacks: transformers,
# openai, ...) next to the unpacked ones in .data/py312, builds cann_ext from source with CMake
# (host TCP plus the NCCL backend, which dlopen()s libnccl at run time) into
# pd_serve/kv/_lib/, and exports PYTHONPATH and NCCL_NVLS_ENABLE=0.
set -e
export NCCL_NVLS_ENABLE=0
export PD_SERVE_PY_EXTRA=${PD_SERVE_PY_EXTRA:-/tmp/pd_py312}
mkdir -p "$PD_SERVE_PY_EXTRA"
for wheel in .data/wheels312/*.whl; do
  [[ -e "$wheel" ]] && python -m zipfile -e "$wheel" "$PD_SERVE_PY_EXTRA"
done
# kernels/ installs as pd_kernels (setup.py); here a link gives the source tree that name.
mkdir -p "$PD_SERVE_PY_EXTRA/src" && ln -sfn "$PWD/kernels" "$PD_SERVE_PY_EXTRA/src/pd_kernels"
export PYTHONPATH="$PWD:$PD_SERVE_PY_EXTRA/src:$PWD/.data/py312:$PD_SERVE_PY_EXTRA${PYTHONPATH:+:$PYTHONPATH}"
cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DCANN_EXT_WITH_NCCL=ON > build_gpu.log
cmake --build build/gpu --parallel 8 >> build_gpu.log
mkdir -p pd_serve/kv/_lib
cp build/gpu/lib/libcann_ext.so pd_serve/kv/_lib/
python -c "import torch; print('gpu env:', torch.__version__, torch.cuda.device_count(), 'GPUs')"
set +e
