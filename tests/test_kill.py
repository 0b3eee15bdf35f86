"""The kill test: SIGKILL workers, runs and drivers on a fixed schedule while a grid trains, restart what died,
and check that every cell ends with exactly one complete record whose logged training losses are those of a
fault-free pass, bit for bit (a resumed run replays from its checkpoint deterministically).

Both drivers are driven only through their command lines (sweeps/optuna_study.py --workers 2, and two
sweeps/local_sweep.py executors sharing one journal), and processes are found in /proc by the test's own
folder in their command lines (an Optuna worker outlives a killed driver: it runs in its own session).
Run it alone with `pytest tests/test_kill.py -m slow -n 0 -s` to see its summary lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from danet.grids import load_grid
from danet.launch.contract import cell_argv, target_of
from danet.launch.ledger import PlanState, ledger_path, read_ledger, records_of, take_looks
from tests.conftest import GRIDS, REPO, tiny_flags, write_grid

OPTUNA_DRIVER = REPO / "sweeps" / "optuna_study.py"
YAML_EXECUTOR = REPO / "sweeps" / "local_sweep.py"
# 30 optimizer steps a run (a few seconds), a checkpoint every 2 of them: a kill lands mid-run, after checkpoints
RUN_FLAGS = ("--iterations", "30", "--eval-every", "10", "--checkpoint-every", "2", "--log-every", "1")
# one thread a process: the losses are bit-identical only at a fixed thread count, and 2 cores are shared
ENVIRONMENT = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                            "WANDB_SILENT": "true"}
FIRST_KILL_S, KILL_EVERY_S = 6.0, 3.5  # the schedule: kill i at FIRST_KILL_S + i * KILL_EVERY_S after the start
FIND_VICTIM_S = 3.0  # how long a scheduled kill waits for its kind of process to exist (else: missed)
# kills that end a run of one cell: below the drivers' bound on attempts (5), so that the schedule cannot make a
# cell be given up; a worker's or a run's kill only hits a cell killed less than twice, so the kills spread out
KILLS_PER_CELL, DIRECT_KILLS_PER_CELL = 3, 2
# a worker / a run: one that holds a run (mid-run), its cell killed least, training now first, then the oldest;
# a driver: by turns (the Optuna driver's workers live on; an executor's run gets SIGTERM from the kernel)
SCHEDULES = {
    "optuna": ["worker", "worker", "driver", "worker", "worker", "worker", "driver", "worker", "worker", "worker",
               "worker"],
    "yaml": ["run", "run", "driver", "run", "run", "run", "driver", "run", "run", "run", "run"],
}
MAX_RESTARTS = 6  # after the schedule: restarts of drivers that did not exit 0
SETTLE_S = 180  # after the schedule: how long the drivers may take to finish the grid
GRID_LINE = re.compile(r"grid \S+: (\d+)/(\d+) cells complete")


@dataclass
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks after boot
    argv: list[str]

    def runs(self, script: str) -> bool:
        return any(arg.endswith(script) for arg in self.argv)


def processes(marker: str) -> list[Proc]:
    """Live processes whose command line mentions `marker` (this test's folder), oldest first."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = [arg.decode(errors="replace") for arg in Path(entry.path, "cmdline").read_bytes().split(b"\0") if arg]
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if not any(marker in arg for arg in argv):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):  # killed, not yet reaped
            continue
        found.append(Proc(int(entry.name), int(fields[1]), int(fields[19]), argv))
    return sorted(found, key=lambda proc: (proc.start, proc.pid))


def held_run(pid: int) -> str | None:
    """The run (record folder name) whose lock RUNS/.locks/<run-id>.lock the process holds open, if any."""
    try:
        links = [os.readlink(path) for path in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return None
    for link in links:
        if "/.locks/" in link and link.endswith(".lock") and not Path(link).name.startswith("worker-"):
            return Path(link).name[:-len(".lock")]
    return None


@dataclass
class DriverRun:
    slot: int
    number: int
    process: subprocess.Popen
    log: Path
    killed: bool = False

    def tail(self, lines: int = 12) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


@dataclass
class Chaos:
    """The driver slots (one Optuna driver, or two executors), restarted with the same command when they die."""

    commands: list[list[str]]
    cwd: Path
    logs: Path
    marker: str
    runs_dir: Path
    runs: list[DriverRun] = field(default_factory=list)
    restarts: int = 0
    late_restarts: int = 0  # restarts after the schedule
    schedule: list[str] = field(default_factory=list)  # what each scheduled kill killed, "-" when it found none
    cell_kills: dict[str, int] = field(default_factory=dict)

    def start(self, slot: int) -> DriverRun:
        number = sum(run.slot == slot for run in self.runs)
        log = self.logs / f"driver{slot}-{number}.log"
        with log.open("w") as output:
            process = subprocess.Popen(self.commands[slot], cwd=self.cwd, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=ENVIRONMENT, text=True)
        self.runs.append(DriverRun(slot, number, process, log))
        return self.runs[-1]

    def latest(self, slot: int) -> DriverRun:
        return [run for run in self.runs if run.slot == slot][-1]

    def supervise(self, late: bool = False) -> None:
        """Restart each driver that died or failed (a driver that exited 0 is done); after the schedule (`late`),
        at most MAX_RESTARTS times."""
        for slot in range(len(self.commands)):
            code = self.latest(slot).process.poll()
            if code is not None and code != 0 and (not late or self.late_restarts < MAX_RESTARTS):
                self.restarts += 1
                self.late_restarts += late
                self.start(slot)

    def running(self) -> bool:
        return any(self.latest(slot).process.poll() is None for slot in range(len(self.commands)))

    def kill(self, target: str, index: int) -> str | None:
        """Kill one process of the target's kind, as the schedule's rule picks it; what was killed, or None
        when no such process is there now."""
        driver_pids = {run.process.pid for run in self.runs}
        live = processes(self.marker)
        if target == "driver":
            slots = len(self.commands)
            choices = []
            for turn in range(slots):  # by turns, passing over a driver whose run's cell was killed enough
                slot = (index + turn) % slots
                run = self.latest(slot)
                if run.process.poll() is not None:
                    continue
                cells = [cell for proc in live if proc.ppid == run.process.pid and proc.runs("ablations/run.py")
                         and (cell := self.cell_of(proc))]
                if all(self.cell_kills.get(cell, 0) < KILLS_PER_CELL for cell in cells):
                    choices.append((run, cells))
            if not choices:
                return None
            run, cells = choices[0]
            run.process.send_signal(signal.SIGKILL)
            run.process.wait()
            run.killed = True
            for cell in cells:  # an executor's run is stopped with it (SIGTERM): one more attempt for its cell
                self.cell_kills[cell] = self.cell_kills.get(cell, 0) + 1
            return f"driver{run.slot}-{run.number}" + (f" ({', '.join(cells)})" if cells else "")
        script = "optuna_study.py" if target == "worker" else "ablations/run.py"
        mid_run = [(proc, cell) for proc in live if proc.runs(script) and proc.pid not in driver_pids
                   and held_run(proc.pid) and (cell := self.cell_of(proc))
                   and self.cell_kills.get(cell, 0) < DIRECT_KILLS_PER_CELL]
        if not mid_run:
            return None
        proc, cell = min(mid_run, key=lambda pair: (self.cell_kills.get(pair[1], 0), not self.training(pair[0]),
                                                    pair[0].start, pair[0].pid))
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.cell_kills[cell] = self.cell_kills.get(cell, 0) + 1
        return f"{target} ({cell})"

    def cell_of(self, proc: Proc) -> str | None:
        """A run's --cell (the executor's runs), else the run whose lock the process holds (an Optuna worker)."""
        for arg in proc.argv:
            if arg.startswith("--cell="):
                return arg[len("--cell="):]
        return held_run(proc.pid)

    def training(self, proc: Proc) -> bool:
        """Whether the process holds a run that logged a step less than a second ago (mid-training)."""
        run = held_run(proc.pid)
        try:
            return run is not None and time.time() - (self.runs_dir / run / "metrics.jsonl").stat().st_mtime < 1.0
        except OSError:
            return False

    def stop_everything(self) -> None:
        """Kill what this test started and is still alive: its drivers, then their workers and runs (by pid)."""
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        for proc in processes(self.marker):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def records(runs: Path) -> dict[str, dict]:
    """Record folder name -> its summary (None without one), every folder under RUNS but .locks."""
    found = {}
    for folder in sorted(path for path in runs.iterdir() if path.is_dir() and not path.name.startswith(".")):
        summary = folder / "summary.json"
        found[folder.name] = json.loads(summary.read_text()) if summary.exists() else None
    return found


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss; a step logged again after a resume counts with its last value."""
    logged = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if "train/loss" in event:
            logged[event["step"]] = event["train/loss"]
    return logged


def fault_free_pass(base: Path, grid: Path) -> dict[str, tuple[str, dict[int, float]]]:
    """The grid trained without faults by the Optuna driver: cell hash -> (name, step -> training loss)."""
    runs = base / "A"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(OPTUNA_DRIVER), "--grid", str(grid), "--study", "reference",
                           "--storage", str(base / "reference.journal"), "--workers", "2", "--",
                           *tiny_flags(runs, *RUN_FLAGS)], cwd=base, env=ENVIRONMENT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    found = records(runs)
    assert found and all(summary["status"] == "complete" for summary in found.values()), found
    losses_of = {summary["cell_hash"]: (summary["name"], losses(runs / name)) for name, summary in found.items()}
    assert len(losses_of) == len(found) and all(len(logged) == 30 for _, logged in losses_of.values())
    print(f"\nkill test reference: {len(found)} cells in {time.monotonic() - started:.0f}s (fault-free, Optuna driver, "
          "2 workers)")
    return losses_of


CELLS = {"fcn": {"pam": False, "cam": False}, "pam": {"pam": True, "cam": False}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid (2 cells x seeds 0-3, tiny synthetic runs) and its fault-free pass."""
    base = tmp_path_factory.mktemp("kill")
    grid = write_grid(base / "kill.yaml", CELLS, seeds=(0, 1, 2, 3))
    losses_of = fault_free_pass(base, grid)
    assert len(losses_of) == 8
    return grid, losses_of, None


@pytest.fixture(scope="module")
def planned_reference(reference, tmp_path_factory):
    """The same grid under a sequential plan (looks after 2 and 4 seeds, futility): the cells of the fault-free
    pass that the plan runs and the looks it takes over their records (a cell's hash does not hold its grid, so
    the fault-free records are the planned grid's too)."""
    plain_grid, losses_of, _ = reference
    grid = write_grid(tmp_path_factory.mktemp("kill-planned") / "kill.yaml", CELLS, seeds=(0, 1, 2, 3),
                      # here PAM leads at 2 seeds, so "FCN vs PAM" stops there as futile: seeds 2 and 3 never run
                      comparisons=[{"name": "fcn vs pam", "treatment": "fcn", "baseline": "pam"}],
                      plan={"looks": [2, 4], "futility": True, "alpha": 0.5})
    planned, runs = load_grid(str(grid), GRIDS), plain_grid.parent / "A"
    hashes = {cell: target_of(cell_argv(str(grid), cell, tiny_flags(runs, *RUN_FLAGS))).cell_hash
              for cell in planned.cells}
    state = PlanState(planned)
    looks = take_looks(planned, state, records_of(hashes, runs))
    ran = {hashes[cell_id] for name, order in planned.seeds_in_order().items()
           for _, cell_id in order[:state.cell_seeds()[name]]}
    return grid, {cell: value for cell, value in losses_of.items() if cell in ran}, [
        (entry["look"], entry["comparison"], entry["result"]["decision"], entry["result"]["delta"]) for entry in looks]


def decisions(runs: Path) -> list[tuple]:
    """A ledger's decisions: (look, comparison, decision, Δ) in the order they were written."""
    return [(entry["look"], entry["comparison"], entry["result"]["decision"], entry["result"]["delta"])
            for entry in read_ledger(ledger_path(runs, "kill"))]


def driver_commands(driver: str, base: Path, grid: Path, runs: Path) -> tuple[list[list[str]], Path]:
    flags = tiny_flags(runs, *RUN_FLAGS)
    journal = base / "chaos.journal"
    if driver == "optuna":
        return [[sys.executable, str(OPTUNA_DRIVER), "--grid", str(grid), "--study", "chaos", "--storage",
                 str(journal), "--workers", "2", "--", *flags]], base
    sweep = base / "sweep.yaml"  # as sweeps/make_sweeps.py writes a grid's sweep
    sweep.write_text(yaml.safe_dump({
        "name": "chaos", "program": "ablations/run.py", "method": "grid",
        "metric": {"name": "val/mIoU", "goal": "maximize"},
        "parameters": {"grid": {"value": str(grid)}, "cell": {"values": list(load_grid(str(grid), GRIDS).cells)}},
        "command": ["${env}", "${interpreter}", "${program}", "--resume", "--quiet", "${args}"]}, sort_keys=False))
    executor = [sys.executable, str(YAML_EXECUTOR), str(sweep), "--study", "chaos", "--storage", str(journal), "--",
                *flags]
    return [executor, executor], REPO  # two executors sharing the journal; W&B agents run from the repository


@pytest.mark.slow
@pytest.mark.parametrize("driver,planned", [("optuna", False), ("yaml", False), ("optuna", True)])
def test_killed_workers_runs_and_drivers_lose_no_cell_and_change_no_loss(tmp_path, request, driver, planned):
    grid, expected, expected_decisions = request.getfixturevalue("planned_reference" if planned else "reference")
    runs = tmp_path / "B"
    (tmp_path / "logs").mkdir()
    commands, cwd = driver_commands(driver, tmp_path, grid, runs)
    chaos = Chaos(commands, cwd, tmp_path / "logs", marker=f"{tmp_path}{os.sep}", runs_dir=runs)
    started = time.monotonic()
    try:
        for slot in range(len(commands)):
            chaos.start(slot)
        for index, target in enumerate(SCHEDULES[driver]):
            due = started + FIRST_KILL_S + index * KILL_EVERY_S
            while time.monotonic() < due:
                chaos.supervise()
                time.sleep(0.05)
            while (killed := chaos.kill(target, index)) is None and time.monotonic() < due + FIND_VICTIM_S:
                chaos.supervise()
                time.sleep(0.05)
            chaos.schedule.append(killed or f"- (no {target})")
            chaos.supervise()
        deadline = time.monotonic() + SETTLE_S
        while chaos.running() and time.monotonic() < deadline:
            time.sleep(0.2)
            chaos.supervise(late=True)
        while processes(chaos.marker) and time.monotonic() < deadline:  # orphaned workers of killed drivers
            time.sleep(0.2)
        settled = not chaos.running()
    finally:
        chaos.stop_everything()
    elapsed = time.monotonic() - started

    finals = [chaos.latest(slot) for slot in range(len(commands))]
    exits = {f"driver{run.slot}-{run.number}": "killed" if run.killed else run.process.returncode for run in chaos.runs}
    found = records(runs)
    by_cell: dict[str, list[str]] = {}
    for name, summary in found.items():
        by_cell.setdefault((summary or {}).get("cell_hash", f"no record: {name}"), []).append(name)
    complete = {cell for cell, names in by_cell.items() if cell in expected and len(names) == 1
                and found[names[0]]["status"] == "complete"}
    lost = sorted(expected[cell][0] for cell in expected if cell not in by_cell)
    incomplete = sorted(f"{expected[cell][0]} ({found[names[0]]['status']}: {found[names[0]].get('reason', '')})"
                        for cell, names in by_cell.items() if cell in expected and cell not in complete
                        and len(names) == 1)
    duplicated = sum(len(names) - 1 for names in by_cell.values()) + sum(cell not in expected for cell in by_cell)
    changed = sorted(expected[cell][0] for cell in complete if losses(runs / by_cell[cell][0]) != expected[cell][1])
    outputs = "\n".join(f"--- driver{run.slot}-{run.number} (exit {exits[f'driver{run.slot}-{run.number}']}):\n"
                        f"{run.tail()}" for run in finals)
    kills = sum(not entry.startswith("-") for entry in chaos.schedule)
    label = f"{driver}, planned" if planned else driver
    print(f"\nkill test [{label}]: {kills} kills, {chaos.restarts} restarts, {len(lost) + len(incomplete)} lost, "
          f"{duplicated} duplicated, {len(changed)} with other losses; {len(complete)}/{len(expected)} complete in "
          f"{elapsed:.0f}s; "
          f"exits {exits}; schedule {chaos.schedule}")

    assert settled, f"the drivers did not finish within {SETTLE_S}s of the schedule's end\n{outputs}"
    assert not lost and not incomplete, f"cells without a complete record: {lost + incomplete}; exits {exits}\n{outputs}"
    assert duplicated == 0, f"record folders: {by_cell}"
    assert not changed, f"cells whose training losses differ from the fault-free pass: {changed}"
    assert all(run.process.returncode == 0 for run in finals), f"exits {exits}\n{outputs}"
    for run in finals:  # a driver that says the grid is done must be right
        for claimed, cells in GRID_LINE.findall(run.log.read_text()):
            assert int(claimed) == len(complete) and int(cells) == 8, f"driver{run.slot}-{run.number}: {run.tail()}"
    if planned:  # each look decided once, as the fault-free pass decided it
        assert decisions(runs) == expected_decisions
