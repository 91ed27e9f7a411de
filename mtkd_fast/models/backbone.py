"""A distilled ResNet student as the backbone of torchvision's detection and segmentation models.

``backbone(arch, weights, task=...)`` builds the ResNet ``arch`` (a zoo name, e.g. ``imagenet_resnet18``),
loads ``weights`` (a file written by ``mtkd-fast export``, a run's ``student_best.pth`` or any torchvision
state_dict of that ResNet) and wires it in as torchvision's own builders do:

- ``"detection"``: ``FasterRCNN`` over a feature pyramid on layer1..layer4, as ``fasterrcnn_resnet50_fpn``
  (``resnet_fpn_backbone``): FrozenBatchNorm2d when weights are given, ``trainable_layers`` (default 3)
  trainable stages from the top.
- ``"instance_segmentation"``: ``MaskRCNN`` over the same pyramid, as ``maskrcnn_resnet50_fpn``.
- ``"segmentation"``: ``DeepLabV3`` on layer4 (+ an FCN auxiliary head on layer3 with ``aux_loss``), as
  ``deeplabv3_resnet50``: strides of the last stages replaced by dilation for ``output_stride`` 8 (default) or
  16. torchvision's BasicBlock has no dilation argument, so the dilation is set on the built convolutions; for
  Bottleneck ResNets this gives exactly torchvision's ``replace_stride_with_dilation`` network.

Weights are loaded strictly: every parameter and buffer of the ResNet's trunk (all but the classifier ``fc``)
must be in the file with its shape. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from .._io import load_torch_file
from . import imagenet
from .loading import _extract_state_dict

TASKS = ("detection", "instance_segmentation", "segmentation")
_DEFAULT_CLASSES = {"detection": 91, "instance_segmentation": 91, "segmentation": 21}  # COCO, COCO, VOC (torchvision's)


def _load_state(weights, arg: str = "weights") -> dict[str, Tensor]:
    if isinstance(weights, Mapping):
        return _extract_state_dict(weights, f"{arg} (a mapping)")
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a file path, a state_dict or None, got {type(weights).__name__}")
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: no such file: {path}")
    obj = load_torch_file(path, what=arg, hint="pass a student file (student_best.pth) or the output of "
                          "`mtkd-fast export`")
    return _extract_state_dict(obj, path)


def load_trunk(resnet: nn.Module, state: Mapping[str, Tensor], source: str = "weights") -> None:
    """Load ``state`` into every parameter and buffer of ``resnet`` but the classifier ``fc`` (strictly).

    FrozenBatchNorm2d has no ``num_batches_tracked``; the file's counters are then ignored."""
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    for key, ref in expected.items():
        if key not in state:
            raise ValueError(f"{source}: missing key '{key}' (shape {tuple(ref.shape)}) for this ResNet")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: key '{key}' has shape {tuple(state[key].shape)}, this ResNet expects "
                             f"{tuple(ref.shape)}")
    extra = [k for k in state if k not in expected
             and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if extra:
        raise ValueError(f"{source}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all); is it a "
                         f"checkpoint of another architecture?")
    missing, unexpected = resnet.load_state_dict({k: state[k] for k in expected}, strict=False)
    assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)


def dilate(resnet: nn.Module, replace_stride_with_dilation: tuple[bool, bool, bool]) -> nn.Module:
    """Replace the stride-2 of layer2/3/4 by dilation, as torchvision's ``replace_stride_with_dilation`` (in place).

    Per stage, as torchvision's ``ResNet._make_layer``: the first block's 3x3 convolutions keep the dilation
    reached before the stage (its strided one loses the stride), the later blocks' use the stage's dilation.
    Only strides, dilations and paddings change: the parameters stay as they are."""
    dilation = 1
    for name, replace in zip(("layer2", "layer3", "layer4"), replace_stride_with_dilation):
        previous = dilation
        if replace:
            dilation *= 2
        for b, block in enumerate(getattr(resnet, name)):
            d = previous if b == 0 else dilation
            for module in block.modules():
                if not isinstance(module, nn.Conv2d):
                    continue
                if replace:
                    module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    # BasicBlock: conv1 carries the stride, conv2 the stage's dilation; Bottleneck: conv2 both
                    dd = dilation if (b == 0 and isinstance(block, BasicBlock) and module is block.conv2) else d
                    module.dilation, module.padding = (dd, dd), (dd, dd)
    return resnet


def _resnet(arch: str, norm_layer=None):
    from torchvision.models.resnet import ResNet

    block, layers, groups, width = imagenet.ARCHS[arch]
    return ResNet(block, layers, groups=groups, width_per_group=width, norm_layer=norm_layer)


def _freeze(resnet: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule (``resnet_fpn_backbone``): train the top ``trainable_layers`` stages only."""
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in resnet.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            p.requires_grad_(False)


def backbone(arch: str, weights=None, task: str = "detection", num_classes: Optional[int] = None, *,
             trainable_layers: Optional[int] = None, output_stride: int = 8, aux_loss: bool = False,
             **model_kwargs) -> nn.Module:
    """A torchvision detection or segmentation model with the ResNet ``arch`` loaded from ``weights``.

    Args:
        arch: a ResNet name of the zoo (``imagenet_resnet18`` ... ``imagenet_resnext50_32x4d``).
        weights: a file (``mtkd-fast export`` output, a run's ``student_best.pth``, a torchvision ResNet
            state_dict), a state_dict, or None for random weights. The classifier ``fc`` is not used.
        task: ``"detection"`` (FasterRCNN + FPN), ``"instance_segmentation"`` (MaskRCNN + FPN) or
            ``"segmentation"`` (DeepLabV3).
        num_classes: classes of the new model, background included for the detectors (default: torchvision's,
            91 for detection, 21 for segmentation).
        trainable_layers: detectors only: how many stages from the top stay trainable, 0..5 (default 3 with
            weights, 5 without, as torchvision).
        output_stride: segmentation only: 8 (default), 16 or 32.
        aux_loss: segmentation only: add the FCN auxiliary head on layer3.
        **model_kwargs: passed to FasterRCNN / MaskRCNN (e.g. ``min_size``, ``max_size``).

    Raises ValueError naming the argument for a bad ``arch``, ``task``, ``num_classes``, ``trainable_layers`` or
    ``output_stride``, and naming the file and key when ``weights`` do not fit ``arch``.
    """
    if arch not in imagenet.ARCHS:
        raise ValueError(f"arch: expected a ResNet of the zoo ({', '.join(sorted(imagenet.ARCHS))}), got {arch!r}")
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if num_classes is None:
        num_classes = _DEFAULT_CLASSES[task]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    state = None if weights is None else _load_state(weights)
    source = "weights" if weights is None or isinstance(weights, Mapping) else f"weights: {os.fspath(weights)}"

    if task == "segmentation":
        if trainable_layers is not None:
            raise ValueError("trainable_layers: applies to the detection tasks only")
        return _deeplabv3(arch, state, source, num_classes, output_stride, aux_loss, model_kwargs)
    if output_stride != 8 or aux_loss:
        raise ValueError("output_stride, aux_loss: apply to task='segmentation' only")
    if trainable_layers is None:
        trainable_layers = 3 if state is not None else 5
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers: expected an int in 0..5, got {trainable_layers!r}")
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FrozenBatchNorm2d

    # pretrained trunk: frozen BatchNorm statistics (detection batches are small), as torchvision
    resnet = _resnet(arch, FrozenBatchNorm2d if state is not None else None)
    if state is not None:
        load_trunk(resnet, state, source)
    _freeze(resnet, trainable_layers)
    stage2 = resnet.inplanes // 8  # layer1's output channels
    fpn = BackboneWithFPN(resnet, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                          [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)], out_channels=256)
    detector = MaskRCNN if task == "instance_segmentation" else FasterRCNN
    return detector(fpn, num_classes=num_classes, **model_kwargs)


def _deeplabv3(arch, state, source, num_classes, output_stride, aux_loss, model_kwargs):
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    replace = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
    if output_stride not in replace:
        raise ValueError(f"output_stride: expected 8, 16 or 32, got {output_stride!r}")
    if model_kwargs:
        raise ValueError(f"model_kwargs: DeepLabV3 takes no further arguments, got {sorted(model_kwargs)}")
    resnet = _resnet(arch)
    if state is not None:
        load_trunk(resnet, state, source)
    dilate(resnet, replace[output_stride])
    expansion = resnet.layer4[0].expansion
    layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    trunk = IntermediateLayerGetter(resnet, return_layers=layers)
    aux = FCNHead(256 * expansion, num_classes) if aux_loss else None
    return DeepLabV3(trunk, DeepLabHead(512 * expansion, num_classes), aux)


__all__ = ["backbone", "dilate", "load_trunk", "TASKS"]
