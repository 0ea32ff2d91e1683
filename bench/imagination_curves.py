"""Open-loop prediction against the prediction step, one curve per variant of a world-model benchmark.

    python bench/imagination_curves.py outputs/benchmark/world_model

Reads every finished cell's `imagine/psnr_k` and `imagine/copy_last_psnr_k` (the Workspace's
end-of-run scores on held-out episodes, `eval.loss_terms=true`), and writes beside them
`imagination_curves.png` (PSNR and SSIM against k, mean over seeds, copy-the-last-frame dashed) and
prints a markdown table at a few steps with each cell's code version.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

SHOWN = (1, 2, 5, 10, 15, 20)


def curves(results: list[dict], name: str) -> np.ndarray:
    """(cells, k) of metric `imagine/{name}_k`, k = 1.. as far as every cell has it."""
    pattern = re.compile(rf"imagine/{name}_(\d+)$")
    n = min(max((int(m[1]) for k in r["metrics"] if (m := pattern.match(k))), default=0) for r in results)
    return np.array([[r["metrics"][f"imagine/{name}_{k}"] for k in range(1, n + 1)] for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_dir", type=Path)
    args = parser.parse_args()
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(args.benchmark_dir.glob("cells/*/result.json")):
        result = json.loads(path.read_text())
        if "imagine/psnr_1" in result["metrics"]:
            by_variant[result["policy"]].append(result)
    if not by_variant:
        raise SystemExit(f"no finished cell with imagine/* metrics under {args.benchmark_dir}/cells")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    print("| variant | seeds | " + " | ".join(f"PSNR k={k} (copy last)" for k in SHOWN) + " | code |")
    print("|---|---|" + "---|" * len(SHOWN) + "---|")
    copy_drawn = False
    for variant, results in by_variant.items():
        psnr, ssim, copy = (curves(results, name).mean(axis=0) for name in ("psnr", "ssim", "copy_last_psnr"))
        steps = np.arange(1, len(psnr) + 1)
        axes[0].plot(steps, psnr, marker="o", ms=3, label=variant)
        axes[1].plot(steps, ssim, marker="o", ms=3, label=variant)
        if not copy_drawn:
            axes[0].plot(steps, copy, color="black", ls="--", label="copy last frame")
            copy_drawn = True
        cells = " | ".join(f"{psnr[k - 1]:.2f} ({copy[k - 1]:.2f})" if k <= len(psnr) else "—" for k in SHOWN)
        versions = ", ".join(sorted({r["code_version"] for r in results}))
        print(f"| {variant} | {len(results)} | {cells} | {versions} |")
    for ax, label in zip(axes, ("PSNR (dB)", "SSIM")):
        ax.set_xlabel("steps predicted after 5 filtered frames")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = args.benchmark_dir / "imagination_curves.png"
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
