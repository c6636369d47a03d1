"""The job queue: which study version is analysed next, by whom, and that it is analysed once.

queue.py holds the JobQueue interface and picks an implementation from the settings; lease.py the
database lease every implementation claims through (the database row is the truth); runner.py runs
one claimed job; pool.py the embedded default (worker threads of `strokegate serve` polling the
database); celery_queue.py the distributed one (`serve` publishes, `strokegate worker` consumes from
RabbitMQ).
"""
