"""Vision transformers: torchvision's ViT and Swin Transformer with the zoo's feature interface.

The classes subclass ``torchvision.models.VisionTransformer`` / ``SwinTransformer`` and only replace
``forward``, so parameter names are torchvision's and torchvision state_dicts (e.g. ``vit_b_16-c867db91.pth``,
``swin_t-704ceda3.pth``) load unchanged through ``mtkd_fast.models.load_checkpoint``. Nothing is downloaded.

``model(x, is_feat=True)`` -> ``(feats, logits)``:

- ViT: feats = [patch embeddings, tokens after each quarter of the encoder blocks, final tokens (after the
  encoder's LayerNorm), class token]. Every map is the patch tokens laid out on their grid, [B, D, H/p, W/p]
  (class token excluded): feats[-2] is 14x14 for ViT-B/16 on 224x224. feats[-1] is the class token after the
  final LayerNorm [B, D], the vector the classification head reads.
- Swin: feats = [patch embeddings, stage 1, stage 2, stage 3, stage 4 after the final LayerNorm, pooled];
  maps [B, C, H, W] (7x7 on 224x224 for the last stage), feats[-1] their global average [B, C], as the head.

In both families feats[-2] has as many channels as feats[-1] has values (C == D: ViT-Ti 192, ViT-B 768,
ViT-L 1024, Swin-T/S 768, Swin-B 1024), which the COS state feature of MTKD-RL needs (docs/method.md section 2).
For ViT the embedding is the class token, not the average of the map; only the dimensions must agree.
A transformer teacher's maps are LayerNorm outputs and take negative values, which the feature transfer's
final ReLU (docs/method.md section 1) cannot produce, so their feature MSE has a floor above zero; the
method's transfer is kept as it is.

A ViT takes images of exactly its ``image_size`` (its position embeddings are learnt for that grid); a Swin
takes any size (its windows are padded).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.vision_transformer import VisionTransformer


def _grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """[B, h*w, D] patch tokens -> [B, D, h, w] (a view, no copy)."""
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)


class ImageNetViT(VisionTransformer):
    """torchvision's VisionTransformer; ``forward(x, is_feat)`` as the rest of the zoo (see the module)."""

    def forward(self, x: Tensor, is_feat: bool = False):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"x: expected images [B, 3, {self.image_size}, {self.image_size}] (this ViT's "
                             f"image_size), got {list(x.shape)}")
        h = w = self.image_size // self.patch_size
        tokens = self._process_input(x)  # [B, h*w, D]
        seq = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        # Encoder.forward, block by block: ln(layers(dropout(seq + pos_embedding)))
        enc = self.encoder
        seq = enc.dropout(seq + enc.pos_embedding)
        feats = [_grid(tokens, h, w)] if is_feat else []
        layers = list(enc.layers)
        quarter_ends = {len(layers) * q // 4 - 1 for q in (1, 2, 3)}
        for i, layer in enumerate(layers):
            seq = layer(seq)
            if is_feat and i in quarter_ends:
                feats.append(_grid(seq[:, 1:], h, w))
        seq = enc.ln(seq)
        embedding = seq[:, 0]
        logits = self.heads(embedding)
        if is_feat:
            return feats + [_grid(seq[:, 1:], h, w), embedding], logits
        return logits


class ImageNetSwin(SwinTransformer):
    """torchvision's SwinTransformer (v1 or v2); ``forward(x, is_feat)`` as the rest of the zoo."""

    def forward(self, x: Tensor, is_feat: bool = False):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected images [B, 3, H, W], got {list(x.shape)}")
        feats = []
        last = len(self.features) - 1
        for i, block in enumerate(self.features):
            x = block(x)  # [B, H, W, C]
            # features = [patch embedding, stage 1, merge, stage 2, merge, stage 3, merge, stage 4]
            if is_feat and (i == 0 or i % 2 == 1) and i < last:
                feats.append(x.permute(0, 3, 1, 2))
        last_map = self.permute(self.norm(x))  # [B, C, H, W]
        embedding = self.flatten(self.avgpool(last_map))
        logits = self.head(embedding)
        if is_feat:
            return feats + [last_map, embedding], logits
        return logits


# name -> torchvision's definition of the same name (the builders' arguments, in torchvision's vision_transformer.py
# and swin_transformer.py), and one small ViT
VIT_ARCHS = {
    # ViT-Ti/16: DeiT-Ti's sizes (Touvron et al. 2021), a small student; torchvision has no builder of this name,
    # the parameter names are its VisionTransformer's all the same
    "imagenet_vit_ti_16": dict(patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
    "imagenet_vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "imagenet_vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "imagenet_vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "imagenet_vit_l_32": dict(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
}
_V2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
SWIN_ARCHS = {
    "imagenet_swin_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[7, 7],
                            stochastic_depth_prob=0.2),
    "imagenet_swin_s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=[7, 7],
                            stochastic_depth_prob=0.3),
    "imagenet_swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=[7, 7],
                            stochastic_depth_prob=0.5),
    "imagenet_swin_v2_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[8, 8],
                               stochastic_depth_prob=0.2, **_V2),
    "imagenet_swin_v2_s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=[8, 8],
                               stochastic_depth_prob=0.3, **_V2),
    "imagenet_swin_v2_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=[8, 8],
                               stochastic_depth_prob=0.5, **_V2),
}
ARCHS = {**VIT_ARCHS, **SWIN_ARCHS}


def vit(num_classes: int, image_size: int = 224, **config) -> ImageNetViT:
    """An :class:`ImageNetViT` from torchvision's VisionTransformer arguments (``patch_size``, ``num_layers``,
    ``num_heads``, ``hidden_dim``, ``mlp_dim``, ...): the registered names, or small configurations for tests."""
    return ImageNetViT(image_size=image_size, num_classes=num_classes, **config)


def swin(num_classes: int, patch_size=(4, 4), **config) -> ImageNetSwin:
    """An :class:`ImageNetSwin` from torchvision's SwinTransformer arguments (``embed_dim``, ``depths``,
    ``num_heads``, ``window_size``, ...): the registered names, or small configurations for tests."""
    return ImageNetSwin(patch_size=list(patch_size), num_classes=num_classes, **config)


def build(name: str, num_classes: int):
    if name in VIT_ARCHS:
        return vit(num_classes, **VIT_ARCHS[name])
    return swin(num_classes, **SWIN_ARCHS[name])


__all__ = ["ImageNetViT", "ImageNetSwin", "vit", "swin", "build", "ARCHS", "VIT_ARCHS", "SWIN_ARCHS"]
