"""The health metrics the alert rules rely on: a loop that ends reads 0, a reading nobody took is
absent rather than zero."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from service.ops.loops import Loop
from service.ops.metrics import LoopHealth, Reading


def samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(name):
            sample, value = line.rsplit(" ", 1)
            out[sample] = float(value)
    return out


def test_a_loop_reads_up_while_its_thread_runs_and_down_once_it_ended() -> None:
    registry = CollectorRegistry()
    registry.register(LoopHealth(loops=("tracker", "worker")))
    release = threading.Event()
    threads = [threading.Thread(target=release.wait, name=name, daemon=True)
               for name in ("tracker", "worker-0", "worker-1", "dicom-association", "worker-x")]
    for thread in threads:
        thread.start()
    assert samples(registry, "strokegate_loop_up") == {
        'strokegate_loop_up{loop="tracker"}': 1.0,
        'strokegate_loop_up{loop="worker-0"}': 1.0,
        'strokegate_loop_up{loop="worker-1"}': 1.0,
    }
    release.set()
    for thread in threads:
        thread.join(5)
    assert set(samples(registry, "strokegate_loop_up").values()) == {0.0}


def test_a_loop_restarted_under_its_name_reads_up_again() -> None:
    registry = CollectorRegistry()
    registry.register(LoopHealth(loops=("sender",)))
    stop_first = threading.Event()
    first = threading.Thread(target=stop_first.wait, name="sender", daemon=True)
    first.start()
    assert samples(registry, "strokegate_loop_up") == {'strokegate_loop_up{loop="sender"}': 1.0}
    stop_first.set()
    first.join(5)
    assert samples(registry, "strokegate_loop_up") == {'strokegate_loop_up{loop="sender"}': 0.0}
    release = threading.Event()
    second = threading.Thread(target=release.wait, name="sender", daemon=True)
    second.start()
    assert samples(registry, "strokegate_loop_up") == {'strokegate_loop_up{loop="sender"}': 1.0}
    release.set()
    second.join(5)


def test_a_reading_is_absent_until_taken() -> None:
    reading = Reading("strokegate_test_free_bytes", "Free bytes", registry=CollectorRegistry())
    assert samples(reading.registry, "strokegate_test_free_bytes") == {}
    reading.set(5e9)
    assert samples(reading.registry, "strokegate_test_free_bytes") == {"strokegate_test_free_bytes": 5e9}


def test_a_loop_waiting_to_restart_after_a_crash_reads_down_though_its_thread_lives() -> None:
    crashed = threading.Event()
    release = threading.Event()

    def target() -> None:
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("a bug nobody expected")
        release.wait(10)

    loop = Loop("tracker-97", target, restart_delay_s=0.5)
    sample = 'strokegate_loop_up{loop="tracker-97"}'
    loop.start()
    try:
        assert crashed.wait(5)
        pause = threading.Event()
        for _ in range(50):  # the crash is being logged; then the loop waits 0.5 s to restart
            if not loop.up:
                break
            pause.wait(0.01)
        assert loop._thread.is_alive()
        assert samples(REGISTRY, "strokegate_loop_up")[sample] == 0.0  # down, in its restart pause
        for _ in range(100):
            if loop.up:
                break
            pause.wait(0.05)
        assert samples(REGISTRY, "strokegate_loop_up")[sample] == 1.0  # restarted
    finally:
        loop.stop()
        release.set()
        loop.join(5)


def test_rounds_go_on_after_a_failed_round_and_a_wake_runs_one_at_once() -> None:
    from service.ops.loops import Rounds

    class Counting(Rounds):
        def __init__(self) -> None:
            self.calls, self.ran = 0, threading.Event()
            super().__init__("counting", interval_s=60)

        def round(self) -> None:
            self.calls += 1
            self.ran.set()
            if self.calls == 1:
                raise RuntimeError("database hiccup")

    rounds = Counting()
    rounds.start()
    try:
        assert rounds.ran.wait(5) and rounds.calls == 1
        rounds.ran.clear()
        rounds.wake()  # the interval is a minute: only the wake runs the second round this soon
        assert rounds.ran.wait(5) and rounds.calls == 2
        assert rounds.loop.up  # the failed round did not take the loop down
    finally:
        rounds.stop()
    assert not rounds.loop.up
