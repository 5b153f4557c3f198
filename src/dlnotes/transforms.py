"""Image transforms shared by the MNIST-like recipes, applied to whole batches of in-memory tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MNIST's pixel mean and std; standardised inputs train faster


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28), zero mean and unit variance on MNIST.
    Training, evaluation and predict all go through here, so they see identical inputs."""
    return ((pixels.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def random_affine(images: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                  scale: float = 0.1, shift_px: float = 2.0) -> torch.Tensor:
    """Rotate (±degrees), scale (±scale) and shift (±shift_px) each image of a (B, C, H, W) batch at random,
    as one batched affine warp: far cheaper than per-image transforms."""
    batch, _, height, _ = images.shape
    rand = torch.rand(batch, 4, generator=generator).to(images.device) * 2 - 1  # (B, 4) in [-1, 1]
    angle = rand[:, 0] * torch.pi * degrees / 180
    zoom = 1 + rand[:, 1] * scale
    theta = torch.zeros(batch, 2, 3, device=images.device)  # (B, 2, 3) affine matrices
    theta[:, 0, 0], theta[:, 0, 1] = zoom * torch.cos(angle), -zoom * torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = zoom * torch.sin(angle), zoom * torch.cos(angle)
    theta[:, :, 2] = rand[:, 2:] * (2 * shift_px / height)  # the grid spans [-1, 1] across the image
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="border")
