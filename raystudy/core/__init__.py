"""The torch core: data, models, checkpoints, pretrained weights, devices and precision. No Ray."""
