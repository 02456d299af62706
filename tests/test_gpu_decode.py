"""GPU decode (DALI mixed backend: nvJPEG / hardware decoder, nvJPEG2000) against the CPU path.
Runs only on a machine with a CUDA GPU and nvidia-dali (bench/device_check.sh); skipped here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_slides import CMU, TCGA, needs_data

from proalign.decode.cpu import CpuDecoder
from proalign.slides.patches import PatchStats, read_patches
from proalign.slides.slide import open_slide

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    needs_data,
]


@pytest.fixture(scope="module")
def dali_gpu():
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed on this machine")
    from proalign.decode.dali_decode import DaliDecoder

    return DaliDecoder(device="gpu", max_batch=32)


@pytest.mark.parametrize("path", [CMU, TCGA])
def test_gpu_tiles_match_cpu(dali_gpu, path):
    """nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by rounding: max 8 levels, mean < 0.5.
    JPEG 2000 lossy decoders agree to within 2 levels."""
    s = open_slide(path)
    p = s.pages[0]
    n = min(32, len(p.offsets))
    data, _ = s.readers[0].read(p.offsets[:n], p.bytecounts[:n])
    cpu = CpuDecoder(threads=2).decode(data, s.formats[0])
    gpu = dali_gpu.decode(data, s.formats[0])
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and b.dtype == torch.uint8 and tuple(b.shape) == a.shape
        d = np.abs(a.astype(int) - b.cpu().numpy())
        assert d.max() <= 8 and d.mean() < 0.5


def test_gpu_patches_match_cpu(dali_gpu, rng):
    s = open_slide(CMU)
    w, h = s.dimensions
    coords = np.stack([rng.integers(0, w - 256, 200), rng.integers(0, h - 256, 200)], 1)
    stats = PatchStats()
    gpu = read_patches(s, coords, 256, 224, decoder=dali_gpu, stats=stats)
    cpu = read_patches(s, coords, 256, 224, decoder="cpu")
    d = np.abs(gpu.astype(int) - cpu)
    assert d.max() <= 9 and d.mean() < 0.5  # decoder rounding + float vs uint8 resize (<= 1)
    assert stats.tiles_decoded == stats.tiles_needed
