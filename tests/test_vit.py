"""Vision transformers in the zoo (models/vit.py): torchvision's definitions and weights, the feature interface,
gradients, and training steps of mixed CNN / transformer pools through FeatureTransfer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

from mtkd_fast.agent import MTKDAgent
from mtkd_fast.models import FeatureTransfer, create_model, list_models, load_checkpoint, vit
from mtkd_fast.teachers import LiveTeachers
from mtkd_fast.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMERS = sorted(vit.ARCHS)

# small configurations of the same classes (torchvision's constructor arguments)
TINY_VIT = dict(patch_size=8, num_layers=4, num_heads=2, hidden_dim=24, mlp_dim=40)
TINY_SWIN = dict(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=[4, 4],
                 stochastic_depth_prob=0.0)


def _randomise_norms(model):
    """LayerNorms away from their (1, 0) initialisation, so a wrong order or a skipped norm shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_transformer_names_are_registered():
    assert {"imagenet_vit_b_16", "imagenet_swin_t"} <= set(TRANSFORMERS) <= set(list_models())


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_registered_transformers_are_torchvisions_definitions(name):
    """Same keys and shapes as torchvision's builder of the same name; the interface's shapes at 224x224 and
    C == D (the COS state feature compares a C-channel pooled map with the D-dim embedding). Meta tensors:
    shapes without the cost."""
    with torch.device("meta"):
        ours = create_model(name, 1000)
        if name == "imagenet_vit_ti_16":  # DeiT-Ti's sizes; torchvision has the class, not the builder
            theirs = VisionTransformer(224, 16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
        else:
            theirs = getattr(torchvision.models, name[len("imagenet_"):])(weights=None)
        feats, logits = ours.eval()(torch.empty(2, 3, 224, 224), is_feat=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    width = ({"ti": 192, "b": 768, "l": 1024}[name.split("_")[2]] if "vit" in name
             else (1024 if name.endswith("_b") else 768))
    grid = 224 // int(name.rsplit("_", 1)[1]) if "vit" in name else 7
    assert logits.shape == (2, 1000)
    assert tuple(feats[-2].shape) == (2, width, grid, grid)
    assert tuple(feats[-1].shape) == (2, width)  # C == D


@pytest.mark.slow
@pytest.mark.parametrize("name,tv_name", [("imagenet_vit_b_16", "vit_b_16"), ("imagenet_swin_t", "swin_t")])
def test_full_size_torchvision_state_dict_loads_strictly(name, tv_name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, tv_name)(weights=None, num_classes=10).state_dict()
    ours = create_model(name, 10)
    ours.load_state_dict(theirs, strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def _tiny_pair(kind, num_classes=7, image_size=32, v2=False):
    """(ours, torchvision's) with the same tiny configuration and weights."""
    torch.manual_seed(3)
    if kind == "vit":
        ref = VisionTransformer(image_size=image_size, num_classes=num_classes, **TINY_VIT)
        ours = vit.vit(num_classes, image_size=image_size, **TINY_VIT)
    else:
        extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
        ref = SwinTransformer(patch_size=[4, 4], num_classes=num_classes, **TINY_SWIN, **extra)
        ours = vit.swin(num_classes, **TINY_SWIN, **extra)
    _randomise_norms(ref)
    return ours, ref.eval()


def test_tiny_vit_matches_torchvision_through_a_checkpoint_file(tmp_path):
    ours, ref = _tiny_pair("vit")
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)  # a bare torchvision state_dict
    load_checkpoint(ours, path)
    ours.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        expected = ref(x)
        tokens = ref._process_input(x)
        seq = ref.encoder(torch.cat([ref.class_token.expand(3, -1, -1), tokens], 1))
        plain = ours(x)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(plain, expected)
    # patch embeddings, after blocks 1, 2, 3 (quarters of 4), final tokens, class token
    assert len(feats) == 6
    assert all(tuple(f.shape) == (3, 24, 4, 4) for f in feats[:-1])
    torch.testing.assert_close(feats[0], tokens.transpose(1, 2).reshape(3, 24, 4, 4))
    # token (i, j) of the 4x4 grid is patch 4 i + j of torchvision's sequence (after the class token)
    torch.testing.assert_close(feats[-2], seq[:, 1:].transpose(1, 2).reshape(3, 24, 4, 4))
    torch.testing.assert_close(feats[-2][:, :, 1, 2], seq[:, 1 + 4 * 1 + 2])
    torch.testing.assert_close(feats[-1], seq[:, 0])


@pytest.mark.parametrize("v2", [False, True])
def test_tiny_swin_matches_torchvision(v2):
    ours, ref = _tiny_pair("swin", v2=v2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = ours(x, is_feat=True)
        expected = ref(x)
        last = ref.norm(ref.features(x)).permute(0, 3, 1, 2)
        stage1 = ref.features[1](ref.features[0](x)).permute(0, 3, 1, 2)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(ours(x), expected)
    # patch embeddings, stages 1-3, stage 4 after the final norm, pooled
    assert [tuple(f.shape[1:]) for f in feats[:-1]] == [(8, 16, 16), (8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    torch.testing.assert_close(feats[1], stage1)
    torch.testing.assert_close(feats[-2], last)
    torch.testing.assert_close(feats[-1], last.mean(dim=(2, 3)))


def test_vit_rejects_another_image_size():
    ours, _ = _tiny_pair("vit")
    with pytest.raises(ValueError, match=r"x: expected images \[B, 3, 32, 32\]"):
        ours(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_backward_reaches_every_parameter(kind):
    model, _ = _tiny_pair(kind, image_size=32)
    model.train()
    feats, logits = model(torch.randn(2, 3, 32, 32), is_feat=True)
    # torchvision zero-initialises the ViT head: the embedding gets its gradient from its own term
    (logits.sum() + feats[-2].square().mean() + feats[-1].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ---------------------------------------------------------------------- mixed pools
def _member(name, num_classes):
    """A pool member at 224x224: a zoo CNN, or a narrow transformer of the zoo's classes."""
    torch.manual_seed(len(name))
    if name == "vit":  # 14x14 tokens, as ViT-B/16
        return vit.vit(num_classes, image_size=224, patch_size=16, num_layers=2, num_heads=2, hidden_dim=24,
                       mlp_dim=32)
    if name == "swin":  # 7x7 last stage, as Swin-T
        return vit.swin(num_classes, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[7, 7],
                        stochastic_depth_prob=0.0)
    return create_model(name, num_classes)


@pytest.mark.parametrize("student,teachers", [
    ("vit", ["imagenet_resnet18", "swin"]),  # transformer student, CNN (+ Swin) teachers: 14x14 <- 7x7
    ("imagenet_resnet18", ["vit", "swin"]),  # CNN student, transformer teachers: 7x7 -> 14x14 and 7x7
    ("swin", ["vit", "imagenet_resnet18"]),  # Swin student, mixed pool
])
def test_mixed_pool_training_step(student, teachers):
    k = 6
    s = _member(student, k)
    ts = [_member(t, k).eval() for t in teachers]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 224, 224, generator=g), torch.randint(0, k, (2,), generator=g)
    with torch.no_grad():
        s_feats = s.eval()(x, is_feat=True)[0]
        t_feats = [t(x, is_feat=True)[0] for t in ts]
    s_shape = tuple(s_feats[-2].shape[1:])
    t_shapes = [tuple(f[-2].shape[1:]) for f in t_feats]
    assert {s_shape[1:], *[sh[1:] for sh in t_shapes]} == {(14, 14), (7, 7)}  # resolutions differ
    for f in [s_feats, *t_feats]:
        assert f[-2].shape[1] == f[-1].shape[1]  # C == D
    torch.manual_seed(1)
    transfer = FeatureTransfer(s_shape, t_shapes)
    agent = MTKDAgent([f[-1].shape[1] + k + 3 for f in t_feats], len(ts))
    cfg = TrainConfig(student=student, teachers=teachers, strategy="mtkd_rl", progress=False, lr=0.05)
    trainer = Trainer(cfg, s, LiveTeachers(ts), transfer, agent)
    before = {n: p.detach().clone() for n, p in [*s.named_parameters(), *transfer.named_parameters(prefix="ft")]}
    agent_before = [p.detach().clone() for p in agent.parameters()]
    trainer.begin_epoch(1, steps=1)
    out = trainer.train_step(x, y, torch.arange(2), 0)
    trainer.update_agent()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert out["feature_weights"].shape == (2, len(ts)) and out["logit_weights"].shape == (2, len(ts))
    after = dict([*s.named_parameters(), *transfer.named_parameters(prefix="ft")])
    unchanged = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged[:5]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(agent_before, agent.parameters()))


# ---------------------------------------------------------------------- cache size and the epoch benchmark
def test_cache_size_reports_transformers(capsys):
    from mtkd_fast.cache.storage import per_sample_bytes
    from mtkd_fast.cli import main

    names = ["imagenet_vit_b_16", "imagenet_swin_t", "imagenet_resnet50"]
    assert main(["cache", "size", "--teachers", *names, "--num-classes", "1000", "--image-size", "224",
                 "--samples", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # ViT-B/16: 14x14 patch tokens of 768; Swin-T: a 7x7 last stage of 768; ResNet-50: 7x7 of 2048
    expected = {"imagenet_vit_b_16": (768, (768, 14, 14)), "imagenet_swin_t": (768, (768, 7, 7)),
                "imagenet_resnet50": (2048, (2048, 7, 7))}
    total = 0
    for line, name in zip(lines, names):
        d, shape = expected[name]
        b = per_sample_bytes(1000, d, shape, logits="float16", embeddings="float16", feature_maps="float16")
        total += b
        assert line == f"{name}: K=1000 D={d} map={'x'.join(map(str, shape))}: {b} bytes per (sample, view)"
    assert lines[-1].startswith(f"total: {total} bytes per (sample, view) x 10 samples")


def test_cache_size_measures_what_the_real_model_returns(capsys):
    """cache size builds on the meta device: the shapes must be those of a real forward."""
    from mtkd_fast.cli import main

    assert main(["cache", "size", "--teachers", "ShuffleV2", "--num-classes", "7", "--image-size", "40",
                 "--samples", "1", "--fields", "feature_maps"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    with torch.no_grad():
        feats, z = create_model("ShuffleV2", 7).eval()(torch.randn(1, 3, 40, 40), is_feat=True)
    assert f"K=7 D={feats[-1].shape[1]} map={'x'.join(map(str, feats[-2].shape[1:]))}:" in line


def test_cache_size_of_a_vit_at_another_image_size_is_one_line(capsys):
    from mtkd_fast.cli import main

    assert main(["cache", "size", "--teachers", "imagenet_vit_b_16", "--num-classes", "1000", "--image-size",
                 "160", "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "--image-size: imagenet_vit_b_16: x: expected images [B, 3, 224, 224]" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bench_epoch_imagenet_with_a_vit_teacher(tmp_path, capsys):
    import csv
    import json

    from mtkd_fast.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "epoch", "--setting", "imagenet", "--students", "resnet8", "--teachers",
               "imagenet_vit_ti_16", "resnet8", "--steps", "1", "--repetitions", "1", "--batch-size", "2",
               "--memory-steps", "0", "--threads", "1", "--no-progress", "--configs", "aver", "mtkd_rl_authors",
               "mtkd_rl_live", "mtkd_rl_cached", "--out", str(out)])
    assert rc == 0
    with open(out / "epoch_bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["aver", "mtkd_rl_authors", "mtkd_rl_live", "mtkd_rl_cached"]
    for r in rows:  # the benchmarks' CSV schema: the run's options in the JSON "extra" field
        assert int(r["images"]) == 2 and float(r["median_s"]) > 0
        assert json.loads(r["extra"])["teachers"] == "imagenet_vit_ti_16 resnet8"
