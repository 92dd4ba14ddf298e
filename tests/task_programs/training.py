"""What the PyTorch task programs share: a small fixed data set and a digest of weights, so
that a resumed run can be compared bit for bit with an uninterrupted one."""

from __future__ import annotations

import hashlib

import torch


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def regression_data() -> torch.utils.data.DataLoader:
    """64 fixed samples of a 4-input regression, in 8 unshuffled batches."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=generator)
    y = (x @ torch.tensor([[0.5], [-1.0], [2.0], [0.1]])).tanh()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                       shuffle=False)
