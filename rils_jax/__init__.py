"""rils_jax: RILS (masked visual Reconstruction In Language semantic Space) pre-training, JAX/Flax.

Method: Yang et al., "RILS: Masked Visual Reconstruction in Language Semantic Space", CVPR 2023
(arXiv:2301.06958). See README.md for the entry points.
"""
