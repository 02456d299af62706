"""Text tokenizers read from a local `tokenizer.json`-style file with the `tokenizers` package.

Both CONCH (a byte-level BPE with <start_of_text>/<end_of_text> added by the file's template) and
CLIP (the HF `tokenizer.json` of any CLIP model: the same 49,408-token BPE that open_clip uses)
ship their tokenizer as such a file. The file's own normaliser, pre-tokeniser and template add
the special tokens; here we only fix the context length (truncation keeps the end token) and pad
with the model's pad id, as the models' own tokenize functions do. Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import EncoderError


def _offline() -> None:
    # `tokenizers` imports huggingface_hub; make sure nothing reaches for the network from here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class FileTokenizer:
    """texts -> LongTensor (n, context_length): encode with the file's template, truncate to
    `context_length` (special tokens included), right-pad with `pad_id`."""

    def __init__(self, path: str | os.PathLike, *, context_length: int, pad_id: int, what: str = "tokenizer"):
        _offline()
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise EncoderError(f"{what}: the 'tokenizers' package is needed for text (pip install tokenizers)") from e
        self.path = Path(path)
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"{what}: cannot read tokenizer file {self.path} ({type(e).__name__}: {e})") from e
        self.context_length, self.pad_id = int(context_length), int(pad_id)
        tok.no_truncation()
        tok.no_padding()
        tok.enable_truncation(max_length=self.context_length)
        tok.enable_padding(length=self.context_length, pad_id=self.pad_id,
                           pad_token=tok.id_to_token(self.pad_id) or "<pad>")
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self._tok.encode_batch(list(texts), add_special_tokens=True)
        return torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(enc), self.context_length)


__all__ = ["FileTokenizer"]
