"""Which GPUs this build's kernels run on: checked when a Buffer is created.

The kernels are compiled for a list of CUDA architectures (``JMEP_CUDA_ARCHS`` at
build time; default 80, 90, 100, 120 and PTX for newer GPUs). A GPU with no
matching machine code or PTX would fail at the first launch, deep inside XLA;
``Buffer(...)`` asks the CUDA runtime first and names the GPU and the fix.
"""

from __future__ import annotations

from typing import Optional

import jax

from .native import ext


def arch_error(device: str, capability: str, image_error: str, archs: str) -> Optional[str]:
    """The message for a GPU that cannot load the kernels (None when image_error is '')."""
    if not image_error:
        return None
    cc = capability.replace(".", "")
    return (f"jax_mscclpp_ep: {device} (compute capability {capability}) cannot run this "
            f"build's CUDA kernels, compiled for architectures {archs} ({image_error}). "
            f"Rebuild for it: JMEP_CUDA_ARCHS={cc if cc.isdigit() else 'native'} "
            "pip install --no-build-isolation . (the kernels need compute capability 7.0 or newer, and a CUDA toolkit that supports the GPU)")


def check_devices(devices) -> None:
    """Raise RuntimeError if one of this process's GPUs in ``devices`` cannot run the kernels."""
    archs = ext.cuda_archs().replace(",", ";")
    for d in devices:
        if d.platform != "gpu" or d.process_index != jax.process_index():
            continue
        ordinal = d.local_hardware_id
        msg = arch_error(f"GPU {ordinal} ({getattr(d, 'device_kind', 'unknown')})",
                         ext.compute_capability(ordinal), ext.kernel_image_error(ordinal), archs)
        if msg:
            raise RuntimeError(msg)
