"""Inference backends: a policy's network exported to ONNX and run by onnxruntime or OpenVINO.

What is exported is `_predict_action_chunk` of the accelerated network (`il_policies.accel.
accelerate`): normalized observations in, raw actions out, the normalizer inside the graph, with a
dynamic batch dimension. The robot-facing logic around it (observation checks, history, action
queue, temporal ensembling, clipping) stays in the `Policy`, which calls the runtime through
`Policy.use_backend`. The ONNX file carries the checkpoint's digest and the policy's metadata
(`metadata_props["il_policies"]`, JSON), so it is self-contained for a robot computer that runs it
with onnxruntime alone, and a cached export is re-made when its checkpoint changes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from il_policies.accel import accelerate
from il_policies.atomic import replaced_atomically

BACKENDS = ("torch", "onnxruntime", "openvino")
EXPORT_FORMAT = "il_policies.onnx/1"


class _Network(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: dict[str, torch.Tensor], noise: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy._predict_action_chunk(obs, **noise)  # noise: {} for a deterministic network


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(policy, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the policy's network to `path` (atomically) with `torch.onnx.export(dynamo=True)`, its
    metadata (`policy.metadata`, the config, and `metadata`) inside."""
    import onnx

    if getattr(policy, "samples_noise_in_steps", False):
        raise ValueError(f"policy {policy.name!r} samples with {policy.config.inference_scheduler}, which draws fresh noise "
                         "at every step inside the network; export a deterministic sampler (DDIMScheduler with eta=0, "
                         "DPMSolverMultistepScheduler) or run it with backend='torch'")
    network = accelerate(copy.deepcopy(policy).cpu().eval())
    obs_meta = policy.shape_meta["obs"]
    # Batch 2 in the example: an example of size 1 would make the exporter specialize the batch to 1.
    example = {key: torch.zeros(2, policy.window.n_obs_steps, *obs_meta[key]["shape"]) for key in policy.obs_keys}
    noise = policy.network_noise(2)  # the random inputs drawn outside the graph (Diffusion's x_K), as inputs
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")  # every input shares the one batch axis
        program = torch.onnx.export(
            _Network(network).eval(), (), kwargs={"obs": example, "noise": noise}, dynamo=True, optimize=True, verbose=False,
            input_names=[*policy.obs_keys, *noise], output_names=["action"],
            dynamic_shapes={"obs": {key: {0: batch} for key in policy.obs_keys}, "noise": {key: {0: batch} for key in noise}},
        )
    model = program.model_proto
    entry = model.metadata_props.add()
    info = {"format": EXPORT_FORMAT, "torch": torch.__version__, **policy.metadata, "noise_inputs": sorted(noise),
            "policy_config": dataclasses.asdict(policy.config), **(metadata or {})}
    entry.key, entry.value = "il_policies", json.dumps(info)
    path = Path(path)
    with replaced_atomically(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `il_policies` metadata of an exported file ({} when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = next((p.value for p in model.metadata_props if p.key == "il_policies"), None)
    return json.loads(entry) if entry else {}


def cached_export(policy, checkpoint: str | os.PathLike, onnx_path: str | os.PathLike | None = None) -> Path:
    """`checkpoint`'s export, next to it (`best.pt` -> `best.onnx`) unless `onnx_path` says where;
    exported anew when missing or made from another checkpoint or export format."""
    onnx_path = Path(onnx_path) if onnx_path else Path(checkpoint).with_suffix(".onnx")
    digest = file_digest(checkpoint)
    if onnx_path.is_file():
        meta = onnx_metadata(onnx_path)
        if meta.get("format") == EXPORT_FORMAT and meta.get("checkpoint_sha256") == digest and meta.get("torch") == torch.__version__:
            return onnx_path
    return export_onnx(policy, onnx_path, {"checkpoint_sha256": digest, "checkpoint": Path(checkpoint).name})


class _Runtime:
    """Calls an exported network with the policy's observation tensors; returns a torch tensor."""

    def __init__(self, path: Path, input_names: list[str], draw_noise=None):
        self.path, self.input_names = path, input_names
        self.draw_noise = draw_noise  # policy.network_noise: the graph's random inputs, drawn from the caller's generator

    def __call__(self, obs, generator=None) -> torch.Tensor:
        inputs = dict(obs)
        if self.draw_noise is not None:
            inputs |= self.draw_noise(next(iter(obs.values())).shape[0], generator)
        feed = {name: np.ascontiguousarray(inputs[name].detach().cpu().numpy(), dtype=np.float32) for name in self.input_names}
        return torch.from_numpy(self._run(feed))


class OnnxRuntimeNetwork(_Runtime):
    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, draw_noise=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: a robot computer runs other processes too.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        super().__init__(Path(path), [i.name for i in self.session.get_inputs()], draw_noise)

    def _run(self, feed):
        return self.session.run(["action"], feed)[0]


class OpenVINONetwork(_Runtime):
    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, draw_noise=None):
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("backend='openvino' needs OpenVINO: pip install -e '.[openvino]'") from None
        core = ov.Core()
        # fp32 as the reference (OpenVINO would take bf16 on CPUs with native bf16), latency over throughput.
        self.model = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": num_threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
        # A port may carry several tensor names; the export named each input after its observation key.
        keys = set(onnx_metadata(path).get("observations", {})) | set(onnx_metadata(path).get("noise_inputs", []))
        super().__init__(Path(path), [next(iter(sorted(port.get_names() & keys or port.get_names()))) for port in self.model.inputs],
                         draw_noise)

    def _run(self, feed):
        return self.model(feed)[self.model.output(0)]


RUNTIMES = {"onnxruntime": OnnxRuntimeNetwork, "openvino": OpenVINONetwork}


def use_exported_network(policy, checkpoint, backend: str, onnx_path=None, num_threads: int | None = None) -> Path:
    """Run `policy`'s network through `backend` from `checkpoint`'s (cached) ONNX export."""
    if backend not in RUNTIMES:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    path = cached_export(policy, checkpoint, onnx_path)
    draw_noise = policy.network_noise if policy.network_noise(1) else None
    policy.use_backend(RUNTIMES[backend](path, num_threads, draw_noise))
    return path


__all__ = ["BACKENDS", "OnnxRuntimeNetwork", "OpenVINONetwork", "cached_export", "export_onnx", "onnx_metadata",
           "use_exported_network"]
