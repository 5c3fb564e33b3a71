"""Flax linen models: the ViT image encoder, the MAE-style decoder, the text transformer and the
two-tower RILS model that joins them."""
