"""Randomly initialised checkpoints of the real architectures, written in the official layouts, for
the demo and the benchmarks on machines without the real weights. Embeddings made with them carry
no meaning: they exercise the code paths and measure speed, nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..encoders.base import write_encoder_config
from ..encoders.conch import ConchConfig, ConchV1
from ..encoders.layers import TimmViT
from ..encoders.vit import ARCHS

# A CONCH-shaped model small enough for a CPU demo: same modules, fewer and narrower layers.
TINY_CONCH = dict(image_size=64, patch_size=16, width=64, layers=2, heads=2, embed_dim=64, pooler_heads=2,
                  text_width=64, text_layers=2, text_heads=2, context_length=64)


def _train_tokenizer(path: Path, vocab_size: int) -> int:
    """A CONCH-style byte-level BPE tokenizer (<pad>=0, <start_of_text>=1, <end_of_text>=2), trained
    on the shipped description sets so every word in them tokenizes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from ..prototypes.descriptions import list_description_sets, load_descriptions

    sentences = [s for name in list_description_sets() for s in load_descriptions(name).sentences]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", 1), ("<end_of_text>", 2)])
    tok.save(str(path))
    return tok.get_vocab_size()


def write_random_conch(folder: str | Path, *, seed: int = 0, vocab_size: int = 1024,
                       **overrides: Any) -> dict[str, Any]:
    """A random CONCH v1 (TINY_CONCH unless overridden) as `pytorch_model.bin` plus its tokenizer in
    `folder`, with the architecture overrides recorded in `proalign_encoder.json` (so
    create_encoder("conch_v1", folder) and the CLI's `--weights folder` load it as it is). Returns
    the overrides (passing them to create_encoder as well is harmless)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(folder / "conch_byte_level_bpe_uncased.json", vocab_size)
    over = {**TINY_CONCH, **overrides, "vocab_size": vocab}
    torch.manual_seed(seed)
    model = ConchV1(ConchConfig.from_overrides(over))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    write_encoder_config(folder, "conch_v1", over, note="random weights (proalign.testing.random_weights): "
                         "architecture overrides of this checkpoint; embeddings from it mean nothing")
    (folder / "RANDOM_WEIGHTS.txt").write_text("Randomly initialised: embeddings from this model mean nothing.\n")
    return over


def write_random_timm(folder: str | Path, arch: str = "vit_small_patch16_224", *, seed: int = 0) -> Path:
    """A random timm ViT of a known architecture as `model.safetensors` + `config.json` in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TimmViT(**{"img_size": 224, **ARCHS[arch]})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": arch}))
    (folder / "RANDOM_WEIGHTS.txt").write_text("Randomly initialised: embeddings from this model mean nothing.\n")
    return folder
