"""The health metrics the alert rules rely on: a loop that ends reads 0, a reading nobody took is
absent rather than zero."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest

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
