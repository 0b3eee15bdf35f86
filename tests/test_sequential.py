"""Sequential seed plans (reports/sequential.py) and their audit (reports/plan.py --audit)."""

import csv

import numpy as np
import pytest

from danet.plans import Plan, PlanError
from reports.sequential import audit, decide, exact_type1, magnitude_sets
from tests.conftest import load_script

plan_script = load_script("reports/plan.py")


def test_the_fixed_designs_exact_size_is_the_share_of_sign_patterns_it_rejects():
    magnitudes = np.abs(np.random.default_rng(3).normal(size=12))  # distinct: no ties among the pattern sums
    assert exact_type1(Plan((12,), futility=False, alpha=0.0167), magnitudes) == 68 / 4096
    assert exact_type1(Plan((12,), futility=False, alpha=0.0167), np.ones(12)) < 68 / 4096  # ties: smaller


@pytest.mark.parametrize("looks", [(6, 9, 12), (4, 8), (3, 6, 9, 12)])
def test_a_futility_look_never_raises_the_false_positive_rate(looks):
    fixed = Plan((looks[-1],), futility=False, alpha=0.05)
    sequential = Plan(looks, futility=True, alpha=0.05)
    for magnitudes in magnitude_sets(looks[-1], np.random.default_rng(0))[:12]:
        assert exact_type1(sequential, magnitudes) <= exact_type1(fixed, magnitudes)


def test_spending_keeps_the_plans_level_in_the_worst_case():
    plan = Plan((8, 10, 12), futility=True, efficacy="spending", alpha=0.0167)
    assert sum(plan.levels()) == pytest.approx(0.0167)
    worst = max(exact_type1(plan, magnitudes) for magnitudes in magnitude_sets(12, np.random.default_rng(1)))
    assert 0 < worst <= 0.0167


def test_the_exact_rate_agrees_with_simulated_nulls():
    plan = Plan((6, 9, 12), futility=True, alpha=0.05)
    rng = np.random.default_rng(2)
    rejected, seeds = decide(plan, rng.normal(size=(20_000, 12)))
    exact = np.mean([exact_type1(plan, magnitudes) for magnitudes in magnitude_sets(12, rng)[4:]])
    assert rejected.mean() == pytest.approx(exact, abs=3 * np.sqrt(exact / 20_000))
    assert set(np.unique(seeds)) == {6, 9, 12} and seeds.mean() == pytest.approx(8.71, abs=0.1)


def test_decisions_on_fabricated_differences():
    spending = Plan((8, 10, 12), futility=True, efficacy="spending", alpha=0.05)
    clear_gain = np.full((1, 12), 2.0)
    rejected, seeds = decide(spending, clear_gain)
    assert rejected[0] and seeds[0] == 8  # p = 2^-8 at the first look, below its level 0.0333
    rejected, seeds = decide(spending, -clear_gain)
    assert not rejected[0] and seeds[0] == 8  # futile at the first look
    none = Plan((8, 10, 12), futility=False, efficacy="none", alpha=0.05)
    rejected, seeds = decide(none, clear_gain)
    assert rejected[0] and seeds[0] == 12  # efficacy none: only the last look tests


@pytest.mark.parametrize("kwargs, message", [
    ({"looks": (6, 9, 12), "efficacy": "spending", "alpha": 0.0167}, "look at 6 seeds: its efficacy level 0.00835"),
    ({"looks": (9, 6)}, "increasing"),
    ({"looks": (6, 12), "efficacy": "pocock"}, "one of none, spending"),
])
def test_plans_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Plan(**kwargs)


def test_the_audit_reproduces_the_known_numbers_of_a_futility_plan(tmp_path, capsys):
    """Looks after 6, 9 and 12 seeds at 0.0167 with futility: the fixed design's size 68/4096 and
    power 0.83 at one sd, and about 8.7 seeds on average when there is no effect."""
    assert plan_script.main(["--audit", "--looks", "6,9,12", "--futility", "--alpha", "0.0167", "--sd", "1.0",
                             "--effect", "1.0", "--csv", str(tmp_path / "audit.csv")]) == 0
    assert "20,000 normal draws" in capsys.readouterr().out
    rows = {row["design"]: row for row in csv.DictReader((tmp_path / "audit.csv").open())}
    assert list(next(iter(rows.values()))) == ["design", "type1", "power", "expected_seeds_null",
                                               "expected_seeds_effect"]
    fixed, sequential = rows["fixed"], rows["sequential"]
    assert float(fixed["type1"]) == pytest.approx(68 / 4096, rel=1e-5)
    assert float(sequential["type1"]) <= float(fixed["type1"])
    assert float(fixed["power"]) == pytest.approx(0.83, abs=0.015)
    assert float(fixed["power"]) - float(sequential["power"]) < 0.01
    assert float(sequential["expected_seeds_null"]) == pytest.approx(8.71, abs=0.1)
    assert float(sequential["expected_seeds_effect"]) == pytest.approx(11.96, abs=0.05)


def test_a_plan_that_cannot_work_is_one_line_and_exit_2(capsys):
    assert plan_script.main(["--audit", "--looks", "6,9,12", "--efficacy", "spending", "--alpha", "0.0167"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs at least 7 seeds" in error


def test_audit_rows_come_from_the_same_decision_rule():
    plan = Plan((4, 8), futility=True, alpha=0.05)
    fixed, sequential = audit(plan, effect=1.0, sd=1.0, draws=2000)
    assert (fixed.design, sequential.design) == ("fixed", "sequential")
    assert fixed.expected_seeds_null == 8 and 4 <= sequential.expected_seeds_null < 8


def _grid_with_plan(tmp_path, plan, seeds=(0, 1)):
    from tests.conftest import write_grid

    comparisons = [{"name": "pam vs fcn", "treatment": "pam", "baseline": "fcn"},
                   {"name": "cam vs fcn", "treatment": "cam", "baseline": "fcn"}]
    return write_grid(tmp_path / "planned.yaml", {"fcn": {"pam": False, "cam": False}, "pam": {"pam": True, "cam": False},
                                                  "cam": {"pam": False, "cam": True}}, seeds=seeds,
                      comparisons=comparisons, **({"plan": plan} if plan else {}))


def test_a_grid_carries_its_plan_and_its_cells_keep_their_identity(tmp_path):
    from danet.grids import load_grid

    plan = {"looks": [6, 9, 12], "futility": True, "margin": 1.0}  # a planned grid gives its cells the last look's seeds
    planned = load_grid(str(_grid_with_plan(tmp_path, plan, seeds=tuple(range(12)))), tmp_path)
    assert planned.plan == Plan((6, 9, 12), futility=True, efficacy="none", alpha=0.05, margin=1.0)
    assert planned.plan.for_rows(len(planned.comparisons)).levels() == (0.0, 0.0, 0.025)
    (tmp_path / "plain").mkdir()
    plain = load_grid(str(_grid_with_plan(tmp_path / "plain", None, seeds=tuple(range(12)))), tmp_path)
    assert plain.plan is None and plain.cells == planned.cells


@pytest.mark.parametrize("plan, message", [
    ({"looks": [6, 9, 12], "efficacy": "spending"}, "look at 6 seeds: its efficacy level 0.0125 .* over 2 comparisons"),
    ({"looks": [6, 12], "stop_early": True}, "plan needs looks and may have looks, futility, efficacy, margin, alpha"),
    ({"futility": True}, "plan needs looks"),
    ({"looks": [4]}, "look at 4 seeds: .* needs at least 6 seeds \\(alpha 0.05 over 2 comparisons\\)"),
])
def test_a_grid_whose_plan_cannot_work_is_one_line_and_exit_2(tmp_path, plan, message, capsys):
    from danet.config import UsageError
    from danet.grids import load_grid
    from tests.conftest import run_cli

    grid = _grid_with_plan(tmp_path, plan)
    with pytest.raises(UsageError, match=message):
        load_grid(str(grid), tmp_path)
    assert run_cli(["--grid", str(grid), "--cell", "pam_seed=0", "--print-config"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _replayable(tmp_path):
    """A grid of three cells over seeds 0-7 and its records: pam 2 points above fcn, cam 1 point below."""
    from tests.conftest import write_grid, write_run

    cells = {"fcn": {"pam": False, "cam": False}, "pam": {"pam": True, "cam": False}, "cam": {"pam": False, "cam": True}}
    comparisons = [{"name": "pam vs fcn", "treatment": "pam", "baseline": "fcn"},
                   {"name": "cam vs fcn", "treatment": "cam", "baseline": "fcn"}]
    write_grid(tmp_path / "replayed.yaml", cells, seeds=tuple(range(8)), comparisons=comparisons)
    rng = np.random.default_rng(0)
    shift = {"fcn": 0.0, "pam": 0.02, "cam": -0.01}
    for seed in range(8):
        base = 0.40 + rng.normal(0, 0.005)
        for name, switches in cells.items():
            write_run(tmp_path / "runs", f"{name}_s{seed}", base + shift[name] + rng.normal(0, 0.002), seed=seed,
                      grid="replayed", grid_cell=name, design="as-released", **switches)
    return ["--replay", "--runs-dir", str(tmp_path / "runs"), "--grid", "replayed", "--grids-dir", str(tmp_path)]


def test_a_replay_says_where_each_comparison_would_have_stopped_and_the_hours_saved(tmp_path, capsys):
    arguments = _replayable(tmp_path)
    assert plan_script.main([*arguments, "--looks", "4,6,8", "--futility", "--csv", str(tmp_path / "replay.csv")]) == 0
    printed = capsys.readouterr().out
    assert "- cam vs fcn: futile, stopped at n = 4 (seeds 0-3)" in printed
    assert "- pam vs fcn: better at n = 8 (seeds 0-7)" in printed
    assert "Runs: 20 of the fixed design's 24; training hours: 3.33 for the plan's runs, 0.67 saved" in printed
    assert (tmp_path / "replay.csv").read_text() == ("comparison,stopped_at,decision\n"
                                                     "pam vs fcn,8,better\n"
                                                     "cam vs fcn,4,futile\n"
                                                     "total,20/24,0.67\n")
    assert not list((tmp_path / "runs").glob("*.ledger.jsonl"))  # a replay writes no ledger
    assert plan_script.main([*arguments, "--looks", "8", "--csv", str(tmp_path / "fixed.csv")]) == 0
    assert (tmp_path / "fixed.csv").read_text().splitlines()[1:] == ["pam vs fcn,8,better", "cam vs fcn,8,worse",
                                                                     "total,24/24,0.00"]


@pytest.mark.parametrize("looks, extra, message", [
    ("4,6,8", ["--efficacy", "spending"], "look at 4 seeds: its efficacy level 0.0125 is below 2^-4"),
    ("4,8,12", [], "the last look needs 12 seeds per cell; cell pam has 8"),
    ("8,4", [], "increasing"),
])
def test_a_replay_of_a_plan_that_cannot_work_is_one_line_and_exit_2(tmp_path, capsys, looks, extra, message):
    assert plan_script.main([*_replayable(tmp_path), "--looks", looks, *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
