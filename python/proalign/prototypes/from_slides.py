"""The prototype pool (METHOD.md Step 3) sampled from slide files: an equal, seeded per-slide quota
of patches from each slide's tissue grid, read through the tile engine and encoded. Feeds
`prototypes_from_pool` exactly as the features path's pool does."""
from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..slides.patches import iter_patches
from ..errors import PrototypeError, ProAlignError
from ..slides.mpp import without_fix
from ..slides.patching import slide_grid
from ..slides.slide import open_slide
from .build import Pool

log = logging.getLogger(__name__)


def sample_slide_pool(paths: Sequence[str | Path], encoder: Any, pool_size: int, seed: int, *,
                      magnification: float | None = None, patch_size: int | None = None, min_tissue: float = 0.1,
                      mpp_for: Callable[[Path], float | None] = lambda p: None, batch_size: int = 64,
                      device: str | torch.device = "cpu", mpp_keys: Sequence[str] = ()) -> Pool:
    """Encoded patches (P, d) drawn from the slides; unreadable slides are skipped and reported.
    `mpp_for`: the user's mpp of a slide file; `mpp_keys`: custom property names holding the mpp
    (slides/mpp.py)."""
    if not paths:
        raise PrototypeError("no slides to sample a prototype pool from")
    quota = math.ceil(pool_size / len(paths))
    parts, ids, skipped = [], [], {}
    for path in map(Path, paths):
        sid = path.stem
        try:
            with open_slide(path, mpp=mpp_for(path), mpp_keys=tuple(mpp_keys)) as slide:
                grid = slide_grid(slide, patch_size=patch_size or encoder.patch_size,
                                  target_magnification=magnification or encoder.magnification, min_tissue=min_tissue)
                if len(grid) == 0:
                    raise PrototypeError(f"{path}: no tissue patches")
                # one generator per slide id: the pool does not depend on the order slides are listed in
                rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])
                rows = np.sort(rng.choice(len(grid), size=min(quota, len(grid)), replace=False))
                feats = []
                for _, patches in iter_patches(slide, grid.coords[rows], grid.patch_size_level0, grid.patch_size,
                                               batch_size=batch_size):
                    with torch.inference_mode():
                        feats.append(encoder.encode_image(encoder.preprocess(patches.to(device))).float().cpu())
        except ProAlignError as err:
            skipped[sid] = str(err)
            log.warning("skipping %s for the prototype pool: %s", sid, without_fix(str(err)))  # fix: said once
            continue
        parts.append(torch.cat(feats).numpy())
        ids.append(sid)
    if not parts:
        raise PrototypeError("no readable slide for the prototype pool: " + "; ".join(skipped.values()))
    return Pool(np.concatenate(parts)[:pool_size], ids, skipped)
