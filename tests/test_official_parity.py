"""Our encoders against the official code (timm, open_clip, CONCH) at the real architecture sizes.

These tests run in the parity environment that `make parity` builds (and `.ci/run` runs): PyPI's
torch with torchvision, timm, open_clip_torch and transformers, plus the conch package (PyPI's
`conch-fork`, CONCH v1's code unchanged, or PROALIGN_CONCH_SRC; docs/ENCODERS.md). In the
project's own environment those packages do not import (PyPI's torchvision fails beside the local
CPU torch wheel) and every test here skips, saying why; `make parity` sets PROALIGN_REQUIRE_OFFICIAL
so that there a package that does not import fails instead.

Method, for every encoder `list_encoders()` names: build the official model, fill every parameter
with seeded random numbers (no weights are ever downloaded), save its state dict in the official
checkpoint layout, load that file through `create_encoder` as a user would (no architecture
overrides: the presets and the built-in architecture tables are what is checked), and compare
- image features on the same normalised pixels (and the joint-space embedding where there is one),
- preprocessing: our `preprocess` on uint8 patches against the official eval transform
  (torchvision on PIL images), in uint8 steps, and the features of the two whole pipelines,
- text (open_clip, CONCH): token ids from our tokenizer against the official tokenizer, and the
  text embeddings.
Each measured difference goes to $PROALIGN_PARITY_REPORT (JSON lines) when it is set;
`python tests/test_official_parity.py REPORT` prints the table the README quotes.
"""
from __future__ import annotations

import contextlib
import gc
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import optional_import
from proalign.encoders import create_encoder, list_encoders
from proalign.encoders.presets import PRESETS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["Tumor epithelium, with nuclear atypia and mitoses.", "dense fibrous stroma", "lymphocytes " * 150,
         "H&E, 20x: CD3+ T-cells (n=12) in the invasive margin!", "  necrotic   DEBRIS\tand mucin pools  ",
         "adipose tissue"]
# Token ids are compared on all of TEXTS, the text towers run on three of them (a forward of 77-128
# tokens per text costs as much as an image in the large towers).
TOWER_TEXTS = [TEXTS[0], TEXTS[2], TEXTS[3]]

# Tolerances. Model parity: max |ours - official| over outputs of order 1 (they end in a LayerNorm
# or a unit normalisation), fp32 on the CPU; the two sides compute the same sums in other orders
# (packed vs separate projections, SDPA vs explicit softmax), measured at <= 1e-5 (README).
FEATURE_TOL = 1e-4
# Preprocessing (see preprocess_parity): against PIL's float resampling, float rounding only; against
# the official 8-bit transforms, a few uint8 steps at the most and a small fraction of one on average.
PIL_FLOAT_TOL = 0.01
PIXEL_MAX_STEPS, PIXEL_MEAN_STEPS = 4.0, 0.5


def check_preprocess(name: str, rec: dict) -> None:
    assert rec["preprocess_vs_pil_float_max"] < PIL_FLOAT_TOL, (name, rec)
    assert rec["preprocess_max_uint8_steps"] <= PIXEL_MAX_STEPS, (name, rec)
    assert rec["preprocess_mean_uint8_steps"] <= PIXEL_MEAN_STEPS, (name, rec)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _report(encoder: str, rec: dict, seconds: float, reference: str | None = None) -> None:
    """rec with its time (and the code it was checked against) into the parity report
    (PROALIGN_PARITY_REPORT, one JSON line per check) and the test's output."""
    rec["seconds"] = round(seconds, 1)
    if reference:
        rec["reference"] = reference
    path = os.environ.get("PROALIGN_PARITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"encoder": encoder, **rec}) + "\n")
    print(encoder, rec)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@contextlib.contextmanager
def no_init():
    """Build a model without initialising its parameters (torch.nn.init's functions do nothing
    meanwhile; buffers such as causal masks are still computed): randomize_ fills every
    parameter afterwards, and a billion-parameter tower is built in a moment instead of ~10 s."""
    saved = {n: f for n, f in vars(torch.nn.init).items() if callable(f) and n.endswith("_") and not n.startswith("_")}
    try:
        for n in saved:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random values in every parameter (uniform: 5x quicker to draw than normal on the CPU),
    scaled so activations stay of order 1 through deep towers: matrices with std 1/sqrt(fan_in),
    norm and LayerScale weights 1 +- 0.35 (LayerScale far from its 1e-5 init, so every block
    counts), biases and 1-d embeddings +- 0.35."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim == 4 else p.shape[-1]
                a = math.sqrt(3.0 / fan_in)
                p.uniform_(-a, a, generator=g)
            elif p.ndim == 0:
                p.fill_(math.log(50.0))  # logit_scale
            elif name.endswith(("weight", "gamma")):
                p.uniform_(0.65, 1.35, generator=g)
            else:
                p.uniform_(-0.35, 0.35, generator=g)
    return module.eval().requires_grad_(False)


def tissue_like_patches(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3): blocks of colour with fine noise (edges and texture for the resize)."""
    rng = np.random.default_rng(seed)
    block = max(1, size // 16)
    base = rng.integers(40, 230, (n, size // block + 1, size // block + 1, 3)).repeat(block, 1).repeat(block, 2)
    img = base[:, :size, :size] + rng.integers(-25, 26, (n, size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def preprocess_parity(enc, official_transform, patches: np.ndarray) -> dict:
    """Our `preprocess` on square uint8 patches against
    - the official transform (torchvision on 8-bit PIL images): max and mean |difference| in uint8
      steps over the de-normalised pixels the models see. PIL resizes 8-bit images in two passes
      with the intermediate image rounded and clipped to 8 bits, we in float with one clamp at the
      end: they differ by up to a few steps where bicubic overshoots at sharp edges;
    - PIL's own resampling of the same patch in 32-bit float ('F' images, the same kernel and
      antialiasing, clamped to 0-255 like an 8-bit resize): this is the algorithm, and ours must
      give the same numbers up to float rounding."""
    from PIL import Image

    ours = enc.preprocess(patches)
    theirs = torch.stack([official_transform(Image.fromarray(p)) for p in patches])
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    m = torch.tensor(enc.mean).view(1, 3, 1, 1)
    sd = torch.tensor(enc.std).view(1, 3, 1, 1)
    ours_px, theirs_px = (ours * sd + m) * 255.0, (theirs * sd + m) * 255.0
    s = enc.input_size
    r = getattr(enc, "resize_size", s)  # resize (square patches), then the centre crop: GigaPath 256 -> 224
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[enc.interpolation]
    pil_float = torch.from_numpy(np.stack([
        np.stack([np.asarray(Image.fromarray(p[..., c].astype(np.float32), mode="F").resize((r, r), resample))
                  for c in range(3)]) for p in patches])).clamp(0, 255)
    o = int(round((r - s) / 2.0))
    pil_float = pil_float[:, :, o:o + s, o:o + s]
    return {"preprocess_max_uint8_steps": _max_diff(ours_px, theirs_px),
            "preprocess_mean_uint8_steps": float((ours_px - theirs_px).abs().mean()),
            "preprocess_vs_pil_float_max": _max_diff(ours_px, pil_float)}


@pytest.fixture
def scratch():
    """A folder for one test's checkpoint (up to 4.5 GB for the giant ViTs), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="parity-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
    gc.collect()


def _save(state_dict: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


def _kind(name: str) -> str:
    if name == "conch_v1":
        return "conch"
    if name in ("uni_v1", "uni_v2"):
        return "timm_preset"
    if name in PRESETS:  # the other presets (presets.py): their cases are in "encoder presets" below
        return {"timm": "timm_card", "hf_dinov2": "hf_dinov2", "conch_v15": "conch_v15"}[PRESETS[name].family]
    if name.startswith("timm:"):
        return "timm"
    if name.startswith("open_clip:"):
        return "open_clip"
    raise KeyError(name)


def test_every_listed_encoder_has_a_parity_case():
    """A new encoder or architecture in the registry needs its official counterpart here."""
    unknown = []
    for name in list_encoders():
        try:
            _kind(name)
        except KeyError:
            unknown.append(name)
    assert not unknown, f"no official parity case for {unknown}: add one to tests/test_official_parity.py"


# ---------------------------------------------------------------------------------------------
# timm ViTs: the UNI presets and the timm:<arch> family
# ---------------------------------------------------------------------------------------------

def _uni_official_kwargs(name: str, timm) -> tuple[str, dict]:
    """timm.create_model arguments from the UNI / UNI2-h model cards (MahmoodLab on Hugging Face)."""
    if name == "uni_v1":
        return "vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                             dynamic_img_size=True)
    return "vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                         embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                         mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                                         dynamic_img_size=True)


TIMM_NAMES = [n for n in list_encoders() if _kind(n) in ("timm_preset", "timm")]
OPEN_CLIP_NAMES = [n for n in list_encoders() if _kind(n) == "open_clip"]
# The 518 px DINOv2 giants (1.1e9 parameters, 1370 tokens) run at 224 px with 224 px position
# tables on both sides (the same architecture; 14x less compute): the stage's time budget.
SMALLER_INPUT = {"timm:vit_giant_patch14_dinov2": 224, "timm:vit_giant_patch14_reg4_dinov2": 224}


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_vit_equals_timm(name, scratch):
    timm = optional_import("timm")
    T = optional_import("torchvision.transforms")
    from PIL import Image
    from timm.data import create_transform

    t0 = time.perf_counter()
    extra = {"img_size": SMALLER_INPUT[name]} if name in SMALLER_INPUT else {}
    preset = _kind(name) == "timm_preset"
    if preset:
        arch, kwargs = _uni_official_kwargs(name, timm)
        with no_init():
            official = timm.create_model(arch, pretrained=False, weight_init="skip", **kwargs)
        ckpt = scratch / "pytorch_model.bin"  # the file name of the UNI releases
    else:
        arch = name.split(":", 1)[1]
        with no_init():
            official = timm.create_model(arch, pretrained=False, num_classes=0, weight_init="skip", **extra)
        ckpt = scratch / "model.safetensors"
        # The hub layout: config.json with the architecture and timm's pretrained config (mean,
        # std, interpolation, input size), which our loader reads as timm does.
        cfg = {k: v for k, v in official.pretrained_cfg.items() if isinstance(v, (str, int, float, list, tuple))}
        (scratch / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0, "pretrained_cfg": cfg}))
    randomize_(official, seed=len(name))
    _save(official.state_dict(), ckpt)
    n_params = sum(p.numel() for p in official.parameters())
    s = official.patch_embed.img_size[0]
    n = 2 if n_params < 5e8 else 1
    # preprocessing: UNI's model cards give Resize(224) (torchvision's default bilinear) + ToTensor +
    # ImageNet Normalize on the 256 px patches; for the timm family, timm's eval transform with the
    # pretrained config's interpolation, mean and std, resizing the patch to the input size (crop_pct 1,
    # as pathology pipelines do; timm's ImageNet default would crop the centre 87.5-90 %).
    pc = dict(official.pretrained_cfg)
    if preset:
        official_tf = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        official_tf = create_transform(input_size=(3, s, s), interpolation=pc.get("interpolation", "bicubic"),
                                       mean=pc.get("mean", IMAGENET_MEAN), std=pc.get("std", IMAGENET_STD),
                                       crop_pct=1.0)
    patches = tissue_like_patches(n, 256 if preset else s + 32, seed=3)
    # The official outputs first, then the official model goes before ours is loaded (the giants
    # are 4.5 GB each in fp32).
    px = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))
    px256 = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = official(px)  # num_classes=0: the pooled, normed feature (timm forward_head pre_logits)
        # uni_v1 at another input size: both resample the position table (dynamic_img_size)
        want256 = official(px256) if name == "uni_v1" else None
        # the whole pipeline, uint8 patches to features, for the presets
        e2e_official = official(torch.stack([official_tf(Image.fromarray(p)) for p in patches])) if preset else None
    del official
    gc.collect()
    enc = create_encoder(name, scratch, **extra)
    assert enc.input_size == s and (enc.patch_size == 256 if preset else True)
    if not preset:
        assert tuple(enc.mean) == tuple(pc.get("mean", IMAGENET_MEAN)) and enc.interpolation == pc["interpolation"]
    err = _max_diff(enc.encode_image(px), want)
    rec = {"params_M": round(n_params / 1e6, 1), "input": s, "image_max_abs": err}
    if want256 is not None:
        rec["image_256px_max_abs"] = _max_diff(enc.encode_image(px256), want256)
    rec.update(preprocess_parity(enc, official_tf, patches))
    if e2e_official is not None:
        rec["pipeline_min_cosine"] = float(F.cosine_similarity(enc(patches), e2e_official, dim=1).min())
    _report(name, rec, time.perf_counter() - t0)
    assert err < FEATURE_TOL, f"{name}: max |ours - timm| = {err:.3g}"
    assert rec.get("image_256px_max_abs", 0.0) < FEATURE_TOL, rec
    check_preprocess(name, rec)
    assert rec.get("pipeline_min_cosine", 1.0) > 0.9999, rec


# ---------------------------------------------------------------------------------------------
# open_clip CLIP family: image and text towers, preprocessing, tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_tokenizer_json(tmp_path_factory):
    """A Hugging Face `tokenizer.json` for CLIP's 49,408-token BPE (the file CLIP repos ship), made
    here from the vocabulary open_clip carries (bpe_simple_vocab_16e6.txt.gz) by transformers' own
    slow-to-fast converter: open_clip's vocabulary, transformers' file format, nothing downloaded."""
    optional_import("open_clip")
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    transformers = optional_import("transformers")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_vocab = list(bytes_to_unicode().values())
    vocab = (byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m.split()) for m in merges]
             + ["<|startoftext|>", "<|endoftext|>"])
    d = tmp_path_factory.mktemp("clip_tokenizer")
    (d / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"),
                                         from_slow=True)
    tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


# An architecture and its -quickgelu twin (the same tensors, QuickGELU for GELU) share one random
# checkpoint: each is built by open_clip under its own name and loaded by us under its own name.
OPEN_CLIP_ARCHS = sorted({n.split(":", 1)[1].removesuffix("-quickgelu") for n in OPEN_CLIP_NAMES})


@pytest.mark.parametrize("arch", OPEN_CLIP_ARCHS)
def test_open_clip_equals_open_clip(arch, scratch, clip_tokenizer_json):
    open_clip = optional_import("open_clip")
    names = [n for n in (f"open_clip:{arch}", f"open_clip:{arch}-quickgelu") if n in OPEN_CLIP_NAMES]
    ckpt = scratch / "open_clip_model.safetensors"
    failures = []
    for name in names:
        t0 = time.perf_counter()
        oc_name = name.split(":", 1)[1]
        with no_init():
            official, _, official_tf = open_clip.create_model_and_transforms(oc_name, pretrained=None)
        if not ckpt.exists():
            randomize_(official, seed=len(arch))
            # No open_clip_config.json beside the weights: our built-in architecture table is checked.
            _save(official.state_dict(), ckpt)
            shutil.copy(clip_tokenizer_json, scratch / "tokenizer.json")
        else:  # the twin: the same tensors
            from safetensors.torch import load_file

            official.load_state_dict(load_file(str(ckpt)), strict=True, assign=True)  # no second copy
            official.eval().requires_grad_(False)
        n_params = sum(p.numel() for p in official.parameters())
        s = official.visual.image_size[0]
        n = 2 if n_params < 5e8 else 1
        px = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))
        official_ids = open_clip.get_tokenizer(oc_name)(TEXTS)
        with torch.inference_mode():  # the official outputs first; the model goes before ours is loaded
            z_official = F.normalize(official.encode_image(px), dim=-1)
            proj, official.visual.proj = official.visual.proj, None  # the pooled feature before the projection
            x_official = official.visual(px)
            official.visual.proj = proj
            t_official = F.normalize(official.encode_text(open_clip.get_tokenizer(oc_name)(TOWER_TEXTS)), dim=-1)
        del official, proj
        gc.collect()
        enc = create_encoder(name, scratch)
        assert enc.input_size == s
        x = enc.encode_image(px)
        rec = {"params_M": round(n_params / 1e6, 1), "input": s, "image_max_abs": _max_diff(x, x_official),
               "joint_max_abs": _max_diff(enc.project(x), z_official)}
        ids = enc.tokenizer(TEXTS)
        rec["token_ids_equal"] = bool(torch.equal(ids, official_ids))
        rec["text_max_abs"] = _max_diff(enc.encode_text(TOWER_TEXTS), t_official)
        rec.update(preprocess_parity(enc, official_tf, tissue_like_patches(n, s + 32, seed=3)))
        _report(name, rec, time.perf_counter() - t0)
        del enc
        gc.collect()
        bad = [f"{k} = {rec[k]:.3g}" for k in ("image_max_abs", "joint_max_abs", "text_max_abs") if rec[k] >= FEATURE_TOL]
        if not rec["token_ids_equal"]:
            bad.append("token ids differ")
        try:
            check_preprocess(name, rec)
        except AssertionError as e:
            bad.append(f"preprocessing: {e}")
        if bad:
            failures.append(f"{name}: {'; '.join(bad)}")
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# encoder presets (presets.py): Virchow2, H-optimus-0/1, Prov-GigaPath (timm), Phikon-v2
# (transformers), CONCH v1.5 (timm parts wired as TRIDENT's conchv1_5 code wires them)
# ---------------------------------------------------------------------------------------------
# Each official model is built here from the model card's (or the lab's loader's) own arguments,
# written out below independently of presets.py, at its real size, with seeded random weights;
# the file is saved under the released name and loaded by `create_encoder(name, folder)` with no
# overrides. Compared: features on the official eval transform's pixels of one tissue-like patch
# (the preset's patch size + 32 px, so that the resize runs), and our `preprocess` against that
# transform and PIL's float resampling (preprocess_parity): the two halves of the pipeline, so
# the whole-pipeline forward (one more giant-ViT forward each) is left out. One image, batch 1:
# the stage's time budget.


def _card_timm(name: str, timm):
    """(timm architecture, create_model kwargs, official transform, output rule) per model card."""
    T = optional_import("torchvision.transforms")
    bicubic = T.InterpolationMode.BICUBIC
    glu = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    hopt = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
    if name == "virchow2":  # hf-hub:paige-ai/Virchow2 config + model card; class token + mean of patch tokens
        return ("vit_huge_patch14_224",
                dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4, global_pool="",
                     dynamic_img_size=True, **glu),
                T.Compose([T.Resize(224, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
                lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1))
    if name in ("h_optimus_0", "h_optimus_1"):  # hf-hub:bioptimus/H-optimus-* config + model card
        return ("vit_giant_patch14_reg4_dinov2",
                dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
                T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(*hopt)]), None)
    if name == "gigapath":  # hf_hub:prov-gigapath/prov-gigapath config; gigapath/pipeline.py's transform
        return ("vit_giant_patch14_dinov2",
                dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                     init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
                T.Compose([T.Resize(256, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), None)
    raise KeyError(name)


# H-optimus-1 is H-optimus-0's architecture: one official model and checkpoint serve both names.
CARD_GROUPS = [("virchow2",), ("h_optimus_0", "h_optimus_1"), ("gigapath",)]


def test_every_card_preset_is_in_a_group():
    cards = sorted(n for n in list_encoders() if _kind(n) == "timm_card")
    assert sorted(n for g in CARD_GROUPS for n in g) == cards


def _preset_patches(name: str) -> np.ndarray:
    return tissue_like_patches(1, PRESETS[name].patch_px + 32, seed=3)


@pytest.mark.parametrize("group", CARD_GROUPS, ids=lambda g: "+".join(g))
def test_timm_card_preset_equals_timm(group, scratch):
    timm = optional_import("timm")
    from PIL import Image

    t0 = time.perf_counter()
    arch, kwargs, official_tf, rule = _card_timm(group[0], timm)
    with no_init():
        official = timm.create_model(arch, pretrained=False, weight_init="skip", **kwargs)
    randomize_(official, seed=len(group[0]))
    ckpt = scratch / PRESETS[group[0]].weight_files[0]
    _save(official.state_dict(), ckpt)
    n_params = sum(p.numel() for p in official.parameters())
    patches = _preset_patches(group[0])
    px = torch.stack([official_tf(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        out = official(px)
        want = rule(out) if rule else out
    del official, out
    gc.collect()
    setup = time.perf_counter() - t0
    failures = []
    for name in group:
        t1 = time.perf_counter()
        _, _, tf, _ = _card_timm(name, timm)
        enc = create_encoder(name, scratch)
        p = PRESETS[name]
        assert (enc.input_size, enc.feature_dim, enc.resize_size) == (p.img_size, p.feature_dim, p.resize)
        rec = {"params_M": round(n_params / 1e6, 1), "input": enc.input_size,
               "image_max_abs": _max_diff(enc.encode_image(px), want)}
        rec.update(preprocess_parity(enc, tf, patches))
        _report(name, rec, time.perf_counter() - t1 + (setup if name == group[0] else 0.0))
        del enc
        gc.collect()
        if rec["image_max_abs"] >= FEATURE_TOL:
            failures.append(f"{name}: {rec}")
        try:
            check_preprocess(name, rec)
        except AssertionError as e:
            failures.append(f"{name}: preprocessing: {e}")
    assert not failures, failures


def test_phikon_v2_equals_transformers(scratch):
    transformers = optional_import("transformers")
    T = optional_import("torchvision.transforms")
    from PIL import Image

    t0 = time.perf_counter()
    # owkin/phikon-v2's config.json (Dinov2Model, ViT-L/16 at 224 px)
    cfg = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                                    image_size=224, mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0,
                                    hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False)
    with no_init():
        official = transformers.Dinov2Model(cfg)
    randomize_(official, seed=11)
    official.save_pretrained(scratch, safe_serialization=True)  # config.json + model.safetensors, as released
    assert (scratch / "model.safetensors").is_file() and (scratch / "config.json").is_file()
    n_params = sum(p.numel() for p in official.parameters())
    # TRIDENT's Phikonv2InferenceEncoder transform; the model card's feature last_hidden_state[:, 0]
    official_tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    patches = _preset_patches("phikon_v2")
    px = torch.stack([official_tf(Image.fromarray(p)) for p in patches])
    px256 = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = official(pixel_values=px).last_hidden_state[:, 0]
        want256 = official(pixel_values=px256).last_hidden_state[:, 0]  # transformers resamples the positions
    del official
    gc.collect()
    enc = create_encoder("phikon_v2", scratch)
    assert (enc.input_size, enc.feature_dim) == (224, 1024)
    rec = {"params_M": round(n_params / 1e6, 1), "input": 224, "image_max_abs": _max_diff(enc.encode_image(px), want),
           "image_256px_max_abs": _max_diff(enc.encode_image(px256), want256)}
    rec.update(preprocess_parity(enc, official_tf, patches))
    _report("phikon_v2", rec, time.perf_counter() - t0, "transformers Dinov2Model")
    assert rec["image_max_abs"] < FEATURE_TOL and rec["image_256px_max_abs"] < FEATURE_TOL, rec
    check_preprocess("phikon_v2", rec)


def _dino_interpolate_pos(pos: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The iBOT / DINO interpolate_pos_encoding of CONCH v1.5's trunk (TRIDENT model_zoo/conchv1_5):
    patch rows resampled bicubic at the scale factor (new grid + 0.1) / old grid."""
    n = pos.shape[1] - 1
    g = int(math.sqrt(n))
    d = pos.shape[-1]
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = F.interpolate(pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2),
                         scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    assert int(h0) == grid.shape[-2] and int(w0) == grid.shape[-1]
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


def _conch_v15_from_official_parts():
    """CONCH v1.5's vision tower as TRIDENT's conchv1_5.py builds it: the trunk is timm's
    VisionTransformer with the iBOT `vit_large` settings (ViT-L/16, 224 px position table, qkv bias,
    LayerScale init 1.0, no head), `attn_pool_contrast` its AttentionalPooler (768-d, keys 1024-d,
    8 heads, 1 query; to_q / to_kv / to_out without bias, LayerNorms ln_q / ln_k), `ln_contrast` a
    LayerNorm. The pooler (einops in TRIDENT, not in CI's parity environment) is written out here
    step for step as that code computes it; test_trident_conch_v15_equals_ours checks this model
    against TRIDENT's own file where a checkout is given (measured bit-equal: docs/ENCODERS.md)."""
    timm = optional_import("timm")
    from torch import nn

    class Pooler(nn.Module):
        def __init__(self, d_model=768, context_dim=1024, n_head=8, n_queries=1):
            super().__init__()
            self.query = nn.Parameter(torch.zeros(n_queries, d_model))
            self.heads, self.scale = n_head, (d_model // n_head) ** -0.5
            self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, d_model, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
            self.to_out = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x):  # x (b, n, d) -> (b, n_queries, d_model)
            b, h = x.shape[0], self.heads
            x = self.ln_k(x.unsqueeze(1))                                     # b 1 n d
            q = self.ln_q(self.query.expand(b, 1, -1, -1))                     # b 1 q d
            q = self.to_q(q)
            k, v = self.to_kv(x).chunk(2, dim=-1)

            def split(t):  # 'b t n (h d) -> b h t n d'
                return t.reshape(*t.shape[:3], h, -1).permute(0, 3, 1, 2, 4)

            q, k, v = split(q) * self.scale, split(k), split(v)
            sim = q @ k.transpose(-1, -2)
            attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
            out = (attn @ v).permute(0, 2, 3, 1, 4).flatten(3)                # b t n (h d)
            return self.to_out(out).squeeze(1)

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.models.vision_transformer.VisionTransformer(
                img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True,
                init_values=1.0, num_classes=0, weight_init="skip")
            self.attn_pool_contrast = Pooler()
            self.ln_contrast = nn.LayerNorm(768)

        def forward(self, px):  # the trunk's forward_features with its own position interpolation
            t = self.trunk
            x = F.conv2d(px, t.patch_embed.proj.weight, t.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
            x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + _dino_interpolate_pos(t.pos_embed, px.shape[-2], px.shape[-1], 16)
            x = t.norm(t.blocks(t.norm_pre(x)))
            return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])

    with no_init():
        return Tower()


def test_conch_v15_equals_official_parts(scratch):
    T = optional_import("torchvision.transforms")
    from PIL import Image

    t0 = time.perf_counter()
    official = randomize_(_conch_v15_from_official_parts(), seed=15)
    keys = set(official.state_dict())
    assert {"trunk.pos_embed", "trunk.blocks.23.ls2.gamma", "attn_pool_contrast.to_kv.weight", "ln_contrast.bias"} <= keys
    assert not any(k.startswith("trunk.head") or k.startswith("trunk.fc_norm") for k in keys)
    torch.save(official.state_dict(), scratch / "pytorch_model_vision.bin")  # the released file name
    n_params = sum(p.numel() for p in official.parameters())
    # TRIDENT's create_model_from_pretrained transform (img_size 448)
    official_tf = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(448),
                             T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    patches = _preset_patches("conch_v15")
    px = torch.stack([official_tf(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        want = official(px)
    del official
    gc.collect()
    enc = create_encoder("conch_v15", scratch)
    assert (enc.input_size, enc.feature_dim, enc.patch_size) == (448, 768, 512)
    rec = {"params_M": round(n_params / 1e6, 1), "input": 448, "image_max_abs": _max_diff(enc.encode_image(px), want)}
    rec.update(preprocess_parity(enc, official_tf, patches))
    _report("conch_v15", rec, time.perf_counter() - t0, "timm trunk + pooler wired as TRIDENT conchv1_5")
    assert rec["image_max_abs"] < FEATURE_TOL, rec
    check_preprocess("conch_v15", rec)


def _trident_conch_v15_module():
    """TRIDENT's own CONCH v1.5 model file (`trident/patch_encoder_models/model_zoo/conchv1_5/
    conchv1_5.py` under $PROALIGN_TRIDENT_SRC, a TRIDENT checkout), loaded on its own: TRIDENT is on
    no registry (PyPI's `trident` is an unrelated astrophysics package) and its package's __init__
    imports its whole slide stack; the file itself needs timm, einops and einops_exts (PyPI)."""
    import importlib.util

    src = os.environ.get("PROALIGN_TRIDENT_SRC")
    if not src:
        pytest.skip("TRIDENT's code is on no registry: `make parity PROALIGN_TRIDENT_SRC=<a TRIDENT checkout>` "
                    "runs this (docs/ENCODERS.md)")
    for name in ("einops", "einops_exts"):
        optional_import(name, "`make parity PROALIGN_TRIDENT_SRC=...` installs it")
    path = Path(src) / "trident" / "patch_encoder_models" / "model_zoo" / "conchv1_5" / "conchv1_5.py"
    if not path.is_file():
        pytest.fail(f"PROALIGN_TRIDENT_SRC={src}: no {path}", pytrace=False)
    spec = importlib.util.spec_from_file_location("trident_conchv1_5", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trident_conch_v15_equals_ours(tmp_path):
    """CONCH v1.5 against TRIDENT's own code at real size (outside CI: _trident_conch_v15_module),
    and the timm-parts model CI checks against (test_conch_v15_equals_official_parts) against it."""
    T = optional_import("torchvision.transforms")
    from PIL import Image

    tri = _trident_conch_v15_module()
    t0 = time.perf_counter()
    with no_init():
        official = randomize_(tri.CONCHVisionTower(), seed=16)
    state = official.state_dict()
    # as its create_model_from_pretrained loads a checkpoint (the 224 px table stays as it is)
    state["trunk.pos_embed"] = tri.resize_pos_embed(official.trunk, state["trunk.pos_embed"], verbose=False)
    official.load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    n_params = sum(p.numel() for p in official.parameters())
    # its create_model_from_pretrained transform (img_size 448)
    tf = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(448), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    patches = _preset_patches("conch_v15")
    px = torch.stack([tf(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        want = official(px)
    del official
    gc.collect()
    parts = _conch_v15_from_official_parts()
    parts.load_state_dict(state, strict=True)
    with torch.inference_mode():
        rec = {"params_M": round(n_params / 1e6, 1), "input": 448,
               "parts_vs_trident_max_abs": _max_diff(parts.eval()(px), want)}
    del parts, state
    gc.collect()
    enc = create_encoder("conch_v15", tmp_path)
    rec["image_max_abs"] = _max_diff(enc.encode_image(px), want)
    rec.update(preprocess_parity(enc, tf, patches))
    _report("conch_v15 (TRIDENT code)", rec, time.perf_counter() - t0, "TRIDENT conchv1_5.py")
    assert rec["image_max_abs"] < FEATURE_TOL and rec["parts_vs_trident_max_abs"] < FEATURE_TOL, rec
    check_preprocess("conch_v15", rec)


# ---------------------------------------------------------------------------------------------
# CONCH v1
# ---------------------------------------------------------------------------------------------
# The conch package (github.com/mahmoodlab/CONCH) is not on PyPI under its own name (CI installs
# `conch-fork`, a third party's byte-identical upload; docs/ENCODERS.md). CONCH is also checked
# against a model assembled from the official parts CONCH itself is made of, wired as CONCH's
# coca_model.py / vision_tower.py wire them (facts from that code): the image trunk is timm's
# VisionTransformer (ViT-B/16, 448 px, forward_features = all tokens after the final norm), the
# contrastive head open_clip's AttentionalPooler (1 query, 512-d, keys 768-d, 8 heads) + LayerNorm
# + the 512 x 512 `proj_contrast`, the text tower open_clip's TextTransformer
# with CONCH's settings (127 tokens + the appended CLS embedding = 128 positions, the legacy CoCa
# CLS mask, pad id 0), and the captioning parts (open_clip's pooler with 256 queries and its
# MultimodalTransformer) so that the checkpoint has the released file's keys. Where the conch
# package is installed, `test_conch_package_equals_ours` also checks ours and that assembly
# against the package itself, with its own tokenizer file, tokenize() and transform.

def _conch_from_official_parts():
    timm = optional_import("timm")
    optional_import("open_clip")
    from open_clip.transformer import AttentionalPooler, MultimodalTransformer, TextTransformer
    from torch import nn

    class Visual(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.models.vision_transformer.VisionTransformer(  # CONCH's _build_vision_tower
                embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0,
                dynamic_img_size=True, weight_init="skip")
            self.attn_pool_contrast = AttentionalPooler(d_model=512, context_dim=768, n_head=8, n_queries=1)
            self.ln_contrast = nn.LayerNorm(512)
            self.proj_contrast = nn.Parameter(torch.zeros(512, 512))
            self.attn_pool_caption = AttentionalPooler(d_model=768, context_dim=768, n_head=8, n_queries=256)
            self.ln_caption = nn.LayerNorm(768)

        def features(self, pixels):  # CONCH encode_image(proj_contrast=False, normalize=False)
            return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(pixels))[:, 0])

    class ConchParts(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()
            self.text = TextTransformer(context_length=127, vocab_size=32007, width=768, heads=12, layers=12,
                                        output_dim=512, embed_cls=True, pad_id=0)
            self.text_decoder = MultimodalTransformer(context_length=128, width=768, heads=12, layers=12,
                                                      output_dim=32007)
            self.logit_scale = nn.Parameter(torch.tensor(0.0))

        def encode_text(self, ids):  # ids (n, 128) from CONCH's tokenize(): the last slot makes room for CLS
            return self.text(ids[:, :-1])

    with no_init():
        return ConchParts()


def _conch_style_tokenize(tokenizer_file: Path, texts):
    """CONCH's get_tokenizer() + tokenize() (custom_tokenizer.py) on a tokenizer file: transformers'
    PreTrainedTokenizerFast, 127 tokens with truncation and max-length padding, then one pad column."""
    transformers = optional_import("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<start_of_text>",
                                               eos_token="<end_of_text>", pad_token="<pad>")
    encode = getattr(tok, "batch_encode_plus", tok)  # conch calls batch_encode_plus (gone in transformers 5)
    ids = encode(list(texts), max_length=127, add_special_tokens=True, return_token_type_ids=False,
                 truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    return F.pad(ids, (0, 1), value=tok.pad_token_id)


@pytest.fixture(scope="module")
def conch_parts_checkpoint():
    """The assembled CONCH with random weights, saved as the released `pytorch_model.bin`."""
    model = randomize_(_conch_from_official_parts(), seed=7)
    d = Path(tempfile.mkdtemp(prefix="parity-conch-"))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    yield model, d
    shutil.rmtree(d, ignore_errors=True)


def test_conch_v1_equals_official_parts(conch_parts_checkpoint, tmp_path):
    T = optional_import("torchvision.transforms")
    from test_encoders import conch_official_keys

    from proalign.encoders.conch import ConchConfig
    from proalign.testing.random_weights import _train_tokenizer

    t0 = time.perf_counter()
    model, d = conch_parts_checkpoint
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys == conch_official_keys(ConchConfig()), "the assembly does not have the released checkpoint's keys"
    folder = tmp_path / "conch_v1"
    folder.mkdir()
    (folder / "pytorch_model.bin").symlink_to(d / "pytorch_model.bin")
    # A CONCH-style tokenizer file (byte-level BPE, <pad>=0, <start_of_text>, <end_of_text>): the
    # real one ships inside the conch package only.
    _train_tokenizer(folder / "conch_byte_level_bpe_uncased.json", 4000)
    enc = create_encoder("conch_v1", folder, impl="native")
    assert (enc.input_size, enc.feature_dim, enc.joint_dim) == (448, 512, 512)
    px = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x_official = model.visual.features(px)
        z_official = F.normalize(x_official @ model.visual.proj_contrast, dim=-1)
    x = enc.encode_image(px)
    rec = {"params_M": round(sum(p.numel() for n, p in model.named_parameters()
                                 if not n.startswith(("text_decoder", "visual.attn_pool_caption"))) / 1e6, 1),
           "input": 448, "image_max_abs": _max_diff(x, x_official), "joint_max_abs": _max_diff(enc.project(x), z_official)}
    official_ids = _conch_style_tokenize(folder / "conch_byte_level_bpe_uncased.json", TEXTS)
    ids = enc.tokenizer(TEXTS)
    rec["token_ids_equal"] = bool(torch.equal(ids, official_ids[:, :-1]))
    with torch.inference_mode():
        t_official = F.normalize(model.encode_text(_conch_style_tokenize(folder / "conch_byte_level_bpe_uncased.json",
                                                                          TOWER_TEXTS)), dim=-1)
    rec["text_max_abs"] = _max_diff(enc.encode_text(TOWER_TEXTS), t_official)
    # CONCH's eval transform (conch/open_clip_custom/transform.py): Resize(448, bicubic), CenterCrop(448),
    # ToTensor, OpenAI CLIP mean/std; TRIDENT feeds it 512 px patches at 20x.
    official_tf = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(448),
                             T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    patches = tissue_like_patches(2, enc.patch_size, seed=3)
    rec.update(preprocess_parity(enc, official_tf, patches))
    from PIL import Image

    with torch.inference_mode():
        e2e = model.visual.features(torch.stack([official_tf(Image.fromarray(p)) for p in patches]))
    rec["pipeline_min_cosine"] = float(F.cosine_similarity(enc(patches), e2e, dim=1).min())
    _report("conch_v1", rec, time.perf_counter() - t0, "timm + open_clip parts wired as CONCH")
    assert rec["token_ids_equal"], (ids, official_ids)
    for k in ("image_max_abs", "joint_max_abs", "text_max_abs"):
        assert rec[k] < FEATURE_TOL, f"conch_v1: {k} = {rec[k]:.3g}"
    check_preprocess("conch_v1", rec)
    assert rec["pipeline_min_cosine"] > 0.9999, rec


def test_conch_package_equals_ours(conch_parts_checkpoint, tmp_path):
    """Against the conch package itself, where it is installed (`make parity`: PyPI's conch-fork, or
    PROALIGN_CONCH_SRC)."""
    occ = optional_import("conch.open_clip_custom", "`make parity` installs the conch package (PyPI's "
                          "conch-fork, or PROALIGN_CONCH_SRC=<a CONCH checkout>; docs/ENCODERS.md)")
    t0 = time.perf_counter()
    parts, d = conch_parts_checkpoint
    ckpt = d / "pytorch_model.bin"
    conch, conch_tf = occ.create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(ckpt))
    conch = conch.eval().requires_grad_(False)
    conch_keys = set(conch.state_dict())
    assert conch_keys == set(parts.state_dict()), sorted(conch_keys ^ set(parts.state_dict()))[:10]
    folder = tmp_path / "conch_v1"
    folder.mkdir()
    (folder / "pytorch_model.bin").symlink_to(ckpt)  # no tokenizer file beside it: the package's own is found
    enc = create_encoder("conch_v1", folder, impl="native")
    via_pkg = create_encoder("conch_v1", folder, impl="conch")
    assert via_pkg.impl == "conch"
    px = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x_conch = conch.encode_image(px, proj_contrast=False, normalize=False)
        z_conch = conch.encode_image(px)
        x_parts = parts.visual.features(px)
    x = enc.encode_image(px)
    rec = {"input": 448, "image_max_abs": _max_diff(x, x_conch), "joint_max_abs": _max_diff(enc.project(x), z_conch),
           "parts_vs_package_image_max_abs": _max_diff(x_parts, x_conch),
           "impl_conch_vs_native_image_max_abs": _max_diff(via_pkg.encode_image(px), x)}
    tok = occ.get_tokenizer()
    conch_ids = occ.tokenize(tok, TEXTS)
    rec["token_ids_equal"] = bool(torch.equal(enc.tokenizer(TEXTS), conch_ids[:, :-1]))
    tower_ids = occ.tokenize(tok, TOWER_TEXTS)
    with torch.inference_mode():
        t_conch = F.normalize(conch.encode_text(tower_ids), dim=-1)
        t_parts = F.normalize(parts.encode_text(tower_ids), dim=-1)
    rec["text_max_abs"] = _max_diff(enc.encode_text(TOWER_TEXTS), t_conch)
    rec["parts_vs_package_text_max_abs"] = _max_diff(t_parts, t_conch)
    rec.update(preprocess_parity(enc, conch_tf, tissue_like_patches(2, enc.patch_size, seed=3)))
    _report("conch_v1 (conch package)", rec, time.perf_counter() - t0, "conch package")
    assert rec["token_ids_equal"]
    for k in ("image_max_abs", "joint_max_abs", "text_max_abs", "parts_vs_package_image_max_abs",
              "parts_vs_package_text_max_abs", "impl_conch_vs_native_image_max_abs"):
        assert rec[k] < FEATURE_TOL, f"conch_v1: {k} = {rec[k]:.3g}"
    check_preprocess("conch_v1 (conch package)", rec)


# ---------------------------------------------------------------------------------------------
# the table for the README: python tests/test_official_parity.py REPORT.jsonl
# ---------------------------------------------------------------------------------------------

def _table(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    cols = [("encoder", "encoder"), ("params_M", "params (M)"), ("input", "input px"),
            ("image_max_abs", "image max abs diff"), ("joint_max_abs", "joint max abs diff"),
            ("text_max_abs", "text max abs diff"), ("token_ids_equal", "tokens equal"),
            ("preprocess_vs_pil_float_max", "preprocess vs PIL float (max, 0-255)"),
            ("preprocess_max_uint8_steps", "preprocess vs official 8-bit (max steps)"),
            ("preprocess_mean_uint8_steps", "(mean steps)"),
            ("pipeline_min_cosine", "whole pipeline min cosine"), ("seconds", "s")]

    def fmt(k, v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if k == "pipeline_min_cosine":
            return f"{v:.7f}"
        if isinstance(v, float) and k != "seconds" and k != "params_M":
            return "0" if v == 0 else f"{v:.2g}"
        return str(v)

    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
