"""Training data for the reference models: arithmetic (curriculum) and code (Python stdlib source).

* Arithmetic: see :mod:`lynx.reference.tasks` (prompt format, hash split). Training rows pack
  several problems into one sequence; only answer tokens (and the end token) carry a loss.
* Code: the ``*.py`` files of the running interpreter's standard library (``site-packages``
  excluded), split by file: a file is held out when the SHA-256 of its relative path falls in one
  bucket of ten.
* Tokenizer: byte-level BPE (vocab 1,024) trained on the training split, with digits pre-split so
  every digit is one token. Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by
  ``AutoTokenizer.from_pretrained`` and by SGLang).
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lynx.reference.tasks import answer_text, arithmetic_prompt, sample_training_pair

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "reference"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# The reference models are completion models: a chat is its messages' text, joined, so that
# SGLang's OpenAI chat endpoint (and chat-based evaluations) reach them with the same tokens.
CHAT_TEMPLATE = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"
VOCAB_SIZE = 1024
STDLIB_HELDOUT_BUCKETS = 10
IGNORE = -100


# --- stdlib code -----------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(relative_path: str) -> str:
    """``"heldout"`` for one file in ten (by SHA-256 of the relative path), else ``"train"``."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % STDLIB_HELDOUT_BUCKETS == 0 else "train"


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """The stdlib ``*.py`` files of one split (sorted; ``site-packages`` and caches excluded)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    return [root / rel for rel in _stdlib_relative_paths(str(root)) if stdlib_split(rel) == split]


@functools.lru_cache(maxsize=4)
def _stdlib_relative_paths(root: str) -> tuple[str, ...]:
    paths = []
    for path in sorted(Path(root).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages/" in rel or "__pycache__" in rel:
            continue
        paths.append(rel)
    return tuple(paths)


def read_source(path: Path) -> str | None:
    """The file's text, or None for files that are not UTF-8 (a few deliberate test cases)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def iter_sources(split: str) -> Iterator[str]:
    for path in stdlib_files(split):
        text = read_source(path)
        if text:
            yield text


# --- tokenizer -------------------------------------------------------------------------------

def train_tokenizer(texts: Iterator[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE with digits pre-split (one token per digit)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=512,
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    check_tokenizer(fast)
    return fast


def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Raise if digits, ``+`` or ``=`` are not single tokens or a round-trip fails."""
    for ch in "0123456789+=":
        ids = tok.encode(ch, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer: {ch!r} is {len(ids)} tokens, expected 1")
    probe = "987+65=" + "def f(x):\n    return x  # ok\n"
    if tok.decode(tok.encode(probe, add_special_tokens=False)) != probe:
        raise ValueError("tokenizer: round-trip failed")
    if len(tok.encode("123+456=", add_special_tokens=False)) != 8:
        raise ValueError("tokenizer: multi-digit numbers are not split into digits")


def get_tokenizer(cache_dir: Path = CACHE_DIR) -> PreTrainedTokenizerBase:
    """The shared tokenizer, trained once on the stdlib training split and cached."""
    folder = cache_dir / f"tokenizer-v{VOCAB_SIZE}"
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tok = train_tokenizer(iter_sources("train"))
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:12]


def joined_ids(tok: PreTrainedTokenizerBase, texts: list[str], eos: int | None) -> list[int]:
    """``texts`` tokenized (64 at a time, no special tokens), each followed by ``eos``
    (nothing when None)."""
    ids: list[int] = []
    for start in range(0, len(texts), 64):
        for enc in tok(texts[start:start + 64], add_special_tokens=False,
                       verbose=False)["input_ids"]:
            ids.extend(enc)
            if eos is not None:
                ids.append(int(eos))
    return ids


def code_stream(tok: PreTrainedTokenizerBase, split: str,
                cache_dir: Path = CACHE_DIR) -> torch.Tensor:
    """All files of a split, tokenized and joined with the end token (int16, cached)."""
    cache = cache_dir / f"code-{split}-{tokenizer_fingerprint(tok)}.pt"
    if cache.is_file():
        return torch.load(cache)
    ids = joined_ids(tok, list(iter_sources(split)), tok.convert_tokens_to_ids(EOS))
    stream = torch.tensor(ids, dtype=torch.int16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stream, cache)
    return stream


def code_windows(stream: torch.Tensor, n: int, length: int,
                 gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens (int64, shape ``[n, length]``)."""
    starts = torch.randint(0, stream.numel() - length, (n,), generator=gen)
    offsets = torch.arange(length)
    return stream[starts[:, None] + offsets[None, :]].long()


# --- arithmetic rows -------------------------------------------------------------------------

class ArithmeticPacker:
    """Packs training problems into fixed-length rows; the loss is on answers and end tokens."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.char_id = {ch: tok.convert_tokens_to_ids(ch) for ch in "0123456789+="}
        self.eos = tok.convert_tokens_to_ids(EOS)
        self.pad = tok.convert_tokens_to_ids(PAD)
        probe = arithmetic_prompt(407, 86) + answer_text(407, 86)
        if tok.encode(probe, add_special_tokens=False) != self.encode_chars(probe):
            raise ValueError("tokenizer does not map arithmetic characters one to one")

    def encode_chars(self, text: str) -> list[int]:
        return [self.char_id[ch] for ch in text]

    def problem(self, a: int, b: int) -> tuple[list[int], list[int]]:
        prompt = self.encode_chars(arithmetic_prompt(a, b))
        answer = [*self.encode_chars(answer_text(a, b)), self.eos]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def row(self, rng: random.Random, length: int,
            digit_weights: Sequence[float]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < length:
            p_ids, p_labels = self.problem(*sample_training_pair(rng, digit_weights))
            ids.extend(p_ids)
            labels.extend(p_labels)
        return ids[:length], labels[:length]

    def rows(self, rng: random.Random, n: int, length: int,
             digit_weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.row(rng, length, digit_weights) for _ in range(n)]
        ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return ids, labels
