r"""RILS ViT-B/16: the paper's set-up (Yang et al., CVPR 2023, arXiv:2301.06958).

  python -m rils_jax.main --config=configs/vit_b16.py --config.input.batch_size=8 \
      --config.total_steps=3 --workdir=/tmp/b16     # CPU smoke test on generated data

For real pre-training, copy this file and set `c.input.sources` to your caption files (lists
cannot be overridden from the command line).

Recipe and sources (see ../shared/docs/RILS_METHOD.md):
- Model (RILS release): ViT-B/16 at 224 px (width 768, 12 blocks, 12 heads, q/v bias, sin-cos
  positions), 1-block decoder 768 wide, text transformer 512 wide / 12 layers / 8 heads, context
  77, joint width 512. CLIP's 49,408-token BPE tokenizer, as the release
  (`tokenizer.kind='clip_bpe'`: needs open_clip_torch's vocabulary file, README "Tokenizer");
  `--config.tokenizer.kind=sentencepiece` trains one of up to 49,408 pieces on the captions.
- Loss (release): lambda = 0.5, tau_s = 0.1, tau_t = 0.04, mask ratio 0.75, retrieval gate on,
  no L_rec gradient into the captions; logit scale init ln(1/0.07), clipped at 100 (CLIP).
- Optimisation (SLIP, the code base RILS descends from; the release has no training loop):
  global batch 4096, AdamW beta = (0.9, 0.98), eps 1e-8, weight decay 0.5 on every parameter
  but biases, norms and the logit scale (token / position embeddings and CLS / mask tokens
  included), lr 5e-4 with 1 warm-up epoch from 1e-6 and cosine decay to 1e-5, no gradient
  clipping, 25 epochs, RandomResizedCrop(224, scale 0.5-1.0), ImageNet mean / std, mixed
  precision (bfloat16 compute, float32 parameters). Logit scale: exp(l) unclamped in the
  forward, l clamped to [0, ln 100] after each step.
- Initialisation and masking (release): the patch-embedding and text MLP biases at PyTorch's
  default uniform init, int(196 * 0.25) = 49 visible patches.
- On N GPUs the release normalises L_rec per GPU and gathers captions without gradient:
  `--config.loss.release_gpus=N` reproduces that run's loss and gradients exactly; the default
  (0) computes exact global losses, the same for any device count (README, "Where rils_jax
  differs from the release").
- Steps: 25 epochs of LAION-20M at batch 4096 = 122,070 steps; 1 epoch = 4,883 warm-up steps.

Data: with no argument the config points at the generated shapes data (224 px) so that it runs
anywhere; `:data=shared` uses ../shared/data (Flickr8k 1k + COCO mini). LAION-scale data (README
"Data at scale"): `:data=webdataset:/data/laion/{00000..01999}.tar` (img2dataset shards),
`:data=arrayrecord:/data/laion_ar/train-*.array_record` (python -m rils_jax.data.convert) or
`:data=tfds:coco_captions`; your own caption files: `:data=csv:CAPTIONS.csv:IMAGES` (or
coco:JSON:IMAGES, txt:IMAGES) with `epochs=E`, `heldout=N` (README "Your own data"); mixtures
and evaluation data go in a copy of this file. Commas
separate the argument's keys: write brace alternatives `{a,b}` as two patterns joined by `::`.

  python -m rils_jax.main --config=configs/vit_b16.py:data=arrayrecord:/data/ar/*.array_record \
      --workdir=/mnt/shared/b16 --config.input.num_workers=16

Arguments: `configs/vit_b16.py:data=DATA,dtype=auto|bfloat16|float32,platform=NAME`;
`auto` is bfloat16 compute on GPU / TPU (the recipe's mixed precision) and float32 on CPU, where
XLA's bfloat16 matmuls are far slower than float32. `platform` is a preset of
rils_jax/platforms.py (tpu_v4_32, tpu_v4_64, tpu_v5e_256, tpu_v5p_128, gpu_8xh100,
gpu_2x8xh100): mesh, bfloat16, remat and the micro-batch per device. Check that it fits first:

  python -m rils_jax.dry_run --config=configs/vit_b16.py:platform=tpu_v5e_256
"""

from configs import common


def get_config(arg=None):
  return common.paper_recipe(arg, 'B/16', dict(width=512, num_layers=12, num_heads=8),
                                 embed_dim=512)
