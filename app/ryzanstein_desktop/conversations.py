"""Conversations kept across restarts: a local SQLite database of chats, their messages and settings.

An answer is written while it streams (state 'streaming'), so a crash of the app or the service loses at most
the last second of it; at the next start such answers are marked 'interrupted' and the chat says so.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'done',
    model TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""

# Message states: 'done' (complete), 'length' (hit max tokens), 'stopped' (by the user), 'streaming' (being
# written now), 'interrupted' (the app or service stopped while it streamed), 'failed' (the service refused).
FINISHED_STATES = {"done", "length", "stopped", "interrupted", "failed"}
TITLE_LENGTH = 60


@dataclass
class Message:
    id: int
    role: str
    content: str
    state: str = "done"
    model: str = ""


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    settings: dict
    updated: float
    messages: list[Message] = field(default_factory=list)

    def history(self) -> list[dict]:
        """What is sent to the model: user turns and the answers that exist (cut-off ones included as kept)."""
        return [{"role": m.role, "content": m.content} for m in self.messages
                if m.state != "failed" and (m.role != "assistant" or m.content)]


@dataclass(frozen=True)
class _Result:
    lastrowid: int | None
    rowcount: int


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


class ConversationStore:
    """Thread-safe; every write is its own transaction, so a crash never leaves half a write."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.set_aside: Path | None = None  # an unreadable database, kept under this name
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            # Not a database we can read (damaged, or another file under this name): keep it, start afresh.
            self.set_aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(self.set_aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            self._db = self._open()
        self.interrupted_at_open = self._mark_interrupted()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _write(self, sql: str, args: tuple = (), *more: tuple[str, tuple]) -> _Result:
        """Run one statement (and any `more` (sql, args) pairs) in one transaction; return the first cursor."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, args)
                first = (cursor.lastrowid, cursor.rowcount)
                for extra_sql, extra_args in more:
                    self._db.execute(extra_sql, extra_args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return _Result(*first)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _mark_interrupted(self) -> int:
        """Answers still 'streaming' were cut off by a crash: say so instead of pretending they are complete."""
        return self._write("UPDATE messages SET state = 'interrupted' WHERE state = 'streaming'").rowcount

    # -- conversations -------------------------------------------------------------------------------------
    def create(self, title: str = "New chat", model: str = "", settings: dict | None = None) -> int:
        now = time.time()
        cursor = self._write("INSERT INTO conversations (title, model, settings, created, updated) "
                             "VALUES (?, ?, ?, ?, ?)", (title, model, json.dumps(settings or {}), now, now))
        return int(cursor.lastrowid or 0)

    def list(self) -> list[Conversation]:
        rows = self._read("SELECT id, title, model, settings, updated FROM conversations ORDER BY updated DESC")
        return [Conversation(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def get(self, conversation_id: int) -> Conversation:
        rows = self._read("SELECT id, title, model, settings, updated FROM conversations WHERE id = ?",
                          (conversation_id,))
        if not rows:
            raise KeyError(f"no conversation {conversation_id}")
        r = rows[0]
        messages = [Message(*m) for m in self._read(
            "SELECT id, role, content, state, model FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,))]
        return Conversation(r[0], r[1], r[2], json.loads(r[3]), r[4], messages)

    def rename(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise ValueError("A conversation needs a title.")
        self._write("UPDATE conversations SET title = ? WHERE id = ?", (title[:200], conversation_id))

    def delete(self, conversation_id: int) -> None:
        self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def save_settings(self, conversation_id: int, model: str, settings: dict) -> None:
        self._write("UPDATE conversations SET model = ?, settings = ? WHERE id = ?",
                    (model, json.dumps(settings), conversation_id))

    # -- messages --------------------------------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, state: str = "done", model: str = "") -> int:
        now = time.time()
        cursor = self._write(
            "INSERT INTO messages (conversation_id, role, content, state, model, created) VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, state, model, now),
            ("UPDATE conversations SET updated = ?, title = CASE WHEN title = 'New chat' AND ? = 'user' THEN ? "
             "ELSE title END WHERE id = ?", (now, role, title_from(content), conversation_id)))
        return int(cursor.lastrowid or 0)

    def update_message(self, message_id: int, content: str, state: str) -> None:
        self._write("UPDATE messages SET content = ?, state = ? WHERE id = ?", (content, state, message_id))

    def delete_message(self, message_id: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- export ----------------------------------------------------------------------------------------------------
STATE_NOTES = {"length": "(hit the max tokens limit)", "stopped": "(stopped by you)",
               "interrupted": "(cut off: the app or the service stopped while this answer was written)",
               "failed": "(failed)"}


def to_markdown(conversation: Conversation) -> str:
    parts = [f"# {conversation.title}", ""]
    if conversation.model:
        parts += [f"Model: `{conversation.model}`", ""]
    for m in conversation.messages:
        who = "You" if m.role == "user" else (m.model or conversation.model or m.role)
        parts += [f"## {who}", "", m.content]
        if m.state in STATE_NOTES:
            parts += ["", f"_{STATE_NOTES[m.state]}_"]
        parts.append("")
    return "\n".join(parts)


def to_json(conversation: Conversation) -> str:
    return json.dumps({"title": conversation.title, "model": conversation.model, "settings": conversation.settings,
                       "messages": [{"role": m.role, "content": m.content, "state": m.state,
                                     **({"model": m.model} if m.model else {})} for m in conversation.messages]},
                      indent=2, ensure_ascii=False)
