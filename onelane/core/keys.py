"""Every Redis key onelane reads or writes is named here, under one prefix.

kombu's own keys (the queue list and its unacked bookkeeping) are named here too,
because the reaper must touch them in the same atomic step as ours.
"""
from __future__ import annotations

from dataclasses import dataclass

#: kombu's Redis transport keeps unacknowledged messages in this hash
#: (delivery tag -> JSON [message, exchange, routing_key]) ...
KOMBU_UNACKED = "unacked"
#: ... and their delivery times (seconds, the worker's clock) in this sorted set.
KOMBU_UNACKED_INDEX = "unacked_index"
#: kombu's Redis transport keeps a message published with priority p > 0 in "<queue><sep><p>"
KOMBU_PRIORITY_SEP = "\x06\x16"
#: the priority levels a producer's kombu may use (its priority_steps are a subset of 1-9)
PRIORITY_LEVELS = tuple(range(1, 10))


@dataclass(frozen=True)
class Keys:
    """Key names under ``prefix`` (the setting ONELANE_KEY_PREFIX, default "onelane")."""

    prefix: str = "onelane"

    # -- lease names (the argument of the lease key builders below)
    @staticmethod
    def resource_lease(resource: str) -> str:
        """The lease name of a serial resource (also the name of a capped resource's fencing counter)."""
        return f"resource:{resource}"

    @staticmethod
    def slot(resource: str, i: "int | str") -> str:
        """The lease name of slot ``i`` of a capped resource's semaphore (``i=""``: the names' common start)."""
        return f"resource:{resource}#{i}"

    @staticmethod
    def guard_name(queue: str) -> str:
        """The lease name of a queue's worker guard."""
        return f"guard:{queue}"

    @staticmethod
    def presence(token: str) -> str:
        """The lease name of a worker's presence, renewed while it lives."""
        return f"worker:{token}"

    @staticmethod
    def is_worker_lease(name: str) -> bool:
        """True for a guard or presence lease name (status shows those apart from resources)."""
        return name.startswith(("guard:", "worker:"))

    # -- leases (the serial resource leases and the worker guard share one shape)
    def lease(self, name: str) -> str:
        """The lease itself: a string holding the owner's token, with an expiry."""
        return f"{self.prefix}:lease:{name}"

    def lease_holder(self, name: str) -> str:
        """A hash describing the holder (host, pid, since, renewed, deadline)."""
        return f"{self.prefix}:lease:{name}:holder"

    def lease_fence(self, name: str) -> str:
        """The fencing counter: incremented on every grant of the lease."""
        return f"{self.prefix}:fence:{name}"

    def lease_signal(self, name: str) -> str:
        """A list a release pushes to, so waiters block instead of polling."""
        return f"{self.prefix}:lease:{name}:released"

    @property
    def lease_index(self) -> str:
        """Sorted set: lease name -> deadline (ms, Redis clock)."""
        return f"{self.prefix}:leases"

    def standbys(self, queue: str) -> str:
        """Hash: standby worker token -> JSON (label, host, pid, seen_ms) of workers waiting for the guard."""
        return f"{self.prefix}:standby:{queue}"

    # -- capacity
    def rate(self, resource: str) -> str:
        """String: the GCRA theoretical arrival time (ms) of a rate-limited resource."""
        return f"{self.prefix}:rate:{resource}"

    def adaptive(self, resource: str) -> str:
        """Hash: the adaptive cap of a resource (cap as a float, last decrease ms)."""
        return f"{self.prefix}:aimd:{resource}"

    def slot_signal(self, resource: str) -> str:
        """List a slot release pushes to, so waiting tasks block instead of polling."""
        return f"{self.prefix}:slots:{resource}:released"

    def slots_held(self, resource: str) -> str:
        """Sorted set: every slot number 1..N of a capped resource -> its deadline (ms, Redis clock;
        a free slot i scores i, a time long past), so a grant or a refusal reads its lowest member.
        A hint kept beside the slot leases, which stay the truth: a slot is taken only with SET NX
        on its lease key."""
        return f"{self.prefix}:slots:{resource}:held"

    def batch(self, batch_id: str) -> str:
        """Hash: counters of a batch (total, published, done, failed, dead_lettered, started_ms)."""
        return f"{self.prefix}:batch:{batch_id}"

    @property
    def batch_index(self) -> str:
        return f"{self.prefix}:batches"

    def reserved(self, queue: str) -> str:
        """Hash: delivery tag -> token of the worker that received it (queues with many consumers)."""
        return f"{self.prefix}:reserved:{queue}"

    # -- fetching (see onelane.delivery.transport)
    def fetch_list(self, queue: str, token: str) -> str:
        """List: the messages a worker has taken off ``queue`` with the fast take (not recorded as
        unacked), each until its callout's outcome acknowledges it, or a claim or a give-back moves it."""
        return f"{self.prefix}:fetching:{queue}:{token}"

    @property
    def fetch_lists(self) -> str:
        """Hash: fetch list key -> JSON {queue, token} of every consuming worker."""
        return f"{self.prefix}:fetching"

    # -- the ready list and coalescing (see onelane.delivery.coalescing)
    def ready(self, queue: str) -> str:
        """List: the head of ``queue``, taken off kombu's list by a worker's fetch (oldest at the right)."""
        return f"{self.prefix}:ready:{queue}"

    def coalesce_waiting(self, queue: str) -> str:
        """Hash: coalesce key -> task id of the callout with that key waiting to start (its carrier)."""
        return f"{self.prefix}:coalesce:waiting:{queue}"

    def coalesce_newest(self, queue: str) -> str:
        """Hash: carrier task id -> the newest message body (base64) it will send when taken."""
        return f"{self.prefix}:coalesce:newest:{queue}"

    def coalesce_started(self, queue: str) -> str:
        """Hash: coalesce key -> JSON {id, tag, at} of the callout with that key taken and not yet finished."""
        return f"{self.prefix}:coalesce:started:{queue}"

    def coalesce_parked(self, queue: str) -> str:
        """Hash: coalesce key -> JSON list of messages taken while that key's callout was running."""
        return f"{self.prefix}:coalesce:parked:{queue}"

    def coalesce_carried(self, queue: str, task_id: str) -> str:
        """List: JSON {id, batch} of every task id the callout ``task_id`` carries, oldest first
        (the fetch script builds the name from ``coalesce_carried(queue, "")``)."""
        return f"{self.prefix}:coalesce:carried:{queue}:{task_id}"

    def coalesce_key_of(self, queue: str) -> str:
        """Hash: task id -> its coalesce key, from the moment a fetch reads it to its outcome."""
        return f"{self.prefix}:coalesce:keys:{queue}"

    def coalesce_counts(self, queue: str) -> str:
        """Hash: counters of coalescing on ``queue`` (coalesced: task ids carried by another)."""
        return f"{self.prefix}:coalesce:counts:{queue}"

    # -- in-flight registry
    def inflight(self, task_id: str) -> str:
        """Hash: the record of a callout whose attempt is under way."""
        return f"{self.prefix}:inflight:{task_id}"

    def inflight_index(self, queue: str) -> str:
        """Sorted set: task id -> attempt deadline (ms, Redis clock)."""
        return f"{self.prefix}:inflight-index:{queue}"

    # -- outcomes
    def done(self, task_id: str) -> str:
        """String: the recorded outcome (JSON) of a finished task id."""
        return f"{self.prefix}:done:{task_id}"

    def idempotency(self, key: str) -> str:
        """String: the task id whose success used this idempotency key."""
        return f"{self.prefix}:idem:{key}"

    def dead_letters(self, queue: str) -> str:
        """Hash: dead-letter id -> entry (JSON)."""
        return f"{self.prefix}:dlq:{queue}"

    def dead_letter_index(self, queue: str) -> str:
        """Sorted set: dead-letter id -> time it was dead-lettered (ms)."""
        return f"{self.prefix}:dlq-index:{queue}"

    def stats(self, queue: str) -> str:
        """Hash of recent outcome counts, "<outcome>:<10-second step>" -> count, for the completed
        and failed counts of status (onelane.core.recent); the reaper drops steps older than an hour."""
        return f"{self.prefix}:stats:{queue}"

    def legacy_stats(self, queue: str, outcome: str) -> str:
        """The sorted set of recent outcomes (task id -> ms) an onelane before 2026-12-07 kept per outcome;
        the reaper deletes it."""
        return f"{self.prefix}:stats:{queue}:{outcome}"

    def attempts(self, task_id: str) -> str:
        """List: one JSON entry per finished attempt of a task (kept across retries and kills)."""
        return f"{self.prefix}:attempts:{task_id}"

    # -- flow control
    def paused(self, queue: str) -> str:
        """String: present while the queue is paused (who paused it and when, JSON). No expiry."""
        return f"{self.prefix}:paused:{queue}"

    def resumed_signal(self, queue: str) -> str:
        """List a resume pushes to, so paused tasks block instead of polling."""
        return f"{self.prefix}:resumed:{queue}"

    def delayed(self, queue: str) -> str:
        """Sorted set: kombu message (JSON) -> due time (ms); relaxed-order retries wait here."""
        return f"{self.prefix}:delayed:{queue}"

    def circuit(self, resource: str) -> str:
        """Hash: the circuit breaker of a resource (failures, open_until, cooldown)."""
        return f"{self.prefix}:circuit:{resource}"

    @property
    def circuit_index(self) -> str:
        """Set: resources that have a circuit record."""
        return f"{self.prefix}:circuits"

    # -- lanes and bulk queues, discovered: every worker registers the queue it consumes
    @property
    def queues(self) -> str:
        """Hash: queue name -> JSON {kind: "lane" | "bulk", first_ms, seen_ms} of every consumed queue."""
        return f"{self.prefix}:queues"

    def head_seen(self, queue: str) -> str:
        """Hash: the task id at the head of the queue and when it was first seen there (ms), for status."""
        return f"{self.prefix}:head:{queue}"

    # -- metrics (see onelane.core.counters): written by workers, read by the exporter
    @property
    def metric_counters(self) -> str:
        """Hash: JSON [metric, label values...] -> count (callouts succeeded, failed, retried, ...)."""
        return f"{self.prefix}:metrics:counters"

    @property
    def metric_histograms(self) -> str:
        """Hash: JSON [metric, label values..., bucket index | "sum_us"] -> count (or sum in microseconds)."""
        return f"{self.prefix}:metrics:histograms"

    # -- Redis itself
    @property
    def epoch(self) -> str:
        """Hash: the id (random, written once) and birth of this Redis data set (see onelane.delivery.epoch)."""
        return f"{self.prefix}:epoch"

    @property
    def data_loss(self) -> str:
        """Hash: epoch id -> JSON of the data loss noticed when that epoch appeared."""
        return f"{self.prefix}:data-loss"

    @property
    def replication_probe(self) -> str:
        """String: written by a process that must WAIT for replicas with nothing else to write."""
        return f"{self.prefix}:replication-probe"

    # -- kombu's
    @staticmethod
    def queue_list(queue: str) -> str:
        """kombu's list for the queue (priority 0); LPUSH appends, BRPOP takes the head."""
        return queue

    @staticmethod
    def priority_list(queue: str, level: int) -> str:
        """kombu's list for messages of ``queue`` published with priority ``level`` (1-9)."""
        return f"{queue}{KOMBU_PRIORITY_SEP}{level}"

    # -- the transactional outbox (see onelane.ops.relay)
    @staticmethod
    def relay_lease(lane: str) -> str:
        """The lease name of the relay that publishes a lane's outbox rows (one relay at a time)."""
        return f"relay:{lane}"

    @staticmethod
    def is_relay_lease(name: str) -> bool:
        """True for a relay lease name (status shows those with the outbox, not as resources)."""
        return name.startswith("relay:")

    @property
    def outbox_lanes(self) -> str:
        """Hash: lane -> JSON {depth, oldest_age_ms, reported_ms, relay} written by the relay each pass."""
        return f"{self.prefix}:outbox"

    # -- the HTTP intake (onelane.ops.intake)
    def intake_claim(self, lane: str, idempotency_key: str) -> str:
        """String: the task id an Idempotency-Key was first accepted as on a lane (JSON), for the dedupe window."""
        return f"{self.prefix}:intake:idem:{lane}:{idempotency_key}"

    def intake_task(self, task_id: str) -> str:
        """String: the lane a callout accepted by the intake was published to, for the dedupe window."""
        return f"{self.prefix}:intake:task:{task_id}"

    def intake_rate(self, token_id: str) -> str:
        """String: the GCRA theoretical arrival time (ms) of an intake token's request rate."""
        return f"{self.prefix}:intake:rate:{token_id}"

    @staticmethod
    def celery_result(task_id: str) -> str:
        """Celery's own: the result backend's record of a task (JSON with status and result)."""
        return f"celery-task-meta-{task_id}"
