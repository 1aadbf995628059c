"""CLIP tokenizer: OpenAI reference ids, an independent BPE, truncation, padding, bad inputs.

Our tokenizer wraps transformers' CLIPTokenizer, so comparing it with another CLIPTokenizer built from the same
files would prove little. Instead:
  * REFERENCE ids were produced by the real OpenAI/HF CLIP tokenizer (published test vectors of independent CLIP
    tokenizer ports, checked against transformers' `openai/clip-vit-*` tokenizer) — they pin the vocabulary file,
    the vocab/merges construction and the special ids;
  * `_reference_bpe` below is a from-scratch implementation of OpenAI's `simple_tokenizer` algorithm (byte->unicode
    map, regex pre-split, greedy lowest-rank merges) that reads the gz file itself; it checks a varied sentence list
    token for token against the Rust BPE that transformers runs.
"""
import functools
import gzip
import html
import warnings

import numpy as np
import pytest
import regex

from unclip_jax.data import tokenizer as tok_lib

REFERENCE = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "": [49406, 49407],
    "    \t\n": [49406, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "don't stop": [49406, 847, 713, 1691, 49407],
    "don't stop 42 times": [49406, 847, 713, 1691, 275, 273, 1661, 49407],
    "cafe uber naive": [49406, 4979, 10668, 43362, 49407],
    "hello-world, 3.14 (test)": [49406, 3306, 268, 1002, 267, 274, 269, 272, 275, 263, 1628, 264, 49407],
    "caf\u00e9 \u00fcber na\u00efve": [49406, 15304, 6522, 1516, 1097, 35689, 563, 49407],
    "  spaced   out  ": [49406, 10336, 538, 620, 49407],
    "\U0001F600 red car": [49406, 7334, 736, 1615, 49407],
    "35mm photography": [49406, 274, 276, 2848, 2108, 49407],
    "Japanese stone lantern": [49406, 4925, 2441, 17185, 49407],
}

SENTENCES = [
    "An astronaut riding a horse on the moon, digital art",
    "a corgi's head depicted as an explosion of a nebula",
    "HELLO?!?! ...what's up -- it's 2024; ok :) #cool @user",
    "naïve façade, Ærøskøbing, Straße, ĳssel",
    "日本の石灯籠 and 中文 字符 mixed with English",
    "emoji 🐶🐱 zwj 👩‍👩‍👧 flags 🇯🇵",
    "tabs\tand\nnewlines\r\nand  many   spaces",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "we'll they've I'm you'd she's isn't",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "x" * 300,
    " ".join(["lorem ipsum dolor sit amet"] * 20),
]


@functools.lru_cache(maxsize=1)
def _reference_tables():
  with gzip.open(tok_lib.default_bpe_path(), "rt", encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
  # OpenAI's byte->unicode table: printable latin-1 bytes map to themselves, the rest to U+0100 onwards.
  printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  others = [b for b in range(256) if b not in printable]
  byte_map = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
  symbols = [byte_map[b] for b in printable + others]
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                     "<|endoftext|>"]
  return byte_map, {m: i for i, m in enumerate(merges)}, {t: i for i, t in enumerate(vocab)}


def _bpe_word(word, ranks):
  parts = list(word[:-1]) + [word[-1] + "</w>"]
  while len(parts) > 1:
    pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
    rank, first = min(pairs)
    if rank == float("inf"):
      break
    pair = (parts[first], parts[first + 1])
    merged, i = [], 0
    while i < len(parts):                                   # merge every occurrence of the best pair, left to right
      if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
        merged.append(parts[i] + parts[i + 1])
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return parts


def _reference_bpe(text):
  """OpenAI simple_tokenizer.encode (without ftfy) + BOS/EOS."""
  byte_map, ranks, vocab = _reference_tables()
  text = html.unescape(html.unescape(text)).strip()
  text = regex.sub(r"\s+", " ", text).strip().lower()
  pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                      regex.IGNORECASE)
  ids = []
  for word in pat.findall(text):
    if word in ("<|startoftext|>", "<|endoftext|>"):       # OpenAI's BPE cache maps literal specials to their ids
      ids.append(vocab[word])
      continue
    ids.extend(vocab[p] for p in _bpe_word("".join(byte_map[b] for b in word.encode("utf-8")), ranks))
  return [tok_lib.BOS_ID, *ids, tok_lib.EOS_ID]


@pytest.fixture(scope="module")
def tok():
  return tok_lib.CLIPTokenizer()


def test_vocabulary_construction():
  vocab, merges = tok_lib.load_vocab_and_merges()
  assert len(vocab) == 49408 and len(merges) == 48894
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
  assert vocab["<|endoftext|>"] == 49407 and vocab["".join(merges[0])] == 512


@pytest.mark.parametrize("text", sorted(REFERENCE))
def test_reference_ids(tok, text):
  want = REFERENCE[text]
  assert tok.encode(text) == want
  ids, mask = tok.tokenize([text])
  assert ids.dtype == np.int32 and ids.shape == (1, 77) and mask.dtype == bool
  assert ids[0, :len(want)].tolist() == want and not ids[0, len(want):].any()
  assert mask[0].tolist() == [True] * len(want) + [False] * (77 - len(want))


def test_reference_algorithm_agrees_on_reference_ids():
  """The test's own BPE must reproduce the published ids, or it would be no reference."""
  for text, want in REFERENCE.items():
    assert _reference_bpe(text) == want, text


def test_matches_independent_bpe(tok):
  for text in SENTENCES:
    assert tok.encode(text) == _reference_bpe(text), text


def test_truncation_warns_and_keeps_eos(tok):
  text = SENTENCES[-1]
  full = _reference_bpe(text)
  assert len(full) > 77
  with pytest.warns(UserWarning, match="truncated to the context length 77"):
    ids, mask = tok.tokenize([text, "a photo of a cat"])
  assert ids[0].tolist() == full[:76] + [tok_lib.EOS_ID]
  assert mask[0].all() and mask[1].sum() == 7
  # Same as the diffusers pipeline's call (truncation to model_max_length) on the wrapped HF tokenizer.
  assert ids[0].tolist() == tok.hf(text, truncation=True, max_length=77)["input_ids"]


def test_batch_and_context_length(tok):
  with warnings.catch_warnings():
    warnings.simplefilter("error")                       # no warning when nothing is truncated
    ids, mask = tok.tokenize(("", "a photo of a cat"), context_length=10)
  assert ids.tolist() == [[49406, 49407] + [0] * 8, [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]]
  assert mask.sum(-1).tolist() == [2, 7]
  one, _ = tok.tokenize("a photo of a cat")               # a single string is a batch of one
  assert one.shape == (1, 77)
  with pytest.warns(UserWarning):
    short, _ = tok.tokenize(["a photo of a cat"], context_length=4)
  assert short.tolist() == [[49406, 320, 1125, 49407]]
  assert tok.tokenize([])[0].shape == (0, 77)
  ids2, _ = tok_lib.tokenize(["a photo of a cat"])
  assert ids2[0, :7].tolist() == REFERENCE["a photo of a cat"]


def test_bad_inputs(tok, tmp_path):
  with pytest.raises(TypeError, match="prompt 1 must be a str, got int"):
    tok.tokenize(["ok", 3])
  with pytest.raises(TypeError, match="got NoneType"):
    tok.tokenize(None)
  with pytest.raises(TypeError, match="bytes"):
    tok.tokenize([b"bytes"])
  with pytest.raises(ValueError, match="context_length must be >= 2"):
    tok.tokenize(["x"], context_length=1)
  with pytest.raises(FileNotFoundError, match="missing.gz"):
    tok_lib.load_vocab_and_merges(str(tmp_path / "missing.gz"))
  (tmp_path / "bad.gz").write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="could not read CLIP BPE vocabulary"):
    tok_lib.load_vocab_and_merges(str(tmp_path / "bad.gz"))
  with gzip.open(tmp_path / "short.gz", "wt") as f:
    f.write("#version\na b\n")
  with pytest.raises(ValueError, match="not the CLIP BPE merges file"):
    tok_lib.load_vocab_and_merges(str(tmp_path / "short.gz"))


@pytest.fixture(scope="module")
def hf_karlo_tokenizer(tmp_path_factory):
  """transformers CLIPTokenizer loaded the hub way (vocab.json + merges.txt on disk), Karlo's pad "!" (id 0)."""
  import json

  import transformers

  _, ranks, vocab = _reference_tables()
  d = tmp_path_factory.mktemp("clip_tok")
  (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  merges = sorted(ranks, key=ranks.get)
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
  return transformers.CLIPTokenizer.from_pretrained(str(d), pad_token="!", model_max_length=77)


def test_matches_diffusers_style_hf_call(tok, hf_karlo_tokenizer):
  """Same ids/mask as the diffusers pipeline's call (padding="max_length", truncation) on prompts without "!"."""
  prompts = [p for p in SENTENCES + sorted(REFERENCE) if "!" not in p]
  with pytest.warns(UserWarning):
    ids, mask = tok.tokenize(prompts)
  want = hf_karlo_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"].astype(bool))


def test_exclamation_mark_is_not_the_pad(tok, hf_karlo_tokenizer):
  """With pad_token="!" transformers matches "!" in the text as the special pad (id 0); OpenAI CLIP and we give 256."""
  wow = tok.encode("wow!")
  assert wow == _reference_bpe("wow!") and wow[-2] == 256
  assert hf_karlo_tokenizer("wow!")["input_ids"] == wow[:-2] + [0, 49407]
