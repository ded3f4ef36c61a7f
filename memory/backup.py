"""Backup and restore of a whole store: every version of every edit with its ids and times, the embeddings
(optionally), and the weight records (models, records, links, bases).

``editmem export --history`` writes edits for people and other tools; an import of it assigns new ids and merges edits
with equal content. A dump instead restores the store as it was: :func:`dump` writes one JSON object per line, a
header and then the rows of each table in primary-key order, so that dumping a restored store gives the same file
byte for byte (the dump holds no time of its own; the store's random uid and change counter are left out, since a
restored store is a new store). :func:`restore` writes a dump into an empty store in one transaction.

Rows are written column by column from the tables in :mod:`memory.schema` (binary columns as base64, times as ISO
8601 in UTC), so a table or column added to the schema is dumped without changes here. The change log is not dumped:
a restore logs every restored current version as added, which is how other processes' indexes learn of them.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, DateTime, LargeBinary, Table, func, insert, select, text, update

from memory import schema
from memory.errors import FormatError, StoreError, ValidationError
from memory.schema import CURRENT, aware, changes, chunks, edits, embeddings, meta

if TYPE_CHECKING:
    from memory.store import EditMemory

FORMAT = "editmem-dump"
FORMAT_VERSION = 1
_META_KEPT = ("next_edit_id", "next_row_id", "created_at", "schema_version")
_SKIPPED = (meta.name, changes.name)  # meta goes in the header; the change log is rebuilt by restore


def _tables(include_embeddings: bool) -> list[Table]:
    return [t for t in schema.metadata.sorted_tables
            if t.name not in _SKIPPED and (include_embeddings or t.name != embeddings.name)]


def _encode(column: Column, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(column.type, DateTime):
        when = aware(value)
        return None if when is None else when.isoformat()
    return value


def _decode(column: Column, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64decode(value)
    if isinstance(column.type, DateTime):
        return datetime.fromisoformat(value)
    return value


def _line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"


def _ordered(table: Table) -> list[Column]:
    return list(table.primary_key.columns) or list(table.columns)


def dump(mem: EditMemory, path: str | os.PathLike[str], *, include_embeddings: bool = True) -> int:
    """Write the whole store to ``path`` (atomically: a temporary file, then a rename); returns the rows written."""
    target = Path(path)
    if target.is_dir():
        raise FormatError(str(path), "is a directory; give a file name")
    if not target.parent.is_dir():
        raise FormatError(str(path), "the directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f, mem._read() as conn:
            m = conn.execute(select(meta).where(meta.c.id == 1)).one()._mapping
            header = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": m["encoder"],
                      "embeddings": include_embeddings,
                      "meta": {k: _encode(meta.c[k], m[k]) for k in _META_KEPT}}
            f.write(_line(header))
            for table in _tables(include_embeddings):
                cols = list(table.columns)
                for row in conn.execute(select(table).order_by(*_ordered(table))):
                    values = row._mapping
                    f.write(_line({"table": table.name, "row": {c.name: _encode(c, values[c.name]) for c in cols}}))
                    count += 1
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise FormatError(str(path), f"cannot write file: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a dump file (format, encoder, meta); FormatError if it is not one."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError as err:
        raise FormatError(str(path), f"cannot read file: {err.strerror or err}") from None
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FormatError(str(path), f"not an editmem dump (its first line is not a {FORMAT} header)", line=1)
    if header.get("format_version") != FORMAT_VERSION:
        raise FormatError(str(path), f"dump format version {header.get('format_version')!r}; this editmem reads "
                                     f"{FORMAT_VERSION}", line=1)
    if not isinstance(header.get("encoder"), str) or not isinstance(header.get("meta"), dict):
        raise FormatError(str(path), "the header lacks the encoder or meta", line=1)
    return header


def _rows(path: str | os.PathLike[str], tables: Mapping[str, Table]) -> Iterator[tuple[Table, dict[str, Any]]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if number == 1 or not line.strip():
                continue
            try:
                item = json.loads(line)
                table = tables[item["table"]]
                raw = item["row"]
                # a nullable column added after the dump was made (weight records' editor_state) reads as NULL
                row = {c.name: _decode(c, raw.get(c.name) if c.nullable else raw[c.name]) for c in table.columns}
                for value in row.values():
                    if isinstance(value, str):
                        value.encode("utf-8")  # a stray byte in the file: UnicodeEncodeError, a ValueError
            except (ValueError, KeyError, TypeError) as err:
                raise FormatError(str(path), f"not a dump row: {type(err).__name__}: {err}", line=number) from None
            yield table, row


def check_empty(mem: EditMemory) -> None:
    """StoreError unless ``mem`` holds no edits and no weight records (what :func:`restore` needs)."""
    with mem._read() as conn:
        _check_empty(mem, conn)


def _check_empty(mem: EditMemory, conn: Any) -> None:
    for table in (edits, *schema.WEIGHT_TABLES):
        n = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        if n:
            raise StoreError(f"restore needs an empty store; {mem.url} has {n} rows in {table.name} "
                             "(restore into a new store)")


def restore(mem: EditMemory, path: str | os.PathLike[str]) -> int:
    """Write the dump at ``path`` into ``mem``, which must be empty and opened with the dump's encoder; returns the
    rows written. All or nothing: one transaction. The index is rebuilt afterwards (computing embeddings a dump
    without them lacks)."""
    header = read_header(path)
    if mem.encoder.name != header["encoder"]:
        raise ValidationError(f"the dump was made with encoder {header['encoder']!r}; open the store with that "
                              f"encoder (editmem restore does) rather than {mem.encoder.name!r}")
    check_empty(mem)
    tables = {t.name: t for t in _tables(True)}
    batches: dict[str, list[dict[str, Any]]] = {}
    for table, row in _rows(path, tables):
        batches.setdefault(table.name, []).append(row)
    stored = {k: _decode(meta.c[k], v) for k, v in header["meta"].items() if k in _META_KEPT and k != "schema_version"}
    with mem._write() as tx:
        _check_empty(mem, tx.conn)  # again, under the write lock
        for table in _tables(True):
            for part in chunks(batches.get(table.name, [])):
                tx.conn.execute(insert(table), list(part))
        if stored:
            tx.conn.execute(update(meta).where(meta.c.id == 1).values(**stored))
        live = [int(r) for r in tx.conn.execute(select(edits.c.row_id).where(CURRENT).order_by(edits.c.row_id))
                .scalars()]
        for part in chunks(live):
            tx.conn.execute(insert(changes), [{"seq": tx.seq, "row_id": r, "op": schema.OP_ADD} for r in part])
        if tx.conn.dialect.name == "postgresql":
            _advance_sequences(tx.conn)
    mem.rebuild_index()
    return sum(len(rows) for rows in batches.values())


def _advance_sequences(conn: Any) -> None:
    """PostgreSQL: move the sequences of autoincrement keys past the restored ids."""
    for table in schema.metadata.sorted_tables:
        for col in table.primary_key.columns:
            if col.autoincrement is True:
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{col.name}'), "
                                  f"COALESCE(MAX({col.name}), 1), MAX({col.name}) IS NOT NULL) FROM {table.name}"))
