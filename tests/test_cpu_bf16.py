"""CPU bf16 autocast tuned per operator: depthwise convolutions in fp32, math attention for
short ViT sequences. Exact where it claims to be, and a deep copy stays its own model."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from flyp.models import load_model
from flyp.models.base import tune_cpu_bf16


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pointwise = nn.Conv2d(4, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.depthwise(self.pointwise(x))


def test_depthwise_convs_run_in_fp32_under_cpu_autocast_and_nothing_else_changes():
    tower = Tower()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        plain = tower(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mid = tower.pointwise(x)
            untuned = tower.depthwise(mid)
        assert tune_cpu_bf16(tower) == ["depthwise"]
        assert tune_cpu_bf16(tower) == []  # idempotent
        assert torch.equal(tower(x), plain)  # without autocast: the module's own forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tuned_mid = tower.pointwise(x)
            tuned = tower.depthwise(tuned_mid)
    assert tuned_mid.dtype == torch.bfloat16 and torch.equal(tuned_mid, mid)  # 1x1 stays bf16
    expected = nn.functional.conv2d(
        mid.float(), tower.depthwise.weight, tower.depthwise.bias, padding=1, groups=8
    ).to(torch.bfloat16)
    assert tuned.dtype == torch.bfloat16
    assert torch.equal(tuned, expected)
    assert not torch.equal(untuned, expected)  # the bf16 kernel gives other numbers


def test_a_deep_copy_of_a_tuned_model_uses_its_own_weights():
    tower = Tower()
    tune_cpu_bf16(tower)
    twin = copy.deepcopy(tower)
    with torch.no_grad():
        twin.depthwise.weight.zero_()
        twin.depthwise.bias.zero_()
        x = torch.randn(1, 4, 5, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert twin(x).abs().sum() == 0
            assert tower(x).abs().sum() > 0


def test_a_timm_same_padding_depthwise_conv_keeps_its_padding():
    from timm.layers import create_conv2d

    conv = create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        reference = conv(x)
        tune_cpu_bf16(conv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tuned = conv(x)
    assert tuned.shape == reference.shape == (2, 8, 6, 6)
    torch.testing.assert_close(tuned.float(), reference, rtol=0.02, atol=0.02)


def test_a_short_vit_uses_the_math_attention_with_the_same_features(tmp_path):
    config = tmp_path / "flyp-short-vit.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))  # fmt: skip
    model = load_model(f"open_clip:{config}").model.eval()
    images = torch.randn(3, 3, 32, 32)
    used = []
    original = torch.nn.functional.scaled_dot_product_attention

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.encode_image(images)
        assert tune_cpu_bf16(model) == ["encode_image: math attention"]
        from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

        def spy(*args, **kwargs):
            used.append(list(_cur_sdpa_kernel_backends()))
            return original(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            got = model.encode_image(images)
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
    assert used and all(backends == [SDPBackend.MATH] for backends in used)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


def test_freed_memory_is_kept_through_glibc_mallopt_unless_turned_off(monkeypatch):
    import ctypes

    from flyp.models.base import keep_freed_memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert keep_freed_memory() is True
    assert calls == [(-3, 1 << 30), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    monkeypatch.setenv("FLYP_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    assert len(calls) == 2
