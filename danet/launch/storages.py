"""Optuna storages named the way Optuna's own tools name them, the same string in every command.

A database URL (`sqlite:///study.db`, `postgresql://user:pw@host/db`) or a journal file path
(`optuna/study.journal`, Optuna's JournalFileBackend): `optuna trials --storage PATH
--storage-class JournalFileBackend` and `optuna-dashboard PATH` read the same file. Importing this
module loads neither torch nor the models (the reports use it too). A trial whose worker's heartbeat
went stale on a database storage is proposed again (`danet.launch.trials.retry_dead_worker_trial`).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import optuna
import sqlalchemy

from danet.config import UsageError
from danet.launch.trials import retry_dead_worker_trial

JOURNAL_SUFFIX = ".journal"
FORMS = (f"a database URL (sqlite:///FILE.db, postgresql://USER:PASSWORD@HOST/DB) or a journal file path ending "
         f"in {JOURNAL_SUFFIX} (e.g. optuna/STUDY{JOURNAL_SUFFIX})")
SCHEMA_ATTEMPTS = 5


def default_storage(study: str) -> str:
    return f"optuna/{study}{JOURNAL_SUFFIX}"


def storage_kind(text: str) -> str:
    """"journal", "sqlite" or "database"; a usage error naming the accepted forms otherwise."""
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme.startswith("sqlite"):
            return "sqlite"
        if scheme.startswith(("postgresql", "mysql")):
            if scheme.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
                raise UsageError(f"--storage {text}: PostgreSQL needs the psycopg driver: "
                                 "pip install -e \".[postgres]\"")
            return "database"
    elif text.endswith(JOURNAL_SUFFIX) and ":" not in text:  # "journal:PATH" is no form of Optuna's
        return "journal"
    raise UsageError(f"--storage {text}: expected {FORMS}")


def open_storage(text: str, heartbeat: int | None = None,
                 failed_trial_callback=None) -> optuna.storages.BaseStorage:
    """The storage a string names. Database storages get heartbeats when `heartbeat` is given, so
    that trials of dead workers are failed (and handed to `failed_trial_callback`)."""
    kind = storage_kind(text)
    if kind == "journal":
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(text))
    options = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat,
               "failed_trial_callback": failed_trial_callback} if heartbeat else {}
    for attempt in range(SCHEMA_ATTEMPTS - 1):
        try:
            return optuna.storages.RDBStorage(text, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # workers that start together on a fresh database race to create Optuna's tables; the losers fail
            # on a duplicate key or, on PostgreSQL, a duplicate table, and find the tables there a moment later
            if isinstance(error, sqlalchemy.exc.ProgrammingError) and "already exists" not in str(error):
                raise
            time.sleep(1.0 + attempt)
    return optuna.storages.RDBStorage(text, **options)


def open_study_storage(text: str | None, study: str, workers: int, heartbeat: int) -> optuna.storages.BaseStorage:
    """The default journal file optuna/STUDY.journal (several workers on one host or NFS), a
    journal path, sqlite:/// for one process, postgresql:// across machines (with heartbeats, so
    that the trials of dead workers are retried)."""
    text = text or default_storage(study)
    if storage_kind(text) == "sqlite" and workers > 1:
        raise UsageError("SQLite is for one process: parallel workers hit 'database is locked'. Use the default "
                         "journal file (or --storage PATH.journal) on one host, or postgresql:// across hosts")
    return open_storage(text, heartbeat, retry_dead_worker_trial)
