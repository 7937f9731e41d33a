"""ResNets with SupContrast's state-dict names, and the ``--model-arch`` name table.

Two encoder styles (docs/METHOD.md §1):
- CIFAR-style (``cifar_resnet*``): 3×3 stride-1 stem, no max-pool; the layer4 map is 4×4 at
  32×32 input. Blocks name their projection ``shortcut`` (``encoder.layer1.0.shortcut.0``),
  as in SupContrast's ``resnet_big.py``, so public SupCon/KNN checkpoints load.
- ImageNet-style ResNet-50: torchvision's ``ResNet`` (7×7 stride-2 stem + max-pool; the
  layer4 map is 7×7 at 224) with ``forward_features`` added, so torchvision and KNN
  ImageNet checkpoints load by name.

Every encoder has ``forward_features(x) -> [N, C, H, W]`` (the last-stage map, which the
multi-scale features and ALPA use) and ``forward(x) -> [N, C]`` (global average pool).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """SupContrast's ResNet for small images (``in_channel`` 3 for CIFAR, 1 for Fashion-MNIST)."""

    def __init__(self, block, num_blocks, in_channel=3, width=64, zero_init_residual=False):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channel, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x):
        """[N, in_channel, H, W] -> last-stage map [N, C, H/8, W/8] (rounded up)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward(self, x):
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


class ImageNetResNet(torchvision.models.ResNet):
    """torchvision's ResNet (7×7/2 stem + max-pool, stride on the 3×3 conv, projections named
    ``downsample``), so torchvision's and knn-ood's ImageNet weights load by name; only
    ``forward_features`` is added. The classifier is not part of the encoder (``fc`` of
    ``SupCEResNet``), so torchvision's own ``fc`` is removed."""

    def __init__(self, num_blocks=(3, 4, 6, 3), in_channel=3):
        super().__init__(torchvision.models.resnet.Bottleneck, list(num_blocks))
        if in_channel != 3:
            self.conv1 = nn.Conv2d(in_channel, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.fc = None
        self.out_dim = 512 * torchvision.models.resnet.Bottleneck.expansion

    def forward_features(self, x):
        """[N, 3, 224, 224] -> [N, 2048, 7, 7]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


ENCODERS = {
    'resnet18': lambda in_channel, width: CifarResNet(BasicBlock, [2, 2, 2, 2], in_channel, width),
    'resnet34': lambda in_channel, width: CifarResNet(BasicBlock, [3, 4, 6, 3], in_channel, width),
    'resnet50': lambda in_channel, width: CifarResNet(Bottleneck, [3, 4, 6, 3], in_channel, width),
    'resnet101': lambda in_channel, width: CifarResNet(Bottleneck, [3, 4, 23, 3], in_channel, width),
    'resnet50-imagenet': lambda in_channel, width: ImageNetResNet((3, 4, 6, 3), in_channel),
}


class SupConResNet(nn.Module):
    """``encoder`` + MLP ``head`` (Linear(C,C)–ReLU–Linear(C,feat_dim)), L2-normalised output."""

    def __init__(self, name='resnet18', feat_dim=128, in_channel=3, width=64):
        super().__init__()
        self.encoder = ENCODERS[name](in_channel, width)
        dim = self.encoder.out_dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, feat_dim))

    def forward_features(self, x):
        return self.encoder.forward_features(x)

    def forward_head(self, fmap):
        """Last-stage map [N, C, H, W] -> L2-normalised projection [N, feat_dim]."""
        return F.normalize(self.head(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)), dim=1)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class SupCEResNet(nn.Module):
    """``encoder`` + linear classifier ``fc``."""

    def __init__(self, name='resnet18', num_classes=10, in_channel=3, width=64):
        super().__init__()
        self.encoder = ENCODERS[name](in_channel, width)
        self.fc = nn.Linear(self.encoder.out_dim, num_classes)

    def forward_features(self, x):
        return self.encoder.forward_features(x)

    def forward_head(self, fmap):
        """Last-stage map [N, C, H, W] -> logits [N, num_classes]."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def parse_arch(arch):
    """'resnet18-supcon' -> ('resnet18', 'supcon'); 'resnet50-imagenet-ce' -> ('resnet50-imagenet', 'ce')."""
    base, _, kind = arch.rpartition('-')
    if base not in ENCODERS or kind not in ('supcon', 'ce'):
        raise KeyError(arch)
    return base, kind


MODEL_ARCHS = sorted(f'{b}-{k}' for b in ENCODERS for k in ('supcon', 'ce'))


def resolve_arch(arch, in_dataset=None):
    """Our ``--model-arch`` name for one of the authors' / knn-ood's: ``resnet18-supce`` ->
    ``resnet18-ce`` (their CE models), a bare ``resnet18`` -> ``resnet18-ce``, and for
    ``--in-dataset imagenet`` ``resnet50-supcon`` / ``resnet50`` -> ``resnet50-imagenet-supcon``
    / ``-ce`` (their ImageNet names). Anything else is returned unchanged."""
    base, _, kind = arch.rpartition('-')
    if arch in ENCODERS:
        base, kind = arch, 'ce'
    elif kind == 'supce':
        kind = 'ce'
    elif kind not in ('supcon', 'ce'):
        return arch
    if in_dataset is not None and str(in_dataset).lower() == 'imagenet' and base == 'resnet50':
        base = 'resnet50-imagenet'
    return f'{base}-{kind}'


def build_model(arch, num_classes=10, in_channel=3, feat_dim=128, width=64):
    """Build a model from its ``--model-arch`` name, e.g. ``resnet18-supcon``, ``resnet34-ce``,
    ``resnet50-imagenet-supcon``. ``width`` (64 in the paper) shrinks the CIFAR ResNets for
    CPU runs."""
    try:
        base, kind = parse_arch(resolve_arch(arch))
    except KeyError:
        from util.errors import UserError
        raise UserError(f"unknown --model-arch {arch!r}; known: {', '.join(MODEL_ARCHS)}") from None
    if kind == 'supcon':
        return SupConResNet(base, feat_dim=feat_dim, in_channel=in_channel, width=width)
    return SupCEResNet(base, num_classes=num_classes, in_channel=in_channel, width=width)
