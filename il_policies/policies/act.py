"""ACT: Action Chunking with Transformers (Zhao et al. 2023, "Learning Fine-Grained Bimanual
Manipulation with Low-Cost Hardware"), a conditional VAE over chunks of `horizon` (= chunk_size) actions.

CVAE encoder (training only)            q(z | a_{t:t+k}, proprio)
    tokens [CLS, proprio, a_t .. a_{t+k-1}] + fixed 1D sinusoidal positions, key padding from
    `action_is_pad` -> transformer encoder -> CLS output -> linear -> (mu, logvar) of z (32-dim)
Policy (the CVAE decoder)               a_{t:t+k} = pi(images, proprio, z)
    encoder tokens: [z-token, proprio token, environment-state token, image feature tokens]
      z, proprio and the other low-dim keys (concatenated, LeRobot's "environment_state") are linear
      projections with learned 1D positions; each camera's backbone feature map (ResNet18 layer4, or
      the small conv backbone) is projected to d_model per cell with 2D sinusoidal positions
      (cameras side by side along the width, as the original concatenates them).
    -> transformer encoder -> decoder with `horizon` learned queries over a zero target -> linear head
Loss: L1(a_hat, a) with padded steps zeroed, averaged over all entries as the original does,
      + kl_weight(step) * KL(q(z|.) || N(0, I)) (summed over latent dims, mean over the batch);
      kl_weight comes from the shared `KLSchedule` (constant 10 by default).
Inference: z = 0, the CVAE encoder is not run. Actions from the base class's queue of
`n_action_steps`, or, with `temporal_ensemble_coeff` set (and n_action_steps = 1), a chunk every
step averaged online with weights exp(-k i), i = 0 the oldest prediction (`TemporalEnsembler`).

The decoder has 1 layer by default: the original's 7-layer setting only uses its first layer's
output (LeRobot documents the same); `n_decoder_layers=7` runs a real 7-layer decoder.
Proprio: `proprio_key` (default `agent_pos`) when the task has it; every other low-dim key goes into
the environment-state token; with n_obs_steps > 1 the steps are concatenated into each token and
every step's image gets its own column block of 2D positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from il_policies.nn.transformer import TransformerDecoder, TransformerEncoder, sinusoidal_1d, sinusoidal_2d
from il_policies.nn.vae import KLSchedule, gaussian_kl, reparameterize
from il_policies.nn.vision import make_backbone
from il_policies.policies.base import Policy
from il_policies.policies.config import PolicyConfig, TrainingPreset
from il_policies.policies.registry import register_policy


@dataclass
class ACTConfig(PolicyConfig):
    name: str = "act"
    horizon: int = 100  # chunk_size
    n_action_steps: int = 100  # 1 with temporal ensembling
    lr_backbone: float = 1e-5
    d_model: int = 512
    n_heads: int = 8
    dim_feedforward: int = 3200
    n_encoder_layers: int = 4
    n_vae_encoder_layers: int = 4
    n_decoder_layers: int = 1  # the original effectively runs 1; set 7 for its nominal full depth
    dropout: float = 0.1
    activation: str = "relu"
    pre_norm: bool = False
    latent_dim: int = 32
    use_vae: bool = True
    kl_schedule: KLSchedule = field(default_factory=lambda: KLSchedule("constant", weight=10.0))
    backbone: str = "resnet18"  # resnet18 | resnet34 | conv (small CPU backbone, GroupNorm)
    backbone_weights: str | None = None  # local torchvision state_dict file; None: random init
    # ResNet normalization: group | batch | frozen; None: frozen with backbone_weights (as the
    # original with ImageNet weights), group without (a randomly initialized frozen BatchNorm is the identity).
    backbone_norm: str | None = None
    conv_channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # backbone=conv: 96x96 -> 3x3, as ResNet18
    proprio_key: str = "agent_pos"
    # The original's training: AdamW at a constant 1e-5, weight decay 1e-4, no gradient clipping, no EMA.
    training_preset: TrainingPreset = field(default_factory=lambda: TrainingPreset(
        lr=1e-5, weight_decay=1e-4, lr_scheduler="constant", lr_warmup_steps=0, grad_clip=0.0))

    def __post_init__(self):
        super().__post_init__()
        if self.backbone_norm is None:
            self.backbone_norm = "frozen" if self.backbone_weights else "group"
        if self.backbone_weights:
            self.use_imagenet_statistics()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")


def _flat(x: torch.Tensor) -> torch.Tensor:  # (B, T, *shape) -> (B, T * prod(shape))
    return x.flatten(1)


@register_policy("act")
class ACTPolicy(Policy):
    config_class = ACTConfig

    def __init__(self, config: ACTConfig, shape_meta):
        super().__init__(config, shape_meta)
        c, d, t = config, config.d_model, config.n_obs_steps
        obs_meta = self.network_obs_meta
        numel = lambda key: math.prod(obs_meta[key]["shape"]) * t  # noqa: E731
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "rgb")
        low_dim = sorted(k for k, m in obs_meta.items() if m["kind"] == "low_dim")
        self.proprio_key = c.proprio_key if c.proprio_key in low_dim else None
        self.env_keys = [k for k in low_dim if k != self.proprio_key]
        if not (self.rgb_keys or low_dim):
            raise ValueError("ACT needs at least one image or low-dim observation")
        layers = dict(dim=d, n_heads=c.n_heads, dim_feedforward=c.dim_feedforward, dropout=c.dropout,
                      activation=c.activation, pre_norm=c.pre_norm)

        if c.use_vae:  # CVAE encoder: [CLS, proprio?, actions]
            self.vae_encoder = TransformerEncoder(c.n_vae_encoder_layers, **layers)
            self.vae_cls = nn.Embedding(1, d)
            self.vae_proprio_proj = nn.Linear(numel(self.proprio_key), d) if self.proprio_key else None
            self.vae_action_proj = nn.Linear(self.action_dim, d)
            self.vae_latent_proj = nn.Linear(d, 2 * c.latent_dim)
            n_prefix = 2 if self.proprio_key else 1
            self.register_buffer("vae_pos", sinusoidal_1d(n_prefix + c.horizon, d), persistent=False)

        self.latent_proj = nn.Linear(c.latent_dim, d)
        self.proprio_proj = nn.Linear(numel(self.proprio_key), d) if self.proprio_key else None
        self.env_proj = nn.Linear(sum(numel(k) for k in self.env_keys), d) if self.env_keys else None
        self.pos_1d = nn.Embedding(1 + (self.proprio_proj is not None) + (self.env_proj is not None), d)
        if self.rgb_keys:
            shapes = {tuple(obs_meta[k]["shape"]) for k in self.rgb_keys}
            if len(shapes) != 1:
                raise ValueError(f"ACT's shared backbone needs every camera at one shape, got {sorted(shapes)}")
            (channels, height, width), = shapes
            self.backbone = make_backbone(c.backbone, channels, c.backbone_norm, c.backbone_weights, c.conv_channels)
            self.image_proj = nn.Conv2d(self.backbone.out_channels, d, kernel_size=1)
            with torch.no_grad():
                fh, fw = self.backbone(torch.zeros(1, channels, height, width)).shape[-2:]
            # Cameras (and observation steps) side by side along the width: one 2D table, one column block each.
            blocks = len(self.rgb_keys) * t
            table = sinusoidal_2d(fh, blocks * fw, d).reshape(fh, blocks, fw, d).transpose(0, 1)
            self.register_buffer("image_pos", table.reshape(-1, d), persistent=False)
        self.encoder = TransformerEncoder(c.n_encoder_layers, **layers)
        self.decoder = TransformerDecoder(c.n_decoder_layers, **layers)
        self.query_pos = nn.Embedding(c.horizon, d)
        self.action_head = nn.Linear(d, self.action_dim)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)  # as DETR / ACT

    # ---- the network (tokens are sequence-first: (S, B, D)) --------------------------------------
    def _image_tokens(self, nobs) -> torch.Tensor:
        """All cameras and steps through the shared backbone in one batch -> (n_tokens, B, d_model)."""
        images = torch.stack([nobs[k] for k in self.rgb_keys], dim=1)  # (B, n_cam, T, C, H, W)
        features = self.image_proj(self.backbone(rearrange(images, "b n t c h w -> (b n t) c h w")))
        return rearrange(features, "(b n t) d h w -> (n t h w) b d", b=images.shape[0], n=len(self.rgb_keys))

    def _decode(self, nobs, latent: torch.Tensor) -> torch.Tensor:
        """Normalized observations and latent (B, latent_dim) -> normalized actions (B, horizon, A)."""
        tokens = [self.latent_proj(latent)]
        if self.proprio_proj is not None:
            tokens.append(self.proprio_proj(_flat(nobs[self.proprio_key])))
        if self.env_proj is not None:
            tokens.append(self.env_proj(torch.cat([_flat(nobs[k]) for k in self.env_keys], dim=-1)))
        tokens = torch.stack(tokens)
        pos = self.pos_1d.weight
        if self.rgb_keys:
            tokens = torch.cat([tokens, self._image_tokens(nobs)])
            pos = torch.cat([pos, self.image_pos])
        memory = self.encoder(tokens, pos[:, None])
        target = memory.new_zeros(self.config.horizon, memory.shape[1], self.config.d_model)
        out = self.decoder(target, memory, self.query_pos.weight[:, None], pos[:, None])
        return rearrange(self.action_head(out), "h b a -> b h a")

    def _posterior(self, nobs, actions: torch.Tensor, is_pad: torch.Tensor | None):
        """CVAE encoder: (mu, logvar), each (B, latent_dim), from the CLS token's output."""
        batch = actions.shape[0]
        tokens = [self.vae_cls.weight[:, None].expand(1, batch, -1)]
        if self.vae_proprio_proj is not None:
            tokens.append(self.vae_proprio_proj(_flat(nobs[self.proprio_key]))[None])
        tokens.append(rearrange(self.vae_action_proj(actions), "b h d -> h b d"))
        mask = None
        if is_pad is not None:
            mask = F.pad(is_pad.bool(), (len(tokens) - 1, 0), value=False)  # CLS / proprio never padded
        cls = self.vae_encoder(torch.cat(tokens), self.vae_pos[:, None], mask)[0]
        mu, logvar = self.vae_latent_proj(cls).chunk(2, dim=-1)
        return mu, logvar

    # ---- training -------------------------------------------------------------------------------
    def compute_loss(self, batch):
        nobs = self.normalize_obs(batch["obs"])
        actions = self.normalizer.normalize("action", batch["action"])
        is_pad = batch.get("action_is_pad")
        metrics = {}
        if self.config.use_vae:
            mu, logvar = self._posterior(nobs, actions, is_pad)
            latent = reparameterize(mu, torch.exp(0.5 * logvar))
        else:
            latent = actions.new_zeros(actions.shape[0], self.config.latent_dim)
        l1 = (self._decode(nobs, latent) - actions).abs()
        if is_pad is not None:
            l1 = l1.masked_fill(is_pad.bool()[..., None], 0.0)
        loss = l1.mean()
        metrics["l1"] = loss.item()
        if self.config.use_vae:
            kl = gaussian_kl(mu, logvar).mean()
            weight = self.config.kl_schedule(self.training_step)
            loss = loss + weight * kl
            metrics |= {"kl": kl.item(), "kl_weight": weight}
        return loss, metrics

    def optim_groups(self):
        backbone = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": rest}]
        if backbone:
            groups.append({"params": backbone, "lr": self.config.lr_backbone})
        return groups

    # ---- inference ------------------------------------------------------------------------------
    def _predict_action_chunk(self, obs, generator=None):
        nobs = self.normalize_obs(obs)
        batch = next(iter(nobs.values())).shape[0]
        latent = self.latent_proj.weight.new_zeros(batch, self.config.latent_dim)  # z = 0: the prior's mean
        return self.normalizer.unnormalize("action", self._decode(nobs, latent))
