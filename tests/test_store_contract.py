"""The store contract (``selfupgrade.server.stores.base``), run on every store: memory,
SQLite and a real redis-server. A new store passes this file before it is used.

A store keeps state and commits guarded writes; it knows no rollout rule. The last two tests
drive the real rulebook through the control plane from many threads and check, from the
store itself, that the slot limit is never exceeded.
"""

from __future__ import annotations

import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from selfupgrade import UpgradeState as S
from selfupgrade.server import (
    Commit,
    ControlPlane,
    Guard,
    HostProgress,
    HostState,
    HostWrite,
    Outcome,
    PlaneConfig,
    Status,
    Store,
    open_store,
)
from selfupgrade.server.tasks import HostSeen

from .conftest import make_store
from .server_helpers import beat, send, task

NOW = 1000.0


def published(store: Store, limit: int = 2, **members: int) -> str:
    t = task(limit=limit)
    store.publish(t, members or {"a": 0, "b": 0, "c": 0}, {"done": 0, "w0:members": 3})
    return t.id


def admit(host: str, rev: int = 0, until: float = NOW + 30, limit: int = 2) -> Commit:
    p = HostProgress(host, HostState.ADMITTED, lease_until=until, admitted_at=NOW)
    return Commit("t1", NOW, (HostWrite(p, rev, until, takes_slot=True),), slot_limit=limit)


def state_of(store: Store) -> tuple[object, ...]:
    r = store.rollout("t1", NOW)
    progress = sorted((p.host, p.state, p.rev) for p in store.all_progress("t1"))
    return (r.fields(), dict(r.counters), r.in_flight, progress, store.members("t1"))


def hammer(sample, work, threads: int = 16) -> int:  # type: ignore[no-untyped-def]
    """Run ``work(seed)`` on ``threads`` threads while ``sample()`` is called in a loop on
    another; the largest value ``sample`` returned."""
    stop = threading.Event()
    peak = 0

    def sampler() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sample())

    watcher = threading.Thread(target=sampler)
    watcher.start()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    return peak


def test_a_published_rollout_reads_back(store: Store) -> None:
    t = task(limit=2)
    store.publish(t, {"a": 0, "b": 1}, {"done": 0, "w0:members": 1, "w1:members": 1})
    assert store.active_id() == "t1"
    assert store.task("t1") == t and store.tasks() == [t]
    r = store.rollout("t1", NOW)
    assert (r.status, r.wave, r.wave_done_at, r.in_flight) == (Status.ACTIVE, 0, None, 0)
    assert [w.members for w in r.waves] == [1, 1]
    assert store.members("t1") == {"a": 0, "b": 1}
    reads = store.read("t1", ["b", "x", "a"])
    assert [(r.host, r.progress, r.wave) for r in reads] == [
        ("b", None, 1),
        ("x", None, None),
        ("a", None, 0),
    ]
    assert store.rollout("nope", NOW).status == Status.CANCELLED
    assert store.task("nope") is None


def test_a_commit_writes_everything_and_bumps_the_revision(store: Store) -> None:
    published(store)
    c = Commit(
        "t1",
        NOW,
        admit("a").writes,
        Guard(statuses=frozenset({Status.ACTIVE}), fields={"wave": 0}, counters={"done": 0}),
        slot_limit=2,
        add={"done": 2, "new": 5},
        set={"wave_done_at": 12.5, "halt_reason": "x"},
        join={"z": 0},
    )
    assert store.commit([c]) == [Outcome.OK]
    (a,) = store.read("t1", ["a"])
    assert a.progress is not None and a.progress.rev == 1 and a.progress.state == "admitted"
    r = store.rollout("t1", NOW)
    assert (r.counters["done"], r.counters["new"], r.wave_done_at, r.halt_reason) == (
        2,
        5,
        12.5,
        "x",
    )
    assert r.in_flight == 1
    assert store.members("t1")["z"] == 0
    # the next write must name revision 1
    done = HostWrite(HostProgress("a", HostState.DONE, done_at=NOW), 1)
    assert store.commit([Commit("t1", NOW, (done,))]) == [Outcome.OK]
    assert store.read("t1", ["a"])[0].rev == 2
    assert store.rollout("t1", NOW).in_flight == 0  # no lease: released


@pytest.mark.parametrize(
    "broken",
    [
        Guard(statuses=frozenset({Status.PAUSED})),
        Guard(fields={"wave": 1}),
        Guard(fields={"wave_done_at": 3.0}),
        Guard(fields={"status": Status.HALTED}),
        Guard(counters={"done": 1}),
        Guard(counters={"absent": 1}),
    ],
)
def test_a_guard_that_does_not_hold_changes_nothing(store: Store, broken: Guard) -> None:
    published(store)
    before = state_of(store)
    c = Commit("t1", NOW, admit("a").writes, broken, slot_limit=2, add={"done": 1})
    assert store.commit([c]) == [Outcome.STALE]
    assert state_of(store) == before


def test_a_stale_revision_or_a_known_member_changes_nothing(store: Store) -> None:
    published(store)
    assert store.commit([admit("a")]) == [Outcome.OK]
    before = state_of(store)
    # two writes: the first would apply, the second names an old revision
    both = Commit("t1", NOW, (*admit("b").writes, *admit("a", rev=0).writes), slot_limit=5)
    assert store.commit([both]) == [Outcome.STALE]
    assert store.commit([Commit("t1", NOW, join={"a": 0}, add={"done": 1})]) == [Outcome.STALE]
    assert store.commit([Commit("gone", NOW, add={"done": 1})]) == [Outcome.STALE]
    assert state_of(store) == before


def test_a_rollouts_leases_count_until_released_and_another_rollouts_while_live(
    store: Store,
) -> None:
    published(store, limit=2)
    assert store.commit([admit("a", until=NOW + 5), admit("b", until=NOW + 50)]) == [
        Outcome.OK,
        Outcome.OK,
    ]
    before = state_of(store)
    assert store.commit([admit("c")]) == [Outcome.FULL]
    assert state_of(store) == before
    later = Commit("t1", NOW + 10, admit("c").writes, slot_limit=2)
    # a's lease ran out, but its slot is free only once its failure is committed
    assert store.commit([later]) == [Outcome.FULL]
    assert store.due("t1", NOW + 10) == ["a"]
    assert store.rollout("t1", NOW + 10).in_flight == 1
    a = HostProgress("a", HostState.BACKOFF, attempts=1)
    assert store.commit([Commit("t1", NOW + 10, (HostWrite(a, 1),))]) == [Outcome.OK]
    assert store.commit([later]) == [Outcome.OK]
    assert store.rollout("t1", NOW + 10).in_flight == 2
    # a host that holds a live lease cannot take a second slot
    again = Commit("t1", NOW, admit("b", rev=1).writes, slot_limit=10)
    assert store.commit([again]) == [Outcome.FULL]
    # another rollout's lease counts only while live
    store.publish(task(limit=2, task_id="t2"), {"d": 0}, {"w0:members": 1})
    d = HostProgress("d", HostState.ADMITTED, lease_until=NOW + 20)
    d_takes = Commit("t2", NOW, (HostWrite(d, 0, NOW + 20, takes_slot=True),), slot_limit=2)
    assert store.commit([d_takes]) == [Outcome.OK]
    e = HostProgress("e", HostState.ADMITTED)
    e_takes = (HostWrite(e, 0, NOW + 90, takes_slot=True),)
    assert store.commit([Commit("t2", NOW, e_takes, slot_limit=3, slot_pools=("t2", "t1"))]) == [
        Outcome.FULL
    ]
    assert store.commit(
        [Commit("t2", NOW + 60, e_takes, slot_limit=3, slot_pools=("t2", "t1"))]
    ) == [Outcome.OK]  # t1's leases (b until +50, c until +40) ran out; t2's own d counts


def test_slots_shared_with_another_rollout_and_given_back_by_a_host_done_with_it(
    store: Store,
) -> None:
    old = task(limit=2, task_id="t0")
    store.publish(old, {"a": 0, "b": 0}, {"w0:members": 2})
    p = HostProgress("a", HostState.ADMITTED, lease_until=NOW + 30)
    assert store.commit(
        [Commit("t0", NOW, (HostWrite(p, 0, NOW + 30, takes_slot=True),), slot_limit=2)]
    ) == [Outcome.OK]
    published(store, limit=1)
    shared = ("t1", "t0")
    b = Commit("t1", NOW, admit("b", limit=1).writes, slot_limit=1, slot_pools=shared)
    assert store.commit([b]) == [Outcome.FULL]  # t0's lease of a counts
    a_busy = Commit("t1", NOW, admit("a", limit=1).writes, slot_limit=1, slot_pools=shared)
    assert store.commit([a_busy]) == [Outcome.FULL]  # a holds t0's slot: not ordered again
    stale = Commit(
        "t1", NOW, admit("a", rev=7).writes, slot_limit=1, slot_pools=shared, release_others=True
    )
    assert store.commit([stale]) == [Outcome.STALE]
    assert store.rollout("t0", NOW).in_flight == 1  # nothing given back by a stale commit
    a_done = replace(a_busy, release_others=True)  # a reported it is not upgrading any more
    assert store.commit([a_done]) == [Outcome.OK]
    assert (store.rollout("t0", NOW).in_flight, store.rollout("t1", NOW).in_flight) == (0, 1)
    assert store.commit([b]) == [Outcome.FULL]  # a's slot is now t1's


def test_commits_of_one_call_apply_one_after_the_other(store: Store) -> None:
    published(store, limit=2)
    outcomes = store.commit([admit("a"), admit("b"), admit("c"), admit("a")])
    assert outcomes == [Outcome.OK, Outcome.OK, Outcome.FULL, Outcome.STALE]


def test_deactivate_and_the_fleet_view_and_bad_versions(store: Store) -> None:
    published(store)
    assert store.commit([Commit("t1", NOW, deactivate=True)]) == [Outcome.OK]
    assert store.active_id() is None and store.task("t1") is not None
    store.save_hosts([HostSeen("a", "1.0", "idle", 5.0, None, {"dc": "bj"})])
    store.save_hosts([HostSeen("a", "1.1", "idle", 6.0)])
    assert store.hosts() == {"a": HostSeen("a", "1.1", "idle", 6.0)}
    store.mark_bad("1.1", "crashes")
    assert store.bad_versions() == {"1.1": "crashes"}
    store.ping()


def test_raw_concurrent_admissions_never_exceed_the_limit(
    store: Store,
) -> None:
    """16 threads commit admissions and releases straight to the store; a sampler reads the
    live leases from the store all along."""
    limit = 5
    hosts = {f"h{i}": 0 for i in range(64)}
    published(store, limit=limit, **hosts)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            host = f"h{rng.randrange(64)}"
            (read,) = store.read("t1", [host])
            p = read.progress
            if p is not None and p.state == HostState.ADMITTED:
                free = HostWrite(HostProgress(host, HostState.BACKOFF), read.rev)
                store.commit([Commit("t1", NOW, (free,))])
            else:
                store.commit([admit(host, read.rev, limit=limit)])

    peak = hammer(lambda: store.rollout("t1", NOW).in_flight, worker)
    held = sum(1 for p in store.all_progress("t1") if p.state == HostState.ADMITTED)
    assert 0 < peak <= limit, peak
    assert held == store.rollout("t1", NOW).in_flight <= limit


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_admission_through_the_rulebook_is_atomic_under_concurrent_heartbeats(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The control plane (rules, guarded commits) from 16 threads: the sampled number of
    admitted hosts never exceeds the limit. Breaking the limit rule in the rulebook makes
    this fail on every store."""
    store = make_store(kind, tmp_path, request)
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=Clock())
    limit = 7
    plane.commands.publish(task(limit=limit, lease_s=1e9))

    def holders() -> int:
        return sum(1 for p in store.all_progress("t1") if p.state == "admitted")

    def fleet(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            h = f"h{rng.randrange(200)}"
            if rng.random() < 0.2:
                send(plane, beat(h, "1.1"))  # finishes, frees a slot
            else:
                send(plane, beat(h, state=rng.choice([S.IDLE, S.DOWNLOADING])))

    peak = hammer(holders, fleet)
    final = store.rollout("t1", NOW)
    store.close()
    assert 0 < peak <= limit, f"{peak} hosts held a slot at once (limit {limit})"
    assert final.in_flight <= limit
    assert final.done > 0


def test_open_store_names_what_it_accepts(tmp_path: Path) -> None:
    assert type(open_store("memory:")).__name__ == "MemoryStore"
    s = open_store(f"sqlite:{tmp_path / 'x.db'}")
    assert type(s).__name__ == "SqliteStore"
    s.close()
    with pytest.raises(ValueError, match="needs a path"):
        open_store("sqlite:")
    with pytest.raises(ValueError, match="is not one of memory:, sqlite:PATH"):
        open_store("postgres://db/hbs")


def test_the_rulebook_does_no_io_and_the_stores_know_no_rule() -> None:
    """Each rule lives once: the rulebook imports no I/O, clock or store; no store, and no
    front end, imports the rulebook."""
    import ast

    import selfupgrade.server as server

    root = Path(server.__file__).parent

    def imports(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    rulebook = imports(root / "rules.py")
    assert rulebook <= {
        "__future__",
        "enum",
        "collections.abc",
        "dataclasses",
        "..models",
        ".effects",
        ".plan",
        ".tasks",
    }, rulebook
    for path in [*(root / "stores").glob("*.py"), root / "app.py", root / "falcon_rpc.py"]:
        assert not {".rules", "..rules", "rules"} & imports(path), path
