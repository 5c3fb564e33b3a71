"""Transfer evaluations of a RILS model (see runner.py for the config format).

embed.py       jitted, mesh-sharded image / text embedding and frozen GAP features
datasets.py    labelled image sets: image folders and TFDS datasets
templates.py   zero-shot prompt templates (CLIP's ImageNet 80 / 7, CIFAR 18, a short set)
zeroshot.py    zero-shot classification
retrieval.py   image<->text recall at K
linear.py      logistic-regression linear probe with an L2 sweep; low-shot label subsets
lowshot.py     the linear probe on fractions of the training labels
fewshot.py     closed-form ridge-regression few-shot
knn.py         weighted k-NN
patch_text.py  patch-to-phrase probability maps rendered as PNG
runner.py      the evaluators a config names, run at the end, periodically, or on a checkpoint
settings.py    type and range checks of evaluator settings
restore.py     a trained model back from a checkpoint, on one host
"""
