"""tune.py: a 3-trial Optuna study on the tiny cache, resumable from its journal file."""

import json

import optuna

import tune


def test_three_trials_then_resume(tiny_cache, tmp_path, capsys):
    argv = [
        "--cache_dir",
        str(tiny_cache / "cache"),
        "--results_dir",
        str(tmp_path),
        "--epochs",
        "2",
        "--n_trials",
        "3",
        "--device",
        "cpu",
        "--batch_sizes",
        "8,16",
        "--rank",
        "8",
    ]
    study = tune.main(argv)
    assert len(study.trials) == 3
    out = capsys.readouterr().out
    study_dir = tmp_path / "low-rank-image"  # the default --study_name
    best = json.loads((study_dir / "best_params.json").read_text())
    assert best["val_mse"] == min(
        t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    )
    assert set(best["params"]) == {
        "lr",
        "lambda_B",
        "lambda_ortho",
        "weight_decay",
        "batch_size",
        "arch",
        "rank",
    }
    assert "./train.sh" in out and f"--arch {best['params']['arch']}" in out
    for f in ("optimization_history.png", "param_importances.png"):
        assert (study_dir / f).exists(), f
    for f in ("optuna_journal.log", "split.json"):
        assert (tmp_path / f).exists(), f
    split = (tmp_path / "split.json").read_text()
    assert all(
        (study_dir / f"trial_{t.number}" / "split.json").read_text() == split for t in study.trials
    )
    # resumable: the journal holds the study; asking for 4 runs one more
    study = tune.main(
        argv[:-6] + ["--n_trials", "4", "--device", "cpu", "--batch_sizes", "8,16", "--rank", "8"]
    )
    assert len(study.trials) == 4 and "3 trials done, running 1 more" in capsys.readouterr().out

    # a second study in the same folder: its own trials, the first study's untouched
    before = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    other = tune.main(
        argv[:-6]
        + [
            "--n_trials",
            "1",
            "--device",
            "cpu",
            "--batch_sizes",
            "8",
            "--rank",
            "8",
            "--study_name",
            "second",
        ]
    )
    assert len(other.trials) == 1 and (tmp_path / "second" / "trial_0" / "best_model.pt").exists()
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()} == before
