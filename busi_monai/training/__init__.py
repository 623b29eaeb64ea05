"""Recipes (presets as data), losses, schedules, augmentation, the training loop, cross-validation."""
