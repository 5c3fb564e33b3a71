"""Zero-shot classification (CLIP, Radford et al. 2021, Sec. 3.1.4).

Each class's text embedding is the L2-normalised mean of the L2-normalised embeddings of its
prompts (`templates.py`: one prompt per template); an image is assigned the class of highest
cosine similarity. Prompts are embedded a few classes at a time and images scored in blocks, so
memory stays bounded (ImageNet: 1000 classes x 80 templates never sit in memory at once).
"""

from typing import Dict, Sequence

import numpy as np

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
    dict with `top1`, `top5` (top-min(5, C)) in [0, 1] and `chance_top1` = 1 / C. A tie with
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
              chance_top1=1.0 / class_embeds.shape[0])
