"""Encoder presets (python/proalign/encoders/presets.py): the data, the README table made from it,
the registered names, and small random-weight versions of each real architecture (same structure,
fewer layers and channels) written in the official checkpoint layouts and loaded through
`create_encoder`, compared with references written here from the official code's description
(tests/test_official_parity.py checks the real sizes against timm / transformers themselves)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_encoders import close, pixels, random_state, ref_vit_tokens, timm_vit_keys

from proalign.encoders import EncoderError, create_encoder, list_encoders
from proalign.encoders.base import Encoder, build_on_meta
from proalign.encoders.conch_v15 import ConchV15Vision
from proalign.encoders.layers import TimmViT
from proalign.encoders.presets import OUTPUTS, PRESETS, markdown_table
from proalign.encoders.vit import preset_vit_kwargs

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- encoder-presets:begin (generated: python -m proalign.encoders.presets) -->", \
    "<!-- encoder-presets:end -->"


# ---------------------------------------------------------------------------------------------
# the data and the README
# ---------------------------------------------------------------------------------------------

def test_readme_table_is_generated_from_the_presets():
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lacks the encoder-presets markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == markdown_table(), ("README's table of encoder presets is out of date: replace the lines "
                                       "between the markers with `python -m proalign.encoders.presets`")


def test_every_preset_is_registered_with_its_data():
    names = list_encoders()
    desc = list_encoders(descriptions=True)
    for name, p in PRESETS.items():
        assert p.name == name and name in names
        assert p.repo in desc[name] and f"{p.feature_dim}-d" in desc[name]
        assert p.output in OUTPUTS and p.files and p.url == f"https://huggingface.co/{p.repo}"
    assert {"uni_v1", "uni_v2", "conch_v1", "conch_v15", "virchow2", "h_optimus_0", "h_optimus_1", "phikon_v2",
            "gigapath"} <= set(PRESETS)
    with pytest.raises(Exception):
        PRESETS["virchow2"].img_size = 448  # frozen
    with pytest.raises(TypeError):
        PRESETS["virchow2"].arch_kwargs["img_size"] = 448  # read-only mapping


# The real architectures, built on the meta device (no memory): shapes the released checkpoints have.
REAL_SHAPES = {
    # name: (tokens at the input size, {key: shape})
    "uni_v1": (197, {"pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024)}),
    "uni_v2": (265, {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536), "blocks.23.mlp.fc2.weight": (1536, 4096)}),
    "virchow2": (261, {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280),
                       "blocks.31.mlp.fc2.weight": (1280, 3416), "blocks.0.ls1.gamma": (1280,)}),
    "h_optimus_0": (261, {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536),
                          "blocks.39.mlp.fc2.weight": (1536, 4096)}),
    "h_optimus_1": (261, {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536)}),
    "gigapath": (197, {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                       "blocks.39.mlp.fc1.weight": (8192, 1536), "blocks.39.mlp.fc2.weight": (1536, 4096)}),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_timm_presets_build_the_released_architecture(name):
    p = PRESETS[name]
    model = build_on_meta(lambda: TimmViT(**preset_vit_kwargs(p)))
    tokens, shapes = REAL_SHAPES[name]
    sd = model.state_dict()
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, (name, k, tuple(sd[k].shape))
    assert model.seq_len == tokens and model.num_features == p.feature_dim and model.img_size == p.img_size
    assert "head.weight" not in sd


def test_conch_v15_and_phikon_v2_real_shapes():
    p = PRESETS["conch_v15"]
    m = build_on_meta(lambda: ConchV15Vision(**p.arch_kwargs))
    sd = m.state_dict()
    assert tuple(sd["trunk.pos_embed"].shape) == (1, 197, 1024) and tuple(sd["trunk.blocks.23.ls2.gamma"].shape) == (1024,)
    assert tuple(sd["attn_pool_contrast.to_kv.weight"].shape) == (1536, 1024)
    assert tuple(sd["attn_pool_contrast.query"].shape) == (1, 768) and m.num_features == p.feature_dim == 768
    assert not any(k.endswith("bias") and "attn_pool_contrast.to_" in k for k in sd)
    k = PRESETS["phikon_v2"].arch_kwargs
    assert (k["hidden_size"], k["num_hidden_layers"], k["patch_size"], k["image_size"]) == (1024, 24, 16, 224)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_missing_weights_say_what_to_download(name, tmp_path):
    p = PRESETS[name]
    for weights in (None, tmp_path / "nowhere", tmp_path):
        with pytest.raises(EncoderError) as e:
            create_encoder(name, weights)
        msg = str(e.value)
        assert p.repo in msg and p.weight_files[0] in msg and "--local-dir" in msg, msg


# ---------------------------------------------------------------------------------------------
# preprocessing: resize, then centre crop (GigaPath's Resize(256) + CenterCrop(224))
# ---------------------------------------------------------------------------------------------

class _Dummy(torch.nn.Module):
    def forward_features(self, x):
        return x.flatten(1)[:, :4]

    def activation_shape(self):
        return 1, 4, 1, 1.0


def test_resize_then_crop():
    p = PRESETS["gigapath"]
    enc = Encoder(_Dummy(), name="gigapath", input_size=p.img_size, resize_size=p.resize, mean=p.mean, std=p.std,
                  feature_dim=4, joint_dim=None, magnification=20, patch_size=256, logit_scale=None,
                  interpolation=p.interpolation)
    m, s = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    # a 256 px tile: no resampling at all, the centre 224 px
    close(enc.preprocess(a), (x[:, :, 16:240, 16:240] - m) / s, 1e-6)
    # a 512 px patch: resized to 256, then the centre 224 px
    b = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    y = F.interpolate(torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255, size=(256, 256), mode="bicubic",
                      antialias=True, align_corners=False).clamp(0, 1)
    close(enc.preprocess(b), (y[:, :, 16:240, 16:240] - m) / s, 1e-5)
    assert enc.info()["resize_size"] == 256
    with pytest.raises(EncoderError, match="smaller"):
        Encoder(_Dummy(), name="x", input_size=224, resize_size=200, mean=p.mean, std=p.std, feature_dim=4,
                joint_dim=None, magnification=20, patch_size=224, logit_scale=None)


# ---------------------------------------------------------------------------------------------
# small random versions of the timm-layout presets
# ---------------------------------------------------------------------------------------------

# name: (create_encoder overrides, timm_vit_keys arguments, reference arguments)
TINY = {
    # Virchow2: ViT-H/14 structure: class token + 4 registers with position rows, SwiGLU, LayerScale
    "virchow2": (dict(embed_dim=32, depth=2, num_heads=4, img_size=28),
                 dict(width=32, patch=14, grid=2, hidden=int(32 * 5.3375), n_prefix=5, n_reg=4, glu=True),
                 dict(n_reg=4, glu=True)),
    # H-optimus: ViT-g/14 reg4 DINOv2 structure: registers without position rows
    "h_optimus_0": (dict(embed_dim=48, depth=2, num_heads=4, img_size=28),
                    dict(width=48, patch=14, grid=2, hidden=int(48 * 2.66667 * 2), n_prefix=5, n_reg=4,
                         no_embed_class=True, glu=True),
                    dict(n_reg=4, no_embed_class=True, glu=True)),
    "h_optimus_1": (dict(embed_dim=48, depth=2, num_heads=4, img_size=28),
                    dict(width=48, patch=14, grid=2, hidden=int(48 * 2.66667 * 2), n_prefix=5, n_reg=4,
                         no_embed_class=True, glu=True),
                    dict(n_reg=4, no_embed_class=True, glu=True)),
    # GigaPath: ViT-g DINOv2 structure with 16 px patches, SwiGLU, class position row
    "gigapath": (dict(embed_dim=48, depth=2, num_heads=4, img_size=32),
                 dict(width=48, patch=16, grid=2, hidden=int(48 * 5.33334), glu=True),
                 dict(glu=True)),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_timm_preset_matches_reference(name, tmp_path):
    over, keys_kw, ref_kw = TINY[name]
    p = PRESETS[name]
    sd = random_state(timm_vit_keys("", depth=2, layer_scale=True, **keys_kw), seed=len(name))
    fname = p.weight_files[0]
    if fname.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(tmp_path / fname))
    else:
        torch.save(sd, tmp_path / fname)
    enc = create_encoder(name, tmp_path, **over)
    width, s = over["embed_dim"], over["img_size"]
    px = pixels(2, s, seed=3)
    tokens = ref_vit_tokens(sd, "", px, heads=4, **ref_kw)
    n_prefix = 1 + ref_kw.get("n_reg", 0)
    want = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], -1) if p.output == "cls+mean" else tokens[:, 0]
    close(enc.encode_image(px), want)
    assert enc.feature_dim == (2 * width if p.output == "cls+mean" else width) == want.shape[1]
    assert (enc.mean, enc.std, enc.interpolation) == (p.mean, p.std, p.interpolation)
    assert (enc.magnification, enc.patch_size, enc.joint_dim) == (p.magnification, p.patch_px, None)
    assert enc.resize_size == (max(s, round(p.resize * s / p.img_size)))
    # uint8 patches of the preferred size go through preprocess
    out = enc(np.zeros((1, p.patch_px, p.patch_px, 3), np.uint8))
    assert out.shape == (1, enc.feature_dim) and torch.isfinite(out).all()


def test_tiny_timm_preset_refuses_a_checkpoint_of_another_layout(tmp_path):
    # UNI2-h-like keys (8 registers) under virchow2: the strict load names the difference
    sd = random_state(timm_vit_keys("", width=32, depth=2, patch=14, grid=2, hidden=170, n_prefix=9, n_reg=8,
                                    no_embed_class=True, layer_scale=True, glu=True), seed=1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError, match="position embeddings|reg_token|shape"):
        create_encoder("virchow2", tmp_path, embed_dim=32, depth=2, num_heads=4, img_size=28)


# ---------------------------------------------------------------------------------------------
# Phikon-v2: transformers' Dinov2Model layout
# ---------------------------------------------------------------------------------------------

def hf_dinov2_keys(*, width, depth, patch, grid, hidden):
    k = {"embeddings.cls_token": (1, 1, width), "embeddings.mask_token": (1, width),
         "embeddings.position_embeddings": (1, grid * grid + 1, width),
         "embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
         "embeddings.patch_embeddings.projection.bias": (width,),
         "layernorm.weight": (width,), "layernorm.bias": (width,)}
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            k[b + f"attention.attention.{n}.weight"] = (width, width)
            k[b + f"attention.attention.{n}.bias"] = (width,)
        k.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "norm2.weight": (width,),
                  b + "norm2.bias": (width,), b + "attention.output.dense.weight": (width, width),
                  b + "attention.output.dense.bias": (width,), b + "layer_scale1.lambda1": (width,),
                  b + "layer_scale2.lambda1": (width,), b + "mlp.fc1.weight": (hidden, width),
                  b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (width, hidden), b + "mlp.fc2.bias": (width,)})
    return k


def ref_hf_dinov2_cls(sd, x, *, heads, eps=1e-6):
    """transformers' Dinov2Model forward (eager attention), last_hidden_state[:, 0]."""
    w = sd["embeddings.patch_embeddings.projection.weight"]
    p = w.shape[-1]
    e = F.conv2d(x, w, sd["embeddings.patch_embeddings.projection.bias"], stride=p).flatten(2).transpose(1, 2)
    n, _, d = e.shape
    e = torch.cat([sd["embeddings.cls_token"].expand(n, -1, -1), e], 1)
    pos = sd["embeddings.position_embeddings"]
    g0 = int(math.isqrt(pos.shape[1] - 1))
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    if (gh, gw) != (g0, g0):  # interpolate_pos_encoding: bicubic to (gh, gw), no antialiasing
        grid = pos[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)
    h = e + pos
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        b = f"encoder.layer.{i}."

        def lin(t, name):
            return F.linear(t, sd[b + name + ".weight"], sd[b + name + ".bias"])

        y = F.layer_norm(h, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        q, k, v = (lin(y, f"attention.attention.{t}").view(n, -1, heads, d // heads).transpose(1, 2)
                   for t in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        h = h + lin(a.transpose(1, 2).reshape(n, -1, d), "attention.output.dense") * sd[b + "layer_scale1.lambda1"]
        y = F.layer_norm(h, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = h + lin(F.gelu(lin(y, "mlp.fc1")), "mlp.fc2") * sd[b + "layer_scale2.lambda1"]
        i += 1
    return F.layer_norm(h, (d,), sd["layernorm.weight"], sd["layernorm.bias"], eps)[:, 0]


@pytest.fixture
def phikon_folder(tmp_path):
    from safetensors.torch import save_file

    sd = random_state(hf_dinov2_keys(width=32, depth=2, patch=16, grid=2, hidden=128), seed=5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "patch_size": 16, "image_size": 32, "mlp_ratio": 4, "layer_norm_eps": 1e-6,
           "layerscale_value": 1.0, "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path, sd


def test_tiny_phikon_v2_matches_reference(phikon_folder):
    folder, sd = phikon_folder
    enc = create_encoder("phikon_v2", folder)  # the architecture from config.json, as transformers reads it
    assert (enc.input_size, enc.feature_dim, enc.joint_dim) == (32, 32, None)
    p = PRESETS["phikon_v2"]
    assert (enc.mean, enc.std, enc.patch_size, enc.magnification) == (p.mean, p.std, p.patch_px, p.magnification)
    px = pixels(2, 32, seed=1)
    close(enc.encode_image(px), ref_hf_dinov2_cls(sd, px, heads=4))
    # another input size: the position table resampled as transformers does
    px = pixels(2, 48, seed=2)
    close(enc.encode_image(px), ref_hf_dinov2_cls(sd, px, heads=4))
    # the file itself, and a `dinov2.`-prefixed state dict (a Dinov2 inside another model)
    assert create_encoder("phikon_v2", folder / "model.safetensors").input_size == 32


def test_phikon_v2_refuses_what_it_cannot_read(phikon_folder, tmp_path):
    folder, sd = phikon_folder
    cfg = json.loads((folder / "config.json").read_text())
    for bad, match in [({"use_swiglu_ffn": True}, "swiglu"), ({"model_type": "vit"}, "model_type"),
                       ({"hidden_act": "relu"}, "hidden_act")]:
        (folder / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(EncoderError, match=match):
            create_encoder("phikon_v2", folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderError, match="not supported"):
        create_encoder("phikon_v2", folder, embed_dim=32)
    # a missing value projection: the strict load names the key
    from safetensors.torch import save_file

    bad = {k: v for k, v in sd.items() if k != "encoder.layer.1.attention.attention.value.weight"}
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(EncoderError, match="attention.attention"):
        create_encoder("phikon_v2", folder)


# ---------------------------------------------------------------------------------------------
# CONCH v1.5: iBOT ViT-L trunk + query pooler
# ---------------------------------------------------------------------------------------------

def conch_v15_keys(*, width, depth, patch, grid, pool_dim):
    k = timm_vit_keys("trunk.", width=width, depth=depth, patch=patch, grid=grid, hidden=4 * width, layer_scale=True)
    p = "attn_pool_contrast."
    k.update({p + "query": (1, pool_dim), p + "ln_k.weight": (width,), p + "ln_k.bias": (width,),
              p + "ln_q.weight": (pool_dim,), p + "ln_q.bias": (pool_dim,), p + "to_q.weight": (pool_dim, pool_dim),
              p + "to_kv.weight": (2 * pool_dim, width), p + "to_out.weight": (pool_dim, pool_dim),
              "ln_contrast.weight": (pool_dim,), "ln_contrast.bias": (pool_dim,)})
    return k


def dino_pos(pos, grid_in, size_px, patch):
    """The DINO / iBOT interpolate_pos_encoding: bicubic at scale ((size // patch) + 0.1) / grid."""
    d = pos.shape[-1]
    g = size_px // patch + 0.1
    t = F.interpolate(pos[:, 1:].reshape(1, grid_in, grid_in, d).permute(0, 3, 1, 2),
                      scale_factor=(g / grid_in, g / grid_in), mode="bicubic")
    return torch.cat([pos[:, :1], t.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)


def ref_conch_v15(sd, x, *, heads, pool_heads, grid_in, patch):
    t = dict(sd)
    if x.shape[-1] // patch != grid_in:
        t["trunk.pos_embed"] = dino_pos(sd["trunk.pos_embed"], grid_in, x.shape[-1], patch)
    tokens = ref_vit_tokens(t, "trunk.", x, heads=heads)
    p = "attn_pool_contrast."
    q = F.layer_norm(sd[p + "query"], (sd[p + "query"].shape[-1],), sd[p + "ln_q.weight"], sd[p + "ln_q.bias"])
    kv = F.layer_norm(tokens, (tokens.shape[-1],), sd[p + "ln_k.weight"], sd[p + "ln_k.bias"])
    q = q @ sd[p + "to_q.weight"].T
    k, v = (kv @ sd[p + "to_kv.weight"].T).chunk(2, -1)
    n, L, dp = x.shape[0], tokens.shape[1], q.shape[-1]
    hd = dp // pool_heads
    qh = q.view(1, pool_heads, hd).unsqueeze(0)  # (1, 1, h, hd) -> per head
    kh, vh = k.view(n, L, pool_heads, hd), v.view(n, L, pool_heads, hd)
    sim = torch.einsum("bqhd,blhd->bhql", qh.expand(n, -1, -1, -1), kh) * hd ** -0.5
    out = torch.einsum("bhql,blhd->bqhd", sim.softmax(-1), vh).reshape(n, 1, dp) @ sd[p + "to_out.weight"].T
    return F.layer_norm(out[:, 0], (dp,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])


CONCH15_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, pool_dim=24, pool_heads=4)


def test_tiny_conch_v15_matches_reference(tmp_path):
    sd = random_state(conch_v15_keys(width=32, depth=2, patch=8, grid=4, pool_dim=24), seed=9)
    torch.save(sd, tmp_path / "pytorch_model_vision.bin")
    enc = create_encoder("conch_v15", tmp_path, input_size=64, **CONCH15_TINY)
    p = PRESETS["conch_v15"]
    assert (enc.input_size, enc.feature_dim, enc.joint_dim, enc.patch_size) == (64, 24, None, p.patch_px)
    assert (enc.mean, enc.interpolation) == (p.mean, "bilinear")
    px = pixels(2, 64, seed=4)  # 8 x 8 patches from a 4 x 4 position table (the 448 px / 224 px case)
    close(enc.encode_image(px), ref_conch_v15(sd, px, heads=4, pool_heads=4, grid_in=4, patch=8))
    px = pixels(1, 32, seed=5)  # at the table's own size: no interpolation
    close(enc.encode_image(px), ref_conch_v15(sd, px, heads=4, pool_heads=4, grid_in=4, patch=8))
    assert enc.backbone.activation_shape()[0] == 65  # tokens at the input size, not the table's
    with pytest.raises(EncoderError, match="text tower"):
        enc.encode_text(["tumor"])


def test_conch_v15_checkpoint_with_another_position_grid(tmp_path):
    # the official loader resizes the table to the trunk's grid (bilinear) before the forward
    sd = random_state(conch_v15_keys(width=32, depth=1, patch=8, grid=6, pool_dim=24), seed=2)
    torch.save(sd, tmp_path / "pytorch_model_vision.bin")
    enc = create_encoder("conch_v15", tmp_path, input_size=64, **{**CONCH15_TINY, "depth": 1})
    pos = sd["trunk.pos_embed"]
    g = F.interpolate(pos[:, 1:].reshape(1, 6, 6, 32).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear",
                      align_corners=False)
    want_sd = {**sd, "trunk.pos_embed": torch.cat([pos[:, :1], g.permute(0, 2, 3, 1).reshape(1, 16, 32)], 1)}
    px = pixels(1, 64, seed=6)
    close(enc.encode_image(px), ref_conch_v15(want_sd, px, heads=4, pool_heads=4, grid_in=4, patch=8))


def test_conch_v1_preset_is_what_its_builder_makes(conch):
    folder, _, _, over = conch
    enc = create_encoder("conch_v1", folder, **over)
    p = PRESETS["conch_v1"]
    assert (enc.mean, enc.std, enc.interpolation) == (p.mean, p.std, p.interpolation)
    assert (enc.magnification, enc.patch_size, enc.resize_size) == (p.magnification, p.patch_px, enc.input_size)
    assert re.search(r"CONCH", list_encoders("conch_v1", descriptions=True)["conch_v1"])


@pytest.mark.parametrize("name", ["uni_v1", "uni_v2"])
def test_uni_presets_keep_their_settings(name):
    p = PRESETS[name]
    assert (p.interpolation, p.mean, p.patch_px, p.resize, p.img_size) == ("bilinear", (0.485, 0.456, 0.406), 256, 224, 224)
