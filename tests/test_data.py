"""Readers, transforms, tokenizer and the grain pipeline on tiny generated fixtures, including a
corrupt JPEG, a missing file and empty captions."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rils_jax import tokenizer as tokenizer_lib
from rils_jax.data import pipeline
from rils_jax.data import records as records_lib
from rils_jax.data import sources
from rils_jax.data import transforms

GOOD = ['a.jpg', 'b.png', 'c.jpg', 'd.png']


def _write_images(folder):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for name in GOOD:
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
        os.path.join(folder, name))
  with open(os.path.join(folder, 'a.jpg'), 'rb') as f:
    data = f.read()
  with open(os.path.join(folder, 'corrupt.jpg'), 'wb') as f:
    f.write(data[:len(data) // 3])  # Truncated JPEG.


@pytest.fixture
def csv_dataset(tmp_path):
  images = str(tmp_path / 'images')
  _write_images(images)
  rows = [('a.jpg', 'a red box'), ('a.jpg', 'a box that is red'), ('b.png', 'green circle'),
          ('c.jpg', 'blue sky over a field'), ('d.png', 'yellow dog'), ('d.png', '   '),
          ('corrupt.jpg', 'a broken file'), ('missing.jpg', 'a file that is not there'),
          ('empty_only.jpg', '')]
  path = str(tmp_path / 'captions.csv')
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['image', 'caption'])
    w.writerows(rows)
  return path, images


def test_csv_reader_groups_captions_and_counts_empty(csv_dataset):
  path, images = csv_dataset
  records, stats = sources.read_csv_captions(path, images)
  assert [os.path.basename(r.image) for r in records] == GOOD + ['corrupt.jpg', 'missing.jpg']
  assert records[0].captions == ('a red box', 'a box that is red')
  assert records[3].captions == ('yellow dog',)
  assert stats.empty_captions == 2 and stats.images_without_caption == 1
  assert stats.images == 6 and stats.captions == 7
  sel, sel_stats = sources.read_image_captions(
      dict(kind='csv', captions=path, images=images, select='-2:'))
  assert [os.path.basename(r.image) for r in sel] == ['corrupt.jpg', 'missing.jpg']
  assert sel_stats.images == 2 and sel_stats.captions == 2


def test_coco_reader(tmp_path):
  images = str(tmp_path / 'images')
  _write_images(images)
  data = dict(images=[dict(id=7, file_name='b.png'), dict(id=3, file_name='a.jpg')],
              annotations=[dict(image_id=3, caption='first'), dict(image_id=7, caption='x'),
                           dict(image_id=3, caption='second'), dict(image_id=99, caption='orphan'),
                           dict(image_id=7, caption='')])
  path = str(tmp_path / 'captions.json')
  with open(path, 'w') as f:
    json.dump(data, f)
  records, stats = sources.read_coco_captions(path, images)
  assert [(os.path.basename(r.image), r.captions) for r in records] == [
      ('b.png', ('x',)), ('a.jpg', ('first', 'second'))]
  assert stats.empty_captions == 1


def test_reader_errors_are_clear(tmp_path, csv_dataset):
  path, images = csv_dataset
  with pytest.raises(FileNotFoundError, match='captions CSV not found'):
    sources.read_csv_captions(str(tmp_path / 'nope.csv'), images)
  bad = tmp_path / 'bad.csv'
  bad.write_text('file,text\na.jpg,hello\n')
  with pytest.raises(ValueError, match='header'):
    sources.read_csv_captions(str(bad), images)
  with pytest.raises(ValueError, match='kind'):
    sources.read_image_captions(dict(kind='parquet', captions=path, images=images))
  with pytest.raises(ValueError, match='start:stop'):
    records_lib.select([1, 2], '1')


def test_image_folder_reader(tmp_path):
  for cls in ('cat', 'dog'):
    os.makedirs(tmp_path / cls)
    for i in range(3):
      Image.new('RGB', (8, 8)).save(tmp_path / cls / f'{i}.png')
  (tmp_path / 'README.txt').write_text('not a class')
  paths, labels, classes = sources.read_image_folder(str(tmp_path), max_per_class=2)
  assert classes == ['cat', 'dog'] and labels == [0, 0, 1, 1]
  assert [os.path.basename(p) for p in paths] == ['0.png', '1.png'] * 2


def test_load_image_modes_and_errors(tmp_path):
  Image.new('L', (5, 7), 128).save(tmp_path / 'gray.png')
  Image.new('RGBA', (5, 7), (255, 0, 0, 0)).save(tmp_path / 'transparent.png')
  Image.fromarray(np.full((7, 5), 65535, np.uint16)).save(tmp_path / 'sixteen.png')
  Image.new('P', (5, 7)).save(tmp_path / 'palette.gif')
  Image.new('CMYK', (5, 7), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
  for name in ('gray.png', 'transparent.png', 'sixteen.png', 'palette.gif', 'cmyk.jpg'):
    img = transforms.load_image(str(tmp_path / name))
    assert img.mode == 'RGB' and img.size == (5, 7), name
  assert np.asarray(transforms.load_image(str(tmp_path / 'transparent.png')))[0, 0].tolist() == [
      255, 255, 255]  # Fully transparent pixels show the white background.
  assert np.asarray(transforms.load_image(str(tmp_path / 'sixteen.png')))[0, 0].tolist() == [
      255, 255, 255]
  # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 5x7 shows as 7x5.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.new('RGB', (5, 7)).save(tmp_path / 'rotated.jpg', exif=exif)
  assert transforms.load_image(str(tmp_path / 'rotated.jpg')).size == (7, 5)
  (tmp_path / 'garbage.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  for name in ('garbage.jpg', 'missing.png'):
    with pytest.raises(transforms.BadImageError, match=name):
      transforms.load_image(str(tmp_path / name))


def test_random_resized_crop_box_within_image_and_scale():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = transforms.random_resized_crop_box(300, 200, rng, (0.5, 1.0))
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
    assert 0.5 * 0.98 <= (right - left) * (bottom - top) / (300 * 200) <= 1.0
  img = Image.new('RGB', (300, 200))
  assert transforms.random_resized_crop(img, 32, rng).shape == (32, 32, 3)
  assert transforms.resize_center_crop(img, 32).shape == (32, 32, 3)


def test_center_crop_keeps_the_centre(tmp_path):
  arr = np.zeros((100, 300, 3), np.uint8)
  arr[:, 100:200] = 255  # White central square of a wide image.
  out = transforms.resize_center_crop(Image.fromarray(arr), 20)
  assert out[2:-2, 2:-2].min() > 200


@pytest.fixture
def tokenizer(tmp_path):
  captions = ['a red box', 'a green circle on the left', 'blue sky over a field',
              'yellow dog running'] * 20
  path = tokenizer_lib.train_tokenizer(captions, 64, str(tmp_path / 'tok.model'))
  return tokenizer_lib.Tokenizer(path)


def test_tokenizer_rows_end_with_eot_and_pad(tokenizer):
  rows = tokenizer.encode(['a red box', 'yellow dog running ' * 20, ''], context_length=8)
  assert rows.shape == (3, 8) and rows.dtype == np.int32
  assert tokenizer.eot_id == 2 and tokenizer.pad_id == 0
  n = list(rows[0]).index(2)
  assert n >= 3 and (rows[0, n + 1:] == 0).all()
  assert rows[1, -1] == 2 and (rows[1, :-1] != 2).all()  # Truncated, end-of-text kept.
  assert rows[2, 0] == 2
  assert tokenizer.vocab_size <= 64


def test_tokenizer_cli(tmp_path, csv_dataset):
  path, _ = csv_dataset
  out = tmp_path / 'cli.model'
  result = subprocess.run(
      [sys.executable, '-m', 'rils_jax.tokenizer', 'train', f'--captions={path}',
       '--vocab_size=40', f'--out={out}'], capture_output=True, text=True, check=True)
  info = json.loads(result.stdout.strip().splitlines()[-1])
  assert info['captions'] == 7 and info['eot_id'] == 2  # 9 rows, 2 empty captions.
  assert tokenizer_lib.Tokenizer(str(out)).encode(['green circle'], 6)[0, 0] != 2
  (tmp_path / 'nocaption.csv').write_text('image,text\na.jpg,hello\n')
  with pytest.raises(ValueError, match='no "caption" column'):
    tokenizer_lib.read_captions(str(tmp_path / 'nocaption.csv'))


def _consume(records, tokenizer, batches, seed=0, num_workers=0, batch_size=4, rows=None,
             read_threads=16):
  ds = pipeline.make_train_dataset(records, tokenizer, image_size=16, context_length=8,
                                   batch_size=batch_size, seed=seed, num_workers=num_workers,
                                   rows=rows, read_threads=read_threads)
  it = iter(ds)
  return [next(it) for _ in range(batches)]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_pipeline_skips_and_counts_bad_images(csv_dataset, tokenizer, num_workers):
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)  # 4 good, 1 corrupt, 1 missing.
  out = _consume(records, tokenizer, 10, num_workers=num_workers)
  ids = np.concatenate([b['example_id'] for b in out])
  skipped = int(sum(b['skipped'].sum() for b in out))
  counts = np.bincount(ids, minlength=6)
  assert counts[4] == counts[5] == 0 and (counts[:4] > 0).all()
  if num_workers == 0:
    # 40 examples = exactly 10 passes over the 4 good records; two bad records per pass: all of
    # the first 9 passes and 0-2 of the 10th were skipped.
    assert counts.tolist() == [10, 10, 10, 10, 0, 0]
    assert 18 <= skipped <= 20, skipped
  else:
    # Each worker reads its own slice of the stream; a third of the stream is bad.
    assert 0.2 <= skipped / (skipped + 40) <= 0.45, skipped
  batch = out[0]
  assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['text'].shape == (4, 8) and (batch['text'] == 2).sum() == 4


def test_pipeline_is_deterministic_in_the_seed(csv_dataset, tokenizer):
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)
  a = _consume(records, tokenizer, 3, seed=1)
  b = _consume(records, tokenizer, 3, seed=1)
  c = _consume(records, tokenizer, 3, seed=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['example_id'], y['example_id'])
  assert any((x['image'] != z['image']).any() for x, z in zip(a, c))


def test_read_threads_change_nothing_in_the_stream(csv_dataset, tokenizer):
  # configs/default.py reads without threads, the paper configs with grain's 16: the same
  # examples, crops, captions and skip counts either way.
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)  # 4 good, 1 corrupt, 1 missing.
  threaded = _consume(records, tokenizer, 6, seed=3)
  inline = _consume(records, tokenizer, 6, seed=3, read_threads=0)
  for x, y in zip(threaded, inline):
    for key in ('image', 'text', 'example_id', 'skipped'):
      np.testing.assert_array_equal(x[key], y[key])
  assert sum(int(b['skipped'].sum()) for b in inline) > 0


def test_processes_read_their_rows_of_the_same_global_batches(tmp_path, tokenizer):
  folder = tmp_path / 'many'
  folder.mkdir()
  records = []
  for i in range(12):
    name = str(folder / f'{i}.png')
    Image.new('RGB', (8, 8), (20 * i, 0, 0)).save(name)
    records.append(records_lib.ImageCaptions(name, (f'caption {i}',)))
  whole = _consume(records, tokenizer, 6, batch_size=4)
  parts = [_consume(records, tokenizer, 6, batch_size=4, rows=rows)
           for rows in ((0, 2), (2, 4))]
  for k, batch in enumerate(whole):
    # Process p's batch k is rows [2p, 2p + 2) of global batch k: same examples, same crops.
    np.testing.assert_array_equal(
        np.concatenate([p[k]['example_id'] for p in parts]), batch['example_id'])
    np.testing.assert_array_equal(np.concatenate([p[k]['image'] for p in parts]),
                                  batch['image'])
  # One epoch (12 examples = 3 global batches): the processes' examples are disjoint and
  # together they are every record once.
  epoch = [np.concatenate([b['example_id'] for b in p[:3]]) for p in parts]
  assert not set(epoch[0]) & set(epoch[1])
  assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
  with pytest.raises(ValueError, match='outside a global batch'):
    _consume(records, tokenizer, 1, batch_size=4, rows=(2, 6))


def test_pipeline_reaches_every_caption(csv_dataset, tokenizer):
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)
  out = _consume(records, tokenizer, 20)
  rows = {tuple(r) for b in out for r, i in zip(b['text'], b['example_id']) if i == 0}
  assert len(rows) == 2  # Image a.jpg has two captions; both are drawn.


def test_pipeline_rejects_too_few_records(csv_dataset, tokenizer):
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)
  with pytest.raises(ValueError, match='fewer than one batch'):
    _consume(records[:2], tokenizer, 1)


def test_eval_batches_keep_order_and_skip_bad(csv_dataset):
  _, images = csv_dataset
  paths = [os.path.join(images, n) for n in ['a.jpg', 'corrupt.jpg', 'b.png', 'missing.jpg',
                                             'c.jpg']]
  batches = list(pipeline.eval_batches(paths, 16, batch_size=2))
  assert np.concatenate([b['index'] for b in batches]).tolist() == [0, 2, 4]
  assert batches[0]['image'].shape == (2, 16, 16, 3)
  # With workers, batches are still whole (not one fragment per worker) and nothing is lost.
  batches = list(pipeline.eval_batches(paths * 4, 16, batch_size=5, num_workers=2))
  assert [len(b['index']) for b in batches] == [5, 5, 2]
  assert sorted(np.concatenate([b['index'] for b in batches]) % 5) == [0] * 4 + [2] * 4 + [4] * 4


def test_csv_with_bom_long_caption_and_unbalanced_quote(tmp_path, csv_dataset):
  _, images = csv_dataset
  long_caption = 'word ' * 300_000  # 1.5 MB, beyond the csv module's default field limit.
  bom = tmp_path / 'bom.csv'
  bom.write_text(f'image,caption\na.jpg,a red box\nb.png,{long_caption}\n', encoding='utf-8-sig')
  records, _ = sources.read_csv_captions(str(bom), images)
  assert [r.captions[0][:9] for r in records] == ['a red box', 'word word']
  broken = tmp_path / 'broken.csv'
  broken.write_text('image,caption\na.jpg,fine\nb.png,"never closed\nc.jpg,lost row\n')
  with pytest.raises(ValueError, match=r'broken.csv, line \d+: a caption spans several lines'):
    sources.read_csv_captions(str(broken), images)


def test_coco_orphans_are_counted_and_bad_json_is_named(tmp_path):
  images = str(tmp_path / 'images')
  _write_images(images)
  path = tmp_path / 'coco.json'
  path.write_text(json.dumps(dict(images=[dict(id=1, file_name='a.jpg')],
                                  annotations=[dict(image_id=1, caption='ok'),
                                               dict(image_id=5, caption='orphan'),
                                               dict(caption='no id')])))
  records, stats = sources.read_coco_captions(str(path), images)
  assert len(records) == 1 and stats.captions_without_image == 2
  path.write_text(json.dumps(dict(images=[dict(id=1)], annotations=[])))
  with pytest.raises(ValueError, match='coco.json is not a COCO captions file'):
    sources.read_coco_captions(str(path), images)
  path.write_text('{not json')
  with pytest.raises(ValueError, match='coco.json'):
    sources.read_coco_captions(str(path), images)


def test_float_images_and_decompression_bombs(tmp_path, monkeypatch):
  Image.fromarray(np.full((4, 4), 0.5, np.float32), mode='F').save(tmp_path / 'float.tif')
  assert np.asarray(transforms.load_image(str(tmp_path / 'float.tif')))[0, 0, 0] == 127
  Image.new('L', (40, 40)).save(tmp_path / 'big.png')
  # 1,600 pixels: between the limit and twice the limit, where Pillow only warns.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  with pytest.raises(transforms.BadImageError, match='DecompressionBomb'):
    transforms.load_image(str(tmp_path / 'big.png'))


def test_pipeline_stops_when_no_image_can_be_read(tmp_path, tokenizer):
  records = [records_lib.ImageCaptions(str(tmp_path / f'missing{i}.jpg'), ('a caption',))
             for i in range(8)]
  ds = pipeline.make_train_dataset(records, tokenizer, image_size=16, context_length=8,
                                   batch_size=4, seed=0, max_consecutive_skips=20)
  with pytest.raises(RuntimeError, match='20 examples in a row had no readable image or caption'):
    next(iter(ds))


def test_a_wrong_image_folder_is_refused_before_any_decoding(tmp_path, caplog):
  images = str(tmp_path / 'images')
  _write_images(images)
  path = tmp_path / 'captions.csv'
  path.write_text('image,caption\n' + ''.join(f'x{i}.jpg,caption {i}\n' for i in range(100)))
  with pytest.raises(FileNotFoundError, match=r'none of 64 images sampled from .*captions.csv '
                     r'is in .*images \(e\.g\. .*x0\.jpg\): check the image folder'):
    sources.open_source(dict(kind='csv', captions=str(path), images=images))
  # Some missing: one line with the share sampled (once, though configs read a source twice),
  # then training goes on.
  path.write_text('image,caption\na.jpg,red\nb.png,green\nnothere.jpg,gone\n')
  with caplog.at_level('WARNING'):
    source = sources.open_source(dict(kind='csv', captions=str(path), images=images))
    sources.open_source(dict(kind='csv', captions=str(path), images=images, select=':2'))
    sources.open_source(dict(kind='csv', captions=str(path), images=images, select='1:'))
  assert len(source) == 3
  assert [r.getMessage() for r in caplog.records if 'sampled' in r.getMessage()] == [
      f'1 of 3 images sampled from {path} is missing from {images} (e.g. '
      f'{os.path.join(images, "nothere.jpg")}): missing images are skipped and counted']
  caplog.clear()
  path = tmp_path / 'mostly_missing.csv'
  path.write_text('image,caption\na.jpg,red\nno1.jpg,gone\nno2.png,gone\n')
  with caplog.at_level('WARNING'):
    sources.open_source(dict(kind='csv', captions=str(path), images=images))
  assert [r.getMessage() for r in caplog.records if 'sampled' in r.getMessage()] == [
      f'2 of 3 images sampled from {path} are missing from {images} (e.g. '
      f'{os.path.join(images, "no1.jpg")}): more than half: a run stops once more than '
      'config.input.max_skip_fraction of its examples are skipped; missing images are skipped '
      'and counted']


def test_skipped_files_are_named_once_each_up_to_ten_then_only_counted(tmp_path, tokenizer,
                                                                      caplog):
  images = str(tmp_path / 'images')
  _write_images(images)
  good = [records_lib.ImageCaptions(os.path.join(images, n), ('a caption',))
          for n in ('a.jpg', 'b.png')]
  missing = [records_lib.ImageCaptions(str(tmp_path / f'missing{i}.jpg'), ('a caption',))
             for i in range(15)]
  with caplog.at_level('WARNING'):
    # 4 missing files over 10 epochs: each named once, no closing line.
    it = iter(pipeline.make_train_dataset(good + missing[:4], tokenizer, image_size=16,
                                          context_length=8, batch_size=2, seed=0,
                                          read_threads=0))
    skipped = sum(int(next(it)['skipped'].sum()) for _ in range(10))
    lines = [r.getMessage() for r in caplog.records]
    assert 36 <= skipped <= 40
    named = sorted(re.search(r'missing\d+', m).group() for m in lines
                   if m.startswith('Skipping example'))
    assert named == [f'missing{i}' for i in range(4)] and len(lines) == 4, lines
    caplog.clear()
    # 15 missing files over 3 epochs, read by 4 threads: 10 named, then one closing line.
    it = iter(pipeline.make_train_dataset(good + missing, tokenizer, image_size=16,
                                          context_length=8, batch_size=2, seed=0,
                                          read_threads=4))
    skipped = sum(int(next(it)['skipped'].sum()) for _ in range(3))
    lines = [r.getMessage() for r in caplog.records]
  assert 30 <= skipped <= 45
  assert len({m for m in lines if m.startswith('Skipping example')}) == 10, lines
  assert lines.count('More unreadable files than the 10 named above: further ones are counted '
                     'in the metrics (data/skipped_examples), without a line each') == 1
  assert len(lines) == 11, lines


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..',
                      'shared', 'data')


@pytest.mark.skipif(not os.path.isdir(SHARED), reason='../shared/data is not present')
def test_readers_on_the_shared_real_data():
  flickr, coco = os.path.join(SHARED, 'flickr8k_1k'), os.path.join(SHARED, 'coco_mini_train')
  records, stats = sources.read_csv_captions(os.path.join(flickr, 'captions.csv'),
                                             os.path.join(flickr, 'images'))
  assert (stats.images, stats.captions) == (1000, 5000)
  assert all(len(r.captions) == 5 for r in records)
  records, stats = sources.read_coco_captions(
      os.path.join(coco, 'captions_train2017.json'), os.path.join(coco, 'images'))
  assert (stats.images, stats.captions) >= (80, 400)
  img = transforms.load_image(records[0].image)
  assert img.mode == 'RGB' and min(img.size) > 100
  paths, labels, classes = sources.read_image_folder(os.path.join(SHARED, 'cifar10_test'), 3)
  assert len(classes) == 10 and len(paths) == 30 and 'airplane' in classes


def _hostile_dataset(folder):
  """Every kind of awkward file and caption a web-scale dataset holds.

  Returns:
    (captions CSV path, names that must decode, names that must be skipped).
  """
  os.makedirs(folder)
  rng = np.random.default_rng(0)

  def path(name):
    return os.path.join(folder, name)

  Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path('rgb.jpg'))
  Image.new('CMYK', (12, 9), (0, 255, 255, 0)).save(path('cmyk.jpg'))
  Image.new('L', (9, 12), 77).save(path('gray.png'))
  Image.new('RGBA', (8, 8), (0, 0, 255, 128)).save(path('rgba.png'))
  palette = Image.new('P', (8, 8), 1)
  palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  palette.save(path('palette.png'), transparency=0)
  Image.fromarray(np.full((6, 7), 4096, np.uint16)).save(path('sixteen.png'))
  frames = [Image.new('RGB', (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
  frames[0].save(path('animated.gif'), save_all=True, append_images=frames[1:], loop=0)
  Image.new('RGB', (1, 1), (10, 200, 30)).save(path('one_pixel.png'))
  Image.new('RGB', (1, 500), (50, 50, 50)).save(path('needle.png'))
  Image.new('RGB', (16, 16), (0, 128, 0)).save(path('png_named.jpg'), format='PNG')
  # Upright: 10 wide, 20 tall, red above blue. Stored rotated a quarter turn anticlockwise with
  # EXIF orientation 6 ("rotate 90 degrees clockwise to display").
  upright = Image.new('RGB', (10, 20), (255, 0, 0))
  upright.paste((0, 0, 255), (0, 10, 10, 20))
  exif = Image.Exif()
  exif[0x0112] = 6
  upright.transpose(Image.Transpose.ROTATE_90).save(path('exif_rotated.jpg'), exif=exif,
                                                    quality=95)
  decodable = ['rgb.jpg', 'cmyk.jpg', 'gray.png', 'rgba.png', 'palette.png', 'sixteen.png',
               'animated.gif', 'one_pixel.png', 'needle.png', 'png_named.jpg', 'exif_rotated.jpg']

  with open(path('rgb.jpg'), 'rb') as f:
    jpeg = f.read()
  with open(path('truncated.jpg'), 'wb') as f:
    f.write(jpeg[:len(jpeg) // 2])
  with open(path('gray.png'), 'rb') as f:
    png = bytearray(f.read())
  png[-20:-12] = b'\x00' * 8  # The IDAT chunk's data and checksum.
  with open(path('corrupt.png'), 'wb') as f:
    f.write(bytes(png))
  Image.new('1', (12_000, 12_000)).save(path('bomb.png'))  # 144 Mpixels, a few KB on disk.
  open(path('zero_bytes.jpg'), 'wb').close()
  with open(path('text.jpg'), 'w') as f:
    f.write('this is not an image')
  os.makedirs(path('folder.jpg'))
  skipped = ['truncated.jpg', 'corrupt.png', 'bomb.png', 'zero_bytes.jpg', 'text.jpg',
             'folder.jpg', 'missing.jpg']

  rows = [f'{name},a picture called {name}'.encode() for name in decodable + skipped]
  rows += ['rgb.jpg,un caf\xe9 cr\xe8me'.encode('cp1252'),  # Not UTF-8.
           b'rgb.jpg,a picture called rgb.jpg',  # A duplicate of a caption above.
           ('gray.png,' + 'grey ' * 200_000).encode(),  # A megabyte.
           b'no_caption.jpg,', b'no_caption.jpg,"   "',  # Empty and whitespace only.
           'exif_rotated.jpg,un gar\u00e7on \u65e5\u672c'.encode()]  # Valid UTF-8.
  csv_path = os.path.join(os.path.dirname(folder), 'hostile.csv')
  with open(csv_path, 'wb') as f:
    f.write(b'image,caption\n' + b'\n'.join(rows) + b'\n')
  return csv_path, decodable, skipped


def test_hostile_data_is_decoded_or_skipped_and_counted(tmp_path, tokenizer):
  images = str(tmp_path / 'hostile')
  csv_path, decodable, skipped = _hostile_dataset(images)
  records, stats = sources.read_csv_captions(csv_path, images)
  assert (stats.images, stats.non_utf8_lines, stats.duplicate_captions, stats.empty_captions,
          stats.images_without_caption) == (18, 1, 1, 2, 1)
  by_name = {os.path.basename(r.image): r for r in records}
  assert 'un café crème' in by_name['rgb.jpg'].captions
  assert 'un café crème' in tokenizer_lib.read_captions(csv_path)  # The same text as training.
  assert 'un garçon 日本' in by_name['exif_rotated.jpg'].captions
  assert max(len(c) for c in by_name['gray.png'].captions) == 999_999

  for name in decodable:
    img = transforms.load_image(os.path.join(images, name))
    assert img.mode == 'RGB' and min(img.size) >= 1, name
  upright = np.asarray(transforms.load_image(os.path.join(images, 'exif_rotated.jpg')))
  assert upright.shape == (20, 10, 3)
  assert upright[2, 5, 0] > 200 and upright[2, 5, 2] < 60  # Red at the top...
  assert upright[17, 5, 2] > 200 and upright[17, 5, 0] < 60  # ...blue at the bottom.
  assert np.asarray(transforms.load_image(os.path.join(images, 'animated.gif')))[5, 5].tolist() \
      == [255, 0, 0]  # The first frame.
  for name in skipped:
    with pytest.raises(transforms.BadImageError, match=name):
      transforms.load_image(os.path.join(images, name))

  # Three epochs through the training pipeline: every decodable image three times, every bad
  # one skipped and counted (all of them in the first two epochs, some in the third).
  out = _consume(records, tokenizer, len(decodable), batch_size=3)  # 3 x len(decodable).
  ids = np.concatenate([b['example_id'] for b in out])
  names = [os.path.basename(records[i].image) for i in ids]
  assert sorted(set(names)) == sorted(decodable)
  assert all(names.count(n) == 3 for n in decodable)
  total_skipped = int(sum(b['skipped'].sum() for b in out))
  assert 2 * len(skipped) <= total_skipped <= 3 * len(skipped)
  row = out[0]['text'][0]
  assert (row == tokenizer.eot_id).sum() == 1


@pytest.mark.parametrize('num_workers', [0, 2])
def test_pipeline_resumes_from_a_saved_iterator_state(csv_dataset, tokenizer, num_workers):
  path, images = csv_dataset
  records, _ = sources.read_csv_captions(path, images)

  def make():
    return iter(pipeline.make_train_dataset(records, tokenizer, image_size=16, context_length=8,
                                            batch_size=2, seed=5, num_workers=num_workers))

  whole = make()
  expected = [next(whole) for _ in range(7)]
  first = make()
  for _ in range(3):
    next(first)
  state = first.get_state()
  resumed = make()
  resumed.set_state(state)
  for want in expected[3:]:
    got = next(resumed)
    for key in ('example_id', 'image', 'text', 'skipped'):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
