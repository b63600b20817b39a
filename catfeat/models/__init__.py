"""The backbones: the registry of specs and weights, the EfficientNet-Lite builders, the compiled forward pass, ImageNet class names."""
