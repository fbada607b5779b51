"""The server's task pool: which tasks exist, which are resident on the serving device, and the
host-memory cache of tasks read and checked but not resident.

Residency follows an LRU under a byte budget (``budget_bytes``, counted with
``MultiTaskModel.task_bytes``); pinned tasks are never evicted. Only the model thread (engine.py)
changes residency, between batches, so a task that a batch in flight uses is never evicted. The
registry itself (names, files, pins) may be read and changed from any thread (a lock guards it).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .errors import Conflict, UnknownTask

MB = 1 << 20


@dataclass
class TaskEntry:
    """One task the server knows: its file, pin, and (once read) its size and class names."""

    name: str
    path: Optional[str]
    pinned: bool = False
    resident: bool = False
    nbytes: Optional[int] = None  # known once the file has been read and checked
    labels: Optional[List[str]] = None
    last_used: int = 0  # the model thread's batch counter when a batch last used the task
    removing: bool = False  # DELETE in progress: the name stays taken until the model drops it
    loads: int = 0
    error: Optional[str] = field(default=None)  # the last load's failure, if any

    def info(self) -> Dict:
        return {"name": self.name, "resident": self.resident, "pinned": self.pinned, "bytes": self.nbytes,
                "path": self.path, "labels": self.labels is not None, "loads": self.loads, "error": self.error}


class HostCache:
    """Checked tasks (MultiTaskModel.prepare_task's result) kept in host memory, LRU under
    ``capacity_bytes``: reloading an evicted task then costs a copy, not a file read and check."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: "OrderedDict[str, object]" = OrderedDict()
        self._bytes: Dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def get(self, name: str):
        with self._lock:
            item = self._items.get(name)
            if item is not None:
                self._items.move_to_end(name)
            return item

    def put(self, name: str, prepared, nbytes: int) -> None:
        with self._lock:
            self._items.pop(name, None)
            self._bytes.pop(name, None)
            if nbytes > self.capacity_bytes:
                return
            self._items[name], self._bytes[name] = prepared, nbytes
            while sum(self._bytes.values()) > self.capacity_bytes:
                old, _ = self._items.popitem(last=False)
                del self._bytes[old]

    def drop(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)
            self._bytes.pop(name, None)


class TaskPool:
    """The registry of tasks and the residency bookkeeping (see the module docstring)."""

    def __init__(self, budget_bytes: Optional[int] = None, host_cache_bytes: int = 1024 * MB) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"TaskPool: the task budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = budget_bytes  # None: no limit
        self.host = HostCache(host_cache_bytes)
        self._entries: Dict[str, TaskEntry] = {}
        self._lock = threading.RLock()

    # -- the registry (any thread)
    def register(self, name: str, path: Optional[str], pinned: bool = False) -> TaskEntry:
        with self._lock:
            if name in self._entries:
                raise Conflict(f"a task named {name!r} exists already (DELETE /v1/tasks/{name} first)")
            entry = self._entries[name] = TaskEntry(name, os.fspath(path) if path is not None else None, pinned)
            return entry

    def unregister(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
        self.host.drop(name)

    def get(self, name: str) -> TaskEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or entry.removing:
            raise UnknownTask(f"unknown task {name!r}: GET /v1/tasks lists the tasks this server has")
        return entry

    def lookup(self, name: str) -> TaskEntry:
        """The entry, also while its removal is in progress (the model thread's view)."""
        with self._lock:
            return self._entries[name]

    def has(self, name: str) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.removing

    def names(self) -> List[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if not e.removing]

    def entries(self) -> List[TaskEntry]:
        with self._lock:
            return [e for e in self._entries.values() if not e.removing]

    # -- residency (the model thread)
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes or 0 for e in self._entries.values() if e.resident)

    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes or 0 for e in self._entries.values() if e.pinned and e.nbytes)

    def fits(self, nbytes: int) -> bool:
        return self.budget_bytes is None or self.resident_bytes() + nbytes <= self.budget_bytes

    def victims(self, nbytes: int, busy: set) -> Optional[List[str]]:
        """The resident tasks to evict so that ``nbytes`` more fit, least recently used first,
        tasks in ``busy`` (requests waiting to run) only when the others do not free enough;
        None if even evicting every unpinned task would not."""
        if self.budget_bytes is None:
            return []
        with self._lock:
            free = self.budget_bytes - sum(e.nbytes or 0 for e in self._entries.values() if e.resident)
            if free >= nbytes:
                return []
            cand = sorted((e for e in self._entries.values() if e.resident and not e.pinned),
                          key=lambda e: (e.name in busy, e.last_used))
            out = []
            for e in cand:
                out.append(e.name)
                free += e.nbytes or 0
                if free >= nbytes:
                    return out
            return None
