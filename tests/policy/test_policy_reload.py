"""Hot reload: bad versions are rejected, the last good one stays active."""

from __future__ import annotations

import os
import threading

import pytest

from monitor.errors import PolicyError
from monitor.policy import PolicyStore, ReloadResult
from tests.policy.helpers import write

GOOD = """\
version: 1
rules:
  - {id: r, description: d, severity: low, when: {latent: 1, above: %s}, actions: [log]}
"""


def bump(path, text):
    """Rewrite ``path`` and push its mtime forward so a coarse clock still sees a change."""
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))


def test_good_bad_good(tmp_path):
    path = write(tmp_path, "p.yaml", GOOD % "1.0")
    store = PolicyStore(path, None, 16)
    first = store.current
    seen: list[ReloadResult] = []
    store.on_reload(seen.append)

    bump(path, "version: 1\nrules: [{id: r, description: d}\n")  # broken YAML
    result = store.reload()
    assert not result.ok and "YAML syntax error" in (result.error or "")
    assert store.current is first and result.version_id == first.version_id

    bump(path, GOOD % "abc")  # valid YAML, invalid policy
    result = store.reload()
    assert not result.ok and "p.yaml:3:" in (result.error or "") and store.current is first

    bump(path, GOOD % "2.0")
    result = store.reload()
    assert result.ok and result.changed and store.current is not first
    assert store.version_id == result.version_id != first.version_id

    same = store.reload()
    assert same.ok and not same.changed
    assert [r.ok for r in seen] == [False, False, True, True]


def test_bad_files_at_startup_raise(tmp_path):
    with pytest.raises(PolicyError):
        PolicyStore(write(tmp_path, "p.yaml", GOOD % "x"), None, 16)


def test_reload_survives_deleted_files_and_failing_callbacks(tmp_path):
    path = write(tmp_path, "p.yaml", GOOD % "1.0")
    store = PolicyStore(tmp_path, None, 16)

    def explode(result):
        raise RuntimeError("subscriber bug")

    store.on_reload(explode)
    path.unlink()
    result = store.reload()
    assert not result.ok and "holds no policy files" in (result.error or "")


def test_watch_reloads_on_change_and_stops(tmp_path):
    path = write(tmp_path, "p.yaml", GOOD % "1.0")
    with PolicyStore(path, None, 16) as store:
        done = threading.Event()
        results: list[ReloadResult] = []
        store.on_reload(lambda r: (results.append(r), done.set()))
        assert store.check_for_changes() is None
        store.watch(interval_s=0.02)
        bump(path, GOOD % "3.0")
        assert done.wait(5.0)
        assert results[0].ok and results[0].changed
        done.clear()
        bump(path, GOOD % "nope")
        assert done.wait(5.0)
        assert not results[-1].ok and store.version_id == results[0].version_id
    assert store._thread is None


@pytest.mark.parametrize("break_it", ["dangling", "loop", "fifo"])
def test_a_file_turned_into_a_broken_link_fails_the_reload_and_keeps_its_rules(tmp_path, break_it):
    write(tmp_path, "a.yaml", GOOD % "1.0")
    second = write(tmp_path, "b.yaml", GOOD.replace("id: r", "id: b") % "2.0")
    store = PolicyStore(tmp_path, None, 16)
    first = store.current
    assert [r.id for r in first.rules] == ["r", "b"]
    second.unlink()
    if break_it == "dangling":
        second.symlink_to(tmp_path / "moved-away.yaml")
    elif break_it == "loop":
        second.symlink_to(second)
    else:
        os.mkfifo(second)
    change = store.check_for_changes()  # the watcher sees the entry change
    assert change is not None and not change.ok
    assert f"{second}: " in (change.error or "")
    assert store.current is first and [r.id for r in store.current.rules] == ["r", "b"]
    second.unlink()
    write(tmp_path, "b.yaml", GOOD.replace("id: r", "id: b") % "3.0")
    fixed = store.reload()
    assert fixed.ok and fixed.changed and [r.id for r in store.current.rules] == ["r", "b"]
