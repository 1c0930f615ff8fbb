import math

import torch
import torch.nn.functional as F

from flyp.losses import clip_loss, siglip_loss

# Two unit image features and two unit text features with easy cosine similarities.
IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
# cos: [[0.6, 0.0], [0.8, 1.0]]


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_clip_loss_hand_computed():
    s = 2.0
    # image->text rows: [1.2, 0], [1.6, 2.0]; text->image rows (columns): [1.2, 1.6], [0, 2.0]
    i2t = (lse(1.2, 0.0) - 1.2) + (lse(1.6, 2.0) - 2.0)
    t2i = (lse(1.2, 1.6) - 1.2) + (lse(0.0, 2.0) - 2.0)
    expected = (i2t / 2 + t2i / 2) / 2
    assert math.isclose(clip_loss(IMG, TXT, s).item(), expected, rel_tol=1e-6)


def test_collision_mask_and_soft_hand_computed():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    labels = torch.tensor([0, 0, 1])  # samples 0 and 1 share a class
    logits = (img @ txt.t()).tolist()
    # mask: in rows/columns 0 and 1 the other same-class entry leaves the denominator
    i2t = (
        (lse(logits[0][0], logits[0][2]) - logits[0][0])
        + (lse(logits[1][1], logits[1][2]) - logits[1][1])
        + (lse(*logits[2]) - logits[2][2])
    )
    col = [[logits[r][c] for r in range(3)] for c in range(3)]
    t2i = (
        (lse(col[0][0], col[0][2]) - col[0][0])
        + (lse(col[1][1], col[1][2]) - col[1][1])
        + (lse(*col[2]) - col[2][2])
    )
    expected_mask = (i2t / 3 + t2i / 3) / 2
    assert math.isclose(
        clip_loss(img, txt, 1.0, labels, "mask").item(), expected_mask, rel_tol=1e-6
    )

    # soft: rows 0 and 1 put half their target on each same-class caption
    def soft(rows):
        total = 0.0
        for r, row in enumerate(rows):
            z = lse(*row)
            targets = [0, 1] if r < 2 else [2]
            total += sum(-(row[t] - z) / len(targets) for t in targets)
        return total / 3

    expected_soft = (soft(logits) + soft(col)) / 2
    assert math.isclose(
        clip_loss(img, txt, 1.0, labels, "soft").item(), expected_soft, rel_tol=1e-6
    )


def test_collision_options_equal_plain_when_labels_distinct():
    img, txt = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    labels = torch.arange(5)
    plain = clip_loss(img, txt, 3.0)
    assert torch.allclose(clip_loss(img, txt, 3.0, labels, "mask"), plain)
    assert torch.allclose(clip_loss(img, txt, 3.0, labels, "soft"), plain)


def test_siglip_loss_hand_computed():
    s, b = 2.0, -1.0
    logits = [[1.2 + b, 0.0 + b], [1.6 + b, 2.0 + b]]

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    total = (
        log_sigmoid(logits[0][0])
        + log_sigmoid(-logits[0][1])
        + log_sigmoid(-logits[1][0])
        + log_sigmoid(logits[1][1])
    )
    assert math.isclose(siglip_loss(IMG, TXT, s, b).item(), -total / 2, rel_tol=1e-6)
