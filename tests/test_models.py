"""Model zoo: names, the feature interface, checkpoint compatibility with the lineage, loading errors.

The expected state_dict keys and shapes below were worked out by hand from the public definitions the
shared CIFAR-100 teacher checkpoints were trained with:
- HobbitLong/RepDistiller models/{resnet,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py (and the same
  files in Rorozhl/CA-MKD, which MTKD-RL's code builds on; wrn_28_4 = WideResNet(depth=28, widen_factor=4));
- resnet110x2 = ResNet(110, [16, 32, 64, 128]) from the SimKD / CA-MKD lineage's resnet.py;
- RegNetX_200MF / RegNetX_400MF / RegNetY_400MF from kuangliu/pytorch-cifar models/regnet.py (stem conv
  3->64, stages with strides 1,1,2,2, SE width round(w_in * 0.25), classifier ``linear``).
"""

from __future__ import annotations

import argparse
import functools

import pytest
import torch
import torchvision

from mtkd_fast.models import create_model, list_models, load_checkpoint

CIFAR_MODELS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "resnet110x2",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_4",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "MobileNetV2", "MobileNetV2_0_5", "ShuffleV1", "ShuffleV2", "RegNetX_200MF", "RegNetX_400MF", "RegNetY_400MF",
]  # fmt: skip
IMAGENET_MODELS = {
    "imagenet_resnet18": "resnet18",
    "imagenet_resnet34": "resnet34",
    "imagenet_resnet50": "resnet50",
    "imagenet_resnet101": "resnet101",
    "imagenet_wide_resnet50_2": "wide_resnet50_2",
    "imagenet_resnext50_32x4d": "resnext50_32x4d",
}

# feats[-2] (C, H, W) on a 32x32 input, from the definitions above (stage strides and widths)
LAST_MAP = {
    **{n: (64, 8, 8) for n in ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]},
    "resnet8x4": (256, 8, 8), "resnet32x4": (256, 8, 8), "resnet110x2": (128, 8, 8),
    "wrn_16_1": (64, 8, 8), "wrn_16_2": (128, 8, 8), "wrn_40_1": (64, 8, 8), "wrn_40_2": (128, 8, 8),
    "wrn_28_4": (256, 8, 8),
    **{n: (512, 4, 4) for n in ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]},
    "MobileNetV2": (320, 2, 2), "MobileNetV2_0_5": (1280, 2, 2), "ShuffleV1": (960, 4, 4), "ShuffleV2": (1024, 4, 4),
    "RegNetX_200MF": (368, 8, 8), "RegNetX_400MF": (384, 8, 8), "RegNetY_400MF": (384, 8, 8),
}  # fmt: skip
# models whose feats[-1] is not the global average of feats[-2]: the authors' MobileNetV2 pools the 1280-channel
# output of its final 1x1 conv, which comes after the 320-channel feats[-2]
EMBEDDING_WIDTH = {"MobileNetV2": 1280}

# (model, key, shape) from the lineage's definitions; None = the key must NOT exist
LINEAGE_KEYS = [
    # ResNet: conv1/bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.0/1}, fc
    ("resnet8", "conv1.weight", (16, 3, 3, 3)),
    ("resnet8", "layer1.0.conv1.weight", (16, 16, 3, 3)),
    ("resnet8", "layer1.0.downsample.0.weight", None),
    ("resnet8", "layer2.0.downsample.0.weight", (32, 16, 1, 1)),
    ("resnet8", "layer3.0.downsample.1.running_var", (64,)),
    ("resnet8", "fc.weight", (100, 64)),
    ("resnet56", "layer3.8.bn2.num_batches_tracked", ()),
    ("resnet56", "layer3.9.conv1.weight", None),
    ("resnet8x4", "conv1.weight", (32, 3, 3, 3)),
    ("resnet8x4", "layer1.0.downsample.0.weight", (64, 32, 1, 1)),
    ("resnet32x4", "layer3.4.conv2.weight", (256, 256, 3, 3)),
    ("resnet32x4", "fc.weight", (100, 256)),
    ("resnet110x2", "conv1.weight", (16, 3, 3, 3)),
    ("resnet110x2", "layer1.0.downsample.0.weight", (32, 16, 1, 1)),
    ("resnet110x2", "layer3.17.conv2.weight", (128, 128, 3, 3)),
    ("resnet110x2", "layer1.18.conv1.weight", None),
    ("resnet110x2", "fc.weight", (100, 128)),
    # WRN: conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc
    ("wrn_40_2", "conv1.weight", (16, 3, 3, 3)),
    ("wrn_40_2", "block1.layer.0.bn1.weight", (16,)),
    ("wrn_40_2", "block1.layer.0.conv1.weight", (32, 16, 3, 3)),
    ("wrn_40_2", "block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
    ("wrn_40_2", "block1.layer.1.convShortcut.weight", None),
    ("wrn_40_2", "block3.layer.5.conv2.weight", (128, 128, 3, 3)),
    ("wrn_40_2", "bn1.running_mean", (128,)),
    ("wrn_40_2", "fc.weight", (100, 128)),
    ("wrn_16_1", "block1.layer.0.convShortcut.weight", None),
    ("wrn_16_1", "block2.layer.0.convShortcut.weight", (32, 16, 1, 1)),
    ("wrn_28_4", "block3.layer.3.conv2.weight", (256, 256, 3, 3)),
    ("wrn_28_4", "block3.layer.4.conv2.weight", None),
    ("wrn_28_4", "fc.weight", (100, 256)),
    # VGG (vgg*_bn): block{0..4}.{conv, bn, relu, ...} without the last ReLU, classifier
    ("vgg13", "block0.0.weight", (64, 3, 3, 3)),
    ("vgg13", "block0.0.bias", (64,)),
    ("vgg13", "block0.1.running_mean", (64,)),
    ("vgg13", "block0.3.weight", (64, 64, 3, 3)),
    ("vgg13", "block0.4.weight", (64,)),
    ("vgg13", "block4.3.weight", (512, 512, 3, 3)),
    ("vgg13", "classifier.weight", (100, 512)),
    ("vgg8", "block1.0.weight", (128, 64, 3, 3)),
    ("vgg8", "block0.3.weight", None),
    ("vgg19", "block4.9.weight", (512, 512, 3, 3)),
    # MobileNetV2 of the MTKD-RL / CA-MKD code (mobilenetv2_T_w(6, 1.0)): stem 32, hidden = in x 6
    ("MobileNetV2", "conv1.0.weight", (32, 3, 3, 3)),
    ("MobileNetV2", "blocks.0.0.conv.0.weight", (32, 32, 1, 1)),
    ("MobileNetV2", "blocks.0.0.conv.3.weight", (32, 1, 3, 3)),
    ("MobileNetV2", "blocks.0.0.conv.6.weight", (16, 32, 1, 1)),
    ("MobileNetV2", "blocks.1.0.conv.0.weight", (96, 16, 1, 1)),
    ("MobileNetV2", "blocks.1.1.conv.3.weight", (144, 1, 3, 3)),
    ("MobileNetV2", "blocks.2.0.conv.6.weight", (32, 144, 1, 1)),
    ("MobileNetV2", "blocks.3.3.conv.0.weight", (384, 64, 1, 1)),
    ("MobileNetV2", "blocks.5.2.conv.6.weight", (160, 960, 1, 1)),
    ("MobileNetV2", "blocks.6.0.conv.0.weight", (960, 160, 1, 1)),
    ("MobileNetV2", "blocks.6.0.conv.6.weight", (320, 960, 1, 1)),
    ("MobileNetV2", "blocks.6.0.conv.7.running_var", (320,)),
    ("MobileNetV2", "blocks.6.1.conv.0.weight", None),
    ("MobileNetV2", "conv2.0.weight", (1280, 320, 1, 1)),
    ("MobileNetV2", "classifier.0.weight", (100, 1280)),
    # MobileNetV2 (mobile_half: T=6, width 0.5)
    ("MobileNetV2_0_5", "conv1.0.weight", (16, 3, 3, 3)),
    ("MobileNetV2_0_5", "conv1.1.weight", (16,)),
    ("MobileNetV2_0_5", "blocks.0.0.conv.0.weight", (16, 16, 1, 1)),
    ("MobileNetV2_0_5", "blocks.0.0.conv.3.weight", (16, 1, 3, 3)),
    ("MobileNetV2_0_5", "blocks.0.0.conv.6.weight", (8, 16, 1, 1)),
    ("MobileNetV2_0_5", "blocks.1.0.conv.0.weight", (48, 8, 1, 1)),
    ("MobileNetV2_0_5", "blocks.6.0.conv.6.weight", (160, 480, 1, 1)),
    ("MobileNetV2_0_5", "blocks.6.0.conv.7.running_var", (160,)),
    ("MobileNetV2_0_5", "conv2.0.weight", (1280, 160, 1, 1)),
    ("MobileNetV2_0_5", "classifier.0.weight", (100, 1280)),
    # ShuffleV1 (groups 3, out_planes 240/480/960, blocks 4/8/4)
    ("ShuffleV1", "conv1.weight", (24, 3, 1, 1)),
    ("ShuffleV1", "layer1.0.conv1.weight", (54, 24, 1, 1)),
    ("ShuffleV1", "layer1.0.conv2.weight", (54, 1, 3, 3)),
    ("ShuffleV1", "layer1.0.conv3.weight", (216, 18, 1, 1)),
    ("ShuffleV1", "layer1.1.conv1.weight", (60, 80, 1, 1)),
    ("ShuffleV1", "layer2.0.conv3.weight", (240, 20, 1, 1)),
    ("ShuffleV1", "layer2.7.bn3.weight", (480,)),
    ("ShuffleV1", "linear.weight", (100, 960)),
    # ShuffleV2 (1x: 116/232/464, 1024; blocks 3/7/3 after each down block)
    ("ShuffleV2", "conv1.weight", (24, 3, 1, 1)),
    ("ShuffleV2", "layer1.0.conv1.weight", (24, 1, 3, 3)),
    ("ShuffleV2", "layer1.0.conv2.weight", (58, 24, 1, 1)),
    ("ShuffleV2", "layer1.0.conv3.weight", (58, 24, 1, 1)),
    ("ShuffleV2", "layer1.0.conv4.weight", (58, 1, 3, 3)),
    ("ShuffleV2", "layer1.0.bn5.weight", (58,)),
    ("ShuffleV2", "layer1.1.conv1.weight", (58, 58, 1, 1)),
    ("ShuffleV2", "layer1.4.conv1.weight", None),
    ("ShuffleV2", "layer2.7.conv3.weight", (116, 116, 1, 1)),
    ("ShuffleV2", "conv2.weight", (1024, 464, 1, 1)),
    ("ShuffleV2", "linear.weight", (100, 1024)),
    # RegNet (pytorch-cifar)
    ("RegNetX_200MF", "conv1.weight", (64, 3, 3, 3)),
    ("RegNetX_200MF", "layer1.0.conv1.weight", (24, 64, 1, 1)),
    ("RegNetX_200MF", "layer1.0.conv2.weight", (24, 8, 3, 3)),
    ("RegNetX_200MF", "layer1.0.shortcut.0.weight", (24, 64, 1, 1)),
    ("RegNetX_200MF", "layer1.0.se.se1.weight", None),
    ("RegNetX_200MF", "layer4.6.conv3.weight", (368, 368, 1, 1)),
    ("RegNetX_200MF", "linear.weight", (100, 368)),
    ("RegNetX_400MF", "layer3.6.conv2.weight", (160, 16, 3, 3)),
    ("RegNetX_400MF", "layer4.11.conv2.weight", (384, 16, 3, 3)),
    ("RegNetY_400MF", "layer1.0.se.se1.weight", (16, 32, 1, 1)),
    ("RegNetY_400MF", "layer1.0.se.se1.bias", (16,)),
    ("RegNetY_400MF", "layer1.0.se.se2.weight", (32, 16, 1, 1)),
    ("RegNetY_400MF", "layer2.0.se.se1.weight", (8, 64, 1, 1)),
    ("RegNetY_400MF", "layer4.11.se.se1.weight", (96, 384, 1, 1)),
    ("RegNetY_400MF", "linear.weight", (100, 384)),
]

# state_dict sizes counted by hand from the same definitions (parameters + BN buffers)
LINEAGE_KEY_COUNTS = {
    "resnet8": 56,  # stem 6 + 3 blocks x 12 + 2 downsamples x 6 + fc 2
    "resnet32x4": 206,  # stem 6 + 15 blocks x 12 + 3 downsamples x 6 + fc 2
    "wrn_16_1": 1 + 6 * 12 + 2 + 5 + 2,  # conv1, 6 blocks x (2 BN x 5 + 2 conv), 2 shortcuts, bn1, fc
    "vgg8": 5 * 7 + 2,  # 5 blocks x (conv w,b + BN 5), classifier
    "RegNetX_200MF": 6 + 13 * 18 + 4 * 6 + 2,  # stem, 13 blocks x 3 (conv + BN 5), 4 shortcuts, linear
    "MobileNetV2": 6 + 17 * 18 + 6 + 2,  # stem, 17 inverted residuals x 3 (conv + BN 5), conv2, classifier
    "MobileNetV2_0_5": 6 + 17 * 18 + 6 + 2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    transformers = {n for n in names if n.startswith(("imagenet_vit_", "imagenet_swin_"))}  # tests/test_vit.py
    assert set(names) == set(CIFAR_MODELS) | set(IMAGENET_MODELS) | transformers


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9'") as err:
        create_model("resnet9", 100)
    assert "resnet32x4" in str(err.value) and "imagenet_resnet18" in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet8", num_classes)


@functools.lru_cache(maxsize=None)
def _state_shapes(name: str) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in create_model(name, 100).state_dict().items()}


@pytest.mark.parametrize("name,key,shape", LINEAGE_KEYS)
def test_state_dict_matches_lineage(name, key, shape):
    state = _state_shapes(name)
    if shape is None:
        assert key not in state
    else:
        assert state.get(key) == shape


@pytest.mark.parametrize("name,count", sorted(LINEAGE_KEY_COUNTS.items()))
def test_state_dict_key_counts(name, count):
    assert len(create_model(name, 100).state_dict()) == count


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_forward_and_feature_interface(name):
    torch.manual_seed(0)
    model = create_model(name, 100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all() and logits.std() > 0
    torch.testing.assert_close(logits_feat, logits)
    last, embedding = feats[-2], feats[-1]
    assert tuple(last.shape) == (2, *LAST_MAP[name])
    assert embedding.shape == (2, EMBEDDING_WIDTH.get(name, LAST_MAP[name][0]))
    if name not in EMBEDDING_WIDTH:
        torch.testing.assert_close(embedding, last.mean(dim=(2, 3)))


def test_train_mode_backward_reaches_every_parameter():
    model = create_model("RegNetY_400MF", 10).train()
    feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    (logits.sum() + feats[-2].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# ---------------------------------------------------------------- ImageNet models

@pytest.mark.parametrize("name,tv_name", sorted(IMAGENET_MODELS.items()))
def test_imagenet_names_shapes_and_feature_interface(name, tv_name):
    model = create_model(name, 1000).eval()
    ours = model.state_dict()
    theirs = getattr(torchvision.models, tv_name)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    with torch.no_grad():  # a small input keeps this cheap; the interface does not depend on the size
        feats, logits = model(torch.randn(2, 3, 64, 64), is_feat=True)
    width = 512 if name in ("imagenet_resnet18", "imagenet_resnet34") else 2048
    assert logits.shape == (2, 1000)
    assert tuple(feats[-2].shape) == (2, width, 2, 2)
    torch.testing.assert_close(feats[-1], feats[-2].mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["imagenet_resnet18", "imagenet_resnext50_32x4d"])
def test_imagenet_forward_matches_torchvision_with_loaded_weights(name, tmp_path):
    torch.manual_seed(1)
    reference = getattr(torchvision.models, IMAGENET_MODELS[name])(weights=None, num_classes=7).eval()
    with torch.no_grad():  # non-trivial BN statistics so a mismatch shows
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)  # bare torchvision state_dict
    ours = create_model(name, 7, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        expected = reference(x)
    torch.testing.assert_close(logits, expected)
    width = 512 if name == "imagenet_resnet18" else 2048
    assert tuple(feats[-2].shape) == (2, width, 2, 2)
    torch.testing.assert_close(feats[-1], feats[-2].mean(dim=(2, 3)))


def test_imagenet_weights_file_missing_is_a_clear_error(tmp_path):
    missing = tmp_path / "resnet50-0676ba61.pth"
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        create_model("imagenet_resnet50", 1000, weights=missing)


# ---------------------------------------------------------------- load_checkpoint

def _randomised(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("layout", ["model", "bare", "state_dict", "dataparallel"])
def test_load_checkpoint_layouts(layout, tmp_path):
    torch.manual_seed(2)
    source = _randomised(create_model("resnet8x4", 100))
    state = source.state_dict()
    if layout == "dataparallel":
        obj = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 240}
    elif layout == "model":
        obj = {"model": state, "epoch": 240, "accuracy": torch.tensor(73.1)}  # RepDistiller's teacher format
    elif layout == "state_dict":
        obj = {"state_dict": state}
    else:
        obj = state
    path = tmp_path / "resnet8x4_best.pth"
    torch.save(obj, path)
    target = load_checkpoint(create_model("resnet8x4", 100), path)
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope" / "wrn_40_2.pth"
    with pytest.raises(FileNotFoundError, match="wrn_40_2.pth"):
        load_checkpoint(create_model("wrn_40_2", 100), path)


def test_load_checkpoint_wrong_architecture_names_file_and_key(tmp_path):
    path = tmp_path / "resnet32x4_best.pth"
    torch.save({"model": create_model("resnet32x4", 100).state_dict()}, path)
    with pytest.raises(ValueError, match=r"resnet32x4_best\.pth.*'conv1\.weight' has shape \(32, 3, 3, 3\)"):
        load_checkpoint(create_model("resnet32", 100), path)
    path = tmp_path / "resnet8_best.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, path)
    with pytest.raises(ValueError, match=r"resnet8_best\.pth.*missing key 'block1\.layer\.0\.bn1\.weight'"):
        load_checkpoint(create_model("wrn_40_2", 100), path)


def test_load_checkpoint_class_count_mismatch_names_fc(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, path)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(10, 64\), the model expects \(100, 64\)"):
        load_checkpoint(create_model("resnet8", 100), path)


def test_load_checkpoint_unexpected_key(tmp_path):
    state = create_model("resnet8", 100).state_dict()
    state["extra.weight"] = torch.ones(3)
    path = tmp_path / "t.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        load_checkpoint(create_model("resnet8", 100), path)


def test_load_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"epoch": 3, "acc": 1.0}, path)
    with pytest.raises(ValueError, match=r"t\.pth: expected a state_dict"):
        load_checkpoint(create_model("resnet8", 100), path)


def test_load_checkpoint_with_python_objects_needs_trust(tmp_path):
    """Old training scripts pickle their argparse options next to the weights: refused unless trusted."""
    source = _randomised(create_model("resnet8", 100))
    path = tmp_path / "old.pth"
    torch.save({"model": source.state_dict(), "opt": argparse.Namespace(lr=0.05)}, path)
    with pytest.raises(ValueError, match=r"old\.pth: refused: the checkpoint holds Python objects.*--trust-checkpoint"):
        load_checkpoint(create_model("resnet8", 100), path)
    target = load_checkpoint(create_model("resnet8", 100), path, trusted=True)
    assert torch.equal(target.fc.weight, source.fc.weight)


# ---------------------------------------------------------------- the authors' MobileNetV2

def _authors_mobilenetv2_layout(num_classes: int) -> dict[str, tuple]:
    """Every state_dict key and shape of the MTKD-RL / CA-MKD code's MobileNetV2 (T = 6, width 1.0), written
    from its definition: conv_bn(3, 32, stride 2); per stage (t, c, n, s) n InvertedResiduals whose ``conv``
    is [pw conv in->in*t, BN, ReLU, dw 3x3 conv, BN, ReLU, pw conv in*t->c, BN]; conv_1x1_bn(320, 1280);
    classifier = Sequential(Linear(1280, K))."""
    def conv_bn(prefix, out_ch, in_ch, k):
        return {f"{prefix}.0.weight": (out_ch, in_ch, k, k), **bn(f"{prefix}.1", out_ch)}

    def bn(prefix, ch):
        return {f"{prefix}.weight": (ch,), f"{prefix}.bias": (ch,), f"{prefix}.running_mean": (ch,),
                f"{prefix}.running_var": (ch,), f"{prefix}.num_batches_tracked": ()}

    layout = conv_bn("conv1", 32, 3, 3)
    in_ch = 32
    for s, (t, c, n) in enumerate([(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4),
                                   (6, 96, 3), (6, 160, 3), (6, 320, 1)]):
        for i in range(n):
            p, hidden = f"blocks.{s}.{i}.conv", in_ch * t
            layout.update({f"{p}.0.weight": (hidden, in_ch, 1, 1), **bn(f"{p}.1", hidden),
                           f"{p}.3.weight": (hidden, 1, 3, 3), **bn(f"{p}.4", hidden),
                           f"{p}.6.weight": (c, hidden, 1, 1), **bn(f"{p}.7", c)})
            in_ch = c
    layout.update(conv_bn("conv2", 1280, 320, 1))
    layout.update({"classifier.0.weight": (num_classes, 1280), "classifier.0.bias": (num_classes,)})
    return layout


def _authors_mobilenetv2_forward(sd: dict, x: torch.Tensor):
    """The authors' forward (eval mode) as plain functions of their state_dict: feats [f0..f5], logits."""
    import torch.nn.functional as F

    def cbn(x, p, stride=1, groups=1, relu=True):
        w = sd[f"{p[0]}.weight"]
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)
        x = F.batch_norm(x, sd[f"{p[1]}.running_mean"], sd[f"{p[1]}.running_var"], sd[f"{p[1]}.weight"],
                         sd[f"{p[1]}.bias"], False, 0.0, 1e-5)
        return F.relu(x) if relu else x

    out = cbn(x, ("conv1.0", "conv1.1"), stride=2)
    feats = [out]
    strides = [1, 1, 2, 2, 1, 2, 1]
    for s, n in enumerate([1, 2, 3, 4, 3, 3, 1]):
        for i in range(n):
            p = f"blocks.{s}.{i}.conv"
            stride = strides[s] if i == 0 else 1
            y = cbn(out, (f"{p}.0", f"{p}.1"))
            y = cbn(y, (f"{p}.3", f"{p}.4"), stride=stride, groups=y.shape[1])
            y = cbn(y, (f"{p}.6", f"{p}.7"), relu=False)
            out = out + y if (stride == 1 and out.shape[1] == y.shape[1]) else y
        if s in (1, 2, 4, 6):
            feats.append(out)
    pooled = F.avg_pool2d(cbn(out, ("conv2.0", "conv2.1")), 2, ceil_mode=True).flatten(1)  # AvgPool2d(32 // 16)
    feats.append(pooled)
    return feats, F.linear(pooled, sd["classifier.0.weight"], sd["classifier.0.bias"])


def test_authors_mobilenetv2_state_dict_loads_strictly_and_gives_their_features(tmp_path):
    layout = _authors_mobilenetv2_layout(100)
    model = create_model("MobileNetV2", 100)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    gen = torch.Generator().manual_seed(5)
    theirs = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            theirs[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            theirs[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", "bias")):
            theirs[key] = torch.randn(shape, generator=gen) * 0.1
        elif key.endswith("weight") and len(shape) == 1:  # BN scale
            theirs[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            theirs[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    path = tmp_path / "S_MobileNetV2_best.pth"
    torch.save({"model": theirs, "epoch": 240}, path)
    ours = create_model("MobileNetV2", 100, weights=path).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
    exp_feats, exp_logits = _authors_mobilenetv2_forward({k: v.double() if v.is_floating_point() else v
                                                          for k, v in theirs.items()}, x)
    assert len(feats) == len(exp_feats) == 6
    for got, exp in zip(feats, exp_feats):
        torch.testing.assert_close(got, exp)
    torch.testing.assert_close(logits, exp_logits)
    assert tuple(feats[-2].shape) == (3, 320, 2, 2) and tuple(feats[-1].shape) == (3, 1280)


def test_half_width_checkpoint_does_not_load_into_the_authors_mobilenetv2(tmp_path):
    path = tmp_path / "half.pth"
    torch.save({"model": create_model("MobileNetV2_0_5", 100).state_dict()}, path)
    with pytest.raises(ValueError, match=r"'conv1\.0\.weight' has shape \(16, 3, 3, 3\)"):
        load_checkpoint(create_model("MobileNetV2", 100), path)


# ---------------------------------------------------------------- classifier_head

@pytest.mark.parametrize("name", CIFAR_MODELS + ["imagenet_resnet18"])
def test_classifier_head_maps_the_embedding_to_the_logits(name):
    from mtkd_fast.models import classifier_head

    torch.manual_seed(3)
    model = create_model(name, 11).eval()
    head = classifier_head(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 11
    size = 64 if name.startswith("imagenet") else 32
    with torch.no_grad():
        feats, logits = model(torch.randn(2, 3, size, size), is_feat=True)
        torch.testing.assert_close(head(feats[-1]), logits)


def test_classifier_head_needs_a_linear_layer():
    from mtkd_fast.models import classifier_head

    with pytest.raises(ValueError, match="no nn.Linear"):
        classifier_head(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="model"):
        classifier_head("resnet8")
