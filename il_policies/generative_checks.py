"""Does a generative policy's decoder D use its input? Measured on held-out samples, in numbers.

`decoder_checks(policy, train_batches, val_batches)` for a policy with an observation VAE
(`policy.vae`, `policy.decoder_latent(batch)`: BVAE's normalized action chunk, VAE+NN's mean latent):

- `decoded_explained/<group>`: 1 - MSE(D(z), o) / MSE(m, o) over the held-out samples, where m is
  the training split's mean observation (per group: `image`, `low_dim`). The fraction of the
  held-out variation of o that the decoded observation explains: 0 when D outputs the average
  observation whatever z is, 1 for a perfect reconstruction (negative: worse than the average).
  `decoded_explained_train/<group>`: the same over the training samples (what D fitted).
- `traversal/slope`, `traversal/slope_<i>`: the re-encoding check. Each latent coordinate i of a
  held-out sample is moved by delta (in SDs) and decoded, and the decoded observation is encoded
  again: the slope of mu_i(E(D(z + delta e_i))) - mu_i(E(D(z))) against delta (least squares
  through 0). 1: the edit survives decoding and re-encoding; 0: D's output does not carry it.
- `traversal/change_<group>`: how far one SD of latent edit moves D's output, as the RMS change per
  SD relative to the RMS spread of the held-out observations around the training mean (a visible
  edit of the image moves it by a good fraction of what tells two real frames apart; a change of
  ~0 with a slope near 1 would mean the edit is carried invisibly).

The decoded observation is D's mean (no sampling); eval mode, no gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

DELTAS = (-2.0, -1.0, 1.0, 2.0)


def _packed(policy, batch: Mapping) -> dict[str, torch.Tensor]:
    return policy.vae.pack(policy.normalize_obs(batch["obs"]))


@torch.no_grad()
def training_mean(policy, batches: Iterable[Mapping]) -> dict[str, torch.Tensor]:
    """The mean normalized observation of each group over `batches` (one sample's shape)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches:
        for group, value in _packed(policy, batch).items():
            sums[group] = sums.get(group, 0.0) + value.double().sum(0)
        count += next(iter(batch["obs"].values())).shape[0]
    if not count:
        raise ValueError("decoder checks need at least one training sample for the mean observation")
    return {group: (total / count).float() for group, total in sums.items()}


def _explained(policy, batches: Iterable[Mapping], mean: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per group over `batches`: 1 - SSE(D(z), o) / SSE(mean, o), and the RMS of o - mean."""
    sse = {group: 0.0 for group in mean}
    sse_mean = {group: 0.0 for group in mean}
    elements = {group: 0 for group in mean}
    for batch in batches:
        o = _packed(policy, batch)
        decoded = policy.vae.decode(policy.decoder_latent(batch))[0]
        for group in mean:
            sse[group] += (decoded[group] - o[group]).double().square().sum().item()
            sse_mean[group] += (mean[group] - o[group]).double().square().sum().item()
            elements[group] += o[group].numel()
    if not any(elements.values()):
        raise ValueError("decoder checks need at least one sample in each split")
    explained = {group: 1.0 - sse[group] / sse_mean[group] if sse_mean[group] else float("nan") for group in mean}
    return explained, {group: (sse_mean[group] / elements[group]) ** 0.5 for group in mean}


def _traversal(policy, batches: Iterable[Mapping], deltas: Sequence[float], coordinates: range, groups) -> tuple:
    """Summed over samples: delta * (re-encoded coordinate change) per coordinate, and the RMS
    change of each group per SD of edit (averaged over coordinates); and the sample count."""
    vae = policy.vae
    delta = torch.tensor(deltas)
    along = torch.zeros(len(coordinates), dtype=torch.float64)
    change = {group: 0.0 for group in groups}
    n = 0
    for batch in batches:
        z = policy.decoder_latent(batch)
        decoded = vae.decode(z)[0]
        base = vae.encode(decoded)[:, : vae.latent_dim]
        for row, i in enumerate(coordinates):
            moved = z.repeat(len(deltas), 1)
            moved[:, i] += delta.to(z).repeat_interleave(z.shape[0])
            moved_decoded = vae.decode(moved)[0]
            reencoded = vae.encode(moved_decoded)[:, i].reshape(len(deltas), -1)
            along[row] += ((reencoded - base[:, i]) * delta.to(z)[:, None]).double().sum().item()
            for group in groups:
                diff = moved_decoded[group].reshape(len(deltas), z.shape[0], -1) - decoded[group].reshape(1, z.shape[0], -1)
                rms = diff.double().square().mean(-1).sqrt() / delta.abs().double()[:, None]
                change[group] += rms.sum().item() / len(coordinates)
        n += z.shape[0]
    return along, change, n


@torch.no_grad()
def decoder_checks(policy, train_batches: Callable[[], Iterable[Mapping]], val_batches: Callable[[], Iterable[Mapping]],
                   deltas: Sequence[float] = DELTAS, max_coordinates: int = 16) -> dict[str, float]:
    """The metrics of the module docstring, as `generative/...` keys. Each argument returns a fresh
    iterator over its split's batches (the training split is read twice: its mean, then D's fit)."""
    was_training = policy.training
    policy.eval()
    try:
        mean = training_mean(policy, train_batches())
        explained_train, _ = _explained(policy, train_batches(), mean)
        explained, spread = _explained(policy, val_batches(), mean)
        coordinates = range(min(policy.vae.latent_dim, max_coordinates))
        along, change, n = _traversal(policy, val_batches(), deltas, coordinates, list(mean))
    finally:
        policy.train(was_training)
    slopes = along / (n * sum(d * d for d in deltas))
    out = {f"generative/traversal/slope_{i}": slopes[row].item() for row, i in enumerate(coordinates)}
    out["generative/traversal/slope"] = slopes.mean().item()
    for group in mean:
        out[f"generative/decoded_explained/{group}"] = explained[group]
        out[f"generative/decoded_explained_train/{group}"] = explained_train[group]
        out[f"generative/traversal/change_{group}"] = change[group] / (n * len(deltas)) / spread[group] if spread[group] else float("nan")
    return out


__all__ = ["DELTAS", "decoder_checks", "training_mean"]
