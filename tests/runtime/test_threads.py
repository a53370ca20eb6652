"""The monitor's CPU work runs on one intra-op thread and gives the caller's count back."""

from __future__ import annotations

import pytest
import torch

from monitor.runtime.threads import one_host_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_work_runs_on_one_thread_and_restores(two_threads):
    with one_host_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restored_when_the_work_raises(two_threads):
    with pytest.raises(RuntimeError):
        with one_host_thread(torch.device("cpu")):
            raise RuntimeError("monitoring fault")
    assert torch.get_num_threads() == 2


def test_accelerator_work_leaves_the_count_alone(two_threads):
    with one_host_thread(torch.device("meta")):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_generation_steps_the_monitor_on_one_thread(two_threads, monkeypatch):
    """The transformers path's per-token work runs under one thread; the model keeps two."""
    from monitor.runtime.session import Session
    from monitor.testing import tiny_monitor

    seen: list[int] = []
    observe = Session.observe

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return observe(self, *args, **kwargs)

    monkeypatch.setattr(Session, "observe", spy)
    mon = tiny_monitor()
    mon.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
