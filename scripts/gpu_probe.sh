#!/usr/bin/env bash
# First look at the GPU machine: toolchain, topology, jax APIs, and a build of this package.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
nvidia-smi; nvidia-smi topo -m; nvcc --version | tail -1; which python3; python3 --version
/usr/bin/g++ --version | head -1; cmake --version | head -1
python3 -c "import jax, jaxlib, nanobind; print('jax', jax.__version__, 'nanobind', nanobind.__version__); print(jax.devices())"
python3 - <<'PY'
import jax, inspect
from jax._src import distributed
print([n for n in dir(distributed.global_state) if not n.startswith('_')])
import jax._src.core as core
print('ShapedArray.__new__', inspect.signature(core.ShapedArray.__new__))
print('has jax.enable_x64', hasattr(jax, 'enable_x64'), 'shard_map', inspect.signature(jax.shard_map))
PY
time python3 -m pip install --no-build-isolation -q . 2>&1 | tail -5
cd /tmp && python3 -c "import jax_mscclpp_ep as e, glob, os; print('cuda', e.cuda_enabled(), e.native_version()); so=glob.glob(os.path.dirname(e.__file__)+'/_ep*.so'); print(so); os.system('ldd '+so[0])"
cd - >/dev/null
JMEP_TEST_PLATFORM=cpu timeout 300 pytest -q -x tests 2>&1 | tail -3
} 2>&1 | tee "$OUT/probe.log"
