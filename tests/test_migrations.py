"""Schema migrations (memory/migrate.py): a store made by editmem before namespaces and Alembic (the committed fixture
tests/fixtures/old_store_v1.sqlite, made by tests/fixtures/make_old_store.py at commit bf5447c) opens and is migrated
in place; a store at a revision newer than the code knows is refused."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from memory import EditMemory, NotFoundError, StoreError
from memory.migrate import alembic_config, known_revisions

FIXTURE = Path(__file__).parent / "fixtures" / "old_store_v1.sqlite"


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    return path


def _revision(path: Path) -> str | None:
    with sqlite3.connect(path) as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "alembic_version" not in names:
            return None
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_fixture_is_a_pre_alembic_store() -> None:
    assert _revision(FIXTURE) is None
    with sqlite3.connect(FIXTURE) as con:
        cols = {r[1] for r in con.execute("PRAGMA table_info(editmem_edits)")}
        assert "namespace" not in cols
        assert con.execute("SELECT schema_version FROM editmem_meta").fetchone()[0] == 1


def test_old_store_is_migrated_in_place(old_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, head = known_revisions()
    with caplog.at_level(logging.WARNING, logger="memory.migrate"):
        mem = EditMemory.open(f"sqlite:///{old_store}")
    try:
        assert any("migrating store" in r.getMessage() and "0001" in r.getMessage() for r in caplog.records)
        assert mem.namespace == "default" and mem.encoder.name == "hashing-64"
        assert _revision(old_store) == head
        assert [r.id for r in mem.list()] == [1, 2, 4, 5]
        assert [r.id for r in mem.list(include_deleted=True)] == [1, 2, 3, 4, 5]
        assert [(v.version, v.target_new, v.prompt) for v in mem.history(2)] == [
            (1, "Rome", "The Eiffel Tower is in"), (2, "Berlin", "The Eiffel Tower is in"),
            (3, "Berlin", "The Eiffel Tower stands in")]
        assert [v.deleted for v in mem.history(3)] == [False, True]
        assert [v.target_new for v in mem.history(4)] == ["French", "German", "French"]
        five = mem.get(5)
        assert five.rephrases == ("Which river is longest?",) and five.metadata == {"case_id": 7, "source": "fixture"}
        assert mem.get(1).ground_truth == "Paris"
        assert mem.search("The capital of France is", k=1)[0].edit.id == 1
        mem.verify()
        assert {n for n, in mem._engine.connect().exec_driver_sql(
            "SELECT DISTINCT namespace FROM editmem_edits")} == {"default"}
        added = mem.add("A new fact is", "here")
        assert added.id == 6  # id allocation continues where the old store left off
        assert mem.namespaces() == ["default"]
    finally:
        mem.close()
    with EditMemory.open(f"sqlite:///{old_store}", namespace="other") as other:
        assert len(other) == 0
        with pytest.raises(NotFoundError):
            other.get(1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memory.migrate"), EditMemory.open(f"sqlite:///{old_store}") as again:
        assert len(again) == 5
    assert not [r for r in caplog.records if "migrating" in r.getMessage()]  # once only


def test_failed_migration_leaves_the_store_untouched(old_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alembic import command

    import memory.migrate as migrate

    real_upgrade = command.upgrade

    def broken(cfg, rev):  # the upgrade runs (adds the columns) and then something fails before commit
        real_upgrade(cfg, rev)
        raise RuntimeError("boom")

    monkeypatch.setattr("alembic.command.upgrade", broken)
    with pytest.raises(RuntimeError, match="boom"):
        EditMemory.open(f"sqlite:///{old_store}")
    assert _revision(old_store) is None
    with sqlite3.connect(old_store) as con:
        assert "namespace" not in {r[1] for r in con.execute("PRAGMA table_info(editmem_edits)")}
    monkeypatch.undo()
    assert migrate.BASELINE == "0001"
    with EditMemory.open(f"sqlite:///{old_store}") as mem:
        assert len(mem) == 4


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    EditMemory.open(f"sqlite:///{path}", encoder="hashing-64").close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(StoreError, match=r"does not know.*upgrade editmem"):
        EditMemory.open(f"sqlite:///{path}")


def test_new_store_is_stamped_and_matches_the_migrations(tmp_path: Path) -> None:
    """A store created with create_all and one built by running every migration on an empty database have the same
    tables, columns and indexes."""
    from alembic import command

    _, head = known_revisions()
    created = tmp_path / "created.db"
    EditMemory.open(f"sqlite:///{created}", encoder="hashing-64").close()
    assert _revision(created) == head
    migrated = tmp_path / "migrated.db"
    engine = create_engine(f"sqlite:///{migrated}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")

    def shape(path: Path) -> dict:
        insp = inspect(create_engine(f"sqlite:///{path}"))
        return {t: ({c["name"]: (str(c["type"]), c["nullable"]) for c in insp.get_columns(t)},
                    sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(t)))
                for t in insp.get_table_names()}

    assert shape(created) == shape(migrated)


def test_a_store_at_0002_gets_the_weight_records_editor_state(tmp_path: Path) -> None:
    """Revision 0003 adds ``editor_state`` to the weight records of a store at 0002 (one made by this code, taken
    down to 0002), and a weight record written before it reads back with no editor state."""
    from alembic import command

    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    with EditMemory.open(url, encoder="hashing-64") as mem:
        edit = mem.add("The capital of Peru is", "Lima_x")
        model = mem.add_weight_model("fingerprint", "tiny")
        record = mem.attach_weights(model.id, "memit", [(edit.id, 1)], ["w"], b"deltas", bases={"w": b"base"})
    engine = create_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert _revision(path) == "0002"
    assert "editor_state" not in {c["name"] for c in inspect(engine).get_columns("editmem_weight_records")}
    engine.dispose()
    with EditMemory.open(url) as mem:
        assert _revision(path) == known_revisions()[1]
        assert mem.weight_editor_state(record.id) is None and mem.weight_deltas(record.id) == b"deltas"
