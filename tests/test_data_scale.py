"""Data at scale: WebDataset shards, ArrayRecord conversion, TFDS, mixtures, per-record sharding
across processes, resumable streams with device prefetch, reduced-size JPEG decoding and the
input benchmark, on small fixtures written in temporary folders."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import grain
import jax
import msgpack
import numpy as np
import pytest
from PIL import Image

from rils_jax import config_lib
from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import arrayrecord
from rils_jax.data import benchmark
from rils_jax.data import convert
from rils_jax.data import pipeline
from rils_jax.data import records
from rils_jax.data import shards
from rils_jax.data import sources
from rils_jax.data import transforms
from rils_jax.data import webdataset


def _jpeg(seed: int, size=(24, 16)) -> bytes:
  rng = np.random.default_rng(seed)
  out = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, 'JPEG')
  return out.getvalue()


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def wds(tmp_path_factory):
  """3 shards of 5 samples (img2dataset layout: KEY.jpg, KEY.txt, KEY.json) plus one sample
  without a caption, one without an image and one with corrupt image bytes.

  Returns (folder, the expected [(key, image bytes, caption)] in order)."""
  folder = tmp_path_factory.mktemp('wds')
  expected = []
  for s in range(3):
    with tarfile.open(folder / f'shard-{s:03d}.tar', 'w') as tar:
      for i in range(5):
        key, n = f'{s:03d}{i:04d}', s * 5 + i
        image = b'not a jpeg' if n == 7 else _jpeg(n)
        caption = f'caption number {n}'
        _add(tar, f'{key}.jpg', image)
        _add(tar, f'{key}.txt', caption.encode())
        _add(tar, f'{key}.json', json.dumps({'key': key}).encode())
        expected.append((key, image, caption))
      _add(tar, f'{s:03d}9998.jpg', _jpeg(99))        # No caption.
      _add(tar, f'{s:03d}9999.txt', b'caption only')  # No image.
  return folder, expected


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tok.model')
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(
      [f'caption number {i}' for i in range(40)] + ['a photo of a red box'] * 5, 64, path))


def _stream(data, tokenizer, batches, **kwargs):
  kwargs = dict(dict(image_size=16, context_length=8, batch_size=4, seed=3), **kwargs)
  it = iter(pipeline.make_train_dataset(data, tokenizer, **kwargs))
  return [next(it) for _ in range(batches)]


def test_shard_patterns_expand_braces_and_globs(wds, tmp_path):
  folder, _ = wds
  names = [str(folder / f'shard-{s:03d}.tar') for s in range(3)]
  assert shards.expand(f'{folder}/shard-{{000..002}}.tar') == names
  assert shards.expand(f'{folder}/shard-*.tar') == names
  assert shards.expand(f'{folder}/shard-{{002,000}}.tar') == [names[2], names[0]]
  assert shards.expand([f'{folder}/shard-000.tar', f'{folder}/shard-00[01].tar']) == names[:2]
  with pytest.raises(ValueError, match='matches no file'):
    shards.expand(f'{tmp_path}/none-*.tar')


def test_webdataset_shards_are_read_back_exactly(wds):
  folder, expected = wds
  source = sources.open_source(dict(kind='webdataset', files=f'{folder}/shard-{{000..002}}.tar'))
  assert len(source) == 15
  got = [source[i] for i in range(15)]
  assert [g.key.rsplit(':', 1)[1] for g in got] == [k for k, _, _ in expected]
  assert [g.image for g in got] == [image for _, image, _ in expected]
  assert [g.captions for g in got] == [(caption,) for _, _, caption in expected]
  assert source.stats.images_without_caption == 3 and source.stats.captions_without_image == 3
  # A grain worker gets a pickled copy without the index, and rebuilds it on first read.
  copy = pickle.loads(pickle.dumps(source))
  assert not copy._indices and copy[11] == got[11]
  selected = sources.open_source(dict(kind='webdataset', files=f'{folder}/shard-*.tar',
                                      select='-5:'))
  assert [selected[i] for i in range(5)] == got[-5:]


def test_webdataset_errors_are_clear(wds, tmp_path):
  folder, _ = wds
  with pytest.raises(FileNotFoundError, match='shard not found'):
    webdataset.WebDatasetSource(str(tmp_path / 'missing-{0..1}.tar'))
  (tmp_path / 'junk.tar').write_bytes(b'x' * 2000)
  with pytest.raises(ValueError, match='not an uncompressed tar'):
    webdataset.WebDatasetSource(str(tmp_path / 'junk.tar'))
  with tarfile.open(tmp_path / 'packed.tar.gz', 'w:gz') as tar:
    _add(tar, 'a.jpg', _jpeg(0))
  with pytest.raises(ValueError, match='not an uncompressed tar'):
    webdataset.WebDatasetSource(str(tmp_path / 'packed.tar.gz'))
  for spec, message in ((dict(kind='webdataset'), 'lacks'),
                        (dict(kind='parquet', files='x'), 'kind must be one of'),
                        (dict(kind='arrayrecord', files='x', images='y'), 'unknown keys')):
    with pytest.raises(ValueError, match=message):
      sources.open_source(spec)


def test_webdataset_training_stream_skips_the_corrupt_image(wds, tokenizer):
  folder, _ = wds
  source = sources.open_source(dict(kind='webdataset', files=f'{folder}/shard-*.tar'))
  out = _stream(source, tokenizer, 7)  # 28 examples: nearly two epochs of the 14 good ones.
  ids = np.concatenate([b['example_id'] for b in out])
  assert 7 not in ids and set(ids) == set(range(15)) - {7}
  assert 1 <= int(sum(b['skipped'].sum() for b in out)) <= 2


def _csv(tmp_path, n=12):
  images = tmp_path / 'images'
  images.mkdir()
  rows = ['image,caption']
  for i in range(n):
    (images / f'{i}.jpg').write_bytes(_photo(40 + i, 30))
    rows += [f'{i}.jpg,caption number {i}', f'{i}.jpg,another caption {i}']
  (images / 'bad.jpg').write_bytes(b'garbage')
  rows += ['bad.jpg,a broken image', 'missing.jpg,a missing image']
  (tmp_path / 'captions.csv').write_text('\n'.join(rows) + '\n')
  return str(tmp_path / 'captions.csv'), str(images)


def test_arrayrecord_conversion_round_trips(tmp_path):
  captions, images = _csv(tmp_path)
  source, _ = convert.open_input('csv', captions, images, None)
  out = convert.convert(source, str(tmp_path / 'ar' / 'train'), num_shards=3, num_workers=2,
                        key_root=images)
  assert out['records'] == 12 and out['skipped'] == {'bad image': 2} and out['shards'] == 3
  read = sources.open_source(dict(kind='arrayrecord', files=out['files']))
  assert len(read) == 12 and len(read.paths) == 3
  for i in range(12):
    record = read[i]
    with open(os.path.join(images, f'{i}.jpg'), 'rb') as f:
      assert record.image == f.read()  # Stored as they were: no re-encoding without resize.
    assert record.captions == (f'caption number {i}', f'another caption {i}')
    assert record.key == f'{i}.jpg'  # The image's name in the dataset.
  # Resized: the shorter side becomes 20 px, upright, close to the original downscaled.
  out = convert.convert(source, str(tmp_path / 'small' / 'train'), resize=20, num_workers=1)
  small = sources.open_source(dict(kind='arrayrecord', files=out['files']))
  img = transforms.load_image(small[3].image)
  original = transforms.load_image(os.path.join(images, '3.jpg'))
  assert img.size == (29, 20)
  reference = np.asarray(original.resize(img.size, Image.BICUBIC), np.float32)
  assert np.abs(np.asarray(img, np.float32) - reference).mean() < 6  # JPEG at 29 x 20 px.
  # A damaged record costs itself only.
  with open(read.paths[0], 'r+b') as f:
    f.seek(200)
    f.write(b'\xff' * 64)
  damaged = sources.open_source(dict(kind='arrayrecord', files=out['files'].replace(
      'small', 'ar')))
  kinds = {type(damaged[i]).__name__ for i in range(12)}
  assert kinds <= {'ImageCaptions', 'BadRecord'}


def test_convert_cli_from_webdataset_and_caption_folder(wds, tmp_path):
  folder, expected = wds
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'rils_jax.data.convert', '--kind=webdataset',
         f'--files={folder}/shard-{{000..002}}.tar', f'--output={tmp_path}/wds/train',
         '--num_workers=2']
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['records'] == 14 and out['skipped'] == {'bad image': 1,
                                                     'no caption or no image (reader)': 6}
  read = sources.open_source(dict(kind='arrayrecord', files=out['files']))
  good = [e for n, e in enumerate(expected) if n != 7]
  assert [(r.image, r.captions) for r in (read[i] for i in range(14))] == [
      (image, (caption,)) for _, image, caption in good]
  # img2dataset's `files` layout: KEY.jpg beside KEY.txt (one caption per line).
  tree = tmp_path / 'files' / '00000'
  tree.mkdir(parents=True)
  for i in range(3):
    (tree / f'{i}.jpg').write_bytes(_jpeg(i))
    (tree / f'{i}.txt').write_text(f'first {i}\n\nsecond {i}\nfirst {i}\n')
  (tree / 'lonely.jpg').write_bytes(_jpeg(9))
  source, without = convert.read_caption_folder(str(tmp_path / 'files'))
  assert without == 1 and [source[i].captions for i in range(3)] == [
      (f'first {i}', f'second {i}') for i in range(3)]
  done = subprocess.run([sys.executable, '-m', 'rils_jax.data.convert', '--kind=folder',
                         f'--images={tmp_path}/missing', f'--output={tmp_path}/x'],
                        capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode != 0 and 'image folder not found' in done.stderr


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='png'),
          'captions': tfds.features.Sequence({'text': tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        png = io.BytesIO()
        Image.new('RGB', (12, 10), (40 * i, 0, 0)).save(png, 'PNG')
        png.seek(0)  # Encoded bytes: encoding an array would need TensorFlow.
        yield i, {'image': png, 'captions': {'text': [f'red {i}', f'dark {i}']}}

  TinyCaptions(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = sources.open_source(dict(kind='tfds', name='tiny_captions', split='train',
                                    data_dir=str(tmp_path)))
  records = [source[i] for i in range(len(source))]
  by_red = {int(r.image[0, 0, 0]) // 40: r for r in records}
  assert sorted(by_red) == list(range(6)) and len(records) == 6
  assert by_red[4].captions == ('red 4', 'dark 4') and by_red[4].image.shape == (10, 12, 3)
  with pytest.raises(FileNotFoundError, match='is not prepared as ArrayRecord'):
    sources.open_source(dict(kind='tfds', name='tiny_captions', split='train',
                             data_dir=str(tmp_path / 'elsewhere')))
  with pytest.raises(KeyError, match="no 'text'"):
    sources.open_source(dict(kind='tfds', name='tiny_captions', split='train',
                             data_dir=str(tmp_path), caption_key='text'))
  with pytest.raises(TypeError, match='name one of them, e.g. captions/text'):
    sources.open_source(dict(kind='tfds', name='tiny_captions', split='train',
                             data_dir=str(tmp_path), caption_key='captions'))


def _numbered(n, offset=0):
  return records.ListSource([records.ImageCaptions(_jpeg(offset + i),
                                                   (f'caption number {offset + i}',))
                             for i in range(n)])


def test_mixture_weights_are_respected_and_sources_reshuffle(tokenizer):
  small, large = _numbered(10), _numbered(30, offset=10)
  out = _stream([small, large], tokenizer, 50, weights=[3.0, 1.0])  # 200 examples.
  ids = np.concatenate([b['example_id'] for b in out])
  from_small = (ids < 10).mean()
  assert abs(from_small - 0.75) <= 0.02, from_small
  # 150 draws from the small source = 15 epochs: every record 15 times, each epoch reshuffled.
  small_ids = ids[ids < 10]
  assert np.bincount(small_ids).tolist() == [15] * 10
  epochs = small_ids[:30].reshape(3, 10)
  assert len({tuple(e) for e in epochs}) == 3
  assert set(ids[ids >= 10]) <= set(range(10, 40))
  with pytest.raises(ValueError, match='one per source'):
    _stream([small, large], tokenizer, 1, weights=[1.0])
  with pytest.raises(ValueError, match='every source has a weight'):
    sources.mixture_weights([dict(weight=1), dict()])
  assert sources.mixture_weights([dict(), dict()]) is None


@pytest.mark.parametrize('weights', [None, (1.0, 2.0)])
def test_shard_by_jax_process_gives_disjoint_complete_parts(tokenizer, monkeypatch, weights):
  data = [_numbered(8), _numbered(8, offset=8)]
  parts = []
  for process in range(2):
    # grain's ShardByJaxProcess reads the process index and count from jax.
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    assert (options.shard_index, options.shard_count) == (process, 2)
    out = _stream(data, tokenizer, 4, shard_options=options, weights=weights)
    assert all(len(b['example_id']) == 2 for b in out)  # Global batch 4 over 2 processes.
    parts.append(np.concatenate([b['example_id'] for b in out]))
  if weights is None:  # One epoch of 16 records = 4 batches of 2 per process.
    assert not set(parts[0]) & set(parts[1])
    assert sorted(np.concatenate(parts).tolist()) == list(range(16))
  else:
    assert not set(parts[0]) & set(parts[1])  # Each process reads its own records only.
    assert {i % 2 for i in parts[0]} == {0} and {i % 2 for i in parts[1]} == {1}
  assert _stream(data, tokenizer, 2, shard_options=options, weights=weights)[1][
      'example_id'].tolist() == out[1]['example_id'].tolist()  # Same seed, same order.


def test_mixed_shard_stream_resumes_exactly_through_device_prefetch(wds, tmp_path, tokenizer):
  folder, _ = wds
  captions, images = _csv(tmp_path)
  source, _ = convert.open_input('csv', captions, images, None)
  out = convert.convert(source, str(tmp_path / 'ar' / 'train'), num_shards=2, num_workers=1)
  data = [sources.open_source(dict(kind='webdataset', files=f'{folder}/shard-*.tar')),
          sources.open_source(dict(kind='arrayrecord', files=out['files']))]
  mesh = sharding.make_mesh(config_lib.base_config(), jax.devices()[:1])

  def make(num_workers):
    ds = pipeline.make_train_dataset(data, tokenizer, image_size=16, context_length=8,
                                     batch_size=4, seed=9, weights=[1.0, 1.0],
                                     num_workers=num_workers)
    return iter(pipeline.prefetch_to_device(
        ds, lambda b: sharding.put_batch(b, mesh), size=2))

  for num_workers in (0, 2):  # Workers interleave their slices: each count is its own stream.
    whole = make(num_workers)
    expected = [next(whole) for _ in range(8)]
    first = make(num_workers)
    for _ in range(3):
      next(first)
    state = first.get_state()
    resumed = make(num_workers)
    resumed.set_state(state)
    for want in expected[3:]:
      got = next(resumed)
      np.testing.assert_array_equal(got['example_id'], want['example_id'])
      for key in ('image', 'text', 'skipped'):
        assert isinstance(got[key], jax.Array)
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  ids = np.concatenate([b['example_id'] for b in expected])
  assert (ids < 15).any() and (ids >= 15).any() and ids.max() < 27


def _photo(width, height, orientation=None) -> bytes:
  """A smooth picture (gradients and shapes: JPEG statistics of a photo, not of noise)."""
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  arr = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(4 * y + x) * 0.5 + 0.5,
                  ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05) * 0.8 + 0.1], -1)
  img = Image.fromarray((arr * 255).astype(np.uint8))
  out = io.BytesIO()
  exif = Image.Exif()
  if orientation:
    exif[0x0112] = orientation
  img.save(out, 'JPEG', quality=92, exif=exif.tobytes())
  return out.getvalue()


@pytest.mark.parametrize('orientation', [None, 6])
def test_draft_decoding_matches_the_full_decode(orientation):
  data = _photo(960, 720, orientation)
  reduced = 0
  for seed in range(8):
    full = transforms.decode_crop(data, 64, np.random.default_rng(seed), draft=False)
    fast = transforms.decode_crop(data, 64, np.random.default_rng(seed), draft=True)
    # The same box is drawn; the picture differs by about a grey level on average.
    assert np.abs(full.astype(np.float32) - fast).mean() < 2.0, seed
    reduced += not np.array_equal(full, fast)
  assert reduced == 8  # A 64 px crop of a 960 x 720 photo is always decoded at 1/4 or 1/8.
  img = transforms.load_image(data)
  assert img.size == ((720, 960) if orientation else (960, 720))
  full = transforms.decode_crop(data, 96, draft=False)  # Evaluation: resize + centre crop.
  fast = transforms.decode_crop(data, 96, draft=True)
  assert np.abs(full.astype(np.float32) - fast).mean() < 2.0
  png = io.BytesIO()
  Image.open(io.BytesIO(data)).save(png, 'PNG')  # Not a JPEG: no draft, same draws.
  a = transforms.decode_crop(png.getvalue(), 64, np.random.default_rng(1))
  b = transforms.decode_crop(png.getvalue(), 64, np.random.default_rng(1), draft=False)
  np.testing.assert_array_equal(a, b)


def test_input_benchmark_figures(tmp_path):
  captions, images = _csv(tmp_path)
  c = config_lib.base_config()
  c.model.image_size = 32
  c.model.text.context_length = 8
  c.tokenizer.vocab_size = 64
  c.input.sources = [dict(kind='csv', captions=captions, images=images)]
  results = benchmark.run(c, workers=(0, 1), images=16, batch_size=4)
  assert [r['setting'] for r in results] == ['plain Pillow loop', 'grain, 0 workers',
                                             'grain, 1 workers']
  for r in results:
    assert r['images'] == 16 and r['records'] == 14
    assert r['images_per_s'] == pytest.approx(16 / r['seconds'], rel=0.05)
    assert r['cpu_cores_busy'] > 0
    assert r['images_per_s_per_core'] == pytest.approx(
        r['images_per_s'] / r['cpu_cores_busy'], rel=0.05)
  assert results[0]['skipped'] >= 1  # The plain loop meets the bad and the missing image too.


def test_damaged_webdataset_shards_keep_their_good_part_and_are_counted(tmp_path):
  with tarfile.open(tmp_path / 'whole.tar', 'w') as tar:
    for i in range(10):
      _add(tar, f'{i:03d}.jpg', _jpeg(i))
      _add(tar, f'{i:03d}.txt', f'caption {i}'.encode())
  data = (tmp_path / 'whole.tar').read_bytes()
  members = tarfile.open(tmp_path / 'whole.tar').getmembers()
  bad_header = bytearray(data)
  bad_header[members[6].offset + 5] ^= 0xFF  # Member 6 (sample 3's image) has a bad header.
  damaged = {'bad_header': (bytes(bad_header), 3),
             'cut_between_members': (data[:members[10].offset], 5),
             'cut_inside_a_member': (data[:members[10].offset_data + 100], 5),
             'concatenated': (data + data, 10)}
  for name, (content, kept) in damaged.items():
    (tmp_path / f'{name}.tar').write_bytes(content)
    source = webdataset.WebDatasetSource(str(tmp_path / f'{name}.tar'))
    assert (len(source), source.stats.damaged_shards) == (kept, 1), name
    assert source[kept - 1].captions == (f'caption {kept - 1}',)
  whole = webdataset.WebDatasetSource(str(tmp_path / 'whole.tar'))
  assert (len(whole), whole.stats.damaged_shards) == (10, 0)


def test_converter_never_mixes_or_loses_shard_sets(tmp_path):
  captions, images = _csv(tmp_path)
  source, _ = convert.open_input('csv', captions, images, None)
  prefix = str(tmp_path / 'out' / 'train')
  first = convert.convert(source, prefix, num_shards=2, num_workers=1)
  before = {p: open(p, 'rb').read() for p in shards.expand(first['files'])}
  with pytest.raises(ValueError, match='exist already'):
    convert.convert(source, prefix, num_shards=3, num_workers=1)
  bad = tmp_path / 'bad.csv'
  bad.write_text('image,caption\nmissing.jpg,nothing here\n')
  with pytest.raises(FileNotFoundError, match='none of 1 images sampled from .*bad.csv'):
    convert.open_input('csv', str(bad), images, None)
  bad.write_text('image,caption\nbad.jpg,an image that does not decode\n')
  bad_source, _ = convert.open_input('csv', str(bad), images, None)
  with pytest.raises(ValueError, match='no record could be converted'):
    convert.convert(bad_source, prefix, num_shards=2, num_workers=1, overwrite=True)
  # The failed run left the earlier set as it was, and no temporary file.
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(os.path.basename(p) for p in before)
  assert all(open(p, 'rb').read() == data for p, data in before.items())
  second = convert.convert(source, prefix, num_shards=3, num_workers=1, overwrite=True)
  assert len(shards.expand(second['files'])) == 3  # The 2-shard set is gone.
  assert len(sources.open_source(dict(kind='arrayrecord', files=second['files']))) == 12
  with pytest.raises(ValueError, match='--resize=-5 must be >= 0'):
    convert.convert(source, str(tmp_path / 'x'), resize=-5)
  assert convert.convert(source, str(tmp_path / 'y' / 't'), num_shards=50)['shards'] == 14


def test_unreadable_array_record_shards_are_named(tmp_path):
  captions, images = _csv(tmp_path)
  source, _ = convert.open_input('csv', captions, images, None)
  out = convert.convert(source, str(tmp_path / 'ar' / 't'), num_workers=1)
  path = shards.expand(out['files'])[0]
  (tmp_path / 'half.array_record').write_bytes(open(path, 'rb').read()[:5000])
  (tmp_path / 'text.array_record').write_text('not a shard')
  for name in ('half', 'text'):
    broken = str(tmp_path / f'{name}.array_record')
    with pytest.raises(ValueError, match=f'{broken} is not a readable ArrayRecord file'):
      sources.open_source(dict(kind='arrayrecord', files=f'{path}::{broken}'))


def test_bad_weights_and_captions_are_clear_errors(tokenizer):
  for weights in ([float('inf'), 1.0], [0, 1], ['1', '1'], [True, 1]):
    with pytest.raises(ValueError, match='finite positive numbers'):
      _stream([_numbered(4), _numbered(4)], tokenizer, 1, weights=weights)
  assert sources.mixture_weights([dict(weight=np.float32(2)), dict(weight=1)]) == [2.0, 1.0]
  assert arrayrecord.decode(msgpack.packb({'image': b'x', 'captions': 'one caption'})).captions \
      == ('one caption',)
  with pytest.raises(ValueError, match='list of strings'):
    arrayrecord.decode(msgpack.packb({'image': b'x', 'captions': [1, None]}))
