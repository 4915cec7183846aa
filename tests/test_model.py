"""PreAct ResNet-18: layout, parameter count and the residual quirk."""
import torch
import torch.nn.functional as F

from PreResNet import PreActBlock, ResNet18


def test_output_shape_and_parameter_count():
    net = ResNet18(num_classes=10).eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # stem 1,856 + stages 147,968 / 525,184 / 2,098,944 / 8,392,192 + head 5,130 (counted by hand)
    assert sum(p.numel() for p in net.parameters()) == 11_171_274
    assert ResNet18(num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_no_bn_relu_before_pooling_and_shortcuts_only_on_shape_change():
    net = ResNet18()
    names = [n for n, _ in net.named_children()]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"]
    shortcuts = [b.shortcut is not None for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    assert shortcuts == [False, False, True, False, True, False, True, False]


def test_identity_path_adds_the_preactivated_tensor():
    torch.manual_seed(0)
    block = PreActBlock(8, 8).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 5)
    o = F.relu(block.bn1(x))
    residual = block.conv2(F.relu(block.bn2(block.conv1(o))))
    out = block(x)
    assert torch.allclose(out, residual + o, atol=1e-6)
    assert not torch.allclose(out, residual + x, atol=1e-3)


def test_projection_shortcut_takes_the_preactivated_tensor():
    torch.manual_seed(0)
    block = PreActBlock(8, 16, stride=2).eval()
    x = torch.randn(2, 8, 6, 6)
    o = F.relu(block.bn1(x))
    expected = block.conv2(F.relu(block.bn2(block.conv1(o)))) + block.shortcut(o)
    assert torch.allclose(block(x), expected, atol=1e-6)
