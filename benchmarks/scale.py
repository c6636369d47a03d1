"""Scaling out: studies per hour against the number of analysis workers, the embedded pool
(job_queue database: `strokegate serve` with STROKEGATE_WORKERS threads) beside Celery (job_queue
celery: serve and that many `strokegate worker` processes on RabbitMQ), in one run on one machine;
and, on an idle system, the time from the last image of one study to the last of its results
acknowledged by the PACS (a dcmtk storescp) with each.

Each configuration gets a fresh PostgreSQL database and its own RabbitMQ queue (the machine's
PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 5672, as the integration tests use). The studies are
distinct copies (own UIDs and patients) of one phantom MRI diffusion series; series_idle_s is 2 s
for both, so the latency is mostly the analysis and the delivery, not the idle wait.

Throughput: from the first job queued to the last result acknowledged, over --studies studies sent
at once. Latency: the median over --latency-runs studies sent one at a time to the idle service
with one worker (the job's last instance to its last delivery, as the service records them).

    nice -n 10 .venv/bin/python benchmarks/scale.py [--studies 8] [--workers 1 2 4] [--matrix 96]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))  # the integration tests' harness

from sqlalchemy import func, select  # noqa: E402

from dicom_tools import storescu  # noqa: E402
from scale_out import BROKER, Worker, delete_queue, distinct_studies, queue_name, rabbitmq_available  # noqa: E402
from service.phantom.generate import write_patient  # noqa: E402
from service.phantom.patient import PhantomOptions  # noqa: E402
from service.store.database import Database  # noqa: E402
from service.store.models import Delivery, DeliveryState, Job, JobState, ResultObject  # noqa: E402
from service_harness import Service, StoreSCP, TemporaryPostgres, postgres_available, wait_for  # noqa: E402

SEND = "seg+sr+summary"


@dataclass
class Row:
    queue: str
    workers: int
    studies: int
    span_s: float
    latencies_s: list[float]

    @property
    def per_hour(self) -> float:
        return self.studies * 3600 / self.span_s


def finished(db: Database, jobs: int) -> bool:
    """``jobs`` jobs done and every delivery acknowledged."""
    with db.session() as session:
        done = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.DONE))
        failed = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.FAILED))
        unsent = session.scalar(select(func.count()).select_from(Delivery).where(Delivery.state != DeliveryState.SENT))
    if failed:
        raise RuntimeError(f"{failed} jobs failed: see the service's log")
    return done >= jobs and unsent == 0


def span(db: Database) -> float:
    """First job queued to last result acknowledged, seconds."""
    with db.session() as session:
        first = session.scalar(select(func.min(Job.created_at)))
        last = session.scalar(select(func.max(Delivery.sent_at)))
    return (last - first).total_seconds()


def last_instance_to_ack(db: Database) -> float:
    """The latest job's last instance to its last result acknowledged, seconds."""
    with db.session() as session:
        job = session.scalars(select(Job).order_by(Job.id.desc()).limit(1)).one()
        last = session.scalar(select(func.max(Delivery.sent_at)).join(ResultObject).where(ResultObject.job_id == job.id))
    return (last - job.last_instance_at).total_seconds()


def run(kind: str, workers: int, studies: list[Path], idle_studies: list[Path], root: Path, timeout_s: float) -> Row:
    """One configuration: throughput over ``studies``; then, with one worker, the latency of each of
    ``idle_studies`` sent alone."""
    root.mkdir(parents=True)
    pacs = StoreSCP(root / "pacs").start()
    queue = queue_name()
    env = {"STROKEGATE_SERIES_IDLE_S": "2", "STROKEGATE_JOB_QUEUE": "database" if kind == "pool" else "celery",
           "STROKEGATE_WORKERS": str(workers) if kind == "pool" else "1", "STROKEGATE_BROKER_URL": BROKER,
           "STROKEGATE_CELERY_QUEUE": queue, "STROKEGATE_LOG_LEVEL": "WARNING"}
    destination = f"{pacs.address}?send={SEND}"
    with TemporaryPostgres() as url:
        db = Database(url)
        service = Service(root / "gate", url, [destination], env=env)
        pool = [Worker(root / "gate", f"worker{i}", url, [destination], env) for i in range(workers if kind == "celery" else 0)]
        try:
            service.start()
            for worker in pool:
                worker.start()
            for worker in pool:
                worker.wait_ready(180)
            storescu(studies, service.port, "STROKEGATE", timeout=300)
            wait_for(lambda: finished(db, len(studies)), timeout_s, f"{len(studies)} studies analysed and delivered", interval=0.5)
            throughput = span(db)
            latencies = []
            for count, study in enumerate(idle_studies, start=len(studies) + 1):
                time.sleep(1)
                storescu(study, service.port, "STROKEGATE")
                wait_for(lambda count=count: finished(db, count), timeout_s, "one study analysed and delivered", interval=0.1)
                latencies.append(last_instance_to_ack(db))
            return Row(kind, workers, len(studies), throughput, latencies)
        finally:
            db.dispose()
            for worker in pool:
                worker.stop()
            service.stop()
            pacs.stop()
            if kind == "celery":
                delete_queue(queue)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8, help="studies sent at once for the throughput")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to measure")
    parser.add_argument("--matrix", type=int, default=96, help="in-plane matrix of the MRI diffusion series")
    parser.add_argument("--latency-runs", type=int, default=3, help="single studies on the idle system (median)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    args = parser.parse_args()
    if not (postgres_available() and rabbitmq_available()):
        print("needs PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="strokegate-scale-") as tmp:
        tmp = Path(tmp)
        write_patient(2, "mri", tmp / "phantom", PhantomOptions(mr_matrix=args.matrix))
        dwi = tmp / "phantom" / "SGPH00000002" / "dicom" / "MR" / "dwi"
        instances = len(list(dwi.glob("*.dcm")))
        rows = []
        for workers in args.workers:
            for kind in ("pool", "celery"):
                count = args.studies + (args.latency_runs if workers == 1 else 0)
                copies = distinct_studies(dwi, tmp / f"{kind}{workers}" / "studies", count)
                rows.append(run(kind, workers, copies[: args.studies], copies[args.studies :], tmp / f"{kind}{workers}" / "run",
                                args.timeout))
                print(f"{kind} x{workers}: {rows[-1].per_hour:.0f} studies/hour", file=sys.stderr, flush=True)
    base = rows[0].per_hour
    print(f"\nScale-out: {args.studies} MRI diffusion studies ({args.matrix} x {args.matrix}, {instances} instances each) sent at "
          f"once; results {SEND} to a storescp; series_idle_s 2; PostgreSQL; {len(__import__('os').sched_getaffinity(0))} cores\n")
    print(f"{'job queue':<28}{'workers':>8}{'span s':>9}{'studies/h':>11}{'vs pool x1':>12}")
    for row in rows:
        name = "embedded pool (threads)" if row.queue == "pool" else "Celery (worker processes)"
        print(f"{name:<28}{row.workers:>8}{row.span_s:>9.1f}{row.per_hour:>11.0f}{row.per_hour / base:>11.2f}x")
    print(f"\nLast image to the last result acknowledged by the PACS, one study on the idle system, one worker "
          f"(median of {args.latency_runs}):")
    for row in rows:
        if row.latencies_s:
            name = "embedded pool" if row.queue == "pool" else "Celery"
            print(f"  {name:<14}{statistics.median(row.latencies_s):6.2f} s   (runs: {', '.join(f'{v:.2f}' for v in row.latencies_s)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
