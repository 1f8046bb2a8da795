"""wsss: weakly-supervised semantic segmentation of histopathology patches.

Two stages after Han et al. (Medical Image Analysis 2022): a ResNet38 multi-label classifier whose
Grad-CAMs become pseudo-masks, then a DeepLab v3+ segmenter trained on those masks.

From Python (``docs/api.md``)::

    import wsss
    model = wsss.load_model("stage2.pth", stage1_ckpt="stage1.pth", device="cpu")
    result = model.predict(image)          # labels (H, W), probabilities (C, H, W) float16
    summary = model.predict_slide("slide.svs", out="wsi/", save_probs=True)

The API is imported on first use, so ``import wsss`` (and ``wsss --help``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Classifier", "Result", "Segmenter", "WsssError", "__version__", "load_classifier", "load_model",
           "reproduce", "train"]

if TYPE_CHECKING:
    from wsss.api import Classifier, Result, Segmenter, load_classifier, load_model, reproduce, train
    from wsss.errors import WsssError


def __getattr__(name: str) -> Any:
    if name == "WsssError":
        from wsss.errors import WsssError

        return WsssError
    if name in __all__:
        from wsss import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsss' has no attribute {name!r}")
