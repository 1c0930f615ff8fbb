import torch
import torch.nn.functional as F
from torch import nn

from flyp.heads import zeroshot_weights


class LookupText(nn.Module):
    """encode_text returns a fixed vector per caption, so the head can be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.p = nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens):
        return torch.stack([self.table[int(t)] for t in tokens[:, 0]])


def test_zeroshot_head_hand_computed():
    captions = ["a cat.", "a drawing of cat.", "a dog.", "a drawing of dog."]
    table = {
        0: torch.tensor([3.0, 0.0]),
        1: torch.tensor([0.0, 2.0]),
        2: torch.tensor([1.0, 1.0]),
        3: torch.tensor([-1.0, 1.0]),
    }
    tokenizer = lambda texts: torch.tensor([[captions.index(t)] for t in texts])  # noqa: E731
    weights = zeroshot_weights(
        LookupText(table), tokenizer, ["cat", "dog"], ["a {}.", "a drawing of {}."]
    )
    # cat: mean of unit vectors (1,0) and (0,1) -> (0.5, 0.5) -> normalised (0.7071, 0.7071)
    # dog: mean of (0.7071, 0.7071) and (-0.7071, 0.7071) -> (0, 0.7071) -> (0, 1)
    expected = torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.norm(dim=1), torch.ones(2))


def test_zeroshot_head_restores_train_mode():
    model = LookupText({0: torch.ones(2)})
    model.train()
    zeroshot_weights(model, lambda t: torch.zeros(len(t), 1, dtype=torch.long), ["x"], ["{}"])
    assert model.training
    assert F.normalize(torch.ones(1, 2), dim=-1).shape == (1, 2)
