"""A grid's sequential plan in action: its looks, decided once from the records and kept in a ledger.

The ledger is `<grid>.ledger.jsonl` in the runs folder, one line per comparison per look, appended
and never rewritten: the look, its seeds, the decision (danet.plans.decide_look), Δ, the exact
p-values, the boundary used, and the records the look used (run id and a SHA-256 of each summary).
Every launcher (the Optuna driver, the W&B-YAML executor, the Slurm look job, ablations/run.py)
calls `advance`, which under a file lock replays the ledger, checks that every record a decision
used is still there unchanged (else LedgerError names it: no silent re-decision), and decides each
look whose records are complete, once. Seeds run in rounds: round r is the seeds after look r-1 up
to look r (seed ids in order) of the cells still running; a cell stops when every comparison it
belongs to has stopped, and a cell in no comparison runs all of its seeds in the first round.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from danet.grids import Grid
from danet.plans import CONTINUE, LookDecision, decide_look
from danet.tracking import complete_runs

LEDGER_SUFFIX = ".ledger.jsonl"


class LedgerError(RuntimeError):
    """The ledger and the records disagree (a used record is gone or changed, the plan was edited)."""


@dataclass(frozen=True)
class SeedRecord:
    """The complete record of one seed of a cell, as a look uses it."""

    value: float  # the summary's final_miou, in %
    run_id: str
    summary_sha256: str = ""  # "" where the record has no summary file (W&B exports)


def summary_sha256(summary_path: Path) -> str:
    return hashlib.sha256(summary_path.read_bytes()).hexdigest()


def seed_record(run_dir: Path) -> SeedRecord:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    return SeedRecord(100.0 * float(summary["final_miou"]), str(summary["run_id"]), summary_sha256(path))


def ledger_path(runs_dir: str | Path, grid_name: str) -> Path:
    return Path(runs_dir) / f"{grid_name}{LEDGER_SUFFIX}"


@dataclass
class PlanState:
    """Where a planned grid stands: the looks taken and each comparison's latest decision."""

    grid: Grid
    looks_taken: int = 0
    decisions: dict[str, LookDecision] = field(default_factory=dict)  # comparison -> its latest look

    def stopped(self, comparison: str) -> bool:
        decision = self.decisions.get(comparison)
        return decision is not None and decision.decision != CONTINUE

    def comparisons_of(self, cell: str) -> list[str]:
        return [c["name"] for c in self.grid.comparisons if cell in (c["treatment"], c["baseline"])]

    def stopped_cells(self) -> dict[str, int]:
        """Named cells every comparison of which has stopped, with the seeds they stopped at."""
        stopped = {}
        for cell in self.grid.seeds_in_order():
            names = self.comparisons_of(cell)
            if names and all(self.stopped(name) for name in names):
                stopped[cell] = max(self.decisions[name].n for name in names)
        return stopped

    def next_look(self) -> int | None:
        """The index of the next look, or None when the plan is done (every look taken, or all stopped)."""
        live = [c["name"] for c in self.grid.comparisons if not self.stopped(c["name"])]
        return self.looks_taken if live and self.looks_taken < len(self.grid.plan.looks) else None

    def round_cells(self) -> list[str]:
        """The cell ids of the round before the next look: the seeds after the previous look up to it, of every
        named cell still running; a cell in no comparison runs all of its seeds in the first round. Empty once
        the plan is done."""
        index = self.next_look()
        if index is None:
            return []
        looks, stopped = self.grid.plan.looks, self.stopped_cells()
        start = looks[index - 1] if index else 0
        cells = []
        for name, seeds in self.grid.seeds_in_order().items():
            if not self.comparisons_of(name):
                cells += [cell_id for _, cell_id in seeds] if index == 0 else []
            elif name not in stopped:
                cells += [cell_id for _, cell_id in seeds[start:looks[index]]]
        return cells

    def cell_seeds(self) -> dict[str, int]:
        """The seeds each named cell has run under the plan so far: up to the look that stopped it, else up to
        the last look taken (all of its seeds for a cell in no comparison, or once the plan is done)."""
        looks, stopped = self.grid.plan.looks, self.stopped_cells()
        done = self.next_look() is None
        seeds = {}
        for name, order in self.grid.seeds_in_order().items():
            if name in stopped:
                seeds[name] = stopped[name]
            elif done or not self.comparisons_of(name):
                seeds[name] = len(order)
            else:
                seeds[name] = looks[self.looks_taken - 1] if self.looks_taken else 0
        return seeds

    def stopped_cell_ids(self) -> dict[str, str]:
        """Cell id -> why it will not run: the seeds of a stopped cell beyond the look that stopped it."""
        why = {}
        for name, n in self.stopped_cells().items():
            reasons = "; ".join(f"{c}: {self.decisions[c].decision} at {self.decisions[c].n} seeds"
                                for c in self.comparisons_of(name))
            for _, cell_id in self.grid.seeds_in_order()[name][n:]:
                why[cell_id] = f"cell {name} stopped by the plan of grid {self.grid.name} ({reasons})"
        return why


def standing_lines(state: PlanState, runs_dir: Path) -> list[str]:
    """Where a planned grid stands: the looks taken, each comparison's latest decision, the cells stopped."""
    grid, looks = state.grid, state.grid.plan.looks
    index = state.next_look()
    where = f"next: look {index + 1} at {looks[index]} seeds" if index is not None else "the plan is done"
    lines = [f"grid {grid.name}: {state.looks_taken} of {len(looks)} looks taken ({where}); ledger "
             f"{ledger_path(runs_dir, grid.name)}"]
    for comparison in grid.comparisons:
        decision = state.decisions.get(comparison["name"])
        if decision is None:
            lines.append(f"  {comparison['name']}: no look yet")
            continue
        final = "final" if state.stopped(comparison["name"]) else "going on"
        lines.append(f"  {comparison['name']}: {decision.decision} at {decision.n} seeds ({final}; "
                     f"delta {decision.delta:+.2f} mIoU points, p better {decision.p_better:.3g}, p worse "
                     f"{decision.p_worse:.3g}, p equivalent {decision.p_equivalent:.3g}, level {decision.level:.3g})")
    order = grid.seeds_in_order()
    for cell, seeds in state.stopped_cells().items():
        if seeds < len(order[cell]):
            lines.append(f"  cell {cell}: stopped after {seeds} of its {len(order[cell])} seeds (every comparison "
                         "of it stopped)")
    return lines


def plan_fingerprint(grid: Grid) -> dict:
    return {**dataclasses.asdict(grid.plan), "looks": list(grid.plan.looks),
            "comparisons": [dict(c) for c in grid.comparisons]}


def read_ledger(path: Path) -> list[dict]:
    """The ledger's entries; a last line without its newline (a writer killed mid-line) is not an entry."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def append_entries(path: Path, entries: list[dict]) -> None:
    """Append whole lines, dropping the torn tail a killed writer may have left (under the caller's lock)."""
    with open(path, "ab+") as ledger:
        ledger.seek(0)
        text = ledger.read()
        ledger.truncate(text.rfind(b"\n") + 1)
        ledger.flush()
        # one write call: a process killed while writing leaves at most a torn tail, never a torn middle
        os.write(ledger.fileno(), "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries).encode())
        os.fsync(ledger.fileno())


def replay(grid: Grid, entries: Iterable[dict]) -> PlanState:
    """The state the ledger's entries leave (entries of other plans are refused). A look is taken when its
    entries cover every comparison still running before it: a look a killed writer left half written is
    decided again, from the same records, to the same decisions."""
    state = PlanState(grid)
    fingerprint = plan_fingerprint(grid)
    by_look: dict[int, list[dict]] = {}
    for entry in entries:
        if entry["plan"] != fingerprint:
            raise LedgerError(f"the ledger of grid {grid.name} was written under another plan ({entry['plan']}), "
                              f"the grid file now has {fingerprint}: a plan is fixed before its first look; "
                              "start a new runs folder to run another plan")
        by_look.setdefault(entry["look"], []).append(entry)
    for look in sorted(by_look):
        decided = {entry["comparison"]: LookDecision(**entry["result"]) for entry in by_look[look]}
        live = {c["name"] for c in grid.comparisons if not state.stopped(c["name"])}
        if look != state.looks_taken or not live <= set(decided):
            break
        state.decisions.update({name: decided[name] for name in live})
        state.looks_taken = look + 1
    return state


def verify(entries: Iterable[dict], runs_dir: Path) -> None:
    """Every record a decision used is still in runs_dir, unchanged."""
    for entry in entries:
        for cell_id, used in entry["records"].items():
            summary = runs_dir / used["run_id"] / "summary.json"
            if not summary.is_file():
                raise LedgerError(f"{summary}: the record of {cell_id} that look {entry['look'] + 1} of grid "
                                  f"{entry['grid']} used ({entry['comparison']}: {entry['result']['decision']}) is "
                                  "gone; restore it (a decision is never taken again)")
            if used["summary_sha256"] and summary_sha256(summary) != used["summary_sha256"]:
                raise LedgerError(f"{summary}: the record of {cell_id} changed after look {entry['look'] + 1} of grid "
                                  f"{entry['grid']} used it ({entry['comparison']}); restore it (a decision is never "
                                  "taken again)")


def paired_differences(grid: Grid, comparison: dict, records: dict[str, SeedRecord], n: int
                       ) -> tuple[np.ndarray, dict[str, SeedRecord]] | None:
    """The first n seeds' differences treatment - baseline and the records used, or None while one is missing."""
    order = grid.seeds_in_order()
    used = {cell_id: records.get(cell_id)
            for name in (comparison["treatment"], comparison["baseline"]) for _, cell_id in order[name][:n]}
    if any(record is None for record in used.values()):
        return None
    treatment = [records[cell_id].value for _, cell_id in order[comparison["treatment"]][:n]]
    baseline = [records[cell_id].value for _, cell_id in order[comparison["baseline"]][:n]]
    return np.subtract(treatment, baseline), used


def take_looks(grid: Grid, state: PlanState, records: dict[str, SeedRecord]) -> list[dict]:
    """Decide every look whose records are complete; the new ledger entries (state is updated)."""
    new = []
    while (index := state.next_look()) is not None:
        n = grid.plan.looks[index]
        live = [c for c in grid.comparisons if not state.stopped(c["name"])]
        paired = {c["name"]: paired_differences(grid, c, records, n) for c in live}
        if any(found is None for found in paired.values()):
            break
        decided = decide_look(grid.plan, index, {name: d for name, (d, _) in paired.items()}, len(grid.comparisons))
        for comparison in live:
            name = comparison["name"]
            new.append({"grid": grid.name, "look": index, "n": n, "comparison": name,
                        "result": dataclasses.asdict(decided[name]), "plan": plan_fingerprint(grid),
                        "records": {cell_id: {"run_id": record.run_id, "summary_sha256": record.summary_sha256}
                                    for cell_id, record in paired[name][1].items()},
                        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            state.decisions[name] = decided[name]
        state.looks_taken = index + 1
    return new


def replay_plan(grid: Grid, records: dict[str, SeedRecord]) -> PlanState:
    """The grid's plan run over finished records in seed order, as a driver would have run it; reads only
    (no ledger is written). `records`: cell id -> its record."""
    state = PlanState(grid)
    take_looks(grid, state, records)
    return state


def records_of(cell_hashes: dict[str, str], runs_dir: Path) -> dict[str, SeedRecord]:
    """The complete record of each cell id (by its cell hash under this launcher's run flags)."""
    complete = complete_runs(runs_dir)
    return {cell_id: seed_record(complete[cell_hash]) for cell_id, cell_hash in cell_hashes.items()
            if cell_hash in complete}


def advance(grid: Grid, runs_dir: Path, cell_hashes: dict[str, str], write: bool = True) -> PlanState:
    """Replay the ledger, check its records, decide the looks that are ready (each once, under a lock
    on the ledger, so that concurrent launchers agree) and return where the plan stands. `write=False`
    (a dry run) decides them without writing anything."""
    path = ledger_path(runs_dir, grid.name)
    if not write:
        return _advance(grid, runs_dir, cell_hashes, path, write)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        return _advance(grid, runs_dir, cell_hashes, path, write)


def _advance(grid: Grid, runs_dir: Path, cell_hashes: dict[str, str], path: Path, write: bool) -> PlanState:
    entries = read_ledger(path)
    state = replay(grid, entries)
    verify(entries, runs_dir)
    new = take_looks(grid, state, records_of(cell_hashes, runs_dir))
    if new and write:
        append_entries(path, new)
    return state
