"""Execution-provider choice for onnxruntime and onnxruntime-genai.

ORT names providers ``CUDAExecutionProvider``; onnxruntime-genai wants ``cuda``. We
pick the first configured providers that this build actually has, always ending on
CPU so a session can be created anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort

CPU = "CPUExecutionProvider"

# ORT provider name -> onnxruntime-genai provider name (CPU needs no entry in genai).
_GENAI_NAMES: dict[str, str] = {
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "CoreMLExecutionProvider": "CoreML",
    "OpenVINOExecutionProvider": "OpenVINO",
    "QNNExecutionProvider": "QNN",
    "WebGpuExecutionProvider": "WebGPU",
}


def available_execution_providers() -> list[str]:
    """Providers compiled into this onnxruntime build, in ORT's preference order."""
    return list(ort.get_available_providers())


def pick_providers(order: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """The configured providers that exist here, in configured order, CPU last.

    Unknown or missing providers are skipped rather than failing, so one config file
    works on a laptop and on a GPU box.
    """
    have = set(available_execution_providers() if available is None else available)
    picked = [p for p in dict.fromkeys(order) if p in have and p != CPU]
    picked.append(CPU)
    return picked


def genai_provider_name(provider: str) -> str | None:
    """onnxruntime-genai's name for an ORT provider; None for CPU or unsupported ones."""
    return _GENAI_NAMES.get(provider)


def genai_available(provider: str) -> bool:
    """Whether the installed onnxruntime-genai wheel can run ``provider``."""
    import onnxruntime_genai as og

    probes = {
        "CUDAExecutionProvider": "is_cuda_available",
        "DmlExecutionProvider": "is_dml_available",
        "OpenVINOExecutionProvider": "is_openvino_available",
        "QNNExecutionProvider": "is_qnn_available",
        "WebGpuExecutionProvider": "is_webgpu_available",
    }
    if provider == CPU:
        return True
    probe = probes.get(provider)
    if probe is None:
        return provider in available_execution_providers() and provider in _GENAI_NAMES
    return bool(getattr(og, probe, lambda: False)())
