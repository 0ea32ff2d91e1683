"""The one training loop, shared by every policy.

    dataset -> policy (normalizer fitted on the training split) -> AdamW + LR schedule (+ EMA)
    -> steps of (batch, loss, backward, clip, step) -> validation each epoch -> checkpoints

Resumes automatically from `<output_dir>/checkpoints/latest.pt`: model, optimizer, LR schedule,
EMA, RNG states and step are restored and the batch order continues where it stopped, so an
interrupted run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from il_policies.checkpoint import read_checkpoint, save_checkpoint
from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch
from il_policies.data.store import TrajectoryStore
from il_policies.envs import task_from_config
from il_policies.envs.demos import check_generation_complete, check_store_matches_task, ensure_demos
from il_policies.generative_checks import decoder_checks
from il_policies.policies import make_policy
from il_policies.policies.registry import config_to_dict, make_config
from il_policies.training.config import data_reading, resolved_training_preset
from il_policies.training.distributed import DistributedContext, GlobalBatchOrder
from il_policies.training.logger import RunLogger
from il_policies.training.state import capture_rng, clip_grad_norm, resolve_device, restore_rng, seed_everything
from il_policies.training.validate import check_train_config


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Workspace:
    def __init__(self, cfg: DictConfig, output_dir: str | Path, on_round: Callable[[int, dict[str, float]], None] | None = None):
        """`on_round(step, metrics)` is called after every validation round (e.g. to keep learning curves)."""
        self.cfg = cfg
        self.on_round = on_round
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        check_train_config(cfg)
        self.ctx = DistributedContext.from_env()
        self.device = resolve_device(cfg.device, self.ctx)
        self.step = 0
        self.best_score: list[float] | None = None  # compared as (success rate, -val loss) or (-val loss,)

    # ---- setup --------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        if cfg.training.num_threads:
            torch.set_num_threads(int(cfg.training.num_threads))
        seed_everything(cfg.seed)
        policy_config = make_config(cfg.policy)  # a bad option is refused before any data is generated
        window = policy_config.action_window()  # the windows the policy sees and predicts
        self.task = task_from_config(cfg.task)
        if self.task is not None:
            self._ensure_dataset(Path(cfg.task.dataset_path))
        else:
            check_generation_complete(TrajectoryStore.open(cfg.task.dataset_path))
        self.dataset = SequenceDataset.from_store(
            cfg.task.dataset_path,
            n_obs_steps=window.n_obs_steps,
            horizon=window.horizon,
            action_offset=window.start,
            val_ratio=cfg.data.val_ratio,
            seed=cfg.seed,
            max_train_episodes=cfg.data.max_train_episodes,
            **data_reading(cfg.data),
        )
        self.val_dataset = self.dataset.get_validation_dataset()
        self.policy = make_policy(policy_config, self.dataset.shape_meta)
        fit_data = self.dataset.fit_data()
        self.policy.normalizer.fit(fit_data, action_key=self.dataset.action_key)
        actions = fit_data[self.dataset.action_key]
        task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
        self.task_meta = {
            **{key: task_cfg.get(key) for key in ("name", "suite", "env_name", "image", "env_options", "dataset_path")},
            "data_action_low": actions.min(axis=0).tolist(),
            "data_action_high": actions.max(axis=0).tolist(),
        }
        bounds = (self.task.action_low, self.task.action_high) if self.task is not None else (actions.min(0), actions.max(0))
        self.policy.set_action_bounds(*bounds)
        if cfg.training.accel:
            from il_policies.accel import accelerate

            accelerate(self.policy)
        if self.task is not None:
            self.task_meta |= {
                "fps": self.task.fps,
                "max_episode_steps": self.task.max_episode_steps,
                "action_low": np.asarray(self.task.action_low).tolist(),
                "action_high": np.asarray(self.task.action_high).tolist(),
            }
        self.policy.to(self.device)
        # The policy's optimizer / schedule / clipping / EMA preset, with what `training.*` sets in its place.
        self.preset = preset = resolved_training_preset(policy_config.training_preset, cfg.training)
        self.optimizer = torch.optim.AdamW(
            self.policy.optim_groups(),
            lr=preset.lr,
            betas=preset.betas,
            weight_decay=preset.weight_decay,
            fused=True,  # one kernel for all parameters, on CPU and GPU alike
        )
        self.lr_scheduler = get_scheduler(
            preset.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=preset.lr_warmup_steps,
            num_training_steps=cfg.training.steps,
        )
        self.ema = None
        if preset.ema.enabled:
            self.ema = EMAModel(self.policy.parameters(), decay=preset.ema.decay, power=preset.ema.power, use_ema_warmup=True)
        blocks = self.dataset.sample_blocks() if cfg.data.batch_order == "chunked" else None
        self.batch_order = GlobalBatchOrder(len(self.dataset), cfg.training.batch_size, cfg.seed, self.ctx, blocks,
                                            cfg.data.chunks_per_shuffle)
        self.model = self.policy
        if self.ctx.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.training.compile:
            self.model = torch.compile(self.model)

    def _ensure_dataset(self, path: Path) -> None:
        """Generate the task's demonstrations when missing or incomplete; refuse a mismatched dataset."""
        if self.ctx.is_main:
            env_options = OmegaConf.to_container(self.cfg.task.env_options, resolve=True) if "env_options" in self.cfg.task else {}
            ensure_demos(self.task, path, int(self.cfg.task.n_demos), task_options=env_options)
        self.ctx.barrier()
        check_store_matches_task(TrajectoryStore.open(path), self.task)

    # ---- checkpoints --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference_weights(self):
        """The EMA weights in the policy for the duration (the training weights are put back after,
        also when the body raises); without EMA the policy's own weights."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.policy.parameters())
        self.ema.copy_to(self.policy.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.policy.parameters())

    def _batch(self, dataset: SequenceDataset, indices: list[int]) -> dict[str, Any]:
        return prepare_batch(collate_batch(dataset.__getitems__(indices)), self.dataset.shape_meta, self.device)

    def _inference_state(self) -> dict[str, torch.Tensor]:
        with self._inference_weights():
            return copy.deepcopy(self.policy.state_dict())

    def save(self, name: str, metrics: Mapping[str, float] | None = None) -> Path | None:
        if not self.ctx.is_main:
            return None
        payload = {
            "policy_name": self.policy.name,
            "policy_config": config_to_dict(self.policy.config),
            "shape_meta": self.dataset.shape_meta,
            "task_meta": self.task_meta,
            "policy_state": self._inference_state(),
            "step": self.step,
            "metrics": dict(metrics or {}),
            "config_yaml": OmegaConf.to_yaml(self.cfg),
            "train_state": {
                "model": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "best_score": self.best_score,
                "rng": capture_rng(),
                "logger_run_id": self.logger.run_id,
                "elapsed_s": self.logger.elapsed_s,
            },
        }
        return save_checkpoint(self.checkpoint_dir / f"{name}.pt", payload)

    def _resume(self) -> bool:
        path = self.checkpoint_dir / "latest.pt"
        if not (self.cfg.training.resume and path.is_file()):
            return False
        payload = read_checkpoint(path, map_location=self.device)
        state = payload["train_state"]
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.best_score = state["best_score"]
        restore_rng(state["rng"])
        self.step = int(payload["step"])
        self.resumed_run_id = state.get("logger_run_id")
        self.logger.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.resumed_metrics = dict(payload["metrics"])  # the summary of a run resumed at its last step
        return True

    # ---- the loop -----------------------------------------------------------------------------
    def _batches(self):
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batch_order.iter_from(self.step),
            collate_fn=collate_batch,
            num_workers=self.cfg.data.num_workers,
            persistent_workers=self.cfg.data.num_workers > 0,
            prefetch_factor=self.cfg.data.prefetch_batches if self.cfg.data.num_workers else None,
            # Its own generator: creating the loader must not consume the global RNG, or resuming
            # (which creates it mid-run) would shift every later dropout mask.
            generator=torch.Generator().manual_seed(self.cfg.seed + self.step),
        )
        for batch in loader:
            yield prepare_batch(batch, self.dataset.shape_meta, self.device)

    def _train_step(self, batch) -> dict[str, float]:
        self.model.train()
        self.policy.set_training_step(self.step)
        loss, metrics = self.model(batch)
        if not self.ctx.all_true(bool(torch.isfinite(loss))):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step}; stopped, keeping the last good checkpoint in {self.checkpoint_dir}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logged = {"loss": loss.item(), "lr": self.lr_scheduler.get_last_lr()[0], **metrics}
        if self.preset.grad_clip > 0:
            logged["grad_norm"] = clip_grad_norm(self.policy.parameters(), self.preset.grad_clip).item()
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.policy.parameters())
        return logged

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        return self._mean_terms(self.val_dataset, "val")

    def measure_loss_terms(self) -> dict[str, float]:
        """`eval.loss_terms`: every loss term over the whole training split and the whole held-out
        split, with fixed sampling noise (the global RNG untouched), as `terms/train/*`, `terms/val/*`.
        BC's one term `action_mse` is also reported as `action_supervised`, the VAEs' name for it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            terms = self._mean_terms(self.dataset, "terms/train") | self._mean_terms(self.val_dataset, "terms/val")
        terms |= {k.replace("action_mse", "action_supervised"): v for k, v in terms.items() if k.endswith("action_mse")}
        if hasattr(self.policy, "decoder_latent") and len(self.val_dataset):
            with self._inference_weights():
                terms |= decoder_checks(self.policy, lambda: self._all_batches(self.dataset), lambda: self._all_batches(self.val_dataset))
        if hasattr(self.policy, "imagine") and len(self.val_dataset):  # a world model: its open-loop prediction
            from il_policies.imagination import imagination_metrics

            with self._inference_weights():
                store, cfg = TrajectoryStore.open(self.cfg.task.dataset_path), self.cfg.eval
                terms |= imagination_metrics(self.policy, store, self.val_dataset.episode_ids, cfg.imagine_context, cfg.imagine_predict)
        return terms

    def _all_batches(self, dataset: SequenceDataset):
        size = self.cfg.training.batch_size
        return (self._batch(dataset, list(range(start, min(start + size, len(dataset))))) for start in range(0, len(dataset), size))

    def _mean_terms(self, dataset: SequenceDataset, prefix: str) -> dict[str, float]:
        """Every metric of compute_loss averaged over a whole dataset, eval mode, inference weights."""
        if len(dataset) == 0:
            return {}
        totals: dict[str, float] = {}
        with self._inference_weights():
            self.policy.eval()
            for batch in self._all_batches(dataset):
                size = batch["action"].shape[0]
                loss, metrics = self.policy.compute_loss(batch)
                for key, value in {"loss": loss.item(), **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value * size
        return {f"{prefix}/{key}": value / len(dataset) for key, value in totals.items()}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.ctx.init(self.device)
        self.logger = RunLogger(cfg, self.output_dir, enabled=self.ctx.is_main)
        try:
            self._build()
            if self._resume():
                self.logger.message(f"resumed from {self.checkpoint_dir / 'latest.pt'} at step {self.step}")
            self.logger.start(getattr(self, "resumed_run_id", None))
            return self._train()
        finally:
            self.logger.finish()
            self.ctx.shutdown()

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.training.steps
        eval_every = cfg.eval.every if self.task is not None else 0
        summary: dict[str, Any] = dict(getattr(self, "resumed_metrics", {}))
        progress = tqdm(total=total, initial=self.step, disable=not self.ctx.is_main, desc=f"train {self.policy.name}")
        batches = self._batches()
        try:
            while self.step < total:
                metrics = self._train_step(next(batches))
                self.step += 1
                progress.update(1)
                if self.step % cfg.training.log_every == 0 or self.step == total:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                    self.logger.log({f"train/{k}": v for k, v in metrics.items()}, self.step)
                final = self.step == total
                evaluate = self.task is not None and ((eval_every and self.step % eval_every == 0) or final)
                if evaluate or final or self.step % cfg.training.val_every == 0:
                    summary = self._checkpoint_round(metrics, evaluate)
                    if self.on_round is not None:
                        self.on_round(self.step, summary)
                elif self.step % cfg.training.checkpoint_every == 0:
                    self.save("latest")
        except KeyboardInterrupt:
            # The step in flight either finished or never touched the parameters: save and stop.
            self.save("latest")
            self.logger.message(f"interrupted at step {self.step}; saved {self.checkpoint_dir / 'latest.pt'}")
            raise
        finally:
            progress.close()
        self.ctx.barrier()
        return {"step": self.step, **summary}

    def _checkpoint_round(self, train_metrics: Mapping[str, float], evaluate: bool) -> dict[str, float]:
        """Validation (and rollouts), then `best` when the score improved, then `latest`."""
        val = {key: self.ctx.mean(value) for key, value in self.validate().items()}
        rollouts = self.evaluate() if evaluate else {}
        if self.cfg.eval.loss_terms and self.step == self.cfg.training.steps:
            rollouts |= self.measure_loss_terms()
        if self.ctx.is_main:
            self._visualize()
        self.logger.log({**val, **rollouts, "epoch": self.batch_order.epoch_of(self.step - 1)}, self.step)
        metrics = {f"train/{k}": v for k, v in train_metrics.items()} | val | rollouts
        val_loss = val.get("val/loss", train_metrics["loss"])
        score = None
        if self.task is None:
            score = [-val_loss]
        elif "eval/success_rate" in rollouts:
            score = [rollouts["eval/success_rate"], -val_loss]
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score = score
            self.save("best", metrics)
        self.save("latest", metrics)
        return metrics

    @torch.no_grad()
    def _visualize(self) -> None:
        source = self.val_dataset if len(self.val_dataset) else self.dataset
        spread = np.linspace(0, len(source) - 1, num=min(len(source), 8)).round().astype(int)  # windows across the split
        batch = self._batch(source, spread.tolist())
        self.policy.eval()
        for path in self.policy.visualize(batch, self.output_dir / "visualizations" / f"step_{self.step}"):
            self.logger.log_media(f"visualize/{Path(path).stem}", Path(path), self.step)

    def evaluate(self) -> dict[str, float]:
        """Rollouts of the current (EMA) policy on held-out seeds, on the main process."""
        cfg = self.cfg.eval
        if not self.ctx.is_main or cfg.n_episodes <= 0:
            return {}
        from il_policies.rollout import PolicyActor, eval_seeds, run_rollouts

        out_dir = self.output_dir / "eval" / f"step_{self.step}"
        with self._inference_weights():
            self.policy.eval()
            result, _ = run_rollouts(
                self.task, PolicyActor(self.policy), eval_seeds(cfg.n_episodes, cfg.seed_start), n_envs=cfg.n_envs,
                asynchronous=cfg.asynchronous, video_dir=out_dir, n_videos=cfg.n_videos,
            )
        result.write_json(out_dir / "metrics.json")
        for video in result.videos:
            self.logger.log_media("eval/video", Path(video), self.step)
        self.logger.message(
            f"step {self.step}: success rate {result.success_rate:.2f} over {result.n_episodes} episodes ({result.wall_time_s:.0f} s)"
        )
        return {f"eval/{key}": float(value) for key, value in result.summary().items()}
