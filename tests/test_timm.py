"""timm models as teachers and students (models/timm_models.py): the (feats, logits) contract for popular timm
names, its values against timm's own API, weights from local files only, BatchNorm folding of timm's fused
BatchNorm + activation, training steps of timm / zoo pools on both loss backends, the CLI paths, export."""

from __future__ import annotations

import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from mtkd_fast.agent import MTKDAgent  # noqa: E402
from mtkd_fast.models import FeatureTransfer, create_model, is_model, timm_models  # noqa: E402
from mtkd_fast.teachers import LiveTeachers, fold_batchnorm  # noqa: E402
from mtkd_fast.train import TrainConfig, Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (C == D, feats[-2]'s grid at 224x224): widths from the models' papers / timm's definitions
POPULAR = {
    "resnet18": (512, 7), "resnet50": (2048, 7), "convnext_tiny": (768, 7), "convnext_atto": (320, 7),
    "efficientnet_b0": (1280, 7), "tf_efficientnet_b0": (1280, 7), "regnety_040": (1088, 7),
    "resnetv2_50": (2048, 7), "densenet121": (1024, 7), "vit_tiny_patch16_224": (192, 14),
    "vit_base_patch16_224": (768, 14), "deit_small_patch16_224": (384, 14),
    "deit_tiny_distilled_patch16_224": (192, 14), "eva02_tiny_patch14_224": (192, 16),
    "swin_tiny_patch4_window7_224": (768, 7), "mixer_b16_224": (768, 14),
    # the other families docs/models.md lists as working
    "regnetx_002": (368, 7), "convnextv2_atto": (320, 7), "beit_base_patch16_224": (768, 14),
    "cait_xxs24_224": (192, 14), "xcit_nano_12_p16_224": (128, 14), "levit_128s": (384, 4),
    "efficientformerv2_s0": (176, 7), "maxvit_tiny_tf_224": (512, 7), "coatnet_0_rw_224": (768, 7),
    "edgenext_xx_small": (168, 7), "poolformer_s12": (512, 7), "caformer_s18": (512, 7), "fastvit_t8": (768, 7),
    "repvit_m1": (384, 7), "pvt_v2_b0": (256, 7), "mobilevitv2_050": (256, 8), "dla34": (512, 7),  # MobileViT: 2x2
    "cspdarknet53": (1024, 7), "rexnet_100": (1280, 7), "nfnet_l0": (2304, 7), "swinv2_cr_tiny_ns_224": (768, 7),
    "hrnet_w18_small": (2048, 7), "inception_v3": (2048, 5),
}
# the head widens the pooled map: C != D (docs/models.md)
WIDENING = ["mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100", "vgg11", "efficientvit_b0",
            "hgnetv2_b0"]


def _randomise(model):
    """Norm statistics and affines away from their initial values, so a skipped or reordered norm shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


# ---------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", sorted(POPULAR))
def test_contract_of_popular_models_at_224(name):
    """Shapes and C == D at the models' native 224x224 (meta tensors: shapes without the cost)."""
    width, grid = POPULAR[name]
    with torch.device("meta"):
        model = create_model(f"timm:{name}", 1000).eval()
        feats, logits = model(torch.empty(2, 3, 224, 224), is_feat=True)
    assert logits.shape == (2, 1000)
    assert tuple(feats[-2].shape) == (2, width, grid, grid)
    assert tuple(feats[-1].shape) == (2, width)


@pytest.mark.parametrize("name", WIDENING)
def test_a_head_that_widens_the_map_is_refused_naming_the_model(name):
    with pytest.raises(ValueError, match=rf"timm:{name}'s head widens its \d+-channel feature map to a \d+-wide"):
        with torch.device("meta"):
            create_model(f"timm:{name}", 10)


def _pair(name, k=7, **kwargs):
    """Our model and timm's own model with the same weights."""
    torch.manual_seed(3)
    ours = _randomise(create_model(f"timm:{name}", k, **kwargs)).eval()
    theirs = timm.create_model(name, pretrained=False, num_classes=k, **kwargs).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_cnn_values_against_timm():
    """ResNet: the logits are timm's; the embedding is the global average of feats[-2] (the map is NCHW)."""
    ours, theirs = _pair("resnet18")
    x = torch.randn(3, 3, 40, 48)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        ref = theirs(x)
        plain = ours(x)
    assert feats[-2].shape == (3, 512, 2, 2)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)
    torch.testing.assert_close(feats[-1], feats[-2].double().mean((2, 3)).float(), rtol=1e-5, atol=1e-6)


def test_convnext_embedding_is_the_head_norm_of_the_pooled_map():
    ours, theirs = _pair("convnext_atto")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        ref = theirs(x)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    norm = ours.head.norm  # timm's ConvNeXt pools, then normalises (LayerNorm2d over channels)
    pooled = feats[-2].double().mean((2, 3))
    expected = torch.nn.functional.layer_norm(pooled, pooled.shape[1:], norm.weight.double(), norm.bias.double(),
                                              norm.eps)
    torch.testing.assert_close(feats[-1], expected.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, (expected @ ours.head.fc.weight.double().T
                                        + ours.head.fc.bias.double()).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kwargs,prefix", [
    ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8, depth=2), 1),
    ("deit_tiny_distilled_patch16_224", dict(img_size=40, patch_size=8, depth=2), 2),
    ("eva02_tiny_patch14_224", dict(img_size=42, patch_size=7, depth=2), 1),
])
def test_vit_family_map_is_the_patch_token_grid(name, kwargs, prefix):
    """feats[-2][:, :, i, j] is patch token i * w + j of forward_features (prefix tokens dropped);
    feats[-1] is what timm's head reads: ViT the class token, DeiT-distilled the mean of its two tokens,
    EVA-02 (global_pool "avg") the LayerNorm of the patch tokens' mean."""
    ours, theirs = _pair(name, **kwargs)
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        tokens = theirs.forward_features(x)
        ref = theirs(x)
    h = w = size // kwargs["patch_size"]
    assert feats[-2].shape == (2, tokens.shape[-1], h, w) and tokens.shape[1] == prefix + h * w
    for i, j in [(0, 0), (0, w - 1), (h - 1, 0), (h // 2, w // 3)]:
        torch.testing.assert_close(feats[-2][:, :, i, j], tokens[:, prefix + i * w + j], rtol=0, atol=0)
    if name.startswith("eva"):
        pooled = tokens[:, prefix:].double().mean(1)
        norm = theirs.fc_norm
        expected = torch.nn.functional.layer_norm(pooled, pooled.shape[1:], norm.weight.double(), norm.bias.double(),
                                                  norm.eps).float()
    else:
        expected = tokens[:, :prefix].mean(1)
    torch.testing.assert_close(feats[-1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_swin_map_is_nchw_and_pooled_by_the_head():
    ours, theirs = _pair("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                         num_heads=(1, 1, 2, 2), window_size=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        nhwc = theirs.forward_features(x)
        ref = theirs(x)
    assert nhwc.shape == (2, 2, 2, 128) and feats[-2].shape == (2, 128, 2, 2)
    torch.testing.assert_close(feats[-2], nhwc.permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(feats[-1], feats[-2].double().mean((2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_backward_reaches_the_parameters():
    model = create_model("timm:vit_tiny_patch16_224", 5, img_size=32, patch_size=8, depth=2).train()
    feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    (logits.sum() + feats[-2].square().mean() + feats[-1].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_a_vit_refuses_another_image_size_in_one_line():
    model = create_model("timm:vit_tiny_patch16_224", 5, depth=1)
    with pytest.raises(ValueError, match=r"x: timm:vit_tiny_patch16_224 takes images \[B, C, 224, 224\], got "
                                         r"\[1, 3, 32, 32\]; for another size build it with create_model"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}), ("convnext_atto", {}), ("efficientnet_b0", {}),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1)),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                          window_size=2)),
])
def test_classifier_head_maps_the_embedding_to_the_logits(name, kwargs):
    """CA-MKD applies each teacher's classifier to transformed student features: it must be the layer that
    turns feats[-1] into the logits (ConvNeXt's and Swin's sit inside a head module)."""
    from mtkd_fast.models import classifier_head

    model = _randomise(create_model(f"timm:{name}", 6, **kwargs)).eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
        head = classifier_head(model)
        torch.testing.assert_close(head(feats[-1]), logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- names, weights, the optional extra
def test_names():
    assert is_model("timm:resnet18") and is_model("timm:convnext_tiny.fb_in22k")  # a pretrained tag is fine
    assert not is_model("timm:no_such_net") and not is_model("resnet18_timm")
    with pytest.raises(ValueError, match=r"name: timm has no model 'no_such_net'"):
        create_model("timm:no_such_net", 10)
    with pytest.raises(ValueError, match=r"timm_kwargs: \['img_size'\] apply to timm: models only"):
        create_model("resnet8", 10, img_size=32)
    with pytest.raises(ValueError, match=r"pretrained: timm:resnet18 takes its weights from a local file only"):
        create_model("timm:resnet18", 10, pretrained=True)
    with pytest.raises(ValueError, match=r"checkpoint_path: set by create_model for timm:resnet18; pass num_classes "
                                         r"/ weights instead"):
        create_model("timm:resnet18", 10, checkpoint_path="resnet18.pth")


def test_weights_come_from_a_timm_state_dict_file(tmp_path):
    torch.manual_seed(0)
    theirs = _randomise(timm.create_model("efficientnet_b0", pretrained=False, num_classes=4)).eval()
    path = tmp_path / "effnet.pth"
    torch.save(theirs.state_dict(), path)
    ours = create_model("timm:efficientnet_b0", 4, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"effnet.pth: checkpoint does not match .*key 'classifier.weight' has "
                                         r"shape \(4, 1280\), the model expects \(10, 1280\)"):
        create_model("timm:efficientnet_b0", 10, weights=path)


def test_without_timm_the_error_names_the_extra(monkeypatch):
    from mtkd_fast._optional import MissingExtra

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(MissingExtra, match=r"^a timm:<name> model needs timm, which is not installed: pip install "
                                           r"mtkd_fast\[timm\]$"):
        create_model("timm:resnet18", 10)


# ---------------------------------------------------------------------- LiveTeachers
def test_batchnorm_folding_keeps_timms_fused_activation():
    """EfficientNet's BatchNormAct2d (BatchNorm + SiLU in one module) folds into its convolution and keeps its
    activation; the folded teacher computes the same outputs."""
    model = _randomise(create_model("timm:efficientnet_b0", 6)).eval().double()  # float64: exact up to rounding
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m).__name__ == "BatchNormAct2d" for m in bns)
    folded, n = fold_batchnorm(model)
    assert n == len(bns)
    left = [m for m in folded.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert not left  # each became Sequential(drop, act): the normalisation does not run any more
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, is_feat=True)
        got = folded(x, is_feat=True)
    for a, b in [(ref[1], got[1]), (ref[0][-2], got[0][-2]), (ref[0][-1], got[0][-1])]:
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


class _ShiftedBatchNorm(torch.nn.BatchNorm2d):
    """A BatchNorm subclass that does more after normalising (unknown to the folding)."""

    def forward(self, x):
        return torch.relu(super().forward(x)) - 0.25


@pytest.mark.parametrize("kind", ["timm", "other"])
def test_folding_a_batchnorm_subclass_in_a_sequential_keeps_what_it_adds(kind):
    from timm.layers import BatchNormAct2d

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bn = BatchNormAct2d(5, act_layer=torch.nn.ReLU) if kind == "timm" else _ShiftedBatchNorm(5)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), bn)

        def forward(self, x, is_feat=False):
            # data-dependent control flow: torch.fx cannot trace it, folding falls back to the Sequential
            f = self.body(x) if x.sum() > -1e9 else x
            return ([f, f.mean((2, 3))], f.mean((2, 3))) if is_feat else f.mean((2, 3))

    net = _randomise(Net()).eval().double()
    folded, n = fold_batchnorm(net)
    assert n == 1
    if kind == "timm":  # replaced by its dropout and activation
        assert [type(m) for m in folded.body[1]] == [torch.nn.Identity, torch.nn.ReLU]
    else:  # kept, with an identity normalisation
        assert isinstance(folded.body[1], _ShiftedBatchNorm) and folded.body[1].eps == 0
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        ref, got = net(x, is_feat=True)[0][0], folded(x, is_feat=True)[0][0]
    assert (ref == ref.min()).any() and ref.min() <= 0  # the ReLU acts
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_live_teachers_run_timm_models_in_bf16_and_fp32():
    ts = [_randomise(create_model("timm:convnext_atto", 5)), _randomise(create_model("timm:resnet18", 5)),
          create_model("timm:vit_tiny_patch16_224", 5, img_size=32, patch_size=8, depth=2)]
    x = torch.randn(2, 3, 32, 32)
    ref = LiveTeachers(ts, precision="fp32", fold_bn=False, channels_last=False)(x)
    fast = LiveTeachers(ts, precision="fp32", fold_bn=True)(x)
    half = LiveTeachers(ts, precision="bf16", fold_bn=True)(x)
    assert ref.logits.shape == (3, 2, 5) and [f.shape[1:] for f in ref.feature_maps] == [
        (320, 1, 1), (512, 1, 1), (192, 4, 4)]
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast.feature_maps + fast.embeddings, ref.feature_maps + ref.embeddings):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert half.logits.dtype == torch.float32
    rel = (half.logits - ref.logits).abs().max() / ref.logits.abs().max()
    assert 0 < rel < 0.1  # bf16 computed, and close


@pytest.mark.slow
def test_live_teachers_compile_timm_models():
    import warnings

    # small graphs (compile time grows with them): RegNetX's BatchNormAct2d folded, a plain BatchNorm ResNet
    ts = [_randomise(create_model("timm:regnetx_002", 5)), _randomise(create_model("timm:resnet10t", 5))]
    x = torch.randn(2, 3, 32, 32)
    ref = LiveTeachers(ts, precision="fp32", fold_bn=False, channels_last=False)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure falls back with a RuntimeWarning
        compiled = LiveTeachers(ts, precision="fp32", compile=True)
        out = compiled(x)
    assert compiled.compile and compiled.compile_error is None
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- training steps
def _member(name, k):
    torch.manual_seed(len(name))
    if name == "timm:vit":  # a narrow ViT at 32x32: a 4x4 patch grid
        return create_model("timm:vit_tiny_patch16_224", k, img_size=32, patch_size=8, depth=2, embed_dim=48,
                            num_heads=2)
    # timm zero-initialises each residual branch's last BatchNorm, which leaves the branch without gradients
    return _randomise(create_model(name, k))


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("student,teachers", [
    ("resnet8", ["timm:convnext_atto", "timm:efficientnet_b0"]),  # timm CNN teachers, zoo student
    ("timm:vit", ["resnet8", "timm:resnet18"]),  # timm ViT student, zoo (+ timm) teachers
    ("timm:resnet18", ["timm:vit", "resnet8x4"]),  # timm CNN student, timm ViT + zoo teachers
])
def test_mixed_pool_training_step(student, teachers, backend):
    k = 6
    s = _member(student, k)
    ts = [_member(t, k).eval() for t in teachers]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, k, (4,), generator=g)
    with torch.no_grad():
        s_feats = s.eval()(x, is_feat=True)[0]
        t_feats = [t(x, is_feat=True)[0] for t in ts]
    for f in [s_feats, *t_feats]:
        assert f[-2].shape[1] == f[-1].shape[1]  # C == D
    torch.manual_seed(1)
    transfer = FeatureTransfer(tuple(s_feats[-2].shape[1:]), [tuple(f[-2].shape[1:]) for f in t_feats])
    agent = MTKDAgent([f[-1].shape[1] + k + 3 for f in t_feats], len(ts))
    cfg = TrainConfig(student=student, teachers=teachers, strategy="mtkd_rl", progress=False, lr=0.05,
                      loss_backend=backend)
    trainer = Trainer(cfg, s, LiveTeachers(ts), transfer, agent)
    before = {n: p.detach().clone() for n, p in [*s.named_parameters(), *transfer.named_parameters(prefix="ft")]}
    agent_before = [p.detach().clone() for p in agent.parameters()]
    trainer.begin_epoch(1, steps=1)
    out = trainer.train_step(x, y, torch.arange(4), 0)
    trainer.update_agent()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert out["feature_weights"].shape == (4, len(ts)) and out["logit_weights"].shape == (4, len(ts))
    after = dict([*s.named_parameters(), *transfer.named_parameters(prefix="ft")])
    unchanged = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged[:5]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(agent_before, agent.parameters()))


def test_both_loss_backends_give_the_same_step():
    """The fused and the reference backend on the same timm pool: one loss, the same student gradient."""
    k = 5
    results = []
    for backend in ("fused", "reference"):
        s = _member("timm:resnet18", k)
        ts = [_member(t, k).eval() for t in ("timm:convnext_atto", "timm:vit")]
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1, 4, 2])
        with torch.no_grad():
            s_shape = tuple(s.eval()(x, is_feat=True)[0][-2].shape[1:])
            t_shapes = [tuple(t(x, is_feat=True)[0][-2].shape[1:]) for t in ts]
        torch.manual_seed(1)
        transfer = FeatureTransfer(s_shape, t_shapes)
        agent = MTKDAgent([d + k + 3 for d in (320, 48)], 2)
        cfg = TrainConfig(student="timm:resnet18", teachers=["a", "b"], strategy="mtkd_rl", progress=False,
                          loss_backend=backend)
        trainer = Trainer(cfg, s, LiveTeachers(ts, fold_bn=False, precision="fp32"), transfer, agent)
        trainer.begin_epoch(1, steps=1)
        out = trainer.train_step(x, y, torch.arange(4), 0)
        results.append((out["loss"].detach(), s.fc.weight.grad.clone()))  # the gradient at the same weights
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------- the CLI
def test_cache_size_of_timm_teachers(capsys):
    from mtkd_fast.cache.storage import per_sample_bytes
    from mtkd_fast.cli import main

    names = ["timm:convnext_tiny", "timm:vit_base_patch16_224"]
    assert main(["cache", "size", "--teachers", *names, "--num-classes", "1000", "--image-size", "224",
                 "--samples", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, name, (d, shape) in zip(lines, names, [(768, (768, 7, 7)), (768, (768, 14, 14))]):
        b = per_sample_bytes(1000, d, shape, logits="float16", embeddings="float16", feature_maps="float16")
        assert line == f"{name}: K=1000 D={d} map={'x'.join(map(str, shape))}: {b} bytes per (sample, view)"


def test_cli_rejects_an_unknown_timm_name_in_one_line(tmp_path, capsys):
    from mtkd_fast.cli import main

    rc = main(["train", "--teachers", "timm:convnext_atto", "timm:no_such_net", "--student", "resnet8",
               "--epochs", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "teachers[1]: unknown model 'timm:no_such_net'" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_train_timm_pool_then_export(tmp_path, capsys):
    """The issue's command at the smallest sizes: timm teachers from checkpoint files, a timm student; its
    student file exported loads into timm.create_model."""
    from mtkd_fast.cli import main

    paths = []
    for name in ("convnext_atto", "efficientnet_b0"):
        torch.manual_seed(len(name))
        path = tmp_path / f"{name}.pth"
        torch.save(timm.create_model(name, pretrained=False, num_classes=10).state_dict(), path)
        paths.append(str(path))
    out = tmp_path / "run"
    assert main(["train", "--teachers", "timm:convnext_atto", "timm:efficientnet_b0", "--teacher-checkpoints",
                 *paths, "--student", "timm:resnet18", "--epochs", "1", "--limit-per-class", "2", "--batch-size",
                 "8", "--max-steps-per-epoch", "1", "--device", "cpu", "--teacher-precision", "fp32",
                 "--out-dir", str(out)]) == 0
    assert "BatchNorm folded (49 layers)" in capsys.readouterr().err  # EfficientNet-B0's 49 BatchNormAct2d (a log)
    exported = tmp_path / "student.pth"
    assert main(["export", "--checkpoint", str(out / "student_best.pth"), "--arch", "timm:resnet18",
                 "--out", str(exported)]) == 0
    assert "timm.create_model('resnet18', num_classes=10)" in capsys.readouterr().out
    student = timm.create_model("resnet18", pretrained=False, num_classes=10)
    state = torch.load(exported, weights_only=True)
    student.load_state_dict(state)  # strict
    trained = torch.load(out / "student_best.pth", weights_only=True)["model"]
    assert all(torch.equal(state[k], trained[k]) for k in state)


def test_export_names_the_timm_classifier(tmp_path, capsys):
    from mtkd_fast.cli import main

    path = tmp_path / "r18.pth"
    torch.save({"model": timm.create_model("resnet18", pretrained=False, num_classes=3).state_dict()}, path)
    rc = main(["export", "--checkpoint", str(path), "--arch", "timm:convnext_atto", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "has no classifier weight (head.fc.weight); is it a checkpoint of timm:convnext_atto?" in err
    assert timm_models.classifier_key("timm:vit_tiny_patch16_224") == "head.weight"
    assert timm_models.classifier_key("timm:efficientnet_b0") == "classifier.weight"
