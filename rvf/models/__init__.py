"""rvf's model factory.

    from rvf.models import create_model, list_models
    model = create_model("vgg16_bn", num_classes=2)            # an rvf scratch model
    model = create_model("timm:efficientnet_b0", pretrained=True)  # any timm model
    model.pretrained_cfg["input_size"], model.pretrained_cfg["mean"]  # what transforms read

Importing each family module runs its `@register_model` decorators (as in timm).
"""

from ._registry import create_model, get_cam_layer, is_model, list_models, register_model
from ._timm import TIMM_PREFIX
from .alexnet import *  # noqa: F403 (the imports register the models; their names come along)
from .inception import *  # noqa: F403
from .lenet import *  # noqa: F403
from .resnet import *  # noqa: F403
from .vgg import *  # noqa: F403

__all__ = ["TIMM_PREFIX", "create_model", "get_cam_layer", "is_model", "list_models", "register_model"]
