"""Caption tokenizers (`config.tokenizer.kind`), and the sentencepiece-training command.

- 'sentencepiece' (default): a BPE sentencepiece model, the config's `tokenizer.model` or one
  trained on the training captions (`Tokenizer`, `train_tokenizer`).
- 'clip_bpe': CLIP's 49,408-token BPE, as the RILS paper and release (rils_jax/clip_bpe.py).

Both have `kind`, `vocab_size`, `eot_id`, `pad_id`, `model_path` (the one file that rebuilds
them: the .model, or CLIP's bpe_simple_vocab_16e6.txt.gz) and `encode(captions, context_length)`
-> int32 rows; `load(path)` opens either from its file.

Train a sentencepiece model on caption files (CSV with a `caption` column, COCO captions JSON,
or plain text with one caption per line):

  python -m rils_jax.tokenizer train --captions=../shared/data/flickr8k_1k/captions.csv \
      --vocab_size=2000 --out=/tmp/flickr.model

Models trained here reserve id 0 for padding, 1 for unknown pieces and 2 for end-of-text; there
is no start token (the text tower pools the end-of-text feature, CLIP-style).
"""

import csv
import gzip
import hashlib
import io
import json
import os
from typing import Iterable, List, Sequence, Union

import numpy as np
import sentencepiece as spm
from absl import app
from absl import flags

from rils_jax import clip_bpe
from rils_jax import console
from rils_jax.data import records

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
KINDS = ('sentencepiece', 'clip_bpe')
# The run's tokenizer file in its workdir, by kind.
FILE_NAMES = {'sentencepiece': 'tokenizer.model', 'clip_bpe': 'tokenizer_clip_bpe.txt.gz'}
_GZIP_MAGIC = b'\x1f\x8b'  # CLIP's vocabulary is gzipped; a sentencepiece model is a protobuf.


class Tokenizer:
  """A sentencepiece model that maps captions to fixed-length id rows ending in end-of-text.

  Raises:
    FileNotFoundError: if `model_path` does not exist.
    ValueError: if the model has no end-of-text id.
  """

  kind = 'sentencepiece'

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f'sentencepiece model not found: {model_path}')
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if self._sp.eos_id() < 0:
      raise ValueError(f'{model_path} has no end-of-text (eos) id; train it with '
                       '`python -m rils_jax.tokenizer train`')

  def __getstate__(self):  # grain workers receive a path, not the C++ object.
    return {'model_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['model_path'])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def eot_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return max(self._sp.pad_id(), 0)

  def encode(self, captions: Sequence[str], context_length: int) -> np.ndarray:
    """Tokenises captions into int32 (len(captions), context_length).

    Each row is the caption's pieces, truncated to `context_length - 1`, then end-of-text, then
    padding; the end-of-text token is always present. Captions longer than 32 characters per
    token are cut at a space before encoding: sentencepiece pieces are at most 16 characters by
    default, so the kept pieces are the same, and a megabyte-long caption costs microseconds
    instead of 0.35 s.
    """
    out = np.full((len(captions), context_length), self.pad_id, np.int32)
    limit = 32 * context_length
    captions = [_cut(c, limit) for c in captions]
    # sentencepiece encodes a list on a new thread pool per call: 0.2 ms, 10 times the cost of
    # a caption, for the one-caption calls of the training pipeline.
    batch = [self._sp.encode(captions[0])] if len(captions) == 1 else self._sp.encode(captions)
    for row, ids in enumerate(batch):
      ids = ids[:context_length - 1] + [self.eot_id]
      out[row, :len(ids)] = ids
    return out


def _cut(text: str, limit: int) -> str:
  if len(text) <= limit:
    return text
  space = text.rfind(' ', limit // 2, limit)
  return text[:space if space > 0 else limit]


AnyTokenizer = Union[Tokenizer, clip_bpe.ClipBpeTokenizer]
find_clip_vocab = clip_bpe.find_vocab


def check_config(config) -> None:
  """Checks `config.tokenizer` (kind, and that only the kind's own keys are set).

  Raises:
    ValueError: for an unknown kind, or a key of the other kind.
  """
  kind = config.kind
  if kind not in KINDS:
    raise ValueError(f'config.tokenizer.kind={kind!r} must be one of {KINDS}')
  if kind == 'clip_bpe' and config.model:
    raise ValueError(f'config.tokenizer.model={config.model!r} is a sentencepiece model, but '
                     "config.tokenizer.kind='clip_bpe'; drop one of them")
  if kind == 'sentencepiece' and config.get('clip_vocab'):
    raise ValueError(f'config.tokenizer.clip_vocab={config.clip_vocab!r} applies to '
                     "config.tokenizer.kind='clip_bpe' (the kind is 'sentencepiece')")


def kind_of(data: bytes) -> str:
  """'clip_bpe' for (gzipped) CLIP vocabulary bytes, else 'sentencepiece'."""
  return 'clip_bpe' if data[:2] == _GZIP_MAGIC else 'sentencepiece'


def fingerprint(data: bytes) -> str:
  """sha256 of a tokenizer file's content: of the model bytes, or of CLIP's vocabulary text
  (not of its gzip container, whose header differs between copies of the same text)."""
  if kind_of(data) == 'clip_bpe':
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ValueError(f'a damaged gzip file where CLIP\'s vocabulary was expected: {e}') from e
  return hashlib.sha256(data).hexdigest()


def load(path: str) -> AnyTokenizer:
  """The tokenizer of a file: a sentencepiece .model, or CLIP's bpe_simple_vocab_16e6.txt.gz.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if it is not a usable tokenizer of its kind.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer file not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(2)
  if kind_of(head) == 'clip_bpe':
    return clip_bpe.ClipBpeTokenizer(path)
  return Tokenizer(path)


def read_captions(path: str) -> List[str]:
  """All captions of a file: CSV (`caption` column), COCO captions JSON, or text (one per line).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if a CSV has no `caption` column or a JSON has no `annotations`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'caption file not found: {path}')
  if path.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    if 'annotations' not in data:
      raise ValueError(f'{path} is not a COCO captions file (no "annotations")')
    return [str(a.get('caption', '')) for a in data['annotations']]
  text, _ = records.read_text(path)
  if path.endswith('.csv'):
    reader = csv.DictReader(io.StringIO(text, newline=''))
    if 'caption' not in (reader.fieldnames or []):
      raise ValueError(f'{path} has no "caption" column (columns: {reader.fieldnames})')
    return [row['caption'] or '' for row in reader]
  return text.splitlines()


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_path: str) -> str:
  """Trains a BPE sentencepiece model (BPE as CLIP; unigram collapses to characters on small
  caption sets) on captions and writes it to `out_path`.

  `vocab_size` is an upper bound: small corpora get fewer pieces instead of an error.

  Returns:
    `out_path`.

  Raises:
    ValueError: if there is no non-empty caption.
  """
  sentences = [c.strip() for c in captions if c and c.strip()]
  if not sentences:
    raise ValueError('no non-empty caption to train a tokenizer on')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type='bpe', character_coverage=1.0, hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, normalization_rule_name='nmt_nfkc_cf',
      max_sentence_length=4096, num_threads=os.cpu_count() or 1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)  # Never leave a half-written model behind.
  return out_path


def _define_flags():
  # Defined only when run as a command, so importing this module adds no flags to other tools.
  flags.DEFINE_list('captions', [], 'Caption files (.csv with a caption column, COCO .json, .txt).')
  flags.DEFINE_integer('vocab_size', 8000, 'Maximum number of pieces.')
  flags.DEFINE_string('out', None, 'Output .model path.')


def main(argv):
  if len(argv) != 2 or argv[1] != 'train':
    raise app.UsageError('usage: python -m rils_jax.tokenizer train --captions=F[,F...] '
                         '--vocab_size=N --out=PATH')
  f = flags.FLAGS
  if not f.captions or not f.out:
    raise app.UsageError('--captions and --out are required')
  captions = [c for path in f.captions for c in read_captions(path)]  # Errors: console.run.
  train_tokenizer(captions, f.vocab_size, f.out)
  tok = Tokenizer(f.out)
  print(json.dumps(dict(out=f.out, vocab_size=tok.vocab_size, eot_id=tok.eot_id,
                        captions=sum(1 for c in captions if c.strip()))))


if __name__ == '__main__':
  _define_flags()
  console.run(main)
