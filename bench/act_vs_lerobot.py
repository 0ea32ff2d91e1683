#!/usr/bin/env python
"""ACT speed, side by side with LeRobot's ACT, on the shapes of /work/shared/bench/peer_lerobot.py.

State 14, one 3x96x96 camera, action 14, chunk 100, ResNet18 (random init, frozen BatchNorm),
d_model 512, batch 8 training steps and batch-1 `select_action`, fp32, 2 threads, OMP_WAIT_POLICY=PASSIVE.

Worker subprocesses, driven in turn (the order rotates every round, so that all see the same machine
load): one per variant of ours with this interpreter (a robot runs one backend per process: thread pools
of several runtimes in one process wake each other), LeRobot's with the peer venv (`--peer-python`, default
/work/peer-venv/bin/python; see /work/shared/bench/README.md). LeRobot's policy, batches and training
step come from peer_lerobot.py itself (its non-fused AdamW, gradient clipping at 10, as its training
script). Ours is `make_policy("act")` with defaults and a (random) ResNet18 weights file, so with
frozen BatchNorm as LeRobot's, stepped by `Workspace._train_step` itself (fused AdamW over `optim_groups()`, lr 1e-5, weight decay 1e-4, a constant schedule; clipping at 10 as LeRobot's
step, although ACT's own preset clips nothing). Our variants:

    torch        the reference network, eager
    accel        the speed layer's module swaps (il_policies.accel.accelerate; training.accel=true)
    onnxruntime  the accelerated network exported to ONNX, run by onnxruntime (inference only)
    openvino     the same file run by OpenVINO (inference only)

    training step   forward + backward + clip + optimizer step (+ zero_grad), median
    model call      policy.reset(); select_action(obs) (the network runs), median

Ratios to LeRobot: the median over the median, and paired (the ratio within each round, whose runs
are seconds apart: the host's speed drifts by up to ~1.5x within a minute), its median and range.
"% of peak": LeRobot's FLOPs (FlopCounterMode, 135 GFLOP per training step, 2.06 per call) over the
time, against the fp32 matmul peak (2048^2 matmul, 2 threads; the median of one measurement per round).

`--check` first loads LeRobot's weights into our model and compares the outputs (the same function).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import LeRobotWorker, PolicyTimings, Worker, alternate, cpu_model, print_table, serve, summarize, timed

STATE, ACTION, IMAGE, CHUNK = 14, 14, (3, 96, 96), 100
NOMINAL_GFLOP = {"train": 135.0, "infer": 2.06}  # LeRobot's ACT, peer_flops.py (FlopCounterMode)
TRAIN_VARIANTS = ("torch", "accel")
INFER_VARIANTS = ("torch", "accel", "onnxruntime", "openvino")


# ---------------------------------------------------------------------------------------------------
# workers: read one JSON command per line on stdin, answer one JSON line on stdout
# ---------------------------------------------------------------------------------------------------
class OursWorker(PolicyTimings):
    def __init__(self, variant: str):
        import torch
        from types import SimpleNamespace

        from diffusers.optimization import get_scheduler

        import torchvision

        from il_policies import make_policy
        from il_policies.accel import accelerate
        from il_policies.accel.backends import RUNTIMES, export_onnx
        from il_policies.training.distributed import DistributedContext
        from il_policies.training.workspace import Workspace

        torch.manual_seed(0)
        meta = {"obs": {"agent_pos": {"shape": (STATE,), "kind": "low_dim"}, "image": {"shape": IMAGE, "kind": "rgb"}},
                "action": {"shape": (ACTION,)}}
        self.torch = torch
        # LeRobot's ACT runs an ImageNet-initialized ResNet18 with frozen BatchNorm; ours does so from a
        # weights file (here a random one: the same work per step as ImageNet's weights).
        weights = Path(tempfile.mkdtemp(prefix="act_bench_")) / "resnet18.pt"
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
        self.reference = reference = make_policy({"name": "act", "backbone_weights": str(weights)}, meta)
        policy = accelerate(copy.deepcopy(reference)) if variant == "accel" else reference
        if variant in RUNTIMES:
            path = export_onnx(reference, Path(tempfile.mkdtemp(prefix="act_bench_")) / "act.onnx")
            policy.use_backend(RUNTIMES[variant](path))
        self.policies = {variant: policy}
        self.shims = {}
        for name in set(TRAIN_VARIANTS) & {variant}:  # exactly the Workspace's optimizer and step (Workspace._build / _train_step)
            policy, preset = self.policies[name], reference.config.training_preset
            optimizer = torch.optim.AdamW(policy.optim_groups(), lr=preset.lr, weight_decay=preset.weight_decay, fused=True)
            self.shims[name] = SimpleNamespace(
                model=policy, policy=policy, step=0, ctx=DistributedContext(), optimizer=optimizer, ema=None,
                preset=SimpleNamespace(grad_clip=10.0),  # as LeRobot's step
                lr_scheduler=get_scheduler("constant", optimizer=optimizer),
            )
        self._train_step = Workspace._train_step

    def batch(self, size):
        t = self.torch
        return {"obs": {"agent_pos": t.randn(size, 1, STATE), "image": t.rand(size, 1, *IMAGE)},
                "action": t.randn(size, CHUNK, ACTION).clamp(-1, 1), "action_is_pad": t.zeros(size, CHUNK, dtype=t.bool)}

    def obs(self):
        return {"agent_pos": self.torch.randn(1, STATE), "image": self.torch.rand(1, *IMAGE)}

    def train(self, variant, n, size=8):
        shim = self.shims[variant]

        def step():
            self._train_step(shim, self.batch(size))
            shim.step += 1
        return timed(step, n)

    def info(self):
        return {"params": sum(p.numel() for p in self.reference.parameters()), "torch": self.torch.__version__}

    def check(self, path):
        """Load LeRobot's weights (dumped by the peer worker) into a fresh copy of ours and compare outputs."""
        torch = self.torch
        dump = torch.load(path, weights_only=True)
        ours = copy.deepcopy(self.reference)
        ours.load_state_dict(map_lerobot_state(dump["state"], ours.state_dict()), strict=True)
        obs = {"agent_pos": dump["state_obs"][:, None], "image": dump["image"][:, None]}
        chunk = ours.predict_action_chunk(obs)  # unfitted normalizer = identity, as the peer's normalized inputs
        for m in ours.modules():  # dropout off, training mode: the CVAE encoder runs
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
        ours.train()
        with torch.no_grad():
            mu, logvar = ours._posterior(obs, dump["action"], dump["action_is_pad"])
        return {"chunk_max_abs_diff": float((chunk - dump["chunk"]).abs().max()),
                "chunk_scale": float(dump["chunk"].abs().max()),
                "mu_max_abs_diff": float((mu - dump["mu"]).abs().max()),
                "logvar_max_abs_diff": float((logvar - dump["logvar"]).abs().max())}


def map_lerobot_state(theirs, ours_state):
    """LeRobot ACT parameter names -> ours (the same tensors)."""
    backbone = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    renames = [
        ("model.vae_encoder_cls_embed.", "vae_cls."), ("model.vae_encoder_robot_state_input_proj.", "vae_proprio_proj."),
        ("model.vae_encoder_action_input_proj.", "vae_action_proj."), ("model.vae_encoder_latent_output_proj.", "vae_latent_proj."),
        ("model.vae_encoder.", "vae_encoder."), ("model.encoder_robot_state_input_proj.", "proprio_proj."),
        ("model.encoder_env_state_input_proj.", "env_proj."), ("model.encoder_latent_input_proj.", "latent_proj."),
        ("model.encoder_img_feat_input_proj.", "image_proj."), ("model.encoder_1d_feature_pos_embed.", "pos_1d."),
        ("model.decoder_pos_embed.", "query_pos."), ("model.action_head.", "action_head."),
        ("model.encoder.", "encoder."), ("model.decoder.", "decoder."),
    ]
    out = {}
    for name, value in theirs.items():
        if name.startswith("model.backbone."):
            head, rest = name.removeprefix("model.backbone.").split(".", 1)
            new = f"backbone.body.{backbone[head]}.{rest}"
        else:
            new = next((n.replace(a, b, 1) for a, b in renames for n in [name] if n.startswith(a)), None)
            if new is None:
                continue  # LeRobot's normalization buffers, if any
            new = new.replace(".multihead_attn.", ".cross_attn.")
        if new in ours_state:
            out[new] = value
    for name, value in ours_state.items():  # our normalizer / bounds buffers keep their values
        out.setdefault(name, value)
    return out


class PeerWorker(LeRobotWorker):
    def __init__(self):
        super().__init__("act_img")

    def dump(self, path):
        torch, policy = self.torch, self.policy
        g = torch.Generator().manual_seed(1)
        state_obs, image = torch.randn(2, STATE, generator=g), torch.rand(2, *IMAGE, generator=g)
        action = torch.randn(2, CHUNK, ACTION, generator=g)
        is_pad = torch.zeros(2, CHUNK, dtype=torch.bool)
        is_pad[1, 60:] = True
        policy.eval()
        with torch.no_grad():
            chunk = policy.predict_action_chunk({"observation.state": state_obs, "observation.images.top": image})
            for m in policy.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                if isinstance(m, torch.nn.MultiheadAttention):
                    m.dropout = 0.0
            policy.model.train()
            _, (mu, logvar) = policy.model({"observation.state": state_obs, "observation.images": [image],
                                            "action": action, "action_is_pad": is_pad})
        torch.save({"state": {k: v.contiguous() for k, v in policy.state_dict().items()}, "state_obs": state_obs,
                    "image": image, "action": action, "action_is_pad": is_pad, "chunk": chunk, "mu": mu, "logvar": logvar}, path)
        return {"ok": True}


def worker_main(kind: str):
    import torch

    torch.set_num_threads(2)
    variant = kind.removeprefix("ours-")
    worker = OursWorker(variant) if kind.startswith("ours-") else PeerWorker()
    if variant in TRAIN_VARIANTS or kind == "lerobot":  # warm-up
        worker.train(variant, 2)
    worker.infer(variant, 2)
    serve(worker)


# ---------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=5, help="alternation rounds")
    ap.add_argument("--train-steps", type=int, default=2, help="training steps per variant per round")
    ap.add_argument("--infer-calls", type=int, default=8, help="model-running select_action calls per variant per round")
    ap.add_argument("--check", action="store_true", help="load LeRobot's weights into ours and compare outputs")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    t0 = time.perf_counter()
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    workers = {v: Worker(__file__, f"ours-{v}", env=env) for v in INFER_VARIANTS}
    if Path(args.peer_python).exists():
        workers["lerobot"] = Worker(__file__, "lerobot", python=args.peer_python, env=env)
    else:
        print(f"LeRobot not found at {args.peer_python}: measuring ours only", file=sys.stderr)
    result = {"bench": "act_vs_lerobot", "cpu": cpu_model(), "info": {k: w("info") for k, w in workers.items()},
              "rounds": args.rounds, "train_steps": args.train_steps, "infer_calls": args.infer_calls}
    if args.check and "lerobot" in workers:
        dump = Path(tempfile.gettempdir()) / f"act_vs_lerobot_{os.getpid()}.pt"
        workers["lerobot"]("dump", path=str(dump))
        result["check"] = workers["torch"]("check", path=str(dump))
        dump.unlink()
    jobs = {"train": [(v, v) for v in TRAIN_VARIANTS], "infer": [(v, v) for v in INFER_VARIANTS]}
    if "lerobot" in workers:
        jobs = {kind: [*js, ("lerobot", "lerobot")] for kind, js in jobs.items()}
    times, per_round, peaks = alternate(workers, jobs, args.rounds, {"train": args.train_steps, "infer": args.infer_calls})
    for w in workers.values():
        w.close()

    peak = statistics.median(peaks)
    result["matmul_peak_gflops"] = {"median": peak, "per_round": peaks}
    summary = summarize(times, per_round, peak, NOMINAL_GFLOP)
    result["summary"] = summary
    result["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"\n{result['cpu']}, fp32 matmul peak {peak} GFLOP/s (2 threads; per round {min(peaks)}-{max(peaks)}); "
          "medians, ratio = ours / LeRobot (paired median [min, max])")
    print_table(summary)
    print("targets (issue 10): accel training <= 0.75; onnxruntime model call <= 0.30 and >= 50 % of peak; torch model call <= 0.8")
    if "check" in result:
        print(f"same function as LeRobot's ACT (its weights loaded into ours): {result['check']}")
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
