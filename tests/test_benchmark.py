"""eval/benchmark.py: the grid, the statistics of the report, the cluster launcher's configuration,
and the smoke benchmark end to end (resumable: a second invocation trains nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from il_policies.benchmark.plan import BenchmarkError, Cell, plan_cells, run_cell
from il_policies.benchmark.report import markdown_table, mean_ci, paired_differences
from il_policies.policies.registry import make_config
from tests.conftest import REPO, make_cfg

ENV = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "OMP_WAIT_POLICY": "PASSIVE"}


def bench(**changes):
    base = {"name": "t", "tasks": ["metaworld_reach", "metaworld_push"], "policies": {"bc": [], "bvae": ["policy.beta=0.1"]},
            "seeds": [0, 1, 2], "train_episodes": [None, 8], "steps": 10, "dataset_dir": None, "overrides": []}
    return OmegaConf.create({**base, **changes})


def test_the_grid_is_every_combination_in_a_fixed_order():
    cells = plan_cells(bench())
    assert len(cells) == 2 * 2 * 2 * 3 and [c.index for c in cells] == list(range(24))
    assert cells[0] == Cell(0, "metaworld_reach", "bc", (), 0, None)
    assert cells[-1] == Cell(23, "metaworld_push", "bvae", ("policy.beta=0.1",), 2, 8)
    assert len({c.name for c in cells}) == 24


def test_a_labelled_variant_runs_its_policy_config_with_its_overrides(tmp_path):
    from il_policies.benchmark.plan import train_command

    grid = bench(tasks=["metaworld_reach"], seeds=[0], train_episodes=[8], policies={
        "bvae": [], "bvae_without_obs_recon": {"policy": "bvae", "overrides": ["policy.loss_weights.obs_recon=0"]}})
    plain, variant = plan_cells(grid)
    assert (variant.policy, variant.policy_config, variant.policy_overrides) == (
        "bvae_without_obs_recon", "bvae", ("policy.loss_weights.obs_recon=0",))
    command = train_command(grid, variant, tmp_path)
    assert "policy=bvae" in command and command[-1] == "policy.loss_weights.obs_recon=0"
    assert "data.max_train_episodes=8" in command and variant.directory(tmp_path) != plain.directory(tmp_path)
    with pytest.raises(BenchmarkError, match="policies.x="):
        plan_cells(bench(policies={"x": {"policy": "no_such_policy", "overrides": []}}))


@pytest.mark.parametrize("changes,words", [
    ({"tasks": ["metaworld_nothing"]}, "tasks='metaworld_nothing'"),
    ({"seeds": []}, "seeds=[]"),
    ({"train_episodes": [0]}, "train_episodes=[0]"),
    ({"steps": 0}, "steps=0"),
    ({"policies": {"bc": "policy.x=1"}}, "policies.bc='policy.x=1'"),
])
def test_bad_grid_values_are_one_sentence(changes, words):
    with pytest.raises(BenchmarkError) as e:
        plan_cells(bench(**changes))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_mean_ci_is_students_t_interval():
    mean, low, high = mean_ci([0.2, 0.4, 0.6])  # sd 0.2, t(0.975, 2 dof) = 4.302653
    assert mean == pytest.approx(0.4) and high - mean == pytest.approx(4.302653 * 0.2 / 3 ** 0.5, rel=1e-6)
    assert low == pytest.approx(2 * mean - high)
    assert mean_ci([0.5])[0] == 0.5 and all(map(lambda v: v != v, mean_ci([0.5])[1:]))  # one seed: no interval


def _row(policy, seed, success, version="abc"):
    return {"cell": f"{policy}{seed}", "task": "push", "train_episodes": 8, "policy": policy, "seed": seed,
            "wall_time_s": 60.0, "code_version": version, "machine": "cpu", "metrics": {"eval/success_rate": success}}


def test_table_rows_go_by_the_number_of_episodes_with_every_episode_last():
    rows = [{**_row("a", 0, 0.5), "train_episodes": n} for n in (16, None, 8, 32)]
    table = markdown_table(rows)
    assert [line.split(" | ")[1] for line in table.splitlines()[2:6]] == ["8", "16", "32", "all"]


def test_paired_differences_use_only_the_common_seeds():
    rows = [_row("a", 0, 0.5), _row("a", 1, 0.7), _row("a", 2, 0.9), _row("b", 1, 0.5), _row("b", 2, 0.6), _row("b", 3, 0.0)]
    [(task, episodes, a, b, n, mean, low, high)] = paired_differences(rows)
    assert (task, episodes, a, b, n) == ("push", 8, "a", "b", 2)
    assert mean == pytest.approx(((0.7 - 0.5) + (0.9 - 0.6)) / 2) and low < mean < high


def test_paired_differences_of_any_metric():
    rows = [{**_row(p, seed, 0.0), "metrics": {"terms/val/action_supervised" if p == "b" else "terms/val/action_mse": v}}
            for p, seed, v in (("a", 0, 1.0), ("a", 1, 2.0), ("b", 0, 0.5), ("b", 1, 1.0))]
    [(_, _, a, b, n, mean, _, _)] = paired_differences(rows, "terms/val/action_supervised")
    assert (a, b, n) == ("a", "b", 2) and mean == pytest.approx(0.75)
    table = markdown_table(rows, ["terms/val/action_supervised"], ["terms/val/action_supervised"])
    assert "| terms/val/action_supervised: A - B |" in table and "| a - b | 2 | 0.7500 [" in table


def test_the_table_reads_bcs_action_mse_as_action_supervised():
    bc = {**_row("bc", 0, 0.5), "metrics": {"terms/val/action_mse": 0.25}}
    table = markdown_table([bc], ["terms/val/action_supervised"])
    assert "| push | 8 | bc | 1 | 0.2500 |" in table


def test_a_group_mixing_code_versions_is_marked():
    one_version = markdown_table([_row("a", 0, 0.5), _row("a", 1, 0.7)])
    assert "†" not in one_version and "Code version: abc." in one_version
    mixed = markdown_table([_row("a", 0, 0.5), _row("a", 1, 0.7, version="def")])
    assert "| a † |" in mixed and "Versions in this table: abc, def." in mixed


def test_curves_read_bcs_action_mse_as_action_supervised_and_plot_the_configured_keys(tmp_path):
    from il_policies.benchmark.report import curve_value, plot_curves

    assert curve_value({"val/action_mse": 0.3}, "val/action_supervised") == 0.3
    assert curve_value({"val/action_supervised": 0.2, "val/action_mse": 0.3}, "val/action_supervised") == 0.2
    assert curve_value({"val/loss": 1.0}, "val/obs_recon") is None
    rows = []
    for policy, key in (("bc", "val/action_mse"), ("bvae", "val/action_supervised")):
        for seed in (0, 1):
            cell = tmp_path / "cells" / f"{policy}_{seed}"
            cell.mkdir(parents=True)
            lines = [json.dumps({"step": step, "elapsed_s": step / 10, key: 1.0 / step + seed}) for step in (10, 20, 30)]
            (cell / "metrics.jsonl").write_text("\n".join(lines))
            rows.append({**_row(policy, seed, 0.0), "cell": f"{policy}_{seed}"})
    [path] = plot_curves(rows, tmp_path, ["val/action_supervised"])
    assert path.name == "curves_push_8.png" and path.stat().st_size > 5_000


WRITEUP = ["bc_conv_vae", "vae_nn", "bvae", "bvae_per_pixel", "bvae_original"]


@pytest.mark.parametrize("name, n_cells, policies, episodes", [
    ("bvae_writeup", 25, WRITEUP, [8]),
    ("bvae_writeup_budget", 5, WRITEUP, [8]),
    ("bvae_writeup_ablations", 50, [*WRITEUP, "bvae_without_action_supervised", "bvae_without_obs_supervised",
                                    "bvae_without_obs_recon", "bvae_without_action_recon", "bvae_wide"], [8]),
    ("bvae_writeup_data", 45, ["bc_conv_vae", "vae_nn", "bvae"], [8, 16, 32]),  # its null entries leave two variants out
    ("bvae_writeup_latent", 36, ["bc_conv_vae", "bvae", "latent_bc", "latent_bc_bc_only", "bc_conv_vae_chunks",
                                 "bc_conv_vae_history_chunks"], [8, None]),
])
def test_the_writeup_benchmarks_compose_into_their_grids(name, n_cells, policies, episodes):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[f"benchmark={name}"])
    cells = plan_cells(cfg.benchmark)
    labels = list(dict.fromkeys(c.policy for c in cells))
    assert len(cells) == n_cells and labels == policies and list(cfg.benchmark.train_episodes) == episodes
    seeds = [0] if "budget" in name else [0, 1, 2] if "latent" in name else [0, 1, 2, 3, 4]
    assert {c.task for c in cells} == {"metaworld_push_image"} and sorted({c.seed for c in cells}) == seeds
    # the extensions add cells to the same directory, whose finished cells they share
    assert cfg.out == ("outputs/benchmark/bvae_writeup_budget" if "budget" in name else "outputs/benchmark/bvae_writeup")
    for config, overrides in {(c.policy_config or c.policy, c.policy_overrides) for c in cells}:  # each variant composes into a valid config
        make_config(make_cfg([f"policy={config}", *overrides]).policy)
    ablation = next((c for c in cells if c.policy == "bvae_without_obs_recon"), None)
    assert ablation is None or (ablation.policy_config, ablation.policy_overrides) == ("bvae", ("policy.loss_weights.obs_recon=0",))


def test_the_world_model_benchmark_composes_into_its_grid():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["benchmark=world_model"])
    cells = plan_cells(cfg.benchmark)
    assert [c.policy for c in cells] == ["latent_bc", "kl_constant", "kl_cyclical", "teacher_forcing_1", "teacher_forcing_0",
                                         "no_context_skips", "change_mask"]
    assert {c.policy_config or c.policy for c in cells} == {"latent_bc"} and cfg.out == "outputs/benchmark/world_model"
    for cell in cells:  # every variant's overrides, after the benchmark's, compose into a valid latent_bc config
        policy_overrides = [o for o in cfg.benchmark.overrides if o.startswith("policy.")]
        config = make_config(make_cfg([f"policy={cell.policy_config or cell.policy}", *policy_overrides, *cell.policy_overrides]).policy)
        assert config.change_mask == (cell.policy == "change_mask")  # the variants vary the ungated decoder they ran with


def test_the_slurm_launcher_configuration_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="benchmark", return_hydra_config=True,
                      overrides=["benchmark=tasks", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu",
                                 "hydra.launcher.timeout_min=240", "hydra.launcher.cpus_per_task=2"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.timeout_min, cfg.hydra.launcher.cpus_per_task) == ("cpu", 240, 2)
    assert cfg.hydra.sweep.dir == "outputs/benchmark/tasks/jobs"


def test_a_failing_cell_names_itself_and_the_error(tmp_path):
    cell = Cell(0, "metaworld_reach", "bc", ("policy.no_such_option=1",), 0, None)
    with pytest.raises(RuntimeError, match=r"benchmark cell metaworld_reach__bc__episodes-all__seed-0 failed \(exit code 1\)"):
        run_cell(bench(steps=2), cell, tmp_path)
    assert not cell.done(tmp_path)


@pytest.mark.slow
def test_smoke_benchmark_end_to_end_then_nothing_to_train(tmp_path):
    def invoke():
        return subprocess.run([sys.executable, "eval/benchmark.py", "benchmark=smoke", f"out={tmp_path}", "jobs=2"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)

    first = invoke()
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted((tmp_path / "cells").iterdir())
    assert len(cells) == 4 and all((c / "result.json").is_file() for c in cells)
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("cell,task,policy") and "eval/success_rate" in lines[0]
    assert (tmp_path / "curves_metaworld_reach_all.png").stat().st_size > 10_000
    assert "| metaworld_reach | all | bc | 2 |" in (tmp_path / "table.md").read_text()
    result = json.loads((cells[0] / "result.json").read_text())
    assert result["steps"] == 30 and result["metrics"]["step"] == 30 and result["wall_time_s"] > 0
    assert result["code_version"] and "CPU" in result["machine"]

    # an interrupted cell (no result.json, checkpoints kept) resumes; finished ones are not touched
    (cells[1] / "result.json").unlink()
    logs = {c: (c / "train.log").stat().st_size for c in cells}
    second = invoke()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 cells, 3 finished, 1 to run" in second.stdout
    assert "resumed from" in (cells[1] / "train.log").read_text()
    assert all((c / "train.log").stat().st_size == logs[c] for c in cells if c != cells[1])

    third = invoke()
    assert third.returncode == 0 and "4 cells, 4 finished, 0 to run" in third.stdout
    assert all((c / "train.log").stat().st_size == size for c, size in logs.items() if c != cells[1])
