"""Models: timm backbones, the DINO head and the multi-crop wrapper."""
