"""Real processes for the outbox tests: the relay (``onelane relay``) and producers writing in transactions.

    python -m tests.outbox_procs produce --db URL --api URL --producer P --transactions N
        N transactions of 1-3 callouts each; every tenth one is rolled back. Prints one JSON line:
        {"committed": [idempotency keys, in commit order], "rolled_back": [...]}.
    python -m tests.outbox_procs commit-and-hang --db URL --api URL --keys k1,k2
        one transaction with these callouts, committed; prints "committed" and then waits to be killed.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

from tests.procs import VENV_BIN, CeleryProcess, ROOT


class RelayProcess(CeleryProcess):
    """``onelane relay --db URL`` in its own session, logging to a file; stopped by pid."""

    ready_marker = "relay ready"

    def __init__(self, env: dict, db_url: str, name: str = "relay", extra: list[str] | None = None):
        super().__init__(["relay", "--db", db_url, *(extra or [])], env, name)

    def start(self, wait_ready: bool = True, timeout_s: float = 30.0) -> "RelayProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "onelane"), *self.args], cwd=str(ROOT), env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if wait_ready:
            self.wait_log(self.ready_marker, timeout_s)
        return self


def _engine(db: str):
    import sqlalchemy as sa

    return sa.create_engine(db)


def produce(db: str, api: str, producer: int, transactions: int, gap_ms: float = 4) -> dict:
    from onelane import outbox

    rng = random.Random(producer)
    engine = _engine(db)
    committed, rolled_back = [], []
    for t in range(transactions):
        keys = [f"p{producer}-t{t}-c{c}" for c in range(rng.randint(1, 3))]
        with engine.connect() as conn:
            for c, key in enumerate(keys):
                outbox.add(conn, f"{api}/orders/{producer}", json={"p": producer, "t": t, "c": c},
                           idempotency_key=key)
            if t % 10 == 9:  # one transaction in ten fails after writing its callouts
                conn.rollback()
                rolled_back += keys
            else:
                conn.commit()
                committed += keys
        time.sleep(rng.uniform(0, gap_ms / 1000))
    engine.dispose()
    return {"committed": committed, "rolled_back": rolled_back}


def commit_and_hang(db: str, api: str, keys: list[str]) -> None:
    from onelane import outbox

    engine = _engine(db)
    with engine.begin() as conn:
        for key in keys:
            outbox.add(conn, f"{api}/orders", json={"key": key}, idempotency_key=key)
    print("committed", flush=True)  # where a producer would now call send_task
    time.sleep(120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.outbox_procs")
    ap.add_argument("mode", choices=["produce", "commit-and-hang"])
    ap.add_argument("--db", required=True)
    ap.add_argument("--api", required=True)
    ap.add_argument("--producer", type=int, default=0)
    ap.add_argument("--transactions", type=int, default=100)
    ap.add_argument("--gap-ms", type=float, default=4, help="at most this long between transactions")
    ap.add_argument("--keys", default="")
    a = ap.parse_args(argv)
    if a.mode == "produce":
        print(json.dumps(produce(a.db, a.api, a.producer, a.transactions, a.gap_ms)), flush=True)
    else:
        commit_and_hang(a.db, a.api, a.keys.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
