"""Evaluation metrics on hand-built embeddings with known answers."""

import math

import numpy as np
import pytest

from rils_jax import evaluation


def test_retrieval_recall_known_answers():
  # 3 images, 2 captions each (captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2). With
  # identity image embeddings, sim = image @ text.T is exactly this matrix (no ties).
  sim = np.array([[0.1, 0.9, 0.2, 0.3, 0.4, 0.45],   # best own caption at rank 0
                  [0.8, 0.1, 0.3, 0.2, 0.35, 0.5],   # best own caption (2) at rank 3
                  [0.2, 0.3, 0.6, 0.1, 0.5, 0.4]])   # best own caption (4) at rank 1
  owner = np.array([0, 0, 1, 1, 2, 2])
  r = evaluation.retrieval_recall(np.eye(3), sim.T, owner, ks=(1, 2, 3, 4))
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
  r = evaluation.retrieval_recall(images, texts, np.repeat(np.arange(50), 5))
  assert r['i2t_r1'] == r['t2i_r1'] == 1.0


def test_zeroshot_perfect_and_chance():
  classes = np.eye(10, 32)
  labels = np.arange(200) % 10
  perfect = classes[labels] + 0.01
  perfect /= np.linalg.norm(perfect, axis=1, keepdims=True)
  acc = evaluation.zeroshot_accuracy(perfect, labels, classes)
  assert acc['top1'] == 1.0 and acc['top5'] == 1.0 and acc['chance_top1'] == 0.1
  rng = np.random.default_rng(0)
  random = rng.normal(size=(5000, 32))
  random /= np.linalg.norm(random, axis=1, keepdims=True)
  acc = evaluation.zeroshot_accuracy(random, rng.integers(0, 10, 5000), classes)
  assert abs(acc['top1'] - 0.1) < 0.02 and abs(acc['top5'] - 0.5) < 0.03
