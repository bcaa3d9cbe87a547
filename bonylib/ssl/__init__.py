"""Self-supervised learning: DINO augmentations, loss, schedules, trainer."""
