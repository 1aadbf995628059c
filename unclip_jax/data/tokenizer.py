"""CLIP BPE tokenizer: transformers `CLIPTokenizer` built from the shipped OpenAI vocabulary (docs/layouts.md,
"Tokenizer").

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, see `assets/LICENSE-clip-bpe.txt`). At load time:
  merges = lines[1:48895]                                       (48 894 merges; line 0 is a version header)
  vocab  = 256 byte-unicode symbols + the same with "</w>" + "".join(merge) for each merge
           + ["<|startoftext|>", "<|endoftext|>"]             (49 408 ids; BOS 49406, EOS 49407)
Padding uses id 0 ("!") as Karlo/diffusers do. Output ids are `[BOS, tokens..., EOS, pad...]`, truncated to the
context length with EOS kept last; the mask is True on BOS..EOS.

Padding is done here, not by transformers: registering "!" as the HF `pad_token` makes it an added special token,
which transformers then matches inside prompts, so "wow!" would encode "!" as 0 (the pad) instead of OpenAI's
256 ("!</w>"). The wrapped HF tokenizer therefore keeps its default pad token and never pads.
"""
from __future__ import annotations

import gzip
import importlib.resources
import logging
import warnings
from typing import Sequence

import numpy as np

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894                 # 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "!"
BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0
CONTEXT_LENGTH = 77

log = logging.getLogger(__name__)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable unicode map (256 entries, printable bytes map to themselves)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars = list(keep)
  extra = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, map(chr, chars)))


def default_bpe_path() -> str:
  return str(importlib.resources.files("unclip_jax") / "assets" / BPE_FILE)


def load_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Builds (vocab token -> id, merges) from the OpenAI BPE file.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a gzipped CLIP BPE merges list of the expected size.
  """
  path = bpe_path or default_bpe_path()
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}") from None
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"could not read CLIP BPE vocabulary {path}: {e}") from e
  raw = lines[1:NUM_MERGES + 1]
  merges = [tuple(m.split()) for m in raw]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path} is not the CLIP BPE merges file (expected {NUM_MERGES} two-symbol merges)")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE:
    raise ValueError(f"{path}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
  return vocab, merges


class CLIPTokenizer:
  """prompts -> fixed-length ids and masks, via transformers' (Rust-backed) CLIPTokenizer."""

  def __init__(self, bpe_path: str | None = None, context_length: int = CONTEXT_LENGTH):
    import transformers  # runtime dependency, imported lazily

    vocab, merges = load_vocab_and_merges(bpe_path)
    self.context_length = context_length
    # No pad_token="!" here (see the module docstring); we pad with PAD_ID ourselves.
    self.hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
    ids = (self.hf.bos_token_id, self.hf.eos_token_id, self.hf.convert_tokens_to_ids(PAD_TOKEN))
    if ids != (BOS_ID, EOS_ID, PAD_ID):
      raise RuntimeError(f"unexpected special ids (bos, eos, pad) = {ids}")

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  def encode(self, prompt: str) -> list[int]:
    """One prompt -> [BOS, ..., EOS] without truncation or padding."""
    _check_prompts([prompt])
    return list(self.hf(prompt)["input_ids"])

  def __call__(self, prompts: str | Sequence[str], context_length: int | None = None):
    return self.tokenize(prompts, context_length)

  def tokenize(self, prompts: str | Sequence[str], context_length: int | None = None):
    """Tokenizes a prompt or a list of prompts.

    Args:
      prompts: a string or a sequence of strings ("" is the CFG unconditional prompt: [BOS, EOS, pad...]).
      context_length: output length (default: the tokenizer's, 77). Must be >= 2.
    Returns:
      ids int32 [B, L] (pad id 0) and mask bool [B, L] (True on BOS..EOS). Longer prompts are truncated to
      L-2 tokens + BOS/EOS with a warning.
    Raises:
      TypeError: a prompt is not a string.
    """
    length = context_length or self.context_length
    if length < 2:
      raise ValueError(f"context_length must be >= 2 (BOS and EOS), got {length}")
    if isinstance(prompts, str):
      prompts = [prompts]
    _check_prompts(prompts)
    ids = np.full((len(prompts), length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    encoded = self.hf(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    for i, toks in enumerate(encoded):
      if len(toks) > length - 2:
        msg = (f"prompt {i} has {len(toks)} tokens; truncated to the context length {length} "
               f"({len(toks) - (length - 2)} tokens dropped): {prompts[i][:60]!r}...")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        toks = toks[:length - 2]
      row = [BOS_ID, *toks, EOS_ID]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = True
    return ids, mask


def _check_prompts(prompts) -> None:
  if not isinstance(prompts, (list, tuple)):
    raise TypeError(f"prompts must be a str or a list/tuple of str, got {type(prompts).__name__}")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r}")


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH):
  """One-off shortcut: ids int32 [B, L], mask bool [B, L] with the shipped vocabulary.

  Builds a tokenizer per call (~0.5 s); code that tokenizes repeatedly should hold a `CLIPTokenizer`.
  """
  return CLIPTokenizer(context_length=context_length).tokenize(prompts, context_length)
