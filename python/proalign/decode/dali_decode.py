"""DALI tile decoder: nvJPEG (with the hardware JPEG decoder on A100/H100) and nvJPEG2000 through
the "mixed" backend on a GPU, or DALI's CPU decoder. Same contract as decode.cpu.CpuDecoder:
a batch of tile bytes in, a list of uint8 (h, w, 3) RGB tiles out (torch tensors on the GPU for
device="gpu", numpy arrays for device="cpu"), TileDecodeError naming the bad tile.

DALI decodes tile bytes, not TIFF pyramids: the tile engine hands it complete JPEG streams (tables
spliced in, an Adobe marker for RGB JPEG) or raw JPEG 2000 codestreams.
"""
from __future__ import annotations

import numpy as np

from .cpu import TileDecodeError, TileFormat, check_frame, decode_tile

SUPPORTED_CODECS = ("jpeg", "jpeg2000")


def dali_available() -> str | None:
    """None when DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia-dali is not installed ({e}); pip install nvidia-dali-cuda130"
    return None


class DaliDecoder:
    def __init__(self, device: str = "gpu", max_batch: int = 64, threads: int = 2, device_id: int = 0):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        why = dali_available()
        if why:
            raise RuntimeError(why)
        self.device, self.max_batch, self.threads = device, max_batch, threads
        self.device_id = device_id if device == "gpu" else None
        self.name = f"dali-{device}"
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        backend = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            tiles = fn.external_source(name="tiles", dtype=types.UINT8, ndim=1, no_copy=False)
            return fn.decoders.image(tiles, device=backend, output_type=types.RGB)

        p = pipe()
        p.build()
        return p

    def decode(self, tiles: list[bytes], fmt: TileFormat) -> list:
        if fmt.codec not in SUPPORTED_CODECS:
            raise TileDecodeError(0, f"DALI does not decode {fmt.codec} tiles")
        out: list = [None] * len(tiles)
        todo = [i for i, t in enumerate(tiles) if t]
        for i in todo:  # a frame of another size than the tile is refused before DALI allocates it
            try:
                check_frame(tiles[i], fmt)
            except TileDecodeError as e:
                raise TileDecodeError(i, e.problem) from None
        for i in range(len(tiles)):
            if not tiles[i]:  # a tile the writer left out: white, on the decoder's device
                out[i] = self._white(fmt)
        for s in range(0, len(todo), self.max_batch):
            chunk = todo[s:s + self.max_batch]
            for i, tile in zip(chunk, self._run([tiles[i] for i in chunk], fmt)):
                out[i] = tile
        return out

    def _run(self, tiles: list[bytes], fmt: TileFormat) -> list:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("tiles", [np.frombuffer(t, np.uint8) for t in tiles])
            (batch,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # after a decode error a DALI pipeline must be rebuilt
            raise TileDecodeError(self._first_bad(tiles, fmt), f"DALI: {str(e).splitlines()[0]}") from e
        if self.device == "gpu":
            import torch
            # DALI reuses its output buffers on the next run: copy out
            return [torch.from_dlpack(batch[i]).clone() for i in range(len(tiles))]
        return [np.array(batch[i]) for i in range(len(tiles))]

    @staticmethod
    def _first_bad(tiles: list[bytes], fmt: TileFormat) -> int:
        for i, t in enumerate(tiles):
            try:
                decode_tile(t, fmt)
            except Exception:
                return i
        return 0

    def _white(self, fmt: TileFormat):
        if self.device == "gpu":
            import torch
            return torch.full((fmt.tile_height, fmt.tile_width, 3), 255, dtype=torch.uint8,
                              device=f"cuda:{self.device_id}")
        return np.full((fmt.tile_height, fmt.tile_width, 3), 255, np.uint8)

    def close(self) -> None:
        self._pipe = None
