"""CONCH v1 (Lu et al., Nature Medicine 2024): a CoCa-style vision-language model for pathology.

Our own module definition; its state_dict keys and shapes are those of the released checkpoint
(`pytorch_model.bin` of MahmoodLab/CONCH), taken as facts from the public CONCH code
(`conch/open_clip_custom/coca_model.py`, `vision_tower.py`, `transformer.py`,
`model_configs/conch_ViT-B-16.json`):
- `visual.trunk.*`: a timm ViT-B/16 at 448 px (class token, learned positions incl. the class
  row, LayerNorm eps 1e-6, GELU, no LayerScale), all 785 tokens after the final norm;
- `visual.attn_pool_contrast`: one learned query (512-d) attending over those tokens (8 heads,
  key/value width 768), then `visual.ln_contrast` -> the 512-d pre-projection feature x
  (= CONCH `encode_image(proj_contrast=False, normalize=False)`);
- `visual.proj_contrast` (512 x 512): x @ W, normalised -> the joint-space embedding z;
- `text.*`: a 12-layer causal text transformer (width 768, context 128, vocab 32007) with a
  learned CLS embedding appended after the (up to 127) tokens; the CLS output, after `ln_final`,
  @ `text_projection` (768 x 512) is the text embedding;
- `logit_scale`: log of the contrastive temperature's inverse.
The captioning parts (`visual.attn_pool_caption`, `visual.ln_caption`, `text_decoder.*`) are in
the checkpoint but not used for embeddings; they are skipped on load (their names are checked).
Preprocessing (CONCH's eval transform): resize the short side to 448 (bicubic), centre crop,
OpenAI CLIP mean/std. TRIDENT runs conch_v1 on 512 px patches at 20x.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import EncoderError
from .base import (OPENAI_MEAN, OPENAI_STD, Encoder, build_on_meta, find_weights, load_checkpoint,
                   read_state_dict)
from .layers import AttentionalPooler, TimmViT, Transformer, causal_mask

WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.safetensors", "model.safetensors", "conch_v1.bin")
TOKENIZER_FILES = ("conch_byte_level_bpe_uncased.json", "tokenizer.json")
# Parts of the released checkpoint used for captioning only.
CAPTION_PREFIXES = ("text_decoder.", "visual.attn_pool_caption.", "visual.ln_caption.")

HOWTO = """CONCH v1 weights are gated: request access at https://huggingface.co/MahmoodLab/CONCH (CC-BY-NC-ND-4.0),
then download its `pytorch_model.bin`, e.g.
    hf download MahmoodLab/CONCH pytorch_model.bin --local-dir ~/models/conch_v1
(or `huggingface-cli download ...`, or the web page's "Files" tab), and pass the folder or the file:
    create_encoder("conch_v1", "~/models/conch_v1")
For text (building prototypes), put the tokenizer `conch_byte_level_bpe_uncased.json` from
https://github.com/mahmoodlab/CONCH (conch/open_clip_custom/tokenizers/) in the same folder, or install
the conch package (pip install git+https://github.com/mahmoodlab/CONCH, or PyPI's conch-fork 0.1.0,
whose conch/ is byte-identical to that repository at 141cc09: docs/ENCODERS.md)."""


@dataclass
class ConchConfig:
    image_size: int = 448
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # contrastive pooler width = pre-projection feature d = joint space D
    pooler_heads: int = 8
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = 128
    vocab_size: int = 32007
    pad_id: int = 0

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> "ConchConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise EncoderError(f"conch_v1: unknown config keys {bad} (known: {sorted(known)})")
        return cls(**overrides)


class ConchVisual(nn.Module):
    def __init__(self, cfg: ConchConfig):
        super().__init__()
        self.trunk = TimmViT(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                             depth=cfg.layers, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
        self.attn_pool_contrast = AttentionalPooler(cfg.embed_dim, cfg.width, cfg.pooler_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(cfg.embed_dim)
        self.proj_contrast = nn.Parameter(torch.randn(cfg.embed_dim, cfg.embed_dim) / math.sqrt(cfg.width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_tokens(pixels)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class ConchText(nn.Module):
    def __init__(self, cfg: ConchConfig):
        super().__init__()
        w = cfg.text_width
        self.pad_id, self.context_length = cfg.pad_id, cfg.context_length
        self.text_projection = nn.Parameter(torch.randn(w, cfg.embed_dim) / math.sqrt(w))
        self.cls_emb = nn.Parameter(torch.randn(w) * 0.01)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads)
        self.ln_final = nn.LayerNorm(w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n, l), l <= context_length - 1 (the last position is the CLS embedding)."""
        n, l = ids.shape
        if l > self.context_length - 1:
            raise EncoderError(f"conch_v1: {l} tokens, at most {self.context_length - 1} fit beside the CLS token")
        x = torch.cat([self.token_embedding(ids), self.cls_emb.view(1, 1, -1).expand(n, 1, -1)], dim=1)
        x = x + self.positional_embedding[:l + 1]
        # Causal mask; the CLS row (last) also hides padding. CONCH builds that row from
        # `text != pad` shifted right by one (key 0 always visible, key j visible iff token j-1
        # is not padding): kept as is, since the released weights were trained with it.
        keep = torch.ones(n, l + 1, dtype=torch.bool, device=ids.device)
        keep[:, 1:] = ids != self.pad_id
        mask = causal_mask(l + 1, ids.device).expand(n, 1, l + 1, l + 1).clone()
        mask[:, 0, l, :] = torch.zeros(n, l + 1, device=ids.device).masked_fill_(~keep, float("-inf"))
        x = self.transformer(x, mask)
        return self.ln_final(x[:, -1]) @ self.text_projection


class ConchV1(nn.Module):
    """The parts of CONCH v1 that make embeddings (vision tower, contrastive head, text tower)."""

    def __init__(self, cfg: ConchConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ConchVisual(cfg)
        self.text = ConchText(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def projection_weight(self) -> torch.Tensor:
        return self.visual.proj_contrast

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == self.cfg.context_length:  # CONCH's tokenize() output: last slot is a placeholder
            ids = ids[:, :-1]
        return self.text(ids)

    def activation_shape(self) -> tuple[int, int, int, float]:
        t = self.visual.trunk
        return t.seq_len, t.embed_dim, t.num_heads, t.mlp_ratio


def _tokenizer_file(weights_file: Path, weights_arg: Path, explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise EncoderError(f"conch_v1: tokenizer file {p} does not exist.\n{HOWTO}")
        return p
    for folder in dict.fromkeys([weights_arg if weights_arg.is_dir() else weights_arg.parent, weights_file.parent]):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
    spec = _conch_spec()  # the conch package ships the file
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(root) / "tokenizers" / TOKENIZER_FILES[0]
        if p.is_file():
            return p
    return None


def _conch_spec():
    """Spec of `conch.open_clip_custom` when the conch package is installed (not merely a folder
    named `conch` on the path, which Python would take for a namespace package)."""
    try:
        return importlib.util.find_spec("conch.open_clip_custom")
    except (ImportError, ValueError):
        return None


_OFFICIAL_STATE: Optional[tuple[bool, str]] = None  # (imports, why not): the import is tried once per process
_FALLBACK_WARNED = False


def _official_conch() -> tuple[bool, str]:
    """Whether the conch package imports here, and if not, why. Finding the package is not enough:
    beside a torch it was not built for, its imports (torchvision, timm) raise RuntimeError and
    others, not only ImportError, so any exception counts as "does not import". Tried once."""
    global _OFFICIAL_STATE
    if _OFFICIAL_STATE is None:
        if _conch_spec() is None:
            _OFFICIAL_STATE = (False, "the conch package is not installed")
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conch imports huggingface_hub; never fetch
            try:
                importlib.import_module("conch.open_clip_custom")
                _OFFICIAL_STATE = (True, "")
            except Exception as e:  # noqa: BLE001 - whatever the import raises, the package is unusable
                first = (str(e).strip().splitlines() or [""])[0]
                _OFFICIAL_STATE = (False, f"the conch package is installed but does not import "
                                          f"({type(e).__name__}: {first})")
    return _OFFICIAL_STATE


def _warn_fallback(reason: str) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(f"conch_v1: {reason}; using proalign's own CONCH v1 implementation instead (impl='native', "
                      "the same numbers: see the README's official-parity section)", RuntimeWarning, stacklevel=4)


def _make_tokenizer(path: Path, cfg: ConchConfig):
    from .tokenization import FileTokenizer

    tok = FileTokenizer(path, context_length=cfg.context_length - 1, pad_id=cfg.pad_id, what="conch_v1")
    # CONCH's tokenizer: <pad> = 0 (the text tower's pad id), <start_of_text>, <end_of_text>.
    if tok.token_id("<pad>") != cfg.pad_id or tok.token_id("<start_of_text>") is None \
            or tok.token_id("<end_of_text>") is None:
        raise EncoderError(f"conch_v1: {path} is not CONCH's tokenizer (needs <pad>={cfg.pad_id}, "
                           "<start_of_text>, <end_of_text>)")
    if tok.vocab_size > cfg.vocab_size:
        raise EncoderError(f"conch_v1: tokenizer {path} has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    return tok


class _OfficialConch(nn.Module):
    """The conch package's model behind the same backbone contract (used when it is installed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, proj_contrast=False, normalize=False)

    def projection_weight(self) -> torch.Tensor:
        return self.model.visual.proj_contrast

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == self.model.context_length - 1:  # CONCH's encode_text drops a last placeholder slot
            ids = torch.nn.functional.pad(ids, (0, 1), value=self.model.pad_id)
        return self.model.encode_text(ids, normalize=False)

    def activation_shape(self) -> tuple[int, int, int, float]:
        t = self.model.visual.trunk
        grid = t.patch_embed.grid_size
        hidden = t.blocks[0].mlp.fc1.out_features
        return grid[0] * grid[1] + 1, t.embed_dim, t.blocks[0].attn.num_heads, hidden / t.embed_dim


def _build_official(path: Path, weights: Path, *, device: Any, dtype: Any, compile: bool | str) -> Encoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conch imports huggingface_hub; never fetch
    from conch.open_clip_custom import create_model_from_pretrained

    model = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path), return_transform=False)
    model = model.float().eval().requires_grad_(False)
    d, joint = model.visual.proj_contrast.shape
    cfg = ConchConfig(context_length=model.context_length, pad_id=model.pad_id)
    # Text ids from the tokenizer file the package ships, read with `tokenizers` (the same ids as
    # conch's own tokenize(), whose batch_encode_plus call transformers 5 no longer has).
    tok_path = _tokenizer_file(path, weights, None)
    return Encoder(_OfficialConch(model), name="conch_v1", input_size=int(model.visual.image_size[0]),
                   mean=OPENAI_MEAN, std=OPENAI_STD, feature_dim=d, joint_dim=joint, magnification=20,
                   patch_size=512, logit_scale=float(model.logit_scale.detach().exp()), interpolation="bicubic",
                   tokenizer=None if tok_path is None else (lambda: _make_tokenizer(tok_path, cfg)),
                   text_help=f"no CONCH tokenizer file was found.\n{HOWTO}", device=device, dtype=dtype,
                   compile=compile, weights=path, impl="conch")


def build_conch_v1(weights: Optional[str | os.PathLike], *, device: Any = "cpu", dtype: Any = None,
                   compile: bool | str = False, impl: str = "auto", tokenizer: Optional[str] = None,
                   **overrides: Any) -> Encoder:
    """CONCH v1 from local weights. `impl`: "native" (our module), "conch" (the conch package),
    "auto" (the conch package when it imports and no config override is given, else native; a
    conch package that is installed but fails to import is said once per process, as a
    RuntimeWarning, and native is used). `tokenizer`: path of the tokenizer file if it is not
    beside the weights."""
    path = find_weights(weights, WEIGHT_FILES, what="conch_v1", howto=HOWTO)
    if impl not in ("auto", "native", "conch"):
        raise EncoderError(f"conch_v1: impl {impl!r} is not one of auto, native, conch")
    if impl == "conch" or (impl == "auto" and not overrides and tokenizer is None):
        ok, why = _official_conch()
        if impl == "conch" and not ok:
            raise EncoderError(f"conch_v1: impl='conch' needs the conch package, and {why} "
                               "(pip install git+https://github.com/mahmoodlab/CONCH, or PyPI's conch-fork==0.1.0, "
                               "the same code; impl='native' needs nothing)")
        if ok:
            return _build_official(path, Path(weights).expanduser(), device=device, dtype=dtype, compile=compile)
        if _conch_spec() is not None:
            _warn_fallback(why)
    cfg = ConchConfig.from_overrides(overrides)
    model = build_on_meta(lambda: ConchV1(cfg))
    load_checkpoint(model, read_state_dict(path), what="conch_v1", path=path, ignore_prefixes=CAPTION_PREFIXES)
    tok_path = _tokenizer_file(path, Path(weights).expanduser(), tokenizer)
    text_help = ("no CONCH tokenizer file was found beside the weights " f"({path.parent}).\n{HOWTO}")
    return Encoder(model, name="conch_v1", input_size=cfg.image_size, mean=OPENAI_MEAN, std=OPENAI_STD,
                   feature_dim=cfg.embed_dim, joint_dim=cfg.embed_dim, magnification=20, patch_size=512,
                   logit_scale=float(model.logit_scale.detach().exp()), interpolation="bicubic",
                   tokenizer=None if tok_path is None else (lambda: _make_tokenizer(tok_path, cfg)),
                   text_help=text_help, device=device, dtype=dtype, compile=compile, weights=path, impl="native")


__all__ = ["CAPTION_PREFIXES", "ConchConfig", "ConchV1", "build_conch_v1"]
