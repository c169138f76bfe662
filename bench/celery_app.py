"""The Celery side of the benchmark: Python tasks with the names, arguments and results of the
demo plugin's, on a stock Celery 5.7 configuration (only the broker and backend are set).

The bench starts it as `python -m celery -A celery_app worker ...` with BENCH_BROKER and
BENCH_BACKEND in the environment, and waits for the line printed on `worker_ready`.
"""

import os
import sys
import time

from celery import Celery
from celery.signals import worker_ready

app = Celery("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])


@worker_ready.connect
def _ready(**_):
    print("bench: celery worker ready", file=sys.stderr, flush=True)


@app.task(name="demo.add")
def add(x, y):
    return x + y


@app.task(name="demo.echo")
def echo(value):
    return value


@app.task(name="demo.sleep")
def sleep(ms):
    time.sleep(ms / 1000)


@app.task(name="demo.progress", bind=True)
def progress(self, steps):
    for current in range(1, steps + 1):
        self.update_state(state="PROGRESS", meta={"current": current, "total": steps})
    return steps
