"""Evaluation metrics on hand-built embeddings and features with known answers, against NumPy /
SciPy references, and the evaluator config checks."""

import io
import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from rils_jax.data import pipeline
from rils_jax.evals import datasets
from rils_jax.evals import fewshot
from rils_jax.evals import knn
from rils_jax.evals import linear
from rils_jax.evals import retrieval
from rils_jax.evals import runner
from rils_jax.evals import templates
from rils_jax.evals import zeroshot


def test_retrieval_recall_known_answers():
  # 3 images, 2 captions each (captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2). With
  # identity image embeddings, sim = image @ text.T is exactly this matrix (no ties).
  sim = np.array([[0.1, 0.9, 0.2, 0.3, 0.4, 0.45],   # best own caption at rank 0
                  [0.8, 0.1, 0.3, 0.2, 0.35, 0.5],   # best own caption (2) at rank 3
                  [0.2, 0.3, 0.6, 0.1, 0.5, 0.4]])   # best own caption (4) at rank 1
  owner = np.array([0, 0, 1, 1, 2, 2])
  r = retrieval.retrieval_recall(np.eye(3), sim.T, owner, ks=(1, 2, 3, 4))
  assert [r[f'i2t_r{k}'] for k in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
  # Rank of each caption's image: c0 2, c1 0, c2 1, c3 1, c4 0, c5 2.
  assert [r[f't2i_r{k}'] for k in (1, 2, 3)] == pytest.approx([2 / 6, 4 / 6, 1.0])
  assert r['chance_t2i_r1'] == pytest.approx(1 / 3)
  # P(at least one of 2 own captions among K random of 6).
  assert r['chance_i2t_r1'] == pytest.approx(2 / 6)
  assert r['chance_i2t_r2'] == pytest.approx(1 - math.comb(4, 2) / math.comb(6, 2))


def test_retrieval_is_perfect_for_identical_embeddings():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(50, 16))
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  texts = np.repeat(images, 5, axis=0)
  r = retrieval.retrieval_recall(images, texts, np.repeat(np.arange(50), 5))
  assert r['i2t_r1'] == r['t2i_r1'] == 1.0


def test_zeroshot_perfect_and_chance():
  classes = np.eye(10, 32)
  labels = np.arange(200) % 10
  perfect = classes[labels] + 0.01
  perfect /= np.linalg.norm(perfect, axis=1, keepdims=True)
  acc = zeroshot.zeroshot_accuracy(perfect, labels, classes)
  assert acc['top1'] == 1.0 and acc['top5'] == 1.0 and acc['chance_top1'] == 0.1
  rng = np.random.default_rng(0)
  random = rng.normal(size=(5000, 32))
  random /= np.linalg.norm(random, axis=1, keepdims=True)
  acc = zeroshot.zeroshot_accuracy(random, rng.integers(0, 10, 5000), classes)
  assert abs(acc['top1'] - 0.1) < 0.02 and abs(acc['top5'] - 0.5) < 0.03


class _FakeEmbedder:
  """texts(): a fixed random unit vector per distinct prompt; records the largest call."""

  def __init__(self, dim=8):
    self.dim, self.largest, self.vectors = dim, 0, {}

  def texts(self, params, texts):
    del params
    self.largest = max(self.largest, len(texts))
    out = []
    for t in texts:
      if t not in self.vectors:
        v = np.random.default_rng(len(self.vectors)).normal(size=self.dim)
        self.vectors[t] = v / np.linalg.norm(v)
      out.append(self.vectors[t])
    return np.asarray(out)


def test_class_embeddings_average_templates_in_bounded_blocks(monkeypatch):
  monkeypatch.setattr(zeroshot, 'PROMPTS_PER_BLOCK', 10)
  names = [f'class {i}' for i in range(7)]
  fake = _FakeEmbedder()
  embeds = zeroshot.class_embeddings(fake, None, names, templates.CLIP_IMAGENET_7[:3])
  assert fake.largest <= 9  # 3 classes x 3 templates per call, never all 21 prompts.
  for i, name in enumerate(names):
    mean = np.mean([fake.vectors[t.format(name)] for t in templates.CLIP_IMAGENET_7[:3]], 0)
    np.testing.assert_allclose(embeds[i], mean / np.linalg.norm(mean), rtol=1e-6)
  assert len(templates.CLIP_IMAGENET_80) == len(set(templates.CLIP_IMAGENET_80)) == 80
  with pytest.raises(ValueError, match='unknown template set'):
    templates.get_templates('imagenet')
  with pytest.raises(ValueError, match='one {} each'):
    templates.get_templates(['a photo'])


def _blobs(n_per_class, num_classes, dim, spread, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * 3
  labels = np.repeat(np.arange(num_classes), n_per_class)
  return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32), \
      labels


@pytest.mark.parametrize('n_per_class,dim', [(2, 16), (30, 6)])  # Dual (n < d) and primal.
def test_fewshot_ridge_matches_numpy_closed_form(n_per_class, dim):
  x, y = _blobs(n_per_class, 4, dim, 1.0, seed=0)
  w, mean, std = fewshot.ridge_weights(x, y, 3.0, 4)
  xs = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
  a = np.concatenate([xs, np.full((len(x), 1), fewshot.BIAS)], 1).astype(np.float64)
  targets = 2.0 * np.eye(4)[y] - 1.0
  reference = np.linalg.solve(a.T @ a + 3.0 * np.eye(a.shape[1]), a.T @ targets)
  np.testing.assert_allclose(np.asarray(w), reference, rtol=2e-3, atol=2e-5)
  test_x, test_y = _blobs(50, 4, dim, 1.0, seed=0)
  scores = np.asarray(fewshot.ridge_scores(test_x, w, mean, std))
  ref_scores = np.concatenate([(test_x - x.mean(0)) / np.maximum(x.std(0), 1e-6),
                               np.full((len(test_x), 1), fewshot.BIAS)], 1) @ reference
  np.testing.assert_array_equal(scores.argmax(1), ref_scores.argmax(1))


def test_fewshot_accuracy_separable_and_shot_errors():
  x, y = _blobs(40, 5, 12, 0.1, seed=1)
  out = fewshot.fewshot_accuracy(x[::2], y[::2], x[1::2], y[1::2], 5, shots=(1, 5), seeds=3)
  assert out['1shot_top1'] == out['5shot_top1'] == 1.0 and out['5shot_top1_std'] == 0.0
  noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  chance = fewshot.fewshot_accuracy(noise[::2], y[::2], noise[1::2], y[1::2], 5, shots=(5,),
                                    seeds=3)
  assert chance['5shot_top1'] < 0.45
  with pytest.raises(ValueError, match='class 0 has 20'):
    fewshot.fewshot_accuracy(x[::2], y[::2], x[1::2], y[1::2], 5, shots=(25,))


def test_knn_matches_brute_force(monkeypatch):
  monkeypatch.setattr(knn, 'TEST_BLOCK', 7)  # Several blocks.
  rng = np.random.default_rng(0)
  train, test = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
  train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
  out = knn.knn_accuracy(train, train_y, test, test_y, 4, k=9, temperature=0.1)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  hits1 = hits5 = 0
  for i in range(25):
    sims = [float(unit(test)[i] @ unit(train)[j]) for j in range(60)]
    nearest = sorted(range(60), key=lambda j: -sims[j])[:9]
    votes = [sum(np.exp(sims[j] / 0.1) for j in nearest if train_y[j] == c) for c in range(4)]
    order = sorted(range(4), key=lambda c: -votes[c])
    hits1 += order[0] == test_y[i]
    hits5 += test_y[i] in order[:4]
  assert out['top1'] == pytest.approx(hits1 / 25) and out['top5'] == pytest.approx(hits5 / 25)
  x, y = _blobs(30, 3, 4, 0.1, seed=2)
  assert knn.knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], 3)['top1'] == 1.0


def test_logistic_regression_matches_scipy():
  scipy_optimize = pytest.importorskip('scipy.optimize')
  x, y = _blobs(20, 3, 5, 2.0, seed=3)
  x = linear.standardise(x)[0]
  l2 = 0.05
  w, b, value, _ = linear.logistic_regression(x, y, 3, l2, tol=1e-6)

  def objective(flat):
    ww, bb = flat[:15].reshape(5, 3), flat[15:]
    logits = x.astype(np.float64) @ ww + bb
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(ww * ww)

  ref = scipy_optimize.minimize(objective, np.zeros(18), method='L-BFGS-B',
                                options=dict(gtol=1e-10, ftol=1e-14, maxiter=5000))
  assert value == pytest.approx(ref.fun, rel=1e-4)
  np.testing.assert_allclose(w, ref.x[:15].reshape(5, 3), atol=2e-3)
  # b is determined up to a constant shift (softmax): compare centred.
  np.testing.assert_allclose(b - b.mean(), ref.x[15:] - ref.x[15:].mean(), atol=2e-3)


def test_linear_probe_sweep_and_label_subsets():
  x, y = _blobs(50, 4, 8, 0.3, seed=4)
  out = linear.fit_probe(x[::2], y[::2], x[1::2], y[1::2], 4, l2_values=(1e-4, 1e-2))
  assert out['top1'] == 1.0 and out['val_top1'] == 1.0 and out['l2'] == 1e-2  # Ties: larger.
  fit, val = linear.stratified_split(y, 0.2, np.random.default_rng(0))
  assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(y)
  assert list(np.bincount(y[val])) == [10, 10, 10, 10]
  subset = linear.label_subset(y, 0.1, np.random.default_rng(0))
  assert list(np.bincount(y[subset])) == [5, 5, 5, 5] and len(set(subset)) == 20
  assert list(np.bincount(y[linear.label_subset(y, 0.001, np.random.default_rng(0))])) == \
      [1, 1, 1, 1]


def test_evaluator_specs_reject_bad_configs():
  def specs(**evals):
    return runner.evaluator_specs(ml_collections.ConfigDict(dict(batch_size=8, **evals)))

  folder = dict(kind='folder', root='/x')
  assert specs(z=dict(kind='zeroshot', data=folder))['z']['templates'] == 'short'
  assert specs(k=dict(kind='knn', train=folder, test=folder, every=5))['k']['k'] == 20
  with pytest.raises(ValueError, match='kind must be one of'):
    specs(z=dict(kind='mae', data=folder))
  with pytest.raises(ValueError, match=r"unknown keys \['shot'\]"):
    specs(f=dict(kind='fewshot', train=folder, test=folder, shot=(1,)))
  with pytest.raises(ValueError, match='needs `test`'):
    specs(f=dict(kind='fewshot', train=folder))
  with pytest.raises(ValueError, match='every must be an integer >= 0'):
    specs(z=dict(kind='zeroshot', data=folder, every=-1))
  with pytest.raises(ValueError, match='unknown template set'):
    specs(z=dict(kind='zeroshot', data=folder, templates='imagenet'))
  with pytest.raises(ValueError, match='must be a dict with a kind'):
    specs(zeroshot=3)
  bad = {'fewshot': [('shots', (0,)), ('shots', 5), ('seeds', 0), ('l2', -1.0)],
         'knn': [('k', 0), ('temperature', 0.0), ('temperature', float('nan'))],
         'lowshot': [('fractions', (-0.5,)), ('fractions', (2.0,)), ('l2', 0.01),
                     ('val_fraction', 1.5)],
         'linear_probe': [('max_steps', 0), ('l2', ())]}
  for kind, cases in bad.items():
    for key, value in cases:
      with pytest.raises(ValueError, match=f'config.evals.e.{key} must be'):
        specs(e={'kind': kind, 'train': folder, 'test': folder, key: value})
  with pytest.raises(ValueError, match='every must be an integer'):
    specs(z=dict(kind='zeroshot', data=folder, every=True))
  with pytest.raises(ValueError, match='class_names must be a list'):
    specs(z=dict(kind='zeroshot', data=folder, class_names='xyz'))
  with pytest.raises(ValueError, match='batch_size must be an integer >= 1'):
    runner.evaluator_specs(ml_collections.ConfigDict(dict(batch_size=0)))


def test_evaluations_check_datasets_before_running(tmp_path):
  for name, count in (('cat', 3), ('dog', 2), ('ship', 3)):
    os.makedirs(tmp_path / 'a' / name)
    os.makedirs(tmp_path / 'b' / name.replace('ship', 'truck'))
    for i in range(count):
      for root in ('a', 'b'):
        Image.new('RGB', (8, 8)).save(tmp_path / root / name.replace(
            'ship', 'truck' if root == 'b' else 'ship') / f'{i}.png')

  def build(**evaluator):
    return runner.Evaluations(ml_collections.ConfigDict(
        dict(evals=dict(batch_size=8, e=evaluator))))

  a = dict(kind='folder', root=str(tmp_path / 'a'))
  b = dict(kind='folder', root=str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='config.evals.e: the train and test sets have '
                     'different classes'):
    build(kind='knn', train=a, test=b)
  with pytest.raises(ValueError, match="3-shot needs that many .* 'dog' has 2"):
    build(kind='fewshot', train=a, test=a, shots=(1, 3))
  assert build(kind='fewshot', train=a, test=a, shots=(1, 2)).specs['e']['seeds'] == 3
  with pytest.raises(ValueError, match='2 class_names for a dataset of 3 classes'):
    build(kind='zeroshot', data=a, class_names=['x', 'y'])
  os.makedirs(tmp_path / 'a' / 'empty')
  with pytest.raises(ValueError, match=r"class folders without images .*\['empty'\]"):
    build(kind='zeroshot', data=a)


def test_folder_and_tfds_classification_datasets(tmp_path):
  for c, name in enumerate(('cat', 'sea_lion')):
    os.makedirs(tmp_path / 'folder' / name)
    for i in range(4):
      Image.new('RGB', (8, 8), (60 * c, 10 * i, 0)).save(tmp_path / 'folder' / name / f'{i}.png')
  train = datasets.load(dict(kind='folder', root=str(tmp_path / 'folder'), per_class=':3'))
  test = datasets.load(dict(kind='folder', root=str(tmp_path / 'folder'), per_class='3:'))
  assert train.classes == ['cat', 'sea lion'] and len(train) == 6 and len(test) == 2
  assert not {p for p, _ in train.items} & {p for p, _ in test.items}
  assert [label for _, label in test.items] == [0, 1]
  with pytest.raises(ValueError, match="unknown keys \\['max_per_clas'\\]"):
    datasets.load(dict(kind='folder', root=str(tmp_path / 'folder'), max_per_clas=2))
  with pytest.raises(FileNotFoundError, match='image folder dataset not found'):
    datasets.load(dict(kind='folder', root=str(tmp_path / 'none')))

  tfds = pytest.importorskip('tensorflow_datasets')

  class TinyLabels(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='png'),
          'label': tfds.features.ClassLabel(names=['red_car', 'green_tree'])}))

    def _split_generators(self, dl_manager):
      return {'test': self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        png = io.BytesIO()
        Image.new('RGB', (12, 10), (200 * (i % 2), 100, 0)).save(png, 'PNG')
        png.seek(0)  # Encoded bytes: encoding an array would need TensorFlow.
        yield i, {'image': png, 'label': i % 2}

  TinyLabels(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  data = datasets.load(dict(kind='tfds', name='tiny_labels', split='test',
                            data_dir=str(tmp_path)))
  assert data.classes == ['red car', 'green tree'] and len(data) == 6
  batches = list(pipeline.eval_batches(data.items, 8, batch_size=4))
  labels = np.concatenate([b['label'] for b in batches])
  red = np.concatenate([b['image'][:, 0, 0, 0] for b in batches])
  assert sorted(labels) == [0, 0, 0, 1, 1, 1]
  assert all((r > 100) == (label == 1) for label, r in zip(labels, red))
  with pytest.raises(FileNotFoundError, match='tfds build tiny_labels'):
    datasets.load(dict(kind='tfds', name='tiny_labels', split='test',
                       data_dir=str(tmp_path / 'elsewhere')))
