"""Run logging: wandb (offline by default, so no network is needed), one-line messages, and
`metrics.jsonl` in the run directory (every logged step with the training wall time so far, kept
whatever `logger.mode` is: eval/benchmark.py draws its curves from it)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


class RunLogger:
    """wandb on the main process only; `logger.mode` is offline | online | disabled."""

    def __init__(self, cfg: DictConfig, output_dir: Path, enabled: bool = True):
        self.cfg = cfg
        self.output_dir = output_dir
        self.enabled = enabled
        self.run = None
        self.elapsed_before = 0.0  # wall time of the earlier processes of a resumed run
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        """Wall time of this run so far, across resumes (set `elapsed_before` when resuming)."""
        return self.elapsed_before + time.monotonic() - self._started

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def start(self, resume_id: str | None = None) -> None:
        self._started = time.monotonic()
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)  # metrics.jsonl is written whatever the mode
        if not self.enabled or self.cfg.logger.mode == "disabled":
            return
        import wandb  # imported here: it is slow to import and a disabled run does not need it

        self.run = wandb.init(
            project=self.cfg.logger.project,
            entity=self.cfg.logger.entity,
            mode=self.cfg.logger.mode,
            dir=str(self.output_dir),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            name=self.output_dir.name,
            tags=list(self.cfg.logger.tags),
            id=resume_id,
            resume="allow" if resume_id else None,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)
        if self.enabled:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "elapsed_s": round(self.elapsed_s, 3), **dict(metrics)}, default=float) + "\n")

    def log_media(self, name: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            media = wandb.Video(str(path)) if path.suffix in (".mp4", ".gif") else wandb.Image(str(path))
            self.run.log({name: media}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
