"""Diffusion Policy (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning via Action
Diffusion"), the CNN-based variant: actions are sampled by denoising, conditioned on observations.

Window: observations o_{t-To+1..t} (To = n_obs_steps), actions a_{t-To+1 .. t-To+H} (H = horizon,
the chunk starts at the first observed step); the actions from t on are executed, n_action_steps of them.
Condition: c = flatten(ObservationEncoder(o)) over the To frames (each camera: ResNet18 with
    GroupNorm -> spatial-softmax keypoints -> linear; low-dim keys as they are).
Training (DDPM, Ho et al. 2020):  k ~ U{0..K-1}, eps ~ N(0, I),
    x_k = sqrt(alpha_bar_k) a + sqrt(1 - alpha_bar_k) eps        (diffusers' `add_noise`)
    L = || eps_theta(x_k, k, c) - eps ||^2, padded steps masked  (or the clean actions, `prediction_type: sample`)
    actions in [-1, 1] (min-max), K = 100 steps of the `squaredcos_cap_v2` schedule.
Inference: x_K ~ N(0, I); for k in the inference scheduler's steps: x <- step(eps_theta(x, k, c), k, x);
    any diffusers scheduler by name, DDIM with 10 steps by default (DDPM with 100 is the paper's).
eps_theta is `il_policies.nn.unet1d.ConditionalUnet1d` (FiLM on [step embedding, c]).

The initial noise x_K is drawn outside the network (`network_noise`), so an exported graph takes it
as an input and gives the torch policy's actions for the same generator.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import diffusers
import torch
from einops import rearrange

from il_policies.nn import ObservationEncoder
from il_policies.nn.losses import masked_mean
from il_policies.nn.unet1d import ConditionalUnet1d
from il_policies.policies.base import Policy
from il_policies.policies.config import ActionWindow, AugmentConfig, EMAPreset, PolicyConfig, TrainingPreset, VisionConfig
from il_policies.policies.registry import register_policy

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
PREDICTION_TYPES = ("epsilon", "sample")


@dataclass
class DiffusionConfig(PolicyConfig):
    name: str = "diffusion"
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    normalization: dict[str, str] = field(default_factory=lambda: {"action": "minmax", "low_dim": "minmax"})
    # The paper's image recipe: ResNet18 from scratch with GroupNorm, 32 spatial-softmax keypoints, a
    # random crop of 0.9 of each side in training and the center crop at inference.
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(backbone="resnet18", norm="group", pool="spatial_softmax"))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(kind="crop"))
    # The U-Net (the paper's image CNN: down_dims 512-1024-2048, step embedding 128, kernel 5, 8 groups).
    down_dims: tuple[int, ...] = (512, 1024, 2048)
    step_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8
    # Training noise schedule (diffusers DDPMScheduler).
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4  # linear schedules only
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon | sample
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # Sampling: any of SCHEDULERS, with its number of steps; eta for DDIM (0: deterministic).
    inference_scheduler: str = "DDIMScheduler"
    num_inference_steps: int = 10
    eta: float = 0.0
    # The paper's optimizer: AdamW 1e-4, betas (0.95, 0.999), weight decay 1e-6, cosine with 500
    # warm-up steps, no gradient clipping, EMA of the weights (power 0.75).
    training_preset: TrainingPreset = field(default_factory=lambda: TrainingPreset(
        lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, lr_scheduler="cosine", lr_warmup_steps=500, grad_clip=0.0,
        ema=EMAPreset(enabled=True, power=0.75)))

    def __post_init__(self):
        super().__post_init__()
        if self.inference_scheduler not in SCHEDULERS:
            raise ValueError(f"inference_scheduler {self.inference_scheduler!r} is not one of {SCHEDULERS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                             f"got {self.num_inference_steps}")
        halvings = 2 ** (len(self.down_dims) - 1)
        if self.horizon % halvings:
            raise ValueError(f"the U-Net halves the horizon {len(self.down_dims) - 1} times: horizon {self.horizon} "
                             f"must be divisible by {halvings} (or use fewer down_dims)")
        if any(d % self.n_groups for d in self.down_dims):
            raise ValueError(f"every down_dims width must be divisible by n_groups={self.n_groups}, got {self.down_dims}")
        if self.vision.weights:
            self.use_imagenet_statistics()

    def action_window(self) -> ActionWindow:
        return ActionWindow(self.n_obs_steps, self.horizon, -(self.n_obs_steps - 1), self.n_action_steps)

    def scheduler(self, name: str = "DDPMScheduler"):
        """A diffusers scheduler `name` on this config's noise schedule (the options it takes)."""
        cls = getattr(diffusers, name)
        options = dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                       beta_end=self.beta_end, prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                       clip_sample_range=self.clip_sample_range)
        accepted = inspect.signature(cls.__init__).parameters
        if self.clip_sample and "clip_sample" not in accepted:
            # DPM-Solver has no clip_sample; its thresholding with the bound as the largest threshold clips
            # the predicted clean sample to the same range (without it, the cosine schedule's first steps,
            # where alpha_bar is near 0, blow the prediction up).
            options |= {"thresholding": True, "sample_max_value": self.clip_sample_range}
        return cls(**{key: value for key, value in options.items() if key in accepted})


@register_policy("diffusion")
class DiffusionPolicy(Policy):
    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig, shape_meta):
        super().__init__(config, shape_meta)
        self.obs_encoder = ObservationEncoder(self.network_obs_meta, config.vision)
        self.unet = ConditionalUnet1d(self.action_dim, self.obs_encoder.out_dim * config.n_obs_steps, config.down_dims,
                                      config.step_embed_dim, config.kernel_size, config.n_groups)
        self.noise_scheduler = config.scheduler("DDPMScheduler")
        # The inference steps are fixed by the config: set once, as Python ints, so an exported graph
        # unrolls the loop with each step's coefficients as constants (nothing data-dependent to trace).
        self.sampler = config.scheduler(config.inference_scheduler)
        self.sampler.set_timesteps(config.num_inference_steps)
        if hasattr(self.sampler, "set_begin_index"):  # multistep solvers: start at step 0 without a search
            self.sampler.set_begin_index(0)
        self._timesteps = self.sampler.timesteps.tolist()
        self._step_options = {"eta": config.eta} if "eta" in inspect.signature(self.sampler.step).parameters else {}

    def _condition(self, normalized_obs) -> torch.Tensor:
        return rearrange(self.obs_encoder(normalized_obs), "b t d -> b (t d)")

    # ---- training -------------------------------------------------------------------------------
    def compute_loss(self, batch):
        cond = self._condition(self.normalize_obs(batch["obs"]))
        actions = self.normalizer.normalize("action", batch["action"])
        noise = torch.randn_like(actions)
        steps = torch.randint(0, self.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noisy = self.noise_scheduler.add_noise(actions, noise, steps)
        target = noise if self.config.prediction_type == "epsilon" else actions
        loss = masked_mean((self.unet(noisy, steps, cond) - target).square(), batch.get("action_is_pad"))
        return loss, {"diffusion_mse": loss.item()}

    # ---- inference ------------------------------------------------------------------------------
    def network_noise(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        device = generator.device if generator is not None else self.device
        shape = (batch_size, self.config.horizon, self.action_dim)
        return {"noise": torch.randn(shape, generator=generator, device=device).to(self.device)}

    accepts_prefix = True

    def _predict_action_chunk(self, obs, generator=None, noise=None, prefix=None):
        cond = self._condition(self.normalize_obs(obs))
        sample = noise if noise is not None else self.network_noise(cond.shape[0], generator)["noise"]
        # Multistep solvers keep per-call state (the last outputs, the step index): a copy per call, so
        # concurrent calls (server clients) do not share it. Its lists copied, its constant tensors shared.
        sampler = copy.copy(self.sampler)
        sampler.__dict__.update({key: list(value) for key, value in vars(sampler).items() if isinstance(value, list)})
        for i, step in enumerate(self._timesteps):
            predicted = self.unet(sample, torch.full((cond.shape[0],), step, device=cond.device), cond)
            sample = sampler.step(predicted, step, sample, generator=generator, **self._step_options).prev_sample
            if prefix is not None:
                sample = self._inpaint(sample, prefix, self._timesteps[i + 1] if i + 1 < len(self._timesteps) else None, generator)
        return self.normalizer.unnormalize("action", sample)

    def _inpaint(self, sample: torch.Tensor, prefix: torch.Tensor, next_step: int | None, generator) -> torch.Tensor:
        """Real-time chunking by inpainting (RePaint, Lugmayr et al. 2022): after every denoising step
        the committed actions' positions (from the current step on) are set to those actions noised
        to the next step's level (`add_noise`, fresh noise), and to the actions themselves after the
        last step, so the rest of the chunk is denoised around them and joins them smoothly."""
        known = self.normalizer.normalize("action", prefix)
        start = self.window.current
        if start + known.shape[1] > sample.shape[1]:
            raise ValueError(f"a prefix of {known.shape[1]} actions does not fit the {sample.shape[1] - start} actions of a chunk")
        if next_step is not None:
            eps = torch.randn(known.shape, generator=generator, device=generator.device if generator is not None else known.device)
            known = self.noise_scheduler.add_noise(known, eps.to(known.device), torch.tensor([next_step], device=known.device))
        return torch.cat([sample[:, :start], known, sample[:, start + known.shape[1]:]], dim=1)

    @property
    def samples_noise_in_steps(self) -> bool:
        """Whether the sampler draws fresh noise at every step (DDPM, DDIM with eta > 0), beyond x_K."""
        return self.config.inference_scheduler == "DDPMScheduler" or (self.config.inference_scheduler == "DDIMScheduler" and self.config.eta > 0)
