"""wsss: weakly-supervised semantic segmentation of histopathology patches.

Two stages after Han et al. (Medical Image Analysis 2022): a ResNet38 multi-label classifier whose
Grad-CAMs become pseudo-masks, then a DeepLab v3+ segmenter trained on those masks.
"""

__version__ = "0.1.0"
