"""Distilled students as backbones: `mtkd-fast export` and mtkd_fast.models.backbone."""

from __future__ import annotations

import pytest
import torch
import torchvision

from mtkd_fast.cli import main
from mtkd_fast.models import backbone, create_model
from mtkd_fast.models.backbone import dilate

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(arch="imagenet_resnet18", num_classes=5, seed=0):
    """A student with non-trivial weights and BatchNorm statistics (so a skipped or shifted key shows)."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run's student file ({"model": state_dict}, as the trainer writes it) exported through the CLI."""
    d = tmp_path_factory.mktemp("export")
    student = _student()
    torch.save({"model": student.state_dict()}, d / "student_best.pth")
    out = d / "backbone.pth"
    assert main(["export", "--checkpoint", str(d / "student_best.pth"), "--arch", "imagenet_resnet18",
                 "--out", str(out)]) == 0
    return student, out


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_export_writes_a_plain_torchvision_state_dict(exported, capsys):
    student, out = exported
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    reference = torchvision.models.resnet18(weights=None, num_classes=5)
    reference.load_state_dict(state, strict=True)  # torchvision's own model takes it unchanged
    for key, value in student.state_dict().items():
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), student.eval()(x))


def test_export_of_a_transformer(tmp_path, monkeypatch):
    from mtkd_fast import models
    from mtkd_fast.models import vit

    with torch.device("meta"):  # names only: export checks keys and shapes against the zoo's model
        keys = list(create_model("imagenet_swin_t", 4).state_dict())
    assert keys == list(torchvision.models.swin_t(weights=None, num_classes=4).state_dict())
    # a full export round trip on a small Swin of the same class, registered for this test only
    torch.manual_seed(0)
    small = vit.swin(4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4],
                     stochastic_depth_prob=0.0)
    path = tmp_path / "student_best.pth"
    torch.save({"model": small.state_dict()}, path)
    config = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4],
                  stochastic_depth_prob=0.0)
    monkeypatch.setitem(models._BUILDERS, "imagenet_swin_test", lambda name, k: vit.swin(k, **config))
    assert main(["export", "--checkpoint", str(path), "--arch", "imagenet_swin_test", "--out",
                 str(tmp_path / "out.pth")]) == 0
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    torchvision.models.SwinTransformer(patch_size=[4, 4], num_classes=4, **config).load_state_dict(state, strict=True)


def test_export_bad_input_is_one_line(tmp_path, capsys):
    path = tmp_path / "student.pth"
    torch.save({"model": _student().state_dict()}, path)
    assert main(["export", "--checkpoint", str(path), "--arch", "resnet_nope", "--out", str(tmp_path / "o.pth")]) == 2
    assert "--arch: expected a zoo model (" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--arch", "resnet8", "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()  # a zoo name now, but not this checkpoint's architecture
    assert "student.pth" in err and len(err.splitlines()) == 1, err
    assert main(["export", "--checkpoint", str(path), "--arch", "imagenet_resnet34", "--out",
                 str(tmp_path / "o.pth")]) == 2
    assert "missing key 'layer1.2.conv1.weight'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pth"), "--arch", "imagenet_resnet18", "--out",
                 str(tmp_path / "o.pth")]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    # a full training checkpoint holds RNG states (numpy objects): refused, weights_only=True never unpickles
    import numpy as np

    torch.save({"student": _student().state_dict(), "rng": np.random.get_state()}, tmp_path / "checkpoint_best.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "checkpoint_best.pth"), "--arch", "imagenet_resnet18",
                 "--out", str(tmp_path / "o.pth")]) == 1  # a data problem, not a usage error
    err = capsys.readouterr().err
    assert "student_best.pth" in err and "--trust-checkpoint" not in err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "garbage.pth"), "--arch", "imagenet_resnet18",
                 "--out", str(tmp_path / "o.pth")]) == 1
    assert "garbage.pth: not a readable PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("arch, num_classes", [("resnet8", 7), ("ShuffleV2", 5), ("MobileNetV2", 3)])
def test_export_of_a_cifar_zoo_student(tmp_path, capsys, arch, num_classes):
    """The CIFAR zoo's students export too (their classifier is fc, linear or classifier.0): the file is the zoo
    model's own state_dict, loads strictly into create_model(arch, K) and gives the student's outputs."""
    student = _student(arch, num_classes, seed=3)
    torch.save({"model": student.state_dict()}, tmp_path / "student_best.pth")
    out = tmp_path / f"{arch}.pth"
    assert main(["export", "--checkpoint", str(tmp_path / "student_best.pth"), "--arch", arch, "--out",
                 str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: {len(student.state_dict())} tensors, the state_dict of "
        f"mtkd_fast.models.create_model({arch!r}, {num_classes}) (load with weights_only=True)")
    state = torch.load(out, weights_only=True)
    fresh = create_model(arch, num_classes)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.double().eval()(x), student.double().eval()(x), rtol=0, atol=0)


def _assert_trunk_equal(trunk_state, student_state):
    trunk_state = {k: v for k, v in trunk_state.items() if not k.endswith("num_batches_tracked")}
    expected = {k: v for k, v in _trunk(student_state).items() if not k.endswith("num_batches_tracked")}
    assert set(trunk_state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(trunk_state[key], value), key


@pytest.mark.parametrize("task", ["detection", "instance_segmentation"])
def test_detector_from_an_exported_student(exported, task):
    student, path = exported
    # small proposal and sampling counts keep the step cheap (and show the keyword arguments reach the detector)
    model = backbone("imagenet_resnet18", path, task=task, num_classes=3, min_size=64, max_size=64,
                     rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
                     rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_detections_per_img=5)
    assert model.rpn.post_nms_top_n() == 50
    assert type(model).__name__ == {"detection": "FasterRCNN", "instance_segmentation": "MaskRCNN"}[task]
    _assert_trunk_equal(model.backbone.body.state_dict(), student.state_dict())
    # torchvision's defaults for a pretrained trunk: frozen BN, stem and layer1 frozen, layer2-4 trainable
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    model.train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 56, 64, generator=g)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:30] = 1
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks},
               {"boxes": torch.tensor([[2.0, 2.0, 20.0, 50.0]]), "labels": torch.tensor([2]),
                "masks": masks[:, :56]}]
    losses = model(images, targets)
    assert ("loss_mask" in losses) == (task == "instance_segmentation")
    sum(losses.values()).backward()
    body = dict(model.backbone.body.named_parameters())
    assert body["layer4.1.conv2.weight"].grad.abs().sum() > 0 and body["layer2.0.conv1.weight"].grad.abs().sum() > 0
    assert body["conv1.weight"].grad is None  # frozen
    model.eval()
    with torch.no_grad():
        detections = model(images[:1])
    assert set(detections[0]) >= {"boxes", "labels", "scores"}


@pytest.mark.parametrize("aux_loss", [False, True])
def test_segmenter_from_an_exported_student(exported, aux_loss):
    student, path = exported
    model = backbone("imagenet_resnet18", path, task="segmentation", num_classes=4, aux_loss=aux_loss)
    assert type(model).__name__ == "DeepLabV3"
    _assert_trunk_equal(model.backbone.state_dict(), student.state_dict())
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert tuple(out["out"].shape) == (2, 4, 64, 64) and ("aux" in out) == aux_loss
    target = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    loss = sum(torch.nn.functional.cross_entropy(v, target) for v in out.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    # output stride 8: layer4's map is 8x8 on 64x64
    with torch.no_grad():
        assert tuple(model.backbone.eval()(x)["out"].shape) == (2, 512, 8, 8)


@pytest.mark.parametrize("output_stride,replace", [(8, (False, True, True)), (16, (False, False, True))])
def test_dilation_is_torchvisions_for_bottlenecks(output_stride, replace):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=list(replace)).eval()
    ours = dilate(torchvision.models.resnet50(weights=None), replace).eval()
    ours.load_state_dict(reference.state_dict())
    for (name, a), (_, b) in zip(reference.named_modules(), ours.named_modules()):
        if isinstance(a, torch.nn.Conv2d):
            assert (a.stride, a.dilation, a.padding) == (b.stride, b.dilation, b.padding), name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_dilated_basic_block_resnet_keeps_its_receptive_field_shape():
    """BasicBlock ResNets (no dilation in torchvision): output stride 8 keeps layer4's map at H/8, and the
    dilated convolutions give the same result as the strided ones at the positions the stride kept."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None).eval()
    dilated = dilate(torchvision.models.resnet18(weights=None), (False, False, True)).eval()
    dilated.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(plain.conv1, plain.bn1, plain.relu, plain.maxpool, plain.layer1, plain.layer2,
                                    plain.layer3)(x)
        a = plain.layer4[0].relu(plain.layer4[0].bn1(plain.layer4[0].conv1(trunk)))
        b = dilated.layer4[0].relu(dilated.layer4[0].bn1(dilated.layer4[0].conv1(trunk)))
    assert tuple(b.shape[-2:]) == (4, 4) and tuple(a.shape[-2:]) == (2, 2)
    torch.testing.assert_close(b[..., ::2, ::2], a)  # the strided conv is the dilated one subsampled


def test_backbone_takes_the_run_student_file_and_random_weights(tmp_path):
    student = _student(seed=1)
    torch.save({"model": student.state_dict()}, tmp_path / "student_best.pth")
    model = backbone("imagenet_resnet18", tmp_path / "student_best.pth", task="segmentation")
    _assert_trunk_equal(model.backbone.state_dict(), student.state_dict())
    assert model.classifier[-1].out_channels == 21  # torchvision's default (VOC)
    fresh = backbone("imagenet_resnet18", None, num_classes=2, min_size=64, max_size=64)
    assert all(p.requires_grad for p in fresh.backbone.body.parameters())  # no weights: everything trains


def test_backbone_bad_arguments_name_the_argument(exported, tmp_path):
    student, path = exported
    with pytest.raises(ValueError, match="arch: expected a ResNet of the zoo"):
        backbone("imagenet_vit_b_16", path)
    with pytest.raises(ValueError, match="task: expected one of detection"):
        backbone("imagenet_resnet18", path, task="panoptic")
    with pytest.raises(ValueError, match="num_classes: expected a positive int"):
        backbone("imagenet_resnet18", path, num_classes=0)
    with pytest.raises(ValueError, match="trainable_layers: expected an int in 0..5"):
        backbone("imagenet_resnet18", path, trainable_layers=6)
    with pytest.raises(ValueError, match="output_stride: expected 8, 16 or 32"):
        backbone("imagenet_resnet18", path, task="segmentation", output_stride=4)
    with pytest.raises(FileNotFoundError, match="weights: no such file"):
        backbone("imagenet_resnet18", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"weights: .*missing key 'layer1\.2\.conv1\.weight'"):
        backbone("imagenet_resnet34", path)
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        backbone("imagenet_resnet18", {**student.state_dict(), "extra.weight": torch.zeros(1)})
