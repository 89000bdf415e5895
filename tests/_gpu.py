"""Skip marks for the GPU cases: they run where a CUDA device is lent and skip, with the reason, elsewhere."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

TORCH_CUDA = torch.cuda.is_available()
ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

needs_torch_cuda = pytest.mark.skipif(not TORCH_CUDA, reason="needs a CUDA device visible to torch")
needs_ort_cuda = pytest.mark.skipif(
    not (TORCH_CUDA and ORT_CUDA),
    reason="needs a CUDA device and onnxruntime's CUDA execution provider (onnxruntime-gpu)")
