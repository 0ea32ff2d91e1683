#!/usr/bin/env python
"""Diffusion Policy speed, side by side with LeRobot's, on the shapes of /work/shared/bench/peer_lerobot.py.

State 14, one 3x96x96 camera, action 14, horizon 16, 2 observation steps, 8 action steps; ResNet18,
32 spatial-softmax keypoints, U-Net down_dims 512-1024-2048 (the paper's, both sides' defaults); fp32,
2 threads, OMP_WAIT_POLICY=PASSIVE. LeRobot 0.6.1's defaults (no crop, trainable BatchNorm; its
ImageNet weights are not loaded here) differ from the paper's recipe (a random 84x84 crop, GroupNorm)
that is ours: for the same work, ours runs here with `vision.norm=batch` and no augmentation.

Worker subprocesses driven in turn, the order rotating every round (bench/workers.py): one per
backend of ours with this interpreter, LeRobot's with the peer venv (`--peer-python`; see
/work/shared/bench/README.md), whose policy, batches and training step come from peer_lerobot.py.

    training step   batch 8: forward + backward + clipping at 10 + AdamW step + zero_grad, median
                    (ours: `Workspace._train_step` with the paper's AdamW; no EMA on either side, as LeRobot's step)
    model call      policy.reset(); select_action(obs): the network runs, median

Our variants: `torch` (the reference network) and `accel` (the speed layer's module swaps) with
LeRobot's sampler (DDPM, 100 steps: the same work) and with our default (DDIM, 10 steps);
`onnxruntime` and `openvino` run the exported DDIM-10 sampling loop (a DDPM loop draws fresh noise at
every step and is not exported). Ratios are ours / LeRobot's DDPM-100 call: the median over the
median, and paired within each round [median, min, max]. "% of peak": FLOPs per call counted with
torch's FlopCounterMode on our reference network over the time, against the fp32 matmul peak
measured in the same run (2048^2, 2 threads). A batch-1 call streams every U-Net weight once per
denoising step (the "weights" line), so it is bound by memory bandwidth, not by the matmul peak.

`--check` first loads LeRobot's weights into ours where the architectures match (the U-Net; the
ResNet18 + spatial softmax + linear, before LeRobot's extra ReLU) and compares the outputs.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import LeRobotWorker, PolicyTimings, Worker, alternate, copy_bandwidth_gbs, cpu_model, print_table, serve, summarize, timed

STATE, ACTION, IMAGE, HORIZON, N_OBS = 14, 14, (3, 96, 96), 16, 2
SAMPLERS = {"ddpm100": {"inference_scheduler": "DDPMScheduler", "num_inference_steps": 100},
            "ddim10": {"inference_scheduler": "DDIMScheduler", "num_inference_steps": 10}}
BACKENDS = ("torch", "accel", "onnxruntime", "openvino")
TRAIN_BACKENDS = ("torch", "accel")


class OursWorker(PolicyTimings):
    """One backend; its policies for each sampler share one set of weights."""

    def __init__(self, backend: str, down_dims: tuple[int, ...] = (512, 1024, 2048)):
        import copy
        from types import SimpleNamespace

        import torch
        from diffusers.optimization import get_scheduler

        from il_policies import make_policy
        from il_policies.accel import accelerate
        from il_policies.accel.backends import RUNTIMES, export_onnx
        from il_policies.training.distributed import DistributedContext
        from il_policies.training.workspace import Workspace

        torch.manual_seed(0)
        self.torch, self.backend = torch, backend
        meta = {"obs": {"agent_pos": {"shape": (STATE,), "kind": "low_dim"}, "image": {"shape": IMAGE, "kind": "rgb"}},
                "action": {"shape": (ACTION,)}}
        crop = {"augment": {"kind": "none"}, "vision": {"backbone": "resnet18", "norm": "batch", "pool": "spatial_softmax"},
                "down_dims": tuple(down_dims)}
        self.reference = make_policy({"name": "diffusion", **crop, **SAMPLERS["ddpm100"]}, meta)
        self.policies = {}
        for sampler in ("ddim10",) if backend in RUNTIMES else SAMPLERS:
            policy = make_policy({"name": "diffusion", **crop, **SAMPLERS[sampler]}, meta)
            policy.load_state_dict(self.reference.state_dict(), assign=True)  # shares the reference's tensors
            if backend == "accel":
                accelerate(policy)
            if backend in RUNTIMES:
                path = export_onnx(accelerate(copy.deepcopy(policy)), Path(tempfile.mkdtemp(prefix="diffusion_bench_")) / "d.onnx")
                policy.use_backend(RUNTIMES[backend](path, draw_noise=policy.network_noise))
            self.policies[f"{backend} {sampler}"] = policy
        self.shim = None
        if backend in TRAIN_BACKENDS:  # exactly the Workspace's optimizer and step (Workspace._build / _train_step)
            policy = accelerate(copy.deepcopy(self.reference)) if backend == "accel" else self.reference
            preset = policy.config.training_preset
            optimizer = torch.optim.AdamW(policy.optim_groups(), lr=preset.lr, betas=preset.betas,
                                          weight_decay=preset.weight_decay, fused=True)
            self.shim = SimpleNamespace(model=policy, policy=policy, step=0, ctx=DistributedContext(), optimizer=optimizer,
                                        ema=None, preset=SimpleNamespace(grad_clip=10.0),  # as LeRobot's step
                                        lr_scheduler=get_scheduler("constant", optimizer=optimizer))
        self._train_step = Workspace._train_step

    def batch(self, size):
        t = self.torch
        return {"obs": {"agent_pos": t.randn(size, N_OBS, STATE), "image": t.rand(size, N_OBS, *IMAGE)},
                "action": t.randn(size, HORIZON, ACTION).clamp(-1, 1), "action_is_pad": t.zeros(size, HORIZON, dtype=t.bool)}

    def obs(self):
        return {"agent_pos": self.torch.randn(1, STATE), "image": self.torch.rand(1, *IMAGE)}

    def train(self, variant, n, size=8):
        def step():
            self._train_step(self.shim, self.batch(size))
            self.shim.step += 1
        return timed(step, n)

    def info(self):
        unet = sum(p.numel() for p in self.reference.unet.parameters())
        return {"params": sum(p.numel() for p in self.reference.parameters()), "unet_weights_mb": round(4 * unet / 2**20, 1),
                "torch": self.torch.__version__}

    def bandwidth(self):
        return {"gbs": round(copy_bandwidth_gbs(self.torch), 1)}

    def flops(self):
        """GFLOP of one training step (batch 8) and of one model call per sampler, on the reference network."""
        from torch.utils.flop_counter import FlopCounterMode

        torch, out = self.torch, {}
        with FlopCounterMode(display=False) as counter:
            loss, _ = self.reference.compute_loss(self.batch(8))
            loss.backward()
        self.reference.zero_grad(set_to_none=True)
        out["train"] = counter.get_total_flops() / 1e9
        for sampler in SAMPLERS:
            policy = self.policies.get(f"{self.backend} {sampler}")
            if policy is not None:
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    policy.reset()
                    policy.select_action(self.obs())
                out[sampler] = counter.get_total_flops() / 1e9
        return out

    def check(self, path):
        """LeRobot's weights (dumped by the peer worker) in our U-Net and image encoder: the same outputs?"""
        torch = self.torch
        dump = torch.load(path, weights_only=True)
        theirs = dump["state"]
        ours = self.reference
        unet = {_unet_name(k.removeprefix("diffusion.unet.")): v for k, v in theirs.items() if k.startswith("diffusion.unet.")}
        # FiLM input columns: [step embedding, (state, image features) per observation step] in LeRobot's
        # condition, [step embedding, (image features, state) per step] in ours.
        feature = ours.obs_encoder.out_dim
        per_step = [*range(STATE, feature), *range(STATE)]  # ours[j] = theirs[per_step[j]] within a step
        step_embed = ours.config.step_embed_dim
        columns = [*range(step_embed), *(step_embed + s * feature + j for s in range(N_OBS) for j in per_step)]
        for name in [k for k in unet if k.endswith("film.1.weight")]:
            unet[name] = unet[name][:, columns]
        ours.unet.load_state_dict(unet, strict=True)
        camera = ours.obs_encoder.cameras["image"]
        prefix = "diffusion.rgb_encoder.0." if any(k.startswith("diffusion.rgb_encoder.0.") for k in theirs) else "diffusion.rgb_encoder."
        encoder = {_encoder_name(k.removeprefix(prefix)): v for k, v in theirs.items() if k.startswith(prefix) and not k.endswith("pos_grid")}
        missing, unexpected = camera.load_state_dict(encoder, strict=False)
        assert missing == ["pool.log_temperature"] and not unexpected, (missing, unexpected)  # ours at temperature 1 = LeRobot's softmax
        ours.eval()
        with torch.no_grad():
            features = torch.relu(camera(dump["image"]))  # LeRobot applies a ReLU after its linear
            noise_pred = ours.unet(dump["sample"], dump["step"], dump["global_cond"].view(-1, N_OBS, feature)[:, :, per_step].flatten(1))
        return {"image_features_max_abs_diff": float((features - dump["image_features"]).abs().max()),
                "image_features_scale": float(dump["image_features"].abs().max()),
                "unet_max_abs_diff": float((noise_pred - dump["noise_pred"]).abs().max()),
                "unet_output_scale": float(dump["noise_pred"].abs().max())}


def _unet_name(name: str) -> str:
    """LeRobot's DiffusionConditionalUnet1d parameter names -> our ConditionalUnet1d's."""
    for theirs, ours in (("diffusion_step_encoder.1.", "step_encoder.0."), ("diffusion_step_encoder.3.", "step_encoder.2."),
                         ("down_modules.", "down."), ("mid_modules.", "mid."), ("up_modules.", "up."),
                         ("final_conv.0.block.", "out.0."), ("final_conv.1.", "out.1.")):
        name = name.replace(theirs, ours, 1) if name.startswith(theirs) else name
    return (name.replace(".conv1.block.", ".block1.").replace(".conv2.block.", ".block2.").replace(".cond_encoder.", ".film.")
            .replace(".residual_conv.", ".residual.").replace(".2.conv.", ".2."))


def _encoder_name(name: str) -> str:
    """LeRobot's DiffusionRgbEncoder parameter names -> our ImageEncoder's."""
    return name.replace("backbone.", "backbone.body.", 1).replace("pool.nets.", "pool.keypoint_maps.", 1).replace("out.", "head.", 1)


class PeerWorker(LeRobotWorker):
    def __init__(self):
        super().__init__("diffusion_img")

    def dump(self, path):
        torch, model = self.torch, self.policy.diffusion
        g = torch.Generator().manual_seed(1)
        image = torch.rand(2, *IMAGE, generator=g)
        sample, step = torch.randn(2, HORIZON, ACTION, generator=g), torch.tensor([3, 71])
        global_cond = torch.randn(2, model.unet.down_modules[0][0].cond_encoder[1].in_features - model.config.diffusion_step_embed_dim,
                                  generator=g)
        model.eval()
        with torch.no_grad():
            encoder = model.rgb_encoder[0] if isinstance(model.rgb_encoder, torch.nn.ModuleList) else model.rgb_encoder
            features = encoder(image)
            noise_pred = model.unet(sample, step, global_cond=global_cond)
        torch.save({"state": {k: v.contiguous() for k, v in self.policy.state_dict().items()}, "image": image,
                    "image_features": features, "sample": sample, "step": step, "global_cond": global_cond,
                    "noise_pred": noise_pred}, path)
        return {"ok": True}


def worker_main(kind: str, down_dims: str):
    import torch

    torch.set_num_threads(2)
    backend = kind.removeprefix("ours-")
    worker = OursWorker(backend, tuple(int(d) for d in down_dims.split(","))) if kind.startswith("ours-") else PeerWorker()
    if backend in TRAIN_BACKENDS or kind == "lerobot":  # warm-up
        worker.train(None, 1)
    for variant in getattr(worker, "policies", {"lerobot": None}):
        worker.infer(variant, 1)
    serve(worker)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    ap.add_argument("--train-steps", type=int, default=2, help="training steps per variant per round")
    ap.add_argument("--infer-calls", type=int, default=2, help="model-running select_action calls per variant per round")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="which of ours to run")
    ap.add_argument("--down-dims", default="512,1024,2048", help="our U-Net's widths (LeRobot's stays at its default)")
    ap.add_argument("--check", action="store_true", help="load LeRobot's weights into ours and compare outputs")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.down_dims)

    t0 = time.perf_counter()
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    backends = [b for b in BACKENDS if b in args.backends.split(",")]
    workers = {b: Worker(__file__, f"ours-{b}", "--down-dims", args.down_dims, env=env) for b in backends}
    if Path(args.peer_python).exists():
        workers["lerobot"] = Worker(__file__, "lerobot", python=args.peer_python, env=env)
    else:
        print(f"LeRobot not found at {args.peer_python}: measuring ours only", file=sys.stderr)
    result = {"bench": "diffusion_vs_lerobot", "cpu": cpu_model(), "info": {k: w("info") for k, w in workers.items()}, "down_dims": args.down_dims,
              "rounds": args.rounds, "train_steps": args.train_steps, "infer_calls": args.infer_calls}
    reference = backends[0]
    flops = workers[reference]("flops")
    result["gflop"] = flops
    if args.check and "lerobot" in workers and args.down_dims == "512,1024,2048":
        dump = Path(tempfile.gettempdir()) / f"diffusion_vs_lerobot_{os.getpid()}.pt"
        workers["lerobot"]("dump", path=str(dump))
        result["check"] = workers[reference]("check", path=str(dump))
        dump.unlink()
    samplers = lambda b: ("ddim10",) if b in ("onnxruntime", "openvino") else tuple(SAMPLERS)  # noqa: E731
    jobs = {"train": [(b, b) for b in backends if b in TRAIN_BACKENDS],
            "infer": [(b, f"{b} {s}") for b in backends for s in samplers(b)]}
    if "lerobot" in workers:
        jobs = {kind: [*js, ("lerobot", "lerobot")] for kind, js in jobs.items()}
    times, per_round, peaks = alternate(workers, jobs, args.rounds, {"train": args.train_steps, "infer": args.infer_calls},
                                        peak_worker=reference)
    result["copy_bandwidth_gbs"] = workers[reference]("bandwidth")["gbs"]
    for w in workers.values():
        w.close()

    peak = statistics.median(peaks)
    result["matmul_peak_gflops"] = {"median": peak, "per_round": peaks}
    nominal = lambda v, kind: flops["train"] if kind == "train" else flops["ddim10" if "ddim10" in v else "ddpm100"]  # noqa: E731
    summary = summarize(times, per_round, peak, nominal)
    result["summary"] = summary
    result["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"\n{result['cpu']}, fp32 matmul peak {peak} GFLOP/s (2 threads; per round {min(peaks)}-{max(peaks)}); "
          "medians, ratio = ours / LeRobot's DDPM-100 (paired median [min, max])")
    print_table(summary, width=22)
    weights_gb = result["info"][reference]["unet_weights_mb"] * 2**20 / 1e9
    print(f"GFLOP per call: {json.dumps({k: round(v, 2) for k, v in flops.items()})}; U-Net weights read per denoising step: "
          f"{weights_gb:.3f} GB; copy bandwidth {result['copy_bandwidth_gbs']} GB/s (read + write, 1 GB tensor)")
    for v, s in summary.items():
        if s["model_call_ms"] and v != "lerobot":
            steps = 10 if "ddim10" in v else 100
            print(f"  {v}: {steps * weights_gb / (s['model_call_ms'] / 1000):.1f} GB/s of U-Net weights read")
    if "lerobot" in summary and summary["lerobot"]["model_call_ms"] and args.down_dims == "512,1024,2048":
        print(f"  lerobot: {100 * weights_gb / (summary['lerobot']['model_call_ms'] / 1000):.1f} GB/s of U-Net weights read")
    print("targets (issue 12): training step <= 0.8; model call with DDPM-100 <= 0.5; default DDIM-10 on the fastest backend <= 0.02")
    if "check" in result:
        print(f"same function as LeRobot's (its weights loaded into ours): {result['check']}")
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
