"""Zero-shot classification (CLIP, Radford et al. 2021, Sec. 3.1.4), and the `zeroshot`
evaluator kind (settings: `data`, a labelled image set; `templates`; `class_names`).

Each class's text embedding is the L2-normalised mean of the L2-normalised embeddings of its
prompts (`templates.py`: one prompt per template); an image is assigned the class of highest
cosine similarity. Prompts are embedded a few classes at a time and images scored in blocks, so
memory stays bounded (ImageNet: 1000 classes x 80 templates never sit in memory at once).
"""

from typing import Any, Dict, Sequence

import numpy as np

from rils_jax.evals import settings
from rils_jax.evals import templates as templates_lib

# Prompts embedded per call; the class embeddings are accumulated per block of classes.
PROMPTS_PER_BLOCK = 4096
IMAGES_PER_BLOCK = 4096


def class_embeddings(embedder, params, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """float32 (C, D): normalised mean over `templates` of each class's prompt embeddings.

  At most `PROMPTS_PER_BLOCK` prompt embeddings are held at once.
  """
  per_block = max(1, PROMPTS_PER_BLOCK // len(templates))
  out = []
  for start in range(0, len(class_names), per_block):
    names = class_names[start:start + per_block]
    prompts = [t.format(name) for name in names for t in templates]
    out.append(embedder.texts(params, prompts).reshape(len(names), len(templates), -1).mean(1))
  embeds = np.concatenate(out)
  return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def zeroshot_accuracy(image_embeds: np.ndarray, labels: np.ndarray,
                      class_embeds: np.ndarray) -> Dict[str, float]:
  """Top-1 / top-5 accuracy of nearest-class assignment by cosine similarity.

  Args:
    image_embeds: float (n, D) L2-normalised.
    labels: int (n,) true class indices.
    class_embeds: float (C, D) L2-normalised class embeddings.

  Returns:
    dict with `top1`, `top5` (top-min(5, C)) in [0, 1], `chance_top1` = 1 / C and
    `chance_top5` = min(5, C) / C. A tie with
    the true class counts against it (its rank is the number of classes scoring higher or
    equal, other than itself).
  """
  labels = np.asarray(labels)
  k = min(5, class_embeds.shape[0])
  rank = np.empty(len(labels), np.int64)
  for start in range(0, len(labels), IMAGES_PER_BLOCK):
    sim = image_embeds[start:start + IMAGES_PER_BLOCK] @ class_embeds.T
    true = sim[np.arange(sim.shape[0]), labels[start:start + IMAGES_PER_BLOCK]]
    rank[start:start + sim.shape[0]] = np.sum(sim >= true[:, None], axis=1) - 1
  return dict(top1=float(np.mean(rank == 0)), top5=float(np.mean(rank < k)),
              chance_top1=1.0 / class_embeds.shape[0], chance_top5=k / class_embeds.shape[0])


# The `zeroshot` evaluator kind (rils_jax/evals/runner.py).
DEFAULTS = dict(data=None, templates='short', class_names=())
DATASETS = {'data': 'images'}


def check_settings(name: str, spec: settings.Spec) -> None:
  """Raises ValueError for an unknown template set or class names that are not strings."""
  templates_lib.get_templates(spec['templates'])
  names = spec['class_names']
  settings.check(isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names),
                 name, 'class_names', "a list of non-empty strings (or empty: the dataset's)",
                 names)


def check_data(spec: settings.Spec, data: Dict[str, Any]) -> None:
  """Raises ValueError when `class_names` does not name every class of the dataset."""
  classes = data['data'].classes
  if spec['class_names'] and len(spec['class_names']) != len(classes):
    raise ValueError(f'{len(spec["class_names"])} class_names for a dataset of '
                     f'{len(classes)} classes')


def run(ev, spec: settings.Spec, params, embedder, cache) -> Dict[str, float]:
  """top1, top5, their chance levels, images and skipped_images of the zero-shot evaluator."""
  data = ev.images(spec['data'], params, embedder, cache)
  classes = list(spec['class_names'] or data['classes'])
  class_embeds = class_embeddings(embedder, params, classes,
                                  templates_lib.get_templates(spec['templates']))
  out = zeroshot_accuracy(data['embed'], data['label'], class_embeds)
  return dict(out, images=len(data['label']), skipped_images=data['skipped'])
