import torch

from vlm.data.augment import AugmentConfig, augment, two_views


def test_identity_settings_reproduce_the_image():
    img = torch.rand(3, 3, 16, 16)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, brightness=0.0, contrast=0.0)
    assert torch.allclose(augment(img, cfg), img, atol=1e-5)


def test_flip_only_mirrors():
    img = torch.rand(2, 3, 8, 8)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, brightness=0.0, contrast=0.0)
    assert torch.allclose(augment(img, cfg), img.flip(-1), atol=1e-5)


def test_views_differ_are_seeded_and_in_range():
    img = torch.rand(4, 3, 32, 32)
    cfg = AugmentConfig()
    v1 = two_views(img, cfg, torch.Generator().manual_seed(1))
    v2 = two_views(img, cfg, torch.Generator().manual_seed(1))
    assert v1.shape == (8, 3, 32, 32) and torch.equal(v1, v2)
    assert not torch.allclose(v1[:4], v1[4:])
    assert v1.min() >= 0 and v1.max() <= 1
