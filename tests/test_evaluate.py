import pytest
import torch
import torch.nn.functional as F

from vlm.evaluate import retrieval_metrics, zeroshot_metrics


def onehot(idx, dim):
    return F.one_hot(torch.tensor(idx), dim).float()


def test_zeroshot_known_answers():
    classes = torch.eye(4)                    # class c embeds along axis c
    # 8 images: the first 6 point at their class; image 6 (class 2) points at class 3,
    # image 7 (class 3) points mostly at 0 and a little at 3 (top-5 still hits).
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    img = onehot([0, 0, 1, 1, 2, 2, 3, 0], 4)
    img[7, 3] = 0.5
    out = zeroshot_metrics(F.normalize(img, dim=-1), labels, classes)
    assert out["acc1"] == pytest.approx(6 / 8)
    assert out["acc5"] == 1.0                 # only 4 classes: top-5 covers all
    # per-class recall: 1, 1, 2/3, 0
    assert out["mean_per_class_recall"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert out["chance"] == 0.25 and out["num_classes"] == 4


def test_retrieval_known_answers_with_several_captions_per_image():
    # 3 images on axes 0..2; 5 captions: image 0 has captions 0,1; image 1 has 2; image 2 has 3,4.
    images = torch.eye(3)
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    # caption 1 ranks its image third (after 1 and 2), caption 3 points to image 0 (wrong, but its
    # true image is second best), the rest are right.
    texts = torch.stack([onehot(0, 3), torch.tensor([0, 1, 0.5]), onehot(1, 3), torch.tensor([0.9, 0, 0.4]), onehot(2, 3)])
    for chunk in (1, 2, 1024):
        out = retrieval_metrics(images, texts, text_to_image, ks=[1, 2], chunk=chunk)
        # text -> image: captions 0,2,4 right at rank 0; caption 3 rank 1; caption 1 rank 2
        assert out["image_retrieval_recall@1"] == pytest.approx(3 / 5)
        assert out["image_retrieval_recall@2"] == pytest.approx(4 / 5)
        # image -> text: image 0's own caption 0 is top; image 1: captions 1 and 2 tie at
        # score 1 (a tie is not "better", so its own caption 2 counts as rank 0); image 2:
        # caption 4 is top.
        assert out["text_retrieval_recall@1"] == 1.0


def test_retrieval_counts_a_miss():
    images = torch.eye(2)
    texts = torch.eye(2).flip(0)              # each caption points at the other image
    out = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=[1, 2])
    assert out["image_retrieval_recall@1"] == 0.0 and out["text_retrieval_recall@1"] == 0.0
    assert out["image_retrieval_recall@2"] == 1.0 and out["text_retrieval_recall@2"] == 1.0
