"""A small class-conditional VAE: the generator whose samples the evaluation attributes.

The paper trains a beta-VAE per data set and attributes its samples (C1). This is the same
kind of model at the scale of scikit-learn's digits: 8x8 images, so an MLP encoder and
decoder, each conditioned on the one-hot class, trained in seconds on a CPU. Samples are the
decoder's Bernoulli means for z ~ N(0, I) and a chosen class, so every generated image has
a known class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class TrainingLog:
    epochs: int
    seconds: float
    final_loss: float  # mean negative ELBO (beta-weighted) per image over the last epoch


def _modules(dim: int, classes: int, latent: int, hidden: int):
    from torch import nn

    encoder = nn.Sequential(nn.Linear(dim + classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent + classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, dim))
    return encoder, decoder


class ConditionalVAE:
    """p(x | z, y) with x in [0, 1]^dim (pixel intensities as Bernoulli means), y one-hot."""

    def __init__(self, dim: int = 64, classes: int = 10, latent: int = 8, hidden: int = 256, beta: float = 1.0,
                 seed: int = 0):
        import torch

        self.dim, self.classes, self.latent, self.beta = dim, classes, latent, beta
        # Seeded initial weights, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder, self.decoder = _modules(dim, classes, latent, hidden)

    def _onehot(self, labels):
        import torch

        return torch.nn.functional.one_hot(labels, self.classes).float()

    def loss(self, x, labels):
        import torch
        from torch.nn import functional as F

        y = self._onehot(labels)
        mu, logvar = self.encoder(torch.cat([x, y], 1)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(torch.cat([z, y], 1))
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (reconstruction + self.beta * kl) / len(x)

    def parameters(self):
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def fit(self, images: np.ndarray, labels: np.ndarray, epochs: int = 150, batch_size: int = 64,
            lr: float = 2e-3, seed: int = 0) -> TrainingLog:
        """`images`: (n, dim) in [0, 1]; `labels`: (n,) ints. Deterministic for a seed on CPU.
        Runs on one thread: this model is too small to gain from more, and on a busy machine
        a second thread that has to wait for a core made training several times slower."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):  # the reparameterisation noise, seeded
                torch.manual_seed(seed)
                return self._fit(images, labels, epochs, batch_size, lr, seed)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, images, labels, epochs, batch_size, lr, seed) -> TrainingLog:
        import torch

        generator = torch.Generator().manual_seed(seed)
        x_all = torch.as_tensor(images, dtype=torch.float32)
        y_all = torch.as_tensor(labels, dtype=torch.long)
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(len(x_all), generator=generator)
            total = 0.0
            for batch in order.split(batch_size):
                loss = self.loss(x_all[batch], y_all[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
        return TrainingLog(epochs, time.perf_counter() - start, total / len(x_all))

    def sample(self, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """One sample per label: (n, dim) Bernoulli means in [0, 1]."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        y = self._onehot(torch.as_tensor(labels, dtype=torch.long))
        z = torch.randn(len(y), self.latent, generator=generator)
        with torch.inference_mode():
            return torch.sigmoid(self.decoder(torch.cat([z, y], 1))).numpy()
