"""Models: the frozen timm ViT backbone and the per-cluster PEFT modules."""
