"""The `Encoder` every factory returns, and the helpers that read local checkpoints.

An encoder wraps a backbone `nn.Module` that provides
- `forward_features(pixels) -> (n, d)`: the pre-projection image feature x (ProAlign's patch feature),
- `projection_weight() -> (d, D) | None`: the linear map into the joint image-text space,
- `encode_text_ids(ids) -> (n, D)`: text embeddings (un-normalised), for vision-language models,
- `activation_shape() -> (tokens, width, heads, mlp_ratio)`: for the batch-size estimate,
and adds what every model needs the same way: preprocessing on the tensor's own device, bf16
autocast on a GPU (fp32 on the CPU), normalisation, batching, an optional `torch.compile`.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EncoderError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu" if device is None else device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 on a GPU and fp32 on the CPU unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise EncoderError(f"unknown dtype {dtype!r} (bf16, fp16, fp32)")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise EncoderError(f"dtype {dtype} is not supported (bf16, fp16, fp32)")
    return dtype


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def find_weights(path: str | os.PathLike | None, candidates: Sequence[str], *, what: str, howto: str) -> Path:
    """The checkpoint file: `path` itself when it is a file, else the first of `candidates`
    inside the folder `path`. Anything missing raises EncoderError with `howto` (what to download
    and where to put it); nothing is ever fetched."""
    if path is None or str(path) == "":
        raise EncoderError(f"{what}: no weights given (they are never downloaded at run time).\n{howto}")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in candidates:
            if (p / name).is_file():
                return p / name
        present = sorted(q.name for q in p.iterdir())[:12]
        raise EncoderError(f"{what}: folder {p} has none of {list(candidates)} (it holds {present}).\n{howto}")
    raise EncoderError(f"{what}: weights path {p} does not exist.\n{howto}")


# A weights folder may carry the architecture settings its checkpoint was made with (a model that
# is not the published size, e.g. the demo's small random CONCH): create_encoder reads them, and
# explicit keyword arguments (--encoder-arg) win over them.
ENCODER_CONFIG_FILE = "proalign_encoder.json"


class CheckpointMismatchError(EncoderError):
    """The checkpoint's keys or tensor shapes are not those of the architecture being built."""


def write_encoder_config(folder: str | os.PathLike, encoder: str, config: Mapping[str, Any], *,
                         note: str = "") -> Path:
    """Record `config` (create_encoder keyword arguments, e.g. architecture overrides) for the
    weights in `folder`, as ENCODER_CONFIG_FILE; create_encoder(encoder, folder) then applies them."""
    import json

    path = Path(folder) / ENCODER_CONFIG_FILE
    doc = {"encoder": encoder, "config": dict(config), **({"note": note} if note else {})}
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def read_encoder_config(weights: str | os.PathLike | None, encoder: str) -> tuple[Optional[Path], dict[str, Any]]:
    """(file, settings) of ENCODER_CONFIG_FILE in the weights folder (or beside the weights file),
    or (None, {}) when there is none. A file for another encoder, or one that does not parse,
    raises EncoderError naming it."""
    import json

    if weights is None or str(weights) == "":
        return None, {}
    p = Path(weights).expanduser()
    folder = p if p.is_dir() else p.parent
    path = folder / ENCODER_CONFIG_FILE
    if not path.is_file():
        return None, {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path}: unreadable encoder config ({e}); fix or delete it") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict):
        raise EncoderError(f"{path}: an encoder config is a JSON object "
                           '{"encoder": NAME, "config": {KEY: VALUE, ...}}; fix or delete it')
    if doc.get("encoder") not in (None, encoder):
        raise EncoderError(f"{path}: these weights are for encoder {doc['encoder']!r}, not {encoder!r}")
    return path, dict(doc.get("config") or {})


def _unwrap(obj: Any) -> Any:
    # Training checkpoints nest the weights ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint (.safetensors, or a torch file read with weights_only=True:
    no pickled code runs), unwrapped from {"state_dict"/"model": ...} and a DDP `module.` prefix."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable message
        hint = (" Only tensor checkpoints are read (torch.load weights_only=True); re-save the state_dict "
                "or convert it to .safetensors." if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else "")
        raise EncoderError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}).{hint}") from e
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise EncoderError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise EncoderError(f"{path}: checkpoint has no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _few(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_checkpoint(model: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, path: Path | str,
                    ignore_prefixes: Sequence[str] = (), ignore_keys: Sequence[str] = ()) -> nn.Module:
    """Strict load into `model` (normally built on the meta device, so nothing is allocated
    twice): every key the model has must be in the checkpoint with the same shape, and every
    checkpoint key must be the model's or explicitly ignored (parts of the released model that
    inference does not use). Tensors are assigned, then made float32 (autocast does the rest)."""
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items()
          if k not in ignore_keys and not any(k.startswith(p) for p in ignore_prefixes)}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise CheckpointMismatchError(f"{what}: {path} does not match the architecture ({'; '.join(parts)}). "
                           "Is it the checkpoint of this encoder, with the same configuration?")
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(t.shape)}"
           for k, t in expected.items() if tuple(sd[k].shape) != tuple(t.shape)]
    if bad:
        raise CheckpointMismatchError(f"{what}: {path} has tensors of other shapes than the architecture: "
                           + "; ".join(bad[:6]) + (f" ... ({len(bad)} in all)" if len(bad) > 6 else ""))
    model.load_state_dict(dict(sd), strict=True, assign=True)
    model.to(dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating or initialising its weights (they come from the checkpoint)."""
    with torch.device("meta"):
        return factory()


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
class Encoder:
    """A patch encoder ready for inference (see the module docstring for the backbone contract).

    Attributes: `name`, `input_size` (pixels the model sees), `mean`/`std` (RGB, 0-1 scale),
    `feature_dim` (d of x), `joint_dim` (D of z; None without a text tower), `magnification` and
    `patch_size` (the preferred patch grid: `patch_size` pixels at `magnification`x, resized to
    `input_size`), `resize_size` (the shortest side patches are resized to before the centre crop
    to `input_size`; equal to it unless the model's eval transform crops, e.g. GigaPath's
    Resize(256) + CenterCrop(224)), `logit_scale` (float or None), `interpolation`, `device`,
    `dtype`, `weights`."""

    def __init__(self, backbone: nn.Module, *, name: str, input_size: int, mean: Sequence[float],
                 std: Sequence[float], feature_dim: int, joint_dim: Optional[int], magnification: float,
                 patch_size: int, logit_scale: Optional[float], interpolation: str = "bicubic",
                 tokenizer: Optional[Callable[[], Callable[[list[str]], torch.Tensor]]] = None,
                 text_help: str = "", device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 compile: bool | str = False, weights: Optional[str | os.PathLike] = None, impl: str = "native",
                 resize_size: Optional[int] = None):
        if interpolation not in ("bicubic", "bilinear"):
            raise EncoderError(f"{name}: interpolation {interpolation!r} is not supported (bicubic, bilinear)")
        self.name = name
        self.input_size = int(input_size)
        self.resize_size = self.input_size if resize_size is None else int(resize_size)
        if self.resize_size < self.input_size:
            raise EncoderError(f"{name}: resize_size {self.resize_size} is smaller than the input size {self.input_size}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.feature_dim = int(feature_dim)
        self.joint_dim = None if joint_dim is None else int(joint_dim)
        self.magnification = float(magnification)
        self.patch_size = int(patch_size)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.interpolation = interpolation
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.weights = None if weights is None else str(weights)
        self.impl = impl
        self.backbone = backbone.to(self.device).eval()
        self._tokenizer_factory = tokenizer
        self._tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None
        self._text_help = text_help
        self._weights_id: Optional[str] = None
        self._proj: Optional[torch.Tensor] = None
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._image_fn: Callable[[torch.Tensor], torch.Tensor] = backbone.forward_features
        self.compiled = False
        if compile:
            # The first call per input shape compiles (minutes for a large ViT); a fixed batch size
            # (batch_size_for) keeps that to one or two shapes.
            backend = compile if isinstance(compile, str) else "inductor"
            self._image_fn = torch.compile(backbone.forward_features, backend=backend, dynamic=False)
            self.compiled = True

    def use_cuda_graphs(self) -> None:
        """Replay the image forward as a CUDA graph (see `GraphedForward`). On a GPU a ViT-B batch
        is a few hundred kernels; for small batches their launch time is a real share of the
        forward, which a graph removes. Needs a CUDA device."""
        if self.device.type != "cuda":
            raise EncoderError(f"{self.name}: CUDA graphs need a CUDA device (this encoder is on {self.device})")
        if not isinstance(self._image_fn, GraphedForward):
            self._image_fn = GraphedForward(self._image_fn)

    @property
    def cuda_graphs(self) -> bool:
        return isinstance(self._image_fn, GraphedForward)

    # -- preprocessing ------------------------------------------------------------------------
    def _norm_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm_cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._norm_cache[device] = (m, s)
        return self._norm_cache[device]

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 RGB patches (n, H, W, 3) -> normalised float32 (n, 3, S, S), S = input_size, on the
        tensor's own device (no host copy). Other sizes are resized (shortest side to
        `resize_size`, S unless the model's transform crops, with antialiasing, the model's
        interpolation, clamped to [0, 1] like an 8-bit resize) and centre-cropped to S, as the
        models' own eval transforms do (torchvision Resize + CenterCrop)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[-1] != 3:
            got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise EncoderError(f"{self.name}: preprocess takes uint8 (n, H, W, 3) RGB patches, got {got}")
        x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        s, r = self.input_size, self.resize_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            short, long = (h, w) if h <= w else (w, h)
            if short != r:  # torchvision's Resize leaves an image of the asked size as it is
                new_long = int(r * long / short)
                size = (r, new_long) if h <= w else (new_long, r)
                if x.shape[0] > 0:
                    x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
                else:
                    x = x.new_empty((0, 3) + size)
                if self.interpolation == "bicubic":
                    x = x.clamp_(0.0, 1.0)  # bicubic overshoots; an 8-bit resize saturates
            h, w = x.shape[-2:]
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
            x = x[:, :, top:top + s, left:left + s]
        m, sd = self._norm_tensors(x.device)
        return ((x - m) / sd).contiguous()

    # -- inference ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        # autocast's cache of cast weights must not outlive a CUDA graph capture
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=not self.cuda_graphs)

    def encode_image(self, pixels: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Normalised float pixels (n, 3, H, W) (from `preprocess`) -> pre-projection features x
        (n, feature_dim), float32 on the encoder's device."""
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise EncoderError(f"{self.name}: encode_image takes float pixels (n, 3, H, W), got {got}")
        if not pixels.is_floating_point():
            raise EncoderError(f"{self.name}: encode_image takes normalised float pixels; "
                               f"pass uint8 patches through preprocess() first")
        n = pixels.shape[0]
        if n == 0:
            return torch.empty(0, self.feature_dim, device=self.device)
        step = n if not batch_size else int(batch_size)
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, n, step):
                chunk = pixels[i:i + step].to(self.device, non_blocking=True)
                out.append(self._image_fn(chunk).float())
        return out[0] if len(out) == 1 else torch.cat(out)

    def __call__(self, images: torch.Tensor | np.ndarray, batch_size: Optional[int] = None) -> torch.Tensor:
        """uint8 patches -> features x: preprocess + encode_image."""
        return self.encode_image(self.preprocess(images), batch_size)

    def _require_joint(self, what: str) -> None:
        if self.joint_dim is None:
            raise EncoderError(
                f"{self.name} is a vision-only encoder: it has no text tower and no joint image-text space, "
                f"so {what} is not available. Allocate with a vision-language model (e.g. conch_v1) on the "
                "same patches, or build prototypes with init=kmeans.")

    def projection_matrix(self) -> torch.Tensor:
        """(feature_dim, joint_dim) float32 CPU matrix W with z = normalize(x @ W)."""
        self._require_joint("project()")
        if self._proj is None:
            w = self.backbone.projection_weight()
            self._proj = w.detach().to("cpu", torch.float32).clone()
        return self._proj

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Features x (n, feature_dim) -> unit-norm joint-space embeddings z (n, joint_dim), float32
        on x's device (computed in fp32: the map is small and z feeds a softmax with a large scale)."""
        w = self.projection_matrix()
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise EncoderError(f"{self.name}: project takes (n, {self.feature_dim}) features, got {tuple(x.shape)}")
        z = x.to(torch.float32) @ w.to(x.device)
        return F.normalize(z, dim=-1)

    @property
    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        self._require_joint("a tokenizer")
        if self._tokenizer is None:
            if self._tokenizer_factory is None:
                raise EncoderError(f"{self.name}: no tokenizer. {self._text_help}")
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Sentences -> unit-norm text embeddings (n, joint_dim), float32 on the encoder's device,
        through the model's own tokenizer and text tower."""
        self._require_joint("encode_text()")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise EncoderError(f"{self.name}: encode_text takes a list of strings")
        if not texts:
            return torch.empty(0, self.joint_dim, device=self.device)
        tok = self.tokenizer
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                ids = tok(texts[i:i + batch_size]).to(self.device)
                out.append(F.normalize(self.backbone.encode_text_ids(ids).float(), dim=-1))
        return torch.cat(out)

    # -- resources ----------------------------------------------------------------------------
    def bytes_per_image(self, source_size: Optional[int] = None) -> int:
        """A conservative estimate of the memory one image needs in a forward pass: the uint8 source
        patch and its float copies, the widest activations of a block (fp32: autocast keeps
        LayerNorm outputs in fp32), and the attention scores where the kernel stores them (CPU and
        fp32; the flash kernels on a GPU in bf16/fp16 do not)."""
        tokens, width, heads, mlp_ratio = self.backbone.activation_shape()
        s, src = self.input_size, source_size or max(self.patch_size, self.input_size)
        pixels = 3 * src * src * (1 + 4) + 3 * s * s * 4 * 2
        act = tokens * width * (6 + 2 * mlp_ratio) * 4
        flash = self.device.type == "cuda" and self.dtype != torch.float32
        scores = 0 if flash else heads * tokens * tokens * 4
        return int(pixels + act + scores)

    def batch_size_for(self, free_bytes: Optional[int] = None, *, fraction: float = 0.7, max_batch: int = 1024,
                       source_size: Optional[int] = None) -> int:
        """A batch size that fits in `fraction` of `free_bytes` (default: what the device has free
        now), at least 1, at most `max_batch`, a multiple of 8 when 8 or more."""
        if free_bytes is None:
            free_bytes = free_memory(self.device)
        b = int(max(0, free_bytes) * fraction // self.bytes_per_image(source_size))
        b = max(1, min(int(max_batch), b))
        return b - b % 8 if b >= 8 else b

    @property
    def weights_id(self) -> Optional[str]:
        """sha256 (first 32 hex digits) of the weights file: identifies the weights in caches and
        provenance. Computed on first use (a few seconds for a 1 GB file)."""
        if self._weights_id is None and self.weights and Path(self.weights).is_file():
            h = hashlib.sha256()
            with open(self.weights, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            self._weights_id = h.hexdigest()[:32]
        return self._weights_id

    def info(self) -> dict[str, Any]:
        """What to record in provenance (JSON-able)."""
        return {"encoder": self.name, "impl": self.impl, "weights": self.weights, "input_size": self.input_size,
                "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "feature_dim": self.feature_dim, "joint_dim": self.joint_dim, "magnification": self.magnification,
                "patch_size": self.patch_size, "logit_scale": self.logit_scale, "dtype": str(self.dtype).split(".")[-1],
                "device": str(self.device), "compiled": self.compiled, "cuda_graphs": self.cuda_graphs}

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, d={self.feature_dim}, D={self.joint_dim}, input={self.input_size}, "
                f"{self.patch_size}px@{self.magnification:g}x, {self.device}, {str(self.dtype).split('.')[-1]})")


class GraphedForward:
    """`fn(pixels)` replayed from a CUDA graph captured at one batch shape.

    The first call captures the graph at that call's batch (after warm-up runs on a side stream,
    as CUDA graph capture requires); later calls copy their pixels into the graph's static input
    and replay it. A smaller batch (the last one of a slide) is padded with zeros to the captured
    size and its rows cut from the output; a larger batch or another image size captures again.
    The output is cloned, since the next replay overwrites the graph's static output. Rows are
    computed independently by a ViT, so padding does not change them; the tests compare replays
    with the eager forward."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 3):
        self.fn, self.warmup = fn, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_in: Optional[torch.Tensor] = None
        self.static_out: Optional[torch.Tensor] = None
        self.captures = 0

    def _capture(self, x: torch.Tensor) -> None:
        self.graph = self.static_in = self.static_out = None  # free the previous graph's pool first
        static_in = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.captures += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if (self.static_in is None or n > self.static_in.shape[0] or x.shape[1:] != self.static_in.shape[1:]
                or x.dtype != self.static_in.dtype or x.device != self.static_in.device):
            self._capture(x)
        self.static_in[:n].copy_(x)
        if n < self.static_in.shape[0]:
            self.static_in[n:].zero_()
        self.graph.replay()
        return self.static_out[:n].clone()


def free_memory(device: torch.device) -> int:
    """Bytes free now on `device` (the GPU's free memory, or the host's available memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


__all__ = ["Encoder", "GraphedForward", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_MEAN", "OPENAI_STD", "build_on_meta",
           "find_weights", "free_memory", "load_checkpoint", "read_state_dict", "resolve_device", "resolve_dtype"]
