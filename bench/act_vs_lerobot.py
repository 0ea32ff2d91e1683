#!/usr/bin/env python
"""ACT speed, side by side with LeRobot's ACT, on the shapes of /work/shared/bench/peer_lerobot.py.

State 14, one 3x96x96 camera, action 14, chunk 100, ResNet18 (random init, frozen BatchNorm),
d_model 512, batch 8 training steps and batch-1 `select_action`, fp32, 2 threads, OMP_WAIT_POLICY=PASSIVE.

Both models run in worker subprocesses that this script drives in turn (the order rotates every round,
so each worker runs in every place and after every other), so that both see the same machine load: ours with this interpreter, LeRobot's with the peer venv
(`--peer-python`, default /work/peer-venv/bin/python; see /work/shared/bench/README.md). LeRobot's
policy, batches and training step come from peer_lerobot.py itself (its AdamW, non-fused, as its
training script; `--peer-fused` adds a LeRobot row with the fused AdamW our Workspace uses). Ours is
built with `make_policy("act")` defaults and trained by the Workspace's own `_train_step` (fused AdamW
over `optim_groups()`, lr 1e-5, weight decay 1e-4, grad clip 10, cosine schedule).

    training step   forward + backward + clip + optimizer step (+ zero_grad), median
    model call      policy.reset(); select_action(obs)  (the network runs), median

Ratios: the median of all of ours over the median of all of LeRobot's, and (`*_paired_*`) the
ratio within each round, its median and range over the rounds: the host's speed drifts by up to
~1.5x within a minute, and the two models inside one round are timed seconds apart.

`--check` first loads LeRobot's weights into our model and compares the outputs (same function).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEER_BENCH = Path(os.environ.get("PEER_BENCH", "/work/shared/bench"))
STATE, ACTION, IMAGE, CHUNK = 14, 14, (3, 96, 96), 100
NOMINAL_GFLOP = {"train": 135.0, "infer": 2.06}  # LeRobot's ACT, peer_flops.py (FlopCounterMode)


# ---------------------------------------------------------------------------------------------------
# workers: read one JSON command per line on stdin, answer one JSON line on stdout
# ---------------------------------------------------------------------------------------------------
def _timed(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class OursWorker:
    def __init__(self, accel: bool):
        import torch
        from types import SimpleNamespace

        from diffusers.optimization import get_scheduler

        from il_policies import make_policy
        from il_policies.training.distributed import DistributedContext
        from il_policies.training.workspace import Workspace

        torch.manual_seed(0)
        meta = {"obs": {"agent_pos": {"shape": (STATE,), "kind": "low_dim"}, "image": {"shape": IMAGE, "kind": "rgb"}},
                "action": {"shape": (ACTION,)}}
        self.torch, self.meta = torch, meta
        self.policy = policy = make_policy({"name": "act"}, meta)
        if accel:
            from il_policies.accel import accelerate

            accelerate(policy)
        # Exactly the Workspace's optimizer and step (Workspace._build / Workspace._train_step).
        optimizer = torch.optim.AdamW(policy.optim_groups(), lr=policy.config.lr, weight_decay=policy.config.weight_decay, fused=True)
        self.shim = SimpleNamespace(
            model=policy, policy=policy, step=0, ctx=DistributedContext(), optimizer=optimizer, ema=None,
            cfg=SimpleNamespace(training=SimpleNamespace(grad_clip=10.0)),
            lr_scheduler=get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6),
        )
        self._train_step = Workspace._train_step

    def batch(self, size):
        t = self.torch
        return {"obs": {"agent_pos": t.randn(size, 1, STATE), "image": t.rand(size, 1, *IMAGE)},
                "action": t.randn(size, CHUNK, ACTION).clamp(-1, 1), "action_is_pad": t.zeros(size, CHUNK, dtype=t.bool)}

    def obs(self):
        return {"agent_pos": self.torch.randn(1, STATE), "image": self.torch.rand(1, *IMAGE)}

    def train(self, n, size=8):
        def step():
            self._train_step(self.shim, self.batch(size))
            self.shim.step += 1
        return _timed(step, n)

    def infer(self, n):
        self.policy.eval()
        def call():
            self.policy.reset()
            self.policy.select_action(self.obs())
        return _timed(call, n)

    def queue(self, n):
        self.policy.eval()
        self.policy.reset()
        self.policy.select_action(self.obs())
        return _timed(lambda: self.policy.select_action(self.obs()), n)

    def info(self):
        torch, policy = self.torch, self.policy
        policy.train()
        batch = self.batch(8)
        def train_flops():
            loss, _ = policy.compute_loss(batch)
            loss.backward()
        train = _flops(train_flops)
        policy.zero_grad(set_to_none=True)
        policy.eval()
        stacked = {k: v[:1] for k, v in batch["obs"].items()}
        # Forward only, grad mode on (FlopCounterMode's module tracker fails under no_grad/inference_mode
        # when a module gets a parameter as input, as our decoder gets its query embeddings).
        infer = _flops(lambda: policy._predict_action_chunk(stacked))
        a = torch.randn(2048, 2048)
        b = torch.randn(2048, 2048)
        best = min(_timed(lambda: a @ b, 5))
        return {"params": sum(p.numel() for p in policy.parameters()), "train_gflop": round(train, 2),
                "infer_gflop": round(infer, 3), "matmul_gflops": round(2 * 2048**3 / best / 1e9, 1),
                "torch": torch.__version__}

    def check(self, path):
        """Load LeRobot's weights (dumped by the peer worker) and compare outputs."""
        torch = self.torch
        dump = torch.load(path, weights_only=True)
        ours = self.policy
        ours.load_state_dict(map_lerobot_state(dump["state"], ours.state_dict()), strict=True)
        ours.eval()
        obs = {"agent_pos": dump["state_obs"][:, None], "image": dump["image"][:, None]}
        chunk = ours.predict_action_chunk(obs)  # unfitted normalizer = identity, as the peer's normalized inputs
        nobs = {k: v for k, v in obs.items()}
        for m in ours.modules():  # dropout off, training mode: the CVAE encoder runs
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
        ours.train()
        with torch.no_grad():
            mu, logvar = ours._posterior(nobs, dump["action"], dump["action_is_pad"])
        return {"chunk_max_abs_diff": float((chunk - dump["chunk"]).abs().max()),
                "chunk_scale": float(dump["chunk"].abs().max()),
                "mu_max_abs_diff": float((mu - dump["mu"]).abs().max()),
                "logvar_max_abs_diff": float((logvar - dump["logvar"]).abs().max())}


def map_lerobot_state(theirs, ours_state):
    """LeRobot ACT parameter names -> ours (same tensors; the 1x1 image projection becomes a Linear)."""
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


class PeerWorker:
    def __init__(self, fused=False):
        import torch

        sys.path.insert(0, str(PEER_BENCH))
        import peer_lerobot as P

        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.P, self.torch = P, torch
        self.policy, self.cfg, lr, wd, *_ = P.build_case("act_img")
        self.optimizer = torch.optim.AdamW(self.policy.get_optim_params(), lr=lr, weight_decay=wd, **({"fused": True} if fused else {}))

    def train(self, n, size=8):
        policy, torch = self.policy, self.torch
        def step():  # as peer_lerobot.run_case (lerobot_train.update_policy)
            batch = self.P.make_train_batch(self.cfg, size, True, "act")
            policy.train()
            loss, _ = policy.forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
            loss.item()
        return _timed(step, n)

    def infer(self, n):
        self.policy.eval()
        def call():
            self.policy.reset()
            self.policy.select_action(self.P.make_obs(True))
        return _timed(call, n)

    def queue(self, n):
        self.policy.eval()
        self.policy.reset()
        self.policy.select_action(self.P.make_obs(True))
        return _timed(lambda: self.policy.select_action(self.P.make_obs(True)), n)

    def info(self):
        import lerobot

        return {"params": sum(p.numel() for p in self.policy.parameters()), "torch": self.torch.__version__,
                "lerobot": getattr(lerobot, "__version__", "?")}

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
    worker = OursWorker(accel=kind == "ours_accel") if kind.startswith("ours") else PeerWorker(fused=kind == "lerobot_fused")
    worker.train(2)  # warm-up
    worker.infer(2)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        if name == "quit":
            break
        result = getattr(worker, name)(**cmd)
        print(json.dumps(result if isinstance(result, dict) else {"times": result}), flush=True)


# ---------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, python, kind):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        self.kind = kind
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
        self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.kind} died (rc={self.proc.wait()})")
        return json.loads(line)

    def __call__(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def med_ms(xs):
    return round(statistics.median(xs) * 1000, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--rounds", type=int, default=5, help="alternation rounds")
    ap.add_argument("--train-steps", type=int, default=4, help="training steps per worker per round")
    ap.add_argument("--infer-calls", type=int, default=10, help="model-running select_action calls per worker per round")
    ap.add_argument("--peer-fused", action="store_true",
                    help="also run LeRobot with fused AdamW (a second LeRobot process speeds up the first: see bench/ACT.md)")
    ap.add_argument("--check", action="store_true", help="load LeRobot's weights into ours and compare outputs")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    t0 = time.perf_counter()
    peer_ok = Path(args.peer_python).exists()
    workers = {"ours": Worker(sys.executable, "ours"), "ours_accel": Worker(sys.executable, "ours_accel")}
    if peer_ok:
        workers["lerobot"] = Worker(args.peer_python, "lerobot")
        if args.peer_fused:
            workers["lerobot_fused"] = Worker(args.peer_python, "lerobot_fused")
    else:
        print(f"LeRobot not found at {args.peer_python}: measuring ours only", file=sys.stderr)
    result = {"bench": "act_vs_lerobot", "info": {k: w("info") for k, w in workers.items()}, "rounds": args.rounds}
    if args.check and peer_ok:
        dump = Path("/tmp") / f"act_vs_lerobot_{os.getpid()}.pt"
        workers["lerobot"]("dump", path=str(dump))
        checker = Worker(sys.executable, "ours")  # a fresh one, so the timed model keeps its own weights
        result["check"] = checker("check", path=str(dump))
        checker.close()
        dump.unlink()
    times = {k: {"train": [], "infer": [], "queue": []} for k in workers}
    per_round = {k: {"train": [], "infer": []} for k in workers}  # each round's median, for paired ratios
    names = list(workers)
    for r in range(args.rounds):
        # Every worker takes every place in the order, after every other worker: with three workers a plain
        # forward/backward alternation left LeRobot's always in the middle, and that place alone ran 5-9 %
        # faster (its non-fused AdamW beat the fused one in all three such runs).
        turn = r % len(names)
        order = names[turn:] + names[:turn]
        if (r // len(names)) % 2:
            order.reverse()
        for kind in ("train", "infer"):
            for k in order:
                n = args.train_steps if kind == "train" else args.infer_calls
                got = workers[k](kind, n=n)["times"]
                times[k][kind] += got
                per_round[k][kind].append(statistics.median(got))
        for k in order:
            times[k]["queue"] += workers[k]("queue", n=5)["times"]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} train {med_ms(v['train'])} ms infer {med_ms(v['infer'])} ms" for k, v in times.items()), file=sys.stderr)
    for w in workers.values():
        w.close()

    summary = {k: {"train_step_ms": med_ms(v["train"]), "model_call_ms": med_ms(v["infer"]), "queue_call_ms": med_ms(v["queue"]),
                   "n_train": len(v["train"]), "n_infer": len(v["infer"])} for k, v in times.items()}
    peak = result["info"]["ours"]["matmul_gflops"]
    for k, s in summary.items():
        for what, key in (("train", "train_step_ms"), ("infer", "model_call_ms")):
            gflops = NOMINAL_GFLOP[what] / (s[key] / 1000)
            s[f"{what}_gflops_nominal"] = round(gflops, 1)
            s[f"{what}_frac_of_130"] = round(gflops / 130, 3)
            s[f"{what}_frac_of_measured_peak"] = round(gflops / peak, 3)
    ours_info = result["info"]["ours"]
    summary["ours"]["train_gflops_executed"] = round(ours_info["train_gflop"] / (summary["ours"]["train_step_ms"] / 1000), 1)
    summary["ours"]["infer_gflops_executed"] = round(ours_info["infer_gflop"] / (summary["ours"]["model_call_ms"] / 1000), 1)
    result["summary"] = summary
    if "lerobot" in summary:
        result["ratios"] = {"train_step": round(summary["ours"]["train_step_ms"] / summary["lerobot"]["train_step_ms"], 3),
                            "model_call": round(summary["ours"]["model_call_ms"] / summary["lerobot"]["model_call_ms"], 3)}
        # The host's speed drifts within a run: the ratio within each round (the two models timed minutes
        # apart at most) is the paired estimate; its median and range over the rounds.
        for kind, key in (("train", "train_step"), ("infer", "model_call")):
            paired = [o / p for o, p in zip(per_round["ours"][kind], per_round["lerobot"][kind])]
            result["ratios"][f"{key}_paired_median"] = round(statistics.median(paired), 3)
            result["ratios"][f"{key}_paired_range"] = [round(min(paired), 3), round(max(paired), 3)]
        if "lerobot_fused" in summary:
            result["ratios"]["train_step_vs_lerobot_fused_adamw"] = round(
                summary["ours"]["train_step_ms"] / summary["lerobot_fused"]["train_step_ms"], 3)
    result["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"\n{'':16}{'train step b8 (ms)':>20}{'model call b1 (ms)':>20}{'queue call (ms)':>17}{'train % of 130':>16}{'infer % of 130':>16}")
    for k, s in summary.items():
        print(f"{k:16}{s['train_step_ms']:>20}{s['model_call_ms']:>20}{s['queue_call_ms']:>17}"
              f"{100 * s['train_frac_of_130']:>15.0f}%{100 * s['infer_frac_of_130']:>15.0f}%")
    if "ratios" in result:
        print(f"ratios ours/LeRobot: {result['ratios']}  (targets: train <= 0.8, model call <= 0.5)")
    print(f"FLOPs executed by ours: train step {ours_info['train_gflop']} GFLOP, inference {ours_info['infer_gflop']} GFLOP "
          f"(LeRobot nominal {NOMINAL_GFLOP['train']} / {NOMINAL_GFLOP['infer']}); matmul peak measured {peak} GFLOP/s")
    if "check" in result:
        print(f"same function as LeRobot's ACT (its weights loaded into ours): {result['check']}")
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
