"""The suite of regimes (``runs.suite``): fixed tune/test splits, stored reference sweeps that today's code
reproduces bit for bit, stale references refused, and regret against the constant that val (not test) chooses.
The tests use the ``tiny`` regime; the real regimes' references are data in experiments/references/."""
from __future__ import annotations

import json

import pytest

from dyndrop import UserError
from experiments import suite
from experiments.suite import REGIMES, Reference, Regime


def test_the_splits_are_fixed_in_code_and_the_cpu_regimes_fit_two_cores():
    tune = [r for r in REGIMES.values() if r.split == "tune"]
    test = [r for r in REGIMES.values() if r.split == "test"]
    cpu = [r for r in tune + test if not r.gpu]
    assert len(cpu) >= 8 and abs(len(tune) - len(test)) <= 2
    assert {r.name for r in tune}.isdisjoint(r.name for r in test)
    assert [r.name for r in test if r.gpu] == ["paper"]
    for r in cpu:  # no more compute than 4 x 128 for 2400 steps (the longest, measured in docs/results.md)
        cfg = r.config()
        assert cfg.preset == "cpu" and cfg.n_embd * cfg.n_embd * cfg.max_iters <= 128 * 128 * 2400, r.name
        assert cfg.max_iters // cfg.eval_interval == 20, r.name  # every regime gives a controller 20 decisions


def test_the_stored_tiny_reference_trial_reruns_bit_for_bit(tmp_path):
    """A change that alters the numbers without bumping gpt.trainer.NUMERICS_VERSION fails here (the reference
    would be stale but not refused); after a bump the reference is refused until it is rebuilt."""
    regime = REGIMES["tiny"]
    ref = Reference.load(regime)
    ref.check(regime, threads=1)
    comparison = suite.regime_comparison(regime, ["constant:rate=0.1"], [1338], tmp_path, jobs=1, threads=1)
    comparison.run()
    again = suite.collect(comparison)["constant:rate=0.1"][1338]
    assert again == ref.runs["constant:rate=0.1"][1338]


def test_a_stale_reference_is_refused_with_the_command_that_rebuilds_it(tmp_path, monkeypatch, capsys):
    import gpt.trainer
    from runs.suite import cli

    monkeypatch.setattr(gpt.trainer, "NUMERICS_VERSION", gpt.trainer.NUMERICS_VERSION + 1)
    assert cli(["--controllers", "pid", "--regimes", "tiny", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stale" in err[0] and "numerics" in err[0]
    assert "python -m runs.suite --build-references --regimes tiny" in err[0]
    assert not (tmp_path / "s" / "tiny").exists()
    with pytest.raises(UserError, match="threads"):  # another thread count gives other numbers
        monkeypatch.undo()
        Reference.load(REGIMES["tiny"]).check(REGIMES["tiny"], threads=2)


@pytest.mark.parametrize("args, words", [
    (["--controllers", "pid", "--regimes", "nosuch"], "--regimes"),
    (["--controllers", "pid", "--regimes", "tune,bogus"], "--regimes"),
    (["--controllers", "nosuch", "--regimes", "tiny"], "nosuch"),
    (["--controllers", "pid", "--regimes", "tiny", "--seeds", "1,x"], "--seeds"),
    (["--controllers", "pid", "--regimes", "tiny", "--seeds", "5"], "not in tiny's reference"),
    (["--controllers", "pid", "--regimes", "tiny", "--jobs", "0"], "--jobs"),
    (["--regimes", "tiny"], "--controllers"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, words):
    from runs.suite import cli

    assert cli([*args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "s" / "tiny" / "trials").exists()


def test_the_suite_scores_a_controller_by_its_regret_and_reruns_only_it(tmp_path):
    from runs.suite import cli

    out = tmp_path / "s"
    assert cli(["--controllers", "constant:rate=0.2", "pid:start=0", "--regimes", "tiny", "--seeds", "1337,1339",
                "--out", str(out)]) == 0
    result = json.loads((out / "suite.json").read_text())
    trials = sorted(p.name for p in (out / "tiny" / "trials").iterdir())
    assert trials == ["constant_rate0.2-s1337", "constant_rate0.2-s1339", "pid_start0-s1337", "pid_start0-s1339"]
    ref = Reference.load(REGIMES["tiny"])
    best = ref.best_constant()
    for spec in ("constant:rate=0.2", "pid:start=0"):
        row, per = result["rows"][spec], result["per_regime"]["tiny"]["controllers"][spec]
        regrets = [per["test_loss"][str(s)] - ref.runs[best][s]["test_loss"] for s in (1337, 1339)]
        assert row["regret_mean"] == pytest.approx(sum(regrets) / 2) and row["n"] == 2
        assert row["regret_ci"][0] <= row["regret_mean"] <= row["regret_ci"][1]
        assert set(row["vs"]) == {"best_constant", "constant 0.2", "constant 0", "oracle"}
    # the constant the reference holds comes out exactly as stored: the reference is valid for today's code
    assert result["per_regime"]["tiny"]["controllers"]["constant:rate=0.2"]["reproduces_reference"] is True
    assert "regret" in (out / "suite.md").read_text()
    from runs.report import cli as report

    assert report([str(out)]) == 0  # a suite folder: regret per regime
    assert (out / "figures" / "regret.png").read_bytes().startswith(b"\x89PNG") and (out / "report.html").is_file()


def test_the_best_constant_is_chosen_by_val_never_by_test():
    runs = {"constant:rate=0": {1: {"test_loss": 2.0, "best_val_loss_full": 2.5},
                                2: {"test_loss": 2.0, "best_val_loss_full": 2.5}},
            "constant:rate=0.2": {1: {"test_loss": 2.2, "best_val_loss_full": 2.1},
                                  2: {"test_loss": 2.3, "best_val_loss_full": 2.1}}}
    ref = Reference("r", runs, {})
    assert ref.best_constant() == "constant:rate=0.2"  # the lower val, though its test loss is higher
    assert ref.oracle(1) == 2.0  # the oracle takes the best test loss per seed
    regime = Regime("r", "test", "tiny", {"max_iters": 100})
    result = suite.score(["pid"], [regime], {"r": ref}, {"r": {"pid": {1: {"test_loss": 2.1}, 2: {"test_loss": 2.2}}}})
    row = result["rows"]["pid"]
    assert row["regret_mean"] == pytest.approx(-0.1)  # 2.1 - 2.2 and 2.2 - 2.3
    assert row["vs"]["oracle"]["delta"] == pytest.approx(0.15) and row["vs"]["constant 0"]["delta"] == pytest.approx(0.15)
    assert result["per_regime"]["r"]["best_constant"] == "constant:rate=0.2"


def test_every_stored_reference_is_one_that_todays_code_and_data_reproduce():
    """The stored sweeps are what every regret is measured against: each is a regime's, holds the whole grid on
    at least 3 seeds, and its digest (settings, data, numerics version, torch, threads) is today's, so a change to
    any of them fails here rather than in a user's run. (A regime without a sweep is refused by runs.suite with the
    command that builds it: tested above.)"""
    stored = sorted(suite.REFERENCES.glob("*.json"))
    assert len(stored) >= 2
    for path in stored:
        regime = REGIMES[path.stem]
        ref = Reference.load(regime)
        ref.check(regime, threads=suite.THREADS)
        assert len(ref.seeds) >= 3 and ref.regime == regime.name, regime.name
        assert {f"constant:rate={r:g}" for r in suite.GRID} <= set(ref.runs), regime.name


def test_parts_of_a_suite_merge_into_the_table_one_run_would_give(tmp_path, capsys):
    """``--merge``: one suite run in parts (here two controllers, scored apart) gives the table of both at once;
    a part scored against another reference sweep, or disagreeing with another part, is refused in one line."""
    from runs.suite import cli

    regime = REGIMES["tiny"]
    ref = Reference.load(regime)
    refs = {"tiny": ref}
    runs = {spec: {s: {"test_loss": ref.runs[spec][s]["test_loss"] + 0.01} for s in ref.seeds}
            for spec in ("constant:rate=0.1", "constant:rate=0.3")}
    whole = suite.score(list(runs), [regime], refs, {"tiny": runs})
    paths = []
    for spec in runs:
        paths.append(tmp_path / f"{spec}.json")
        paths[-1].write_text(json.dumps(suite.score([spec], [regime], refs, {"tiny": {spec: runs[spec]}})))
    assert cli(["--merge", *map(str, paths), "--out", str(tmp_path / "both")]) == 0
    merged = json.loads((tmp_path / "both" / "suite.json").read_text())
    assert merged["rows"] == json.loads(json.dumps(whole["rows"]))  # p-values Holm-adjusted over both controllers
    assert merged["merged_from"] == list(map(str, paths)) and (tmp_path / "both" / "suite.md").is_file()
    assert cli(["--merge", *map(str, paths), "--controllers", "constant:rate=0.3", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "suite.json").read_text())  # only the rows asked for
    assert list(one["rows"]) == ["constant:rate=0.3"] and one["rows"]["constant:rate=0.3"]["n"] == len(ref.seeds)
    assert cli(["--merge", *map(str, paths), "--regimes", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / "suite.json").read_text())["rows"] == merged["rows"]

    stale = json.loads(paths[0].read_text())
    stale["per_regime"]["tiny"]["constants"]["constant:rate=0"] += 1e-6  # scored against a sweep since rebuilt
    paths[0].write_text(json.dumps(stale))
    clash = suite.score(["constant:rate=0.3"], [regime], refs,
                        {"tiny": {"constant:rate=0.3": {s: {"test_loss": 9.0} for s in ref.seeds}}})
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    capsys.readouterr()
    for args, words in ((["--merge", str(paths[0])], "another reference sweep"),
                        (["--merge", str(paths[1]), str(tmp_path / "clash.json")], "not parts of one suite"),
                        (["--merge", str(paths[1]), "--controllers", "pid"], "in none of the merged files"),
                        (["--merge", str(paths[1]), "--build-references"], "--merge"),
                        (["--merge", str(paths[1]), "--seeds", "1337"], "--merge"),
                        (["--merge", str(paths[1]), "--regimes", "late"], "none of the regimes asked for"),
                        (["--merge", str(tmp_path / "nosuch.json")], "does not exist")):
        assert cli([*args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "bad" / "suite.json").exists()
