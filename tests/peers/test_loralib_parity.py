"""Same seed, same parameters, same outputs as loralib 0.1.2; checkpoints load both ways."""

import numpy as np
import pytest
import torch
from torch import nn

import lora

loralib = pytest.importorskip("loralib")


def randomise(module):
    # loralib and we both start with B = 0 (A = 0 for Embedding): make the adapters matter.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


CASES = {
    "Linear": (lambda m: m.Linear(10, 6, r=3, lora_alpha=6), lambda: torch.randn(4, 10)),
    "Linear_fan_in_fan_out": (
        lambda m: m.Linear(10, 6, r=3, lora_alpha=6, fan_in_fan_out=True),
        lambda: torch.randn(4, 10),
    ),
    "MergedLinear": (
        lambda m: m.MergedLinear(10, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lambda: torch.randn(4, 10),
    ),
    "Embedding": (lambda m: m.Embedding(20, 6, r=3, lora_alpha=6), lambda: torch.randint(0, 20, (4, 5))),
    "Conv2d": (lambda m: m.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "Conv2d_groups": (lambda m: m.Conv2d(4, 6, 3, r=2, groups=2), lambda: torch.randn(2, 4, 7, 7)),
    "Conv1d_k1": (lambda m: m.Conv1d(3, 5, 1, r=2), lambda: torch.randn(2, 3, 9)),
    "Conv3d_k1": (lambda m: m.Conv3d(3, 5, 1, r=2), lambda: torch.randn(2, 3, 4, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_parameters(case):
    build, _ = CASES[case]
    torch.manual_seed(0)
    ours = build(lora)
    torch.manual_seed(0)
    theirs = build(loralib)
    ours_sd = ours.state_dict()
    theirs_sd = {k.replace("conv.", ""): v for k, v in theirs.state_dict().items()}
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in theirs_sd.items():
        assert torch.equal(ours_sd[key], value), key


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_loralib_checkpoint_loads_into_ours(case, mode):
    build, make_input = CASES[case]
    theirs = build(loralib)
    randomise(theirs)
    ours = build(lora)
    ours.load_state_dict(theirs.state_dict())  # loralib's conv keys (`conv.weight`) included
    getattr(ours, mode)()
    getattr(theirs, mode)()
    x = make_input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["Linear", "Linear_fan_in_fan_out", "MergedLinear", "Embedding"])
def test_our_checkpoint_loads_into_loralib(case):
    build, make_input = CASES[case]
    ours = build(lora)
    randomise(ours)
    theirs = build(loralib)
    theirs.load_state_dict(ours.state_dict())
    x = make_input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_loralib_double_applies_a_merged_state_dict_and_we_do_not():
    torch.manual_seed(0)
    theirs = loralib.Linear(16, 16, r=4)
    randomise(theirs)
    ours = lora.Linear(16, 16, r=4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16)
    expected = ours(x)
    theirs.eval()
    ours.eval()
    reloaded_theirs = loralib.Linear(16, 16, r=4)
    reloaded_theirs.load_state_dict(theirs.state_dict())
    reloaded_ours = lora.Linear(16, 16, r=4)
    reloaded_ours.load_state_dict(ours.state_dict())
    assert (reloaded_theirs(x) - expected).abs().max() > 1e-2
    torch.testing.assert_close(reloaded_ours(x), expected)


def test_signatures_match_loralib():
    import inspect

    for name in ["Linear", "MergedLinear", "Embedding", "ConvLoRA", "LoRALayer"]:
        ours = inspect.signature(getattr(lora, name).__init__).parameters
        theirs = inspect.signature(getattr(loralib, name).__init__).parameters
        positional = [p for p in theirs.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [p.name for p in positional] == [p.name for p in ours.values()][: len(positional)], name
        for p in positional:
            default = p.default if not isinstance(p.default, list) else tuple(p.default)
            assert ours[p.name].default == default, (name, p.name)
    assert issubclass(lora.Linear, nn.Linear) and issubclass(lora.MergedLinear, nn.Linear)
    assert issubclass(lora.Embedding, nn.Embedding)


def test_convlora_accepts_every_argument_by_keyword_as_loralib_does():
    layer = lora.ConvLoRA(conv_module=nn.Conv2d, in_channels=3, out_channels=6, kernel_size=3, r=2)
    reference = loralib.ConvLoRA(conv_module=nn.Conv2d, in_channels=3, out_channels=6, kernel_size=3, r=2)
    assert type(layer) is lora.Conv2d and layer.lora_A.shape == reference.lora_A.shape
    with pytest.raises(TypeError, match="conv_module=<class 'torch.nn.modules.conv.Conv1d'> contradicts the layer "
                                        "type, which is a Conv2d"):
        lora.Conv2d(conv_module=nn.Conv1d, in_channels=3, out_channels=6, kernel_size=3)


def test_numpy_ints_and_bools_are_accepted_as_loralib_accepts_them():
    layer = lora.MergedLinear(4, 6, r=np.int64(2), enable_lora=np.array([True, False]))
    reference = loralib.MergedLinear(4, 6, r=np.int64(2), enable_lora=np.array([True, False]))
    assert type(layer.r) is int and layer.enable_lora == (True, False)
    assert layer.lora_A.shape == reference.lora_A.shape and layer.lora_B.shape == reference.lora_B.shape
