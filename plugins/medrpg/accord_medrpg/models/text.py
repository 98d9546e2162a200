"""Text branch of TransVG: BERT (``transformers``) with a WordPiece tokenizer (``tokenizers``).

Either ``bert-base-uncased`` from a local folder (its ``vocab.txt`` and ``config.json``; weights
through :func:`accord_medrpg.weights.load_bert`), or a ``BertConfig`` with a vocabulary trained on
the data's phrases (:func:`train_vocabulary`) when no BERT is at hand. The vocabulary and the BERT
config travel in the checkpoint's ``model_options`` so that ``load_run`` rebuilds the tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from torch import nn
from transformers import BertConfig, BertModel

__all__ = ["SPECIAL_TOKENS", "MARKER", "train_vocabulary", "read_bert_folder", "PhraseTokenizer", "TextEncoder"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: Delimits the grounded span inside a longer text for TaCo's ``marker`` pooling (bert-base-uncased id 1008).
MARKER = "*"


def train_vocabulary(phrases: Iterable[str], vocab_size: int = 2000) -> list[str]:
    """A lower-cased WordPiece vocabulary of ``phrases``: special tokens (``[PAD]`` = 0), every character
    alone and as a ``##`` continuation, then whole words by frequency (ties alphabetical) up to
    ``vocab_size`` tokens; any word tokenizes (a word not kept falls back to its characters).

    Built here rather than by ``tokenizers``' WordPiece trainer because that trainer breaks ties
    between equally frequent merges in hash order: two runs on the same phrases got different
    vocabularies, hence different BERT initialisations, which broke bit-exact reruns. Words are split
    with BERT's own normaliser and pre-tokenizer, as :class:`PhraseTokenizer` splits them.
    """
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for phrase in phrases
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(phrase)))
    characters = sorted({character for word in counts for character in word})
    head = [*SPECIAL_TOKENS, *characters, *(f"##{character}" for character in characters)]
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(word) > 1]
    return head + words[:max(0, vocab_size - len(head))]


def read_bert_folder(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """``(vocabulary, config dict)`` of a local BERT folder (``vocab.txt``, ``config.json``).

    Raises:
        ValueError: a file is missing or the config is not a BERT config.
    """
    path = Path(path)
    vocab_file, config_file = path / "vocab.txt", path / "config.json"
    for required in (vocab_file, config_file):
        if not required.is_file():
            raise ValueError(f"{required}: missing; a BERT folder (e.g. bert-base-uncased) needs vocab.txt, "
                             "config.json and model.safetensors or pytorch_model.bin")
    vocabulary = vocab_file.read_text(encoding="utf-8").splitlines()
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "bert":
        raise ValueError(f"{config_file}: model_type must be 'bert', got {config.get('model_type')!r}")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
            "hidden_dropout_prob", "attention_probs_dropout_prob")
    return vocabulary, {key: config[key] for key in keys if key in config}


class PhraseTokenizer:
    """BERT WordPiece tokenisation as the reference: ``[CLS] + tokens[:L-2] + [SEP]``, zero-padded to L.

    Args:
        vocabulary: tokens in id order (must hold the :data:`SPECIAL_TOKENS`).
        max_length: ``L`` (the reference: 20).
    """

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        missing = [token for token in SPECIAL_TOKENS[:4] if token not in vocabulary]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}")
        self.tokenizer = BertWordPieceTokenizer({token: index for index, token in enumerate(vocabulary)},
                                                lowercase=True)
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=vocabulary.index("[PAD]"))
        self.max_length = max_length
        self.marker_id = vocabulary.index(MARKER) if MARKER in vocabulary else None

    def __call__(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids (B, L) long, attention mask (B, L) long, 1 = real token)``."""
        if isinstance(phrases, str):
            raise TypeError("phrases must be a list of strings, got one str")
        encodings = self.tokenizer.encode_batch(list(phrases))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def marker_span(self, phrases: Sequence[str]) -> torch.Tensor:
        """``(B, L)`` bool: True on the tokens strictly between each phrase's first two ``*`` markers.

        Raises:
            ValueError: the vocabulary has no ``*``, or a phrase (named) has fewer than two markers
                within its first ``L - 2`` tokens, or none between them.
        """
        if self.marker_id is None:
            raise ValueError(f"text_pool 'marker': the vocabulary has no {MARKER!r} token; mark the grounded span of "
                             f"every training phrase as 'text *span* text'")
        ids, _ = self(phrases)
        is_marker = ids == self.marker_id
        seen = is_marker.cumsum(1)
        span = (seen == 1) & ~is_marker
        for phrase, markers, row in zip(phrases, seen[:, -1].tolist(), span):
            if markers < 2 or not row.any():
                problem = ("has fewer than two" if markers < 2 else "has no token between its first two")
                raise ValueError(f"phrase {phrase!r}: {problem} {MARKER!r} markers within its first "
                                 f"{self.max_length - 2} tokens (text_pool 'marker' pools the tokens between them)")
        return span


class TextEncoder(nn.Module):
    """Tokenizer + ``BertModel`` (no pooler): phrases -> ``last_hidden_state`` and the padding mask.

    Args:
        vocabulary: WordPiece tokens in id order.
        bert_config: ``BertConfig`` keyword arguments (``vocab_size`` is set from the vocabulary).
        max_length: tokens per phrase incl. ``[CLS]`` and ``[SEP]``.
    """

    def __init__(self, vocabulary: Sequence[str], bert_config: dict[str, Any], max_length: int) -> None:
        super().__init__()
        self.tokenizer = PhraseTokenizer(vocabulary, max_length)
        config = BertConfig(**{**bert_config, "vocab_size": len(vocabulary)})
        self.bert = BertModel(config, add_pooling_layer=False)
        self.width = config.hidden_size

    def forward(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, L, hidden), padding mask (B, L) bool, True = padding)``."""
        device = self.bert.embeddings.word_embeddings.weight.device
        ids, mask = self.tokenizer(phrases)
        ids, mask = ids.to(device), mask.to(device)
        output = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        return output.last_hidden_state, ~mask.bool()
