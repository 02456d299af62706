"""Encoders (python/proalign/encoders): registry, local-weights loading, forward passes.

Checkpoints are written here in the *official* key layouts (CONCH v1, timm ViT, open_clip CLIP),
spelled out key by key from the public code of those projects, filled with random tensors, and
loaded through `create_encoder` exactly as a user would. Every forward pass is compared with an
independent reference written in this file the way the official code computes it (sequence-first
layout, torch's own `F.multi_head_attention_forward`, explicit softmax attention, CONCH's mask
construction), so a wrong key mapping, head split, mask or pooling shows up as a number.
Tokenizers are tiny BPEs trained here with the `tokenizers` package (no downloads).
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import optional_import
from proalign.encoders import EncoderError, create_encoder, list_encoders
from proalign.encoders.base import build_on_meta
from proalign.encoders.conch import CAPTION_PREFIXES, ConchConfig, ConchV1
from proalign.errors import ProAlignError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
SENTENCES = [
    "tumor epithelium with nuclear atypia and mitoses", "dense fibrous stroma", "lymphocytes and plasma cells",
    "necrotic debris", "normal glandular epithelium", "adipose tissue", "smooth muscle bundles",
    "blood vessels with red cells", "mucin pools", "invasive carcinoma cells in nests",
] * 3

# ---------------------------------------------------------------------------------------------
# official key layouts (from the public CONCH / timm / open_clip code)
# ---------------------------------------------------------------------------------------------


def timm_vit_keys(p, *, width, depth, patch, grid, hidden, n_prefix=1, n_reg=0, no_embed_class=False,
                  layer_scale=False, glu=False):
    k = {p + "cls_token": (1, 1, width), p + "pos_embed": (1, grid * grid + (0 if no_embed_class else n_prefix), width),
         p + "patch_embed.proj.weight": (width, 3, patch, patch), p + "patch_embed.proj.bias": (width,),
         p + "norm.weight": (width,), p + "norm.bias": (width,)}
    if n_reg:
        k[p + "reg_token"] = (1, n_reg, width)
    for i in range(depth):
        b = f"{p}blocks.{i}."
        k.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "attn.qkv.weight": (3 * width, width),
                  b + "attn.qkv.bias": (3 * width,), b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                  b + "norm2.weight": (width,), b + "norm2.bias": (width,), b + "mlp.fc1.weight": (hidden, width),
                  b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (width, hidden // 2 if glu else hidden),
                  b + "mlp.fc2.bias": (width,)})
        if layer_scale:
            k.update({b + "ls1.gamma": (width,), b + "ls2.gamma": (width,)})
    return k


def resblock_keys(p, width, mlp_ratio=4.0, cross=False):
    h = int(width * mlp_ratio)
    k = {p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
         p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
         p + "attn.out_proj.bias": (width,), p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
         p + "mlp.c_fc.weight": (h, width), p + "mlp.c_fc.bias": (h,), p + "mlp.c_proj.weight": (width, h),
         p + "mlp.c_proj.bias": (width,)}
    if cross:
        k.update({p + "ln_1_kv.weight": (width,), p + "ln_1_kv.bias": (width,)})
    return k


def conch_official_keys(cfg: ConchConfig) -> dict[str, tuple]:
    """The released CONCH v1 checkpoint's keys for `cfg` (CoCa with ViT trunk, contrastive and caption
    attentional poolers, text tower with CLS embedding, multimodal decoder), from the CONCH code."""
    w, tw, e = cfg.width, cfg.text_width, cfg.embed_dim
    grid = cfg.image_size // cfg.patch_size
    k = timm_vit_keys("visual.trunk.", width=w, depth=cfg.layers, patch=cfg.patch_size, grid=grid,
                      hidden=int(w * cfg.mlp_ratio))
    # contrastive pooler: nn.MultiheadAttention(e, kdim=w, vdim=w) -> separate q/k/v weights when w != e
    k.update({"visual.attn_pool_contrast.query": (1, e), "visual.attn_pool_contrast.attn.q_proj_weight": (e, e),
              "visual.attn_pool_contrast.attn.k_proj_weight": (e, w), "visual.attn_pool_contrast.attn.v_proj_weight": (e, w),
              "visual.attn_pool_contrast.attn.in_proj_bias": (3 * e,),
              "visual.attn_pool_contrast.attn.out_proj.weight": (e, e), "visual.attn_pool_contrast.attn.out_proj.bias": (e,),
              "visual.attn_pool_contrast.ln_q.weight": (e,), "visual.attn_pool_contrast.ln_q.bias": (e,),
              "visual.attn_pool_contrast.ln_k.weight": (w,), "visual.attn_pool_contrast.ln_k.bias": (w,),
              "visual.ln_contrast.weight": (e,), "visual.ln_contrast.bias": (e,), "visual.proj_contrast": (e, e),
              "logit_scale": ()})
    # caption pooler: 256 queries of embed_dim_caption (768 = trunk width in CONCH: packed in-projection)
    cap = tw
    k.update({"visual.attn_pool_caption.query": (256, cap), "visual.attn_pool_caption.attn.in_proj_bias": (3 * cap,),
              "visual.attn_pool_caption.attn.out_proj.weight": (cap, cap),
              "visual.attn_pool_caption.attn.out_proj.bias": (cap,),
              "visual.attn_pool_caption.ln_q.weight": (cap,), "visual.attn_pool_caption.ln_q.bias": (cap,),
              "visual.attn_pool_caption.ln_k.weight": (w,), "visual.attn_pool_caption.ln_k.bias": (w,),
              "visual.ln_caption.weight": (cap,), "visual.ln_caption.bias": (cap,)})
    if cap == w:
        k["visual.attn_pool_caption.attn.in_proj_weight"] = (3 * cap, cap)
    else:
        k.update({"visual.attn_pool_caption.attn.q_proj_weight": (cap, cap),
                  "visual.attn_pool_caption.attn.k_proj_weight": (cap, w),
                  "visual.attn_pool_caption.attn.v_proj_weight": (cap, w)})
    k.update({"text.text_projection": (tw, e), "text.cls_emb": (tw,), "text.token_embedding.weight": (cfg.vocab_size, tw),
              "text.positional_embedding": (cfg.context_length, tw), "text.ln_final.weight": (tw,),
              "text.ln_final.bias": (tw,), "text_decoder.ln_final.weight": (tw,), "text_decoder.ln_final.bias": (tw,),
              "text_decoder.text_projection": (tw, cfg.vocab_size)})
    for i in range(cfg.text_layers):
        k.update(resblock_keys(f"text.transformer.resblocks.{i}.", tw))
        k.update(resblock_keys(f"text_decoder.resblocks.{i}.", tw))
        k.update(resblock_keys(f"text_decoder.cross_attn.{i}.", tw, cross=True))
    return k


def open_clip_keys(*, embed_dim, v_width, v_layers, patch, grid, t_width, t_layers, context, vocab, text_prefix=""):
    k = {"visual.conv1.weight": (v_width, 3, patch, patch), "visual.class_embedding": (v_width,),
         "visual.positional_embedding": (grid * grid + 1, v_width), "visual.ln_pre.weight": (v_width,),
         "visual.ln_pre.bias": (v_width,), "visual.ln_post.weight": (v_width,), "visual.ln_post.bias": (v_width,),
         "visual.proj": (v_width, embed_dim), "logit_scale": ()}
    for i in range(v_layers):
        k.update(resblock_keys(f"visual.transformer.resblocks.{i}.", v_width))
    t = text_prefix
    k.update({t + "token_embedding.weight": (vocab, t_width), t + "positional_embedding": (context, t_width),
              t + "ln_final.weight": (t_width,), t + "ln_final.bias": (t_width,),
              t + "text_projection": (t_width, embed_dim)})
    for i in range(t_layers):
        k.update(resblock_keys(f"{t}transformer.resblocks.{i}.", t_width))
    return k


def random_state(keys: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(keys.items()):
        if name == "logit_scale":
            sd[name] = torch.tensor(math.log(50.0))
        elif (name.endswith(".weight") and ("norm" in name or ".ln_" in name or "ln_" in name.split(".")[-2])) \
                or name.endswith("gamma"):
            sd[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = shape[-1] if "conv1" not in name and "patch_embed" not in name else int(np.prod(shape[1:]))
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            sd[name] = 0.2 * torch.randn(shape, generator=g)
    return sd


# ---------------------------------------------------------------------------------------------
# references (sequence-first, torch's MHA function, as the official code runs)
# ---------------------------------------------------------------------------------------------


def ln(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps)


def ref_vit_tokens(sd, p, x, *, heads, n_reg=0, no_embed_class=False, glu=False, final_norm=True):
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1])
    n, d = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    prefix = [sd[p + "cls_token"].expand(n, -1, -1)] + ([sd[p + "reg_token"].expand(n, -1, -1)] if n_reg else [])
    x = torch.cat(prefix + [x + sd[p + "pos_embed"]], 1) if no_embed_class else torch.cat(prefix + [x], 1) + sd[p + "pos_embed"]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = ln(x, sd, b + "norm1.", 1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(n, -1, 3, heads, d // heads) \
            .permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(n, -1, d), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + a * sd.get(b + "ls1.gamma", 1.0)
        h = F.linear(ln(x, sd, b + "norm2.", 1e-6), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
        if glu:
            h1, h2 = h.chunk(2, dim=-1)
            h = F.silu(h1) * h2
        else:
            h = F.gelu(h)
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"]) * sd.get(b + "ls2.gamma", 1.0)
        i += 1
    return ln(x, sd, p + "norm.", 1e-6) if final_norm else x


def ref_resblocks(x_lnd, sd, p, heads, mask=None, act=F.gelu):
    i = 0
    while f"{p}{i}.ln_1.weight" in sd:
        b = f"{p}{i}."
        h = ln(x_lnd, sd, b + "ln_1.", 1e-5)
        a = F.multi_head_attention_forward(
            h, h, h, h.shape[-1], heads, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"], None, None,
            False, 0.0, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)[0]
        x_lnd = x_lnd + a
        h = F.linear(ln(x_lnd, sd, b + "ln_2.", 1e-5), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x_lnd = x_lnd + F.linear(act(h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    return x_lnd


def ref_conch_image(sd, pixels, cfg):
    tokens = ref_vit_tokens(sd, "visual.trunk.", pixels, heads=cfg.heads)
    p = "visual.attn_pool_contrast."
    kv = ln(tokens, sd, p + "ln_k.", 1e-5).permute(1, 0, 2)
    q = ln(sd[p + "query"], sd, p + "ln_q.", 1e-5).unsqueeze(1).repeat(1, tokens.shape[0], 1)
    out = F.multi_head_attention_forward(
        q, kv, kv, cfg.embed_dim, cfg.pooler_heads, None, sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=sd[p + "attn.q_proj_weight"],
        k_proj_weight=sd[p + "attn.k_proj_weight"], v_proj_weight=sd[p + "attn.v_proj_weight"])[0]
    x = ln(out.permute(1, 0, 2)[:, 0], sd, "visual.ln_contrast.", 1e-5)
    return x, F.normalize(x @ sd["visual.proj_contrast"], dim=-1)


def ref_conch_text(sd, text, cfg):
    """CONCH's TextTransformer.forward on `text` (n, context_length - 1), mask built as its code does."""
    n, l = text.shape
    x = torch.cat([sd["text.token_embedding.weight"][text], sd["text.cls_emb"].reshape(1, 1, -1).repeat(n, 1, 1)], 1)
    cls_mask = (text != cfg.pad_id).unsqueeze(1)
    cls_mask = F.pad(cls_mask, (1, 0, cls_mask.shape[2], 0), value=True)
    additive = torch.zeros(cls_mask.shape).masked_fill_(~cls_mask, float("-inf"))
    additive = torch.repeat_interleave(additive, cfg.text_heads, 0)
    causal = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
    mask = causal[None, :l + 1, :l + 1] + additive[:, :l + 1, :l + 1]
    x = (x + sd["text.positional_embedding"][:l + 1]).permute(1, 0, 2)
    x = ref_resblocks(x, sd, "text.transformer.resblocks.", cfg.text_heads, mask).permute(1, 0, 2)
    return F.normalize(ln(x[:, -1], sd, "text.ln_final.", 1e-5) @ sd["text.text_projection"], dim=-1)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_clip_image(sd, pixels, heads, act):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1])
    n, d = x.shape[:2]
    x = torch.cat([sd["visual.class_embedding"].expand(n, 1, d), x.flatten(2).transpose(1, 2)], 1)
    x = ln(x + sd["visual.positional_embedding"], sd, "visual.ln_pre.", 1e-5).permute(1, 0, 2)
    x = ref_resblocks(x, sd, "visual.transformer.resblocks.", heads, act=act).permute(1, 0, 2)
    pooled = ln(x, sd, "visual.ln_post.", 1e-5)[:, 0]
    return pooled, F.normalize(pooled @ sd["visual.proj"], dim=-1)


def ref_clip_text(sd, ids, heads, act):
    l = ids.shape[1]
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"][:l]).permute(1, 0, 2)
    mask = torch.full((l, l), float("-inf")).triu_(1)
    x = ln(ref_resblocks(x, sd, "transformer.resblocks.", heads, mask, act).permute(1, 0, 2), sd, "ln_final.", 1e-5)
    return F.normalize(x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"], dim=-1)


# ---------------------------------------------------------------------------------------------
# fixtures: tiny tokenizers and checkpoints
# ---------------------------------------------------------------------------------------------


def _bpe(vocab_size, specials):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def conch_tokenizer_file(tmp_path_factory):
    """A CONCH-style tokenizer file: byte-level BPE, <pad>=0, <start_of_text>=1, <end_of_text>=2 added by
    the file's template (as conch_byte_level_bpe_uncased.json does)."""
    from tokenizers import processors

    tok = _bpe(320, ["<pad>", "<start_of_text>", "<end_of_text>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", 1), ("<end_of_text>", 2)])
    path = tmp_path_factory.mktemp("tok") / "conch_byte_level_bpe_uncased.json"
    tok.save(str(path))
    return path, tok.get_vocab_size()


@pytest.fixture(scope="module")
def clip_tokenizer_file(tmp_path_factory):
    """A CLIP-style tokenizer.json: <|startoftext|>, <|endoftext|> are the two largest ids."""
    from tokenizers import processors

    tok = _bpe(300, [])
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)])
    path = tmp_path_factory.mktemp("cliptok") / "tokenizer.json"
    tok.save(str(path))
    return path, tok.get_vocab_size()


def tiny_conch_cfg(vocab):
    return dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=24, pooler_heads=2,
                text_width=32, text_layers=2, text_heads=4, context_length=16, vocab_size=vocab + 5)


@pytest.fixture(scope="module")
def conch_folder(tmp_path_factory, conch_tokenizer_file):
    tok_path, vocab = conch_tokenizer_file
    over = tiny_conch_cfg(vocab)
    sd = random_state(conch_official_keys(ConchConfig(**over)), seed=1)
    folder = tmp_path_factory.mktemp("conch_v1")
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / tok_path.name).write_bytes(tok_path.read_bytes())
    return folder, sd, over


def pixels(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=2e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < tol, f"max |diff| {err:.3g} >= {tol}"


# ---------------------------------------------------------------------------------------------
# registry and errors
# ---------------------------------------------------------------------------------------------


def test_list_encoders_names_and_filter():
    names = list_encoders()
    for n in ("conch_v1", "uni_v1", "uni_v2", "open_clip:ViT-B-16", "open_clip:ViT-B-32-quickgelu",
              "timm:vit_large_patch16_224"):
        assert n in names
    assert list_encoders("timm:*") == [n for n in names if n.startswith("timm:")]
    assert all(n.startswith("timm:") for n in list_encoders("timm:*"))
    desc = list_encoders("conch*", descriptions=True)
    assert list(desc) == ["conch_v1", "conch_v15"] and "CONCH" in desc["conch_v1"]


@pytest.mark.parametrize("name", ["conch_v2", "uni", "clip:ViT-B-16", "timm:", ""])
def test_unknown_encoder_name(name, tmp_path):
    with pytest.raises(EncoderError) as e:
        create_encoder(name, tmp_path)
    assert "encoder" in str(e.value)
    if name == "conch_v2":
        assert "Did you mean conch_v1" in str(e.value)


@pytest.mark.parametrize("name,repo,fname", [
    ("conch_v1", "MahmoodLab/CONCH", "pytorch_model.bin"),
    ("uni_v1", "MahmoodLab/UNI", "pytorch_model.bin"),
    ("uni_v2", "MahmoodLab/UNI2-h", "pytorch_model.bin"),
    ("open_clip:ViT-B-32-quickgelu", "QuiltNet-B-32", "open_clip_pytorch_model.bin"),
    ("timm:vit_large_patch16_224", "Hugging Face", "model.safetensors"),
])
def test_missing_weights_say_what_to_download(name, repo, fname, tmp_path):
    for weights in (None, tmp_path / "nowhere", tmp_path):  # nothing given, a missing path, an empty folder
        with pytest.raises(EncoderError) as e:
            create_encoder(name, weights)
        msg = str(e.value)
        assert isinstance(e.value, ProAlignError)
        assert repo in msg and fname in msg and "--local-dir" in msg, msg
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder(name, tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# CONCH v1
# ---------------------------------------------------------------------------------------------


def test_conch_full_size_keys_equal_official_layout():
    """Full-size model on the meta device (nothing allocated): its keys plus the captioning keys it
    skips are exactly the released checkpoint's keys, with the same shapes."""
    official = conch_official_keys(ConchConfig())
    model = build_on_meta(lambda: ConchV1(ConchConfig()))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    skipped = {k for k in official if k.startswith(CAPTION_PREFIXES)}
    assert set(ours) == set(official) - skipped
    assert {k: official[k] for k in ours} == ours
    assert len(skipped) > 300 and not any(k.startswith(CAPTION_PREFIXES) for k in ours)
    assert ours["visual.trunk.pos_embed"] == (1, 785, 768) and ours["visual.proj_contrast"] == (512, 512)
    assert ours["text.token_embedding.weight"] == (32007, 768) and ours["text.positional_embedding"] == (128, 768)


def test_conch_tiny_matches_reference(conch_folder):
    folder, sd, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    cfg = ConchConfig(**over)
    assert (enc.name, enc.input_size, enc.feature_dim, enc.joint_dim) == ("conch_v1", 32, 24, 24)
    assert enc.mean == OPENAI_MEAN and enc.interpolation == "bicubic"
    assert (enc.magnification, enc.patch_size) == (20.0, 512)
    assert enc.logit_scale == pytest.approx(50.0, rel=1e-5)
    assert enc.dtype == torch.float32 and enc.impl == "native"
    px = pixels(5, 32)
    x = enc.encode_image(px)
    ref_x, ref_z = ref_conch_image(sd, px, cfg)
    close(x, ref_x)
    z = enc.project(x)
    close(z, ref_z)
    close(z.norm(dim=1), torch.ones(5), 1e-5)
    assert torch.equal(enc.projection_matrix(), sd["visual.proj_contrast"])
    assert torch.equal(enc.encode_image(px), x)  # deterministic
    close(enc.encode_image(px, batch_size=2), x, 1e-5)
    texts = ["tumor epithelium", "dense fibrous stroma with lymphocytes", "Adipose tissue", " ".join(SENTENCES)]
    t = enc.encode_text(texts)
    ids = enc.tokenizer(texts)
    close(t, ref_conch_text(sd, ids, cfg))
    close(t.norm(dim=1), torch.ones(4), 1e-5)
    close(enc.encode_text(texts, batch_size=3), t, 1e-5)


def test_conch_tokenizer_layout(conch_folder):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    ids = enc.tokenizer(["stroma", " ".join(SENTENCES)])
    assert ids.dtype == torch.long and ids.shape == (2, over["context_length"] - 1)  # the last slot is CONCH's CLS
    short, long = ids.tolist()
    assert short[0] == 1 and long[0] == 1  # <start_of_text>
    end = short.index(2)
    assert all(t == 0 for t in short[end + 1:]) and 0 not in short[:end]  # right-padded with <pad>=0
    assert long[-1] == 2 and 0 not in long  # truncated, keeping <end_of_text>


def test_conch_bf16_path_close_to_fp32(conch_folder):
    folder, _, over = conch_folder
    f32 = create_encoder("conch_v1", folder, **over)
    b16 = create_encoder("conch_v1", folder, dtype="bf16", **over)
    assert b16.dtype == torch.bfloat16
    px = pixels(4, 32, seed=3)
    a, b = f32.encode_image(px), b16.encode_image(px)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # autocast really ran in bf16
    cos = F.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.99, cos
    ta, tb = f32.encode_text(["tumor", "stroma"]), b16.encode_text(["tumor", "stroma"])
    assert F.cosine_similarity(ta, tb, dim=1).min() > 0.99


def test_conch_checkpoint_variants(conch_folder, tmp_path):
    """Wrapped / DDP-prefixed / safetensors checkpoints load the same; a file path works as well as a folder."""
    from safetensors.torch import save_file

    folder, sd, over = conch_folder
    px = pixels(2, 32, seed=5)
    want = create_encoder("conch_v1", folder, **over).encode_image(px)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for path in (wrapped, st, folder / "pytorch_model.bin"):
        close(create_encoder("conch_v1", path, **over).encode_image(px), want, 1e-6)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_conch_mismatched_checkpoint_is_refused(conch_folder, tmp_path, damage):
    folder, sd, over = conch_folder
    bad = dict(sd)
    if damage == "missing":
        del bad["visual.trunk.blocks.1.attn.qkv.weight"]
    elif damage == "unexpected":
        bad["visual.trunk.blocks.7.attn.qkv.weight"] = torch.zeros(1)
    else:
        bad["visual.proj_contrast"] = torch.zeros(24, 25)
    torch.save(bad, tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError) as e:
        create_encoder("conch_v1", tmp_path, **over)
    assert "blocks" in str(e.value) or "proj_contrast" in str(e.value)
    # the full-size default config refuses the tiny checkpoint by shape/keys, naming the file
    with pytest.raises(EncoderError, match="pytorch_model.bin"):
        create_encoder("conch_v1", folder, impl="native")


def test_conch_text_without_tokenizer_says_where_to_get_it(conch_folder, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # as if the conch package (which ships the file) were absent
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("conch") else find_spec(name, *a))
    folder, sd, over = conch_folder
    torch.save(sd, tmp_path / "pytorch_model.bin")  # weights only, no tokenizer file
    enc = create_encoder("conch_v1", tmp_path, **over)
    assert enc.encode_image(pixels(1, 32)).shape == (1, 24)
    with pytest.raises(EncoderError) as e:
        enc.encode_text(["tumor"])
    assert "conch_byte_level_bpe_uncased.json" in str(e.value) and "mahmoodlab/CONCH" in str(e.value)
    with pytest.raises(EncoderError, match="unknown config keys"):
        create_encoder("conch_v1", folder, widht=32)


def test_conch_official_package_absent_is_reported(conch_folder):
    from proalign.encoders.conch import _official_conch

    if _official_conch()[0]:
        pytest.skip("the conch package imports here")
    folder, _, over = conch_folder
    with pytest.raises(EncoderError, match="pip install") as e:
        create_encoder("conch_v1", folder, impl="conch")
    assert _official_conch()[1] in str(e.value)  # says why: not installed, or the import's own error


def test_conch_auto_falls_back_when_the_package_does_not_import(conch_folder, tmp_path, monkeypatch):
    """A conch package that is installed but raises on import (as it does beside the local CPU torch
    wheel: torchvision raises RuntimeError) makes impl='auto' use the native model, saying so once
    per process; impl='conch' refuses with the import's error."""
    import sys
    import warnings

    from proalign.encoders import conch as conch_mod

    folder, _, over = conch_folder
    broken = tmp_path / "site" / "conch" / "open_clip_custom"
    broken.mkdir(parents=True)  # the real package has no conch/__init__.py either
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    for name in [m for m in sys.modules if m == "conch" or m.startswith("conch.")]:
        monkeypatch.delitem(sys.modules, name)  # the real package, where installed, is hidden for this test
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(conch_mod, "_OFFICIAL_STATE", None)
    monkeypatch.setattr(conch_mod, "_FALLBACK_WARNED", False)
    # impl='auto' with no config override: the full-size config, here made the tiny one
    monkeypatch.setattr(conch_mod.ConchConfig, "from_overrides", classmethod(lambda cls, o: cls(**over)))
    with pytest.warns(RuntimeWarning, match="does not import .*RuntimeError: operator torchvision::nms") as rec:
        enc = create_encoder("conch_v1", folder)
    assert enc.impl == "native" and len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second encoder is quiet
        again = create_encoder("conch_v1", folder)
    assert again.impl == "native"
    with pytest.raises(EncoderError, match="does not import .*RuntimeError"):
        create_encoder("conch_v1", folder, impl="conch")
    for name in [m for m in sys.modules if m == "conch" or m.startswith("conch.")]:
        del sys.modules[name]  # drop the broken one (monkeypatch then puts back what was there before)


# ---------------------------------------------------------------------------------------------
# timm ViTs (UNI-style, vision only)
# ---------------------------------------------------------------------------------------------

UNI_TINY = dict(embed_dim=32, depth=2, num_heads=4, img_size=32, patch_size=8)
UNI2_TINY = dict(embed_dim=48, depth=2, num_heads=4, img_size=28, patch_size=14, mlp_ratio=2.66667 * 2)


def test_uni_v1_style_vit_matches_reference(tmp_path):
    keys = timm_vit_keys("", width=32, depth=2, patch=8, grid=4, hidden=128, layer_scale=True)
    sd = random_state(keys, seed=2)
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 32), torch.zeros(10)  # a classifier head is ignored
    torch.save(sd, tmp_path / "pytorch_model.bin")
    enc = create_encoder("uni_v1", tmp_path, **UNI_TINY)
    assert (enc.feature_dim, enc.joint_dim, enc.logit_scale) == (32, None, None)
    assert enc.mean == IMAGENET_MEAN and enc.interpolation == "bilinear"
    assert (enc.input_size, enc.magnification, enc.patch_size) == (32, 20.0, 256)
    px = pixels(3, 32, seed=7)
    close(enc.encode_image(px), ref_vit_tokens(sd, "", px, heads=4)[:, 0])
    for call in (lambda: enc.encode_text(["tumor"]), lambda: enc.project(torch.zeros(1, 32)),
                 lambda: enc.projection_matrix()):
        with pytest.raises(EncoderError, match="vision-only"):
            call()
    # another input size: positions resampled (timm dynamic_img_size), features still (n, d)
    out = enc.encode_image(pixels(2, 48))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_uni_v2_style_vit_matches_reference(tmp_path):
    hidden = int(48 * 2.66667 * 2)
    keys = timm_vit_keys("", width=48, depth=2, patch=14, grid=2, hidden=hidden, n_prefix=9, n_reg=8,
                         no_embed_class=True, layer_scale=True, glu=True)
    sd = random_state(keys, seed=4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    enc = create_encoder("uni_v2", tmp_path, **UNI2_TINY)
    px = pixels(3, 28, seed=8)
    close(enc.encode_image(px), ref_vit_tokens(sd, "", px, heads=4, n_reg=8, no_embed_class=True, glu=True)[:, 0])
    assert enc.feature_dim == 48 and enc.joint_dim is None


def test_timm_config_json_and_avg_pool(tmp_path):
    """timm hub layout: config.json's model_args / pretrained_cfg configure the model and preprocessing."""
    keys = timm_vit_keys("", width=32, depth=1, patch=8, grid=4, hidden=64)
    keys.pop("norm.weight"), keys.pop("norm.bias")
    keys.update({"fc_norm.weight": (32,), "fc_norm.bias": (32,)})  # avg pooling moves the final norm after the pool
    sd = random_state(keys, seed=6)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 0, "global_pool": "avg",
        "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                       "mlp_ratio": 2.0, "dynamic_img_size": True},
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                           "input_size": [3, 32, 32]}}))
    enc = create_encoder("timm:vit_base_patch16_224", tmp_path)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25) and enc.interpolation == "bilinear"
    assert enc.input_size == 32 and enc.patch_size == 32
    px = pixels(2, 32, seed=9)
    tokens = ref_vit_tokens(sd, "", px, heads=2, final_norm=False)  # no norm before the pool; fc_norm after
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (32,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    close(enc.encode_image(px), pooled)
    with pytest.raises(EncoderError, match="not 'vit_large_patch16_224'|for 'vit_base_patch16_224'"):
        create_encoder("timm:vit_large_patch16_224", tmp_path)
    with pytest.raises(EncoderError, match="position embeddings"):
        create_encoder("timm:vit_base_patch16_224", tmp_path, img_size=48)


# ---------------------------------------------------------------------------------------------
# open_clip CLIP
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_tokenizer_file):
    tok_path, vocab = clip_tokenizer_file
    model_cfg = {"embed_dim": 24, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 12, "vocab_size": vocab, "width": 32, "heads": 4, "layers": 2}}
    keys = open_clip_keys(embed_dim=24, v_width=32, v_layers=2, patch=8, grid=4, t_width=32, t_layers=2,
                          context=12, vocab=vocab)
    sd = random_state(keys, seed=11)
    folder = tmp_path_factory.mktemp("quiltnet")
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": [0.3, 0.3, 0.3],
                                                   "interpolation": "bicubic", "resize_mode": "shortest"}}))
    (folder / "tokenizer.json").write_bytes(tok_path.read_bytes())
    return folder, sd


def test_open_clip_matches_reference(clip_folder):
    folder, sd = clip_folder
    enc = create_encoder("open_clip:ViT-B-32-quickgelu", folder)
    assert (enc.feature_dim, enc.joint_dim, enc.input_size) == (32, 24, 32)
    assert enc.std == (0.3, 0.3, 0.3) and enc.logit_scale == pytest.approx(50.0, rel=1e-5)
    px = pixels(4, 32, seed=12)
    ref_x, ref_z = ref_clip_image(sd, px, heads=2, act=quick_gelu)
    x = enc.encode_image(px)
    close(x, ref_x)
    close(enc.project(x), ref_z)
    texts = ["tumor epithelium", "mucin pools", " ".join(SENTENCES)]
    ids = enc.tokenizer(texts)
    assert ids.shape == (3, 12) and int(ids[2, -1]) == ids.max()  # truncated long text keeps <|endoftext|>
    close(enc.encode_text(texts), ref_clip_text(sd, ids, heads=4, act=quick_gelu))
    # GELU instead of QuickGELU gives other numbers: the activation really follows the config
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True
    gelu = create_encoder("open_clip:ViT-B-32", folder, quick_gelu=False)
    assert (gelu.encode_image(px) - x).abs().max() > 1e-3


def test_open_clip_custom_text_layout_and_missing_tokenizer(clip_folder, tmp_path):
    """CustomTextCLIP checkpoints keep the text tower under `text.`: same model, same numbers."""
    folder, sd = clip_folder
    moved = {(("text." + k) if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in sd.items()}
    torch.save(moved, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_bytes((folder / "open_clip_config.json").read_bytes())
    enc = create_encoder("open_clip:ViT-B-32-quickgelu", tmp_path)
    px = pixels(2, 32, seed=13)
    close(enc.encode_image(px), create_encoder("open_clip:ViT-B-32-quickgelu", folder).encode_image(px), 1e-6)
    with pytest.raises(EncoderError, match="tokenizer.json"):
        enc.encode_text(["tumor"])
    with pytest.raises(EncoderError, match="not supported"):
        create_encoder("open_clip:ViT-B-32", folder, vision_cfg={"timm_model_name": "vit_base_patch16_224"})


# ---------------------------------------------------------------------------------------------
# preprocessing, batching, compile, provenance
# ---------------------------------------------------------------------------------------------


def test_preprocess_uint8(conch_folder):
    from PIL import Image

    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)  # input 32, bicubic, OpenAI mean/std
    rng = np.random.default_rng(0)
    m = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(enc.std).view(1, 3, 1, 1)
    same = torch.from_numpy(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    out = enc.preprocess(same)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32)
    close(out, (same.permute(0, 3, 1, 2).float() / 255 - m) / s, 1e-6)
    # a larger patch is resized like PIL's antialiased bicubic (CONCH's eval transform)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    big[:, 20:40] = 255
    out = enc.preprocess(big)  # numpy input accepted too
    pil = np.stack([np.asarray(Image.fromarray(b).resize((32, 32), Image.BICUBIC)) for b in big])
    want = (torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255 - m) / s
    assert (out - want).abs().max() * s.min() < 2.5 / 255
    # non-square: short side to 32, centre crop
    rect = torch.from_numpy(rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8))
    close(enc.preprocess(rect), enc.preprocess(rect[:, :, 8:40].contiguous()), 1e-6)
    # stays on the input's device (no host copy): a meta tensor gives a meta tensor
    meta = enc.preprocess(torch.empty(4, 64, 64, 3, dtype=torch.uint8, device="meta"))
    assert meta.is_meta and meta.shape == (4, 3, 32, 32)
    assert enc.preprocess(torch.zeros(0, 64, 64, 3, dtype=torch.uint8)).shape == (0, 3, 32, 32)
    u8 = torch.uint8
    for bad in (torch.zeros(1, 32, 32, 3), torch.zeros(1, 3, 32, 32, dtype=u8), torch.zeros(32, 32, 3, dtype=u8)):
        with pytest.raises(EncoderError, match="uint8"):
            enc.preprocess(bad)
    with pytest.raises(EncoderError, match="preprocess"):
        enc.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert enc.encode_image(torch.zeros(0, 3, 32, 32)).shape == (0, 24)
    close(enc(same), enc.encode_image(enc.preprocess(same)), 1e-6)


def test_batch_size_for(conch_folder):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    per = enc.bytes_per_image()
    assert per > 3 * 512 * 512  # at least the uint8 512 px source patch
    assert enc.batch_size_for(0) == 1 and enc.batch_size_for(per) == 1
    assert enc.batch_size_for(10 ** 15) == 1024 and enc.batch_size_for(10 ** 15, max_batch=100) == 96
    sizes = [enc.batch_size_for(int(per * k / 0.7) + 8) for k in (1, 5, 9, 50, 200)]
    assert sizes == [1, 5, 8, 48, 200]
    assert enc.batch_size_for() >= 1  # the host's free memory
    full = build_on_meta(lambda: ConchV1(ConchConfig()))
    from proalign.encoders.base import Encoder

    big = Encoder(full, name="conch_v1", input_size=448, mean=OPENAI_MEAN, std=OPENAI_MEAN, feature_dim=512,
                  joint_dim=512, magnification=20, patch_size=512, logit_scale=None, device="meta")
    assert 16 <= big.batch_size_for(80 * 2 ** 30) <= 1024  # full-size CONCH, 80 GiB: a real batch


def test_compile_flag_same_features(conch_folder):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, compile="eager", **over)
    assert enc.compiled
    px = pixels(2, 32, seed=21)
    close(enc.encode_image(px), create_encoder("conch_v1", folder, **over).encode_image(px), 1e-5)


def test_cuda_graphs_need_a_gpu(conch_folder):
    folder, _, over = conch_folder
    with pytest.raises(EncoderError, match="CUDA graphs need a CUDA device"):
        create_encoder("conch_v1", folder, device="cpu", cuda_graphs=True, **over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graphs_replay_equals_eager(conch_folder, dtype):
    folder, _, over = conch_folder
    eager = create_encoder("conch_v1", folder, device="cuda", dtype=dtype, **over)
    graphed = create_encoder("conch_v1", folder, device="cuda", dtype=dtype, cuda_graphs=True, **over)
    assert graphed.cuda_graphs and graphed.info()["cuda_graphs"]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    tol = 1e-5 if dtype == "fp32" else 3e-2
    # a full batch (captures), the same size again (replays), a short last batch (padded), then a
    # larger batch (captures again); each against the eager forward on the same pixels
    for i, n in enumerate((16, 16, 5, 24)):
        px = pixels(n, 32, seed=seed + i).cuda()
        close(graphed.encode_image(px).cpu(), eager.encode_image(px).cpu(), tol)
    assert graphed._image_fn.captures == 2
    # the output is not the graph's static buffer: a later replay leaves earlier results alone
    a = graphed.encode_image(pixels(16, 32, seed=seed).cuda())
    a0 = a.clone()
    graphed.encode_image(pixels(16, 32, seed=seed + 99).cuda())
    assert torch.equal(a, a0)


def test_info_and_weights_id(conch_folder):
    folder, _, over = conch_folder
    enc = create_encoder("conch_v1", folder, **over)
    info = enc.info()
    json.dumps(info)
    assert info["encoder"] == "conch_v1" and info["weights"].endswith("pytorch_model.bin")
    assert info["feature_dim"] == 24 and info["dtype"] == "float32"
    want = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()[:32]
    assert enc.weights_id == want


# ---------------------------------------------------------------------------------------------
# against the official packages where they import (tiny sizes; tests/test_official_parity.py runs
# the real sizes in the parity environment of `make parity`)
# ---------------------------------------------------------------------------------------------


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_((1.0 if "weight" in name or "gamma" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.mark.optional
def test_matches_official_timm_when_installed(tmp_path):
    optional_import("timm")
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    t = _randomize(VisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, init_values=1e-5,
                                     mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
                                     act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True), 1)
    torch.save(t.state_dict(), tmp_path / "pytorch_model.bin")
    enc = create_encoder("uni_v2", tmp_path, **UNI2_TINY)
    for size in (28, 56):
        px = pixels(2, size, seed=size)
        with torch.no_grad():
            close(enc.encode_image(px), t(px), 1e-5)


@pytest.mark.optional
def test_matches_official_open_clip_when_installed(tmp_path):
    open_clip = optional_import("open_clip")
    mc = {"embed_dim": 24, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2}}
    m = _randomize(open_clip.model.CLIP(**json.loads(json.dumps(mc))), 2)
    torch.save(m.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": mc}))
    enc = create_encoder("open_clip:ViT-B-32-quickgelu", tmp_path)
    px = pixels(3, 32)
    ids = torch.randint(1, 298, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 5], ids[0, 6:], ids[1, -1] = 298, 299, 0, 299
    with torch.no_grad():
        close(enc.project(enc.encode_image(px)), m.encode_image(px, normalize=True), 1e-5)
        close(F.normalize(enc.backbone.encode_text_ids(ids), dim=-1), m.encode_text(ids, normalize=True), 1e-5)


@pytest.mark.optional
def test_matches_official_conch_when_installed(tmp_path, monkeypatch):
    occ = optional_import("conch.open_clip_custom")
    tiny = {"embed_dim": 24, "embed_dim_caption": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "num_heads": 2,
                           "attentional_pool_caption": True, "attentional_pool_contrast": True, "attn_pooler_heads": 8,
                           "n_queries_contrast": 1, "n_queries_caption": 256, "output_tokens": True},
            "text_cfg": {"context_length": 128, "vocab_size": 32007, "width": 32, "heads": 4, "layers": 2,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 128, "vocab_size": 32007, "width": 32, "heads": 4, "layers": 1}}
    m = _randomize(occ.CoCa(**json.loads(json.dumps(tiny))), 3)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    native = create_encoder("conch_v1", tmp_path, impl="native", image_size=32, patch_size=8, width=32, layers=2,
                            heads=2, embed_dim=24, text_width=32, text_layers=2, text_heads=4)
    orig = occ.create_model_from_pretrained
    monkeypatch.setattr(occ, "create_model_from_pretrained",
                        lambda name, **kw: orig(json.loads(json.dumps(tiny)), **kw))
    official = create_encoder("conch_v1", tmp_path, impl="conch")
    assert official.impl == "conch"
    px = pixels(3, 32)
    texts = ["Tumor epithelium, with nuclear atypia.", "stroma", "lymphocytes " * 200]
    with torch.no_grad():
        close(native.encode_image(px), m.encode_image(px, proj_contrast=False, normalize=False), 1e-5)
        close(native.project(native.encode_image(px)), m.encode_image(px), 1e-5)
    close(official.encode_image(px), native.encode_image(px), 1e-5)
    close(official.encode_text(texts), native.encode_text(texts), 1e-5)
