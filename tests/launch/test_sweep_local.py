"""The sweep command end to end on this machine: real megatron-core trials over gloo."""

import json

from tests.launch.sweeps import records, run_sweep, trial_name

FAST = ["trial.warmup_steps=1", "trial.measure_steps=2", "layout.recompute=none", "layout.gbs=4",
        "layout.attention=sdpa", "layout.norm=torch"]


def test_local_sweep_records_every_trial_and_resumes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    ok = trial_name(tp=2, mbs=2, gbs=4)
    broken = trial_name(tp=1, mbs=2, gbs=4)
    args = ["layout.tp=1,2", "layout.pp=1,2", "layout.mbs=2", f"trial.fail_if_name_contains={broken}", *FAST]

    first = run_sweep(sweep_dir, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    recs = records(sweep_dir)
    assert recs[ok]["status"] == "ok"
    assert recs[ok]["step_time_s"] > 0 and recs[ok]["tokens_per_s"] > 0
    assert 0 < recs[ok]["mfu"]["palm"] < 1 and recs[ok]["mfu_formula"]["palm"].startswith("tokens/s")
    assert len(recs[ok]["peak_memory_gb"]) == 2  # one per rank
    assert recs[broken]["status"] == "error" and "injected failure" in recs[broken]["reason"]
    assert recs[trial_name(pp=2, mbs=2, gbs=4)]["status"] == "ok"  # megatron's 1F1B schedule on CPU
    assert len(recs[trial_name(pp=2, mbs=2, gbs=4)]["losses"]) == 3  # from the last stage
    assert recs[trial_name(tp=2, pp=2, mbs=2, gbs=4)]["status"] == "invalid"
    assert "[1/3]" in first.stdout and "[3/3]" in first.stdout  # progress while trials ran
    board = (sweep_dir / "leaderboard.md").read_text()
    for name in (broken, trial_name(tp=2, pp=2, mbs=2, gbs=4)):
        assert name in board
    # the recommendation, pasteable (tp2 or pp2: which one wins on CPU is a measurement)
    assert "--tensor-model-parallel-size" in first.stdout and "--pipeline-model-parallel-size" in first.stdout
    assert (sweep_dir / "results.csv").read_text().count("\n") == 5  # header + 4 trials
    # The sweeper wrote each launched trial's spec, its prediction inside; the record has both.
    spec = json.loads((sweep_dir / ok / "spec.json").read_text())
    assert spec["prediction"] == recs[ok]["prediction"] and spec["prediction"]["fits"] is True
    assert spec["layout"] == recs[ok]["layout"] and not list(sweep_dir.glob("*/prediction.json"))
    # leaderboard.json rows carry the command that reruns them, and their commit
    rows = {r["trial"]: r for r in json.loads((sweep_dir / "leaderboard.json").read_text())["rows"]}
    assert rows[ok]["command"].startswith("layout-sweep model=tiny cluster=local_cpu layout.tp=2 ")
    assert rows[ok]["commit"] == recs[ok]["git_commit"]

    # Resume: finished trials are not re-run; a trial whose record was lost is.
    ok_mtime = (sweep_dir / ok / "result.json").stat().st_mtime
    (sweep_dir / broken / "result.json").unlink()
    second = run_sweep(sweep_dir, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 done" in second.stdout and "launching 1 trials" in second.stdout
    assert (sweep_dir / ok / "result.json").stat().st_mtime == ok_mtime
    assert records(sweep_dir)[broken]["status"] == "error"


def test_losses_agree_across_layouts(tmp_path):
    """Same seed and data: TP and DP splits train on the same tokens and give the same loss.

    With prestarted ranks: the second trial's ranks are spares that imported while the
    first trial ran (launch/spare.py), and train exactly like fresh processes.
    """
    sweep_dir = tmp_path / "parity"
    result = run_sweep(sweep_dir, "layout.tp=1,2", "layout.mbs=1", "trial.warmup_steps=0",
                       "trial.measure_steps=3", "layout.pp=1", "trial.wandb=true",
                       "trial.prestart_ranks=true", *FAST[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    recs = sorted(records(sweep_dir).values(), key=lambda r: r["ranks"][0]["started_at"])
    assert [[rank["prestarted"] for rank in r["ranks"]] for r in recs] == [[False, False], [True, True]]
    losses = [r["losses"] for r in recs if r["status"] == "ok"]
    assert len(losses) == 2 and len(losses[0]) == len(losses[1]) == 3  # zip would hide a short one
    for a, b in zip(*losses):
        assert abs(a - b) < 1e-4 * abs(a)  # fp32 on CPU: only reduction order differs
    # wandb was asked for: each trial wrote an offline run (no network needed)
    for name in records(sweep_dir):
        runs = list((sweep_dir / name / "wandb").glob("offline-run-*/*.wandb"))
        assert runs, f"no offline wandb run for {name}"


def test_a_trial_over_its_time_limit_is_recorded_as_timeout(tmp_path):
    sweep_dir = tmp_path / "slow"
    # Two seconds cannot even import megatron-core: the supervisor stops the ranks.
    result = run_sweep(sweep_dir, "layout.tp=1", "layout.pp=1", "layout.mbs=1", "trial.timeout_s=2", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = records(sweep_dir).values()
    assert record["status"] == "timeout"
    assert "exceeded trial.timeout_s=2 s" in record["reason"]
    assert "timeout" in (sweep_dir / "leaderboard.md").read_text()


def test_predicted_oom_is_pruned_and_a_wrong_prediction_is_reported(tmp_path):
    tight = ["layout.tp=1", "layout.pp=1", "layout.mbs=1", "cluster.gpu_memory_gb=0.2", *FAST]
    pruned = run_sweep(tmp_path / "pruned", *tight)
    assert pruned.returncode != 0
    assert "empty search space" in pruned.stderr and "predicted OOM" in pruned.stderr

    forced = run_sweep(tmp_path / "forced", *tight, "sweep.prune_predicted_oom=false")
    assert forced.returncode == 0, forced.stderr[-3000:]
    (record,) = records(tmp_path / "forced").values()
    assert record["status"] == "ok" and record["prediction"]["fits"] is False
    assert "Measurement contradicted the memory prediction" in forced.stdout
    assert f"{record['trial']}: fit" in forced.stdout


def test_dry_run_prints_the_plan_and_launches_nothing(tmp_path):
    sweep_dir = tmp_path / "dry"
    result = run_sweep(sweep_dir, "layout.tp=1,2", "layout.pp=1,2", "layout.mbs=2", "sweep.dry_run=true", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 layouts:" in result.stdout and "would launch 3 trials:" in result.stdout
    assert trial_name(tp=2, mbs=2, gbs=4) in result.stdout and "predicted MFU" in result.stdout
    assert "| # | layout |" not in result.stdout  # the summary callback has nothing to summarize
    assert not sweep_dir.exists()
