"""CLIP's byte-level BPE tokenizer (49,408 tokens), the one the RILS paper and release use.

The ids equal open_clip's `SimpleTokenizer` (`open_clip.get_tokenizer('ViT-B-16')`, itself
OpenAI CLIP's `simple_tokenizer.py`), checked by tests/test_tokenizer.py:

  text -> ftfy.fix_text -> html.unescape twice -> whitespace runs collapsed to one space,
  stripped -> lower-cased -> pieces of CLIP's regex (contractions, letter runs, single digits,
  punctuation runs) -> each piece's UTF-8 bytes mapped to CLIP's byte alphabet, BPE with `</w>`
  on the piece's last symbol -> [49406 start-of-text] + ids + [49407 end-of-text], cut to the
  context with the last token forced to end-of-text, padded with 0.

The cleaning is open_clip's (Python); the regex split and the BPE run in HuggingFace
`tokenizers` (Rust), built here from CLIP's vocabulary and merges, read from
`bpe_simple_vocab_16e6.txt.gz`: the copy inside an installed open_clip_torch package (found
without importing it: open_clip imports torch) or a path given as `config.tokenizer.clip_vocab`.

Where Oniguruma (tokenizers' regex engine) and the `regex` module (open_clip's) differ, the
pattern or the cleaning compensate: open_clip's pattern is case-insensitive, which after
lower-casing only makes `'ſ` a contraction (spelled out here) and leaves U+0345 (combining
ypogegrammeni, whose case variant is a letter) matched by no alternative, i.e. a separator
(replaced by a space here). A sweep of every code point alone and beside letters, digits and
punctuation finds no other difference but 17,480 code points assigned in Unicode 15 or later
(19 in the Basic Multilingual Plane, e.g. U+0C5C; 15,626 CJK ideographs of plane 3), which the
`regex` module classifies as letters and Oniguruma does not yet.
"""

import gzip
import html
import importlib.util
import os
import re
from typing import Dict, List, Sequence, Tuple

import ftfy
import numpy as np
import tokenizers

VOCAB_FILE = 'bpe_simple_vocab_16e6.txt.gz'
# CLIP's simple_tokenizer.py: merges = lines[1:49152 - 256 - 2 + 1] (line 0 is a version).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # Bytes, bytes + </w>, merges, start / end of text.
SOT_ID, EOT_ID, PAD_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1, 0
SPECIALS = {'<start_of_text>': SOT_ID, '<end_of_text>': EOT_ID}
INSTALL_HINT = ('pip install --no-deps open_clip_torch==3.3.0 (a 1.5 MB wheel; torch is not '
                'needed) or set --config.tokenizer.clip_vocab=PATH/' + VOCAB_FILE)

# open_clip's pattern without its special-token alternatives; `'ſ` is what re.IGNORECASE adds
# to the contractions once the text is lower-cased.
_PIECES = r"""'s|'ſ|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# For the rare text holding a special token's spelling; `<ſtart_of_text>` is a match of the
# case-insensitive pattern that is not the special token (its bytes are BPE-encoded).
_SPECIAL_PIECES = '<start_of_text>|<end_of_text>|<ſtart_of_text>|' + _PIECES
_SPECIAL_HINT = '_of_text>'  # In every spelling above, and rarely elsewhere.
# Piece boundaries in cleaned text: no piece holds a space, and every digit is its own piece.
_BOUNDARY = re.compile('[ 0-9]')


def bytes_to_unicode() -> Dict[int, str]:
  """CLIP's (= GPT-2's) byte -> printable character table, in CLIP's order (the order of the
  first 256 token ids). From openai/CLIP clip/simple_tokenizer.py."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
  """open_clip's `_clean_lower` (ftfy, html.unescape twice, whitespace collapsed, stripped,
  lower-cased), with U+0345 made a separator (see the module docstring)."""
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower().replace('\u0345', ' ')


def find_vocab(path: str = '') -> str:
  """The path of CLIP's `bpe_simple_vocab_16e6.txt.gz`: `path` when given, else the copy
  inside the installed open_clip_torch package (located without importing open_clip).

  Raises:
    FileNotFoundError: if `path` is not a file, or no open_clip package holds the vocabulary.
  """
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config.tokenizer.clip_vocab={path!r} is not a file; give the '
                              f'path of CLIP\'s {VOCAB_FILE}')
    return path
  try:
    spec = importlib.util.find_spec('open_clip')
  except (ImportError, ValueError):
    spec = None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(folder, VOCAB_FILE)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'CLIP\'s BPE vocabulary ({VOCAB_FILE}, config.tokenizer.kind='
                          f'\'clip_bpe\') was not found: {INSTALL_HINT}')


def read_vocab(path: str) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """CLIP's token -> id map (49,408 entries) and its BPE merges, in rank order, from `path`
  (CLIP's simple_tokenizer.py builds them the same way).

  Raises:
    ValueError: if `path` is not a gzip file of at least 48,894 merges of two symbols each.
  """
  try:
    with gzip.open(path) as f:
      lines = f.read().decode('utf-8').split('\n')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not CLIP\'s {VOCAB_FILE} (a gzip text file): {e}') from e
  merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f'{path} is not CLIP\'s {VOCAB_FILE}: expected {NUM_MERGES} merges of '
                     'two symbols after its first line')
  alphabet = list(bytes_to_unicode().values())
  tokens = alphabet + [c + '</w>' for c in alphabet] + [a + b for a, b in merges] + list(SPECIALS)
  return {t: i for i, t in enumerate(tokens)}, merges


class ClipBpeTokenizer:
  """CLIP's BPE tokenizer with the interface of `rils_jax.tokenizer.Tokenizer`.

  Pickles as its vocabulary path (grain's worker processes rebuild it, in about 0.2 s).

  Raises:
    FileNotFoundError, ValueError: see `find_vocab` and `read_vocab`.
  """

  kind = 'clip_bpe'
  vocab_size = VOCAB_SIZE
  eot_id = EOT_ID
  sot_id = SOT_ID
  pad_id = PAD_ID

  def __init__(self, vocab_path: str):
    self.model_path = find_vocab(vocab_path)
    vocab, merges = read_vocab(self.model_path)
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, end_of_word_suffix='</w>',
                                  fuse_unk=False)
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # No normalizer: `clean` does open_clip's cleaning in Python, where it is defined.
    self._tokenizer = tokenizers.Tokenizer(model)
    self._tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(_PIECES), behavior='removed',
                                        invert=True), byte_level])
    # Texts that spell a special token: split by the special-aware pattern, then each piece
    # BPE-encoded as one word.
    self._special_split = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(_SPECIAL_PIECES), behavior='removed', invert=True)
    self._words = tokenizers.Tokenizer(model)
    self._words.pre_tokenizer = byte_level

  def __getstate__(self):  # grain workers receive a path, not the Rust objects.
    return {'vocab_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['vocab_path'])

  def encode(self, captions: Sequence[str], context_length: int) -> np.ndarray:
    """Tokenises captions into int32 (len(captions), context_length), as open_clip.

    Each row is start-of-text, the caption's BPE ids, end-of-text, then padding; a row that
    does not fit is cut to `context_length` and its last token set to end-of-text.

    A caption over 16 characters per context position is cut before encoding where that keeps
    its row (`_long_ids`): a megabyte caption of several lines, or of ASCII, costs a
    millisecond. A long non-ASCII line is cleaned whole (ftfy decides per line), about 1 s/MB.

    Raises:
      ValueError: if `context_length` < 1.
    """
    if context_length < 1:
      raise ValueError(f'context_length={context_length} must be >= 1')
    limit = 16 * context_length
    ids = [None] * len(captions)
    short = [i for i, c in enumerate(captions) if len(c) <= limit]
    for i, row_ids in zip(short, self._ids([clean(captions[i]) for i in short])):
      ids[i] = row_ids
    for i, caption in enumerate(captions):
      if ids[i] is None:
        ids[i] = self._long_ids(caption, context_length - 1, limit)
    out = np.full((len(captions), context_length), PAD_ID, np.int32)
    for row, row_ids in enumerate(ids):
      tokens = [SOT_ID] + row_ids
      tokens = tokens[:context_length - 1] + [EOT_ID]  # open_clip: cut, last = end-of-text.
      out[row, :len(tokens)] = tokens
    return out

  def _ids(self, texts: List[str]) -> List[List[int]]:
    """BPE ids of cleaned texts (no start / end of text)."""
    plain = [i for i, t in enumerate(texts) if _SPECIAL_HINT not in t]
    out = [None] * len(texts)
    encodings = self._tokenizer.encode_batch_fast([texts[i] for i in plain],
                                                  add_special_tokens=False)
    for i, encoding in zip(plain, encodings):
      out[i] = encoding.ids
    for i, text in enumerate(texts):
      if out[i] is None:
        out[i] = self._ids_with_specials(text)
    return out

  def _ids_with_specials(self, text: str) -> List[int]:
    # open_clip's pattern matches `<start_of_text>` / `<end_of_text>` where a piece starts
    # (not inside a punctuation run: `(<end_of_text>` is plain text), and maps them to their ids.
    ids, words = [], []
    for piece, _ in self._special_split.pre_tokenize_str(text) + [(None, None)]:
      if piece is not None and piece not in SPECIALS:
        words.append(piece)
        continue
      if words:
        ids += self._words.encode(words, is_pretokenized=True, add_special_tokens=False).ids
        words = []
      if piece is not None:
        ids.append(SPECIALS[piece])
    return ids

  def _long_ids(self, caption: str, need: int, limit: int) -> List[int]:
    """The BPE ids of a long caption, or at least its first `need` ones.

    The caption is cut twice at places where cutting changes nothing before the cut: the raw
    text (before ftfy, whose cost grows with the text and whose decisions are per line) after
    a line break, or at a space of an ASCII line without '&' (where ftfy and html.unescape act
    on single characters or space-free sequences); the cleaned text at a space or before a
    digit (piece boundaries, and BPE never crosses pieces). The ids of the cut text are then a
    prefix of the whole text's; if there are fewer than `need` of them (the row might not be
    full), the cut moves 4 times further.
    """
    start = limit
    while True:
      raw = _raw_cut(caption, start)
      cleaned = clean(caption[:raw])
      cut = _BOUNDARY.search(cleaned, start) if len(cleaned) > start else None
      text = cleaned[:cut.start()] if cut else cleaned
      ids = self._ids([text])[0]
      if len(ids) >= need or (raw == len(caption) and text is cleaned):
        return ids
      start *= 4


def _raw_cut(text: str, start: int) -> int:
  """A position >= `start` where `text` may be cut before cleaning (see `_long_ids`), or
  len(text)."""
  if len(text) <= start:
    return len(text)
  newline = text.find('\n', start)
  line_end = newline if newline >= 0 else len(text)
  line = text[text.rfind('\n', 0, start) + 1:line_end]
  if line.isascii() and '&' not in line:
    space = text.find(' ', start, line_end)
    if space >= 0:
      return space
  return newline + 1 if newline >= 0 else len(text)
