"""The Redis transport onelane's workers consume with: kombu's own, with a fetch that cannot lose.

kombu's Redis transport takes a message off the queue with BRPOP and only then records it
as unacknowledged, in a second round trip: a worker killed between the two (or a reply
lost on a dropped connection) loses that message for good. Here a consuming worker takes
the head of its queue and records it as unacked in one script (``lua/fetch_next.lua``, see
:mod:`onelane.delivery.fetching`), which also moves what producers appended to kombu's list
onto the queue's ready list, coalescing callouts that share a key
(:mod:`onelane.delivery.coalescing`). When the queue is empty the worker blocks with
``BLMOVE q q RIGHT RIGHT`` — a rotation of one, which leaves the message where it is — and
then absorbs and takes it with the script. While the ready list holds callouts without a
coalesce key, a take is one plain ``LMOVE`` into the worker's fetch list instead (the *fast
take*); its callout runs from the fetch list (its success's ack takes it from there, a give-back
or a deferral claims it first: :func:`onelane.delivery.fetching.claim_fetched`), and an ack or a
requeue of a message still in the fetch list takes it from there.

Guarantee: at every moment a message is in kombu's list, the ready list, parked or carried
(coalescing), the worker's fetch list, or kombu's unacked hash, never nowhere.

It applies to an onelane worker, which consumes exactly one queue (a lane or the bulk
queue; the guard refuses more); any other consumer keeps kombu's fetch unchanged. The
fetch reads the queue's own list only: a message a plain producer published with a priority
lands in kombu's sub-list for that level, and the worker's heartbeat moves it to the queue
(:func:`onelane.delivery.flow.absorb_priorities`).

It overrides two internal methods of kombu's Redis channel (``_brpop_start`` and
``_brpop_read``), so pyproject.toml requires the kombu line the test suite runs on.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from contextlib import contextmanager
from queue import Empty

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from onelane.core import counters
from onelane.core.clients import sentinel_master_view
from onelane.core.keys import Keys
from onelane.core.replication import Replicas
from onelane.core.settings import WORKER_ID_ENV, WORKER_QUEUE_ENV, get_settings, sentinel_hosts
from onelane.delivery.coalescing import arrival
from onelane.delivery.fetching import (DRAIN_BUDGET, FETCHED, QueueFetch, Step, fetched_of, give_back,
                                       register_fetch_list)

log = logging.getLogger(__name__)


#: delivery tags about to be acknowledged whose unacked copy went with their outcome (one transaction)
_ACKED_WITH_OUTCOME: set = set()
#: a bound on that set, should acks it waits for never come (a lost connection): past it, it is
#: emptied, and those acks go the usual way (a removal that finds nothing)
_ACKED_WITH_OUTCOME_MAX = 10_000
#: the messages the fast take handed to this process's tasks (delivery tag -> the message as the
#: fetch list holds it) until they are acknowledged or rejected: neither a reconnect nor a channel's
#: restore gives one of them back to the queue, since its task is running it from there (the reaper
#: gives them back if this worker dies, each once its attempt's deadline has passed)
_RUNNING_FETCHED: dict = {}


def acked_with_outcome(delivery_tag: str) -> None:
    """Say that kombu's coming ack of ``delivery_tag`` need only clear its bookkeeping in memory:
    the callout's outcome transaction removed the unacked copy from Redis already
    (:func:`onelane.delivery.inflight.queue_acknowledge`). Celery sends the ack itself later, from
    the worker's event loop, which is why this is a note and not a block around the ack."""
    if len(_ACKED_WITH_OUTCOME) >= _ACKED_WITH_OUTCOME_MAX:
        _ACKED_WITH_OUTCOME.clear()
    _ACKED_WITH_OUTCOME.add(delivery_tag)


def _running_fetched(delivery_tag: str, message: str) -> None:
    """Note a message the fast take hands to a task. Bounded as the set above, oldest first out: an
    entry whose ack never came (a lost connection) goes long before a worker could have that
    many tasks running."""
    while len(_RUNNING_FETCHED) >= _ACKED_WITH_OUTCOME_MAX:
        try:  # a task thread may pop an entry meanwhile
            _RUNNING_FETCHED.pop(next(iter(_RUNNING_FETCHED)), None)
        except (RuntimeError, StopIteration):
            pass
    _RUNNING_FETCHED[delivery_tag] = message


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag):
        """kombu's ack; a message acknowledged with its outcome has nothing left in Redis to remove,
        and one the fast take delivered is also removed from the fetch list (if it is still there:
        bad input, a revoked task, a callout that failed)."""
        fetched = _RUNNING_FETCHED.pop(delivery_tag, None)
        try:
            _ACKED_WITH_OUTCOME.remove(delivery_tag)
        except KeyError:
            if fetched is None:
                return super().ack(delivery_tag)
            return self._ack_taken(delivery_tag, fetched)
        if self.channel.global_keyprefix:  # kombu's keys are not the ones the outcome removed from
            return super().ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        """kombu's reject; a message the fast take delivered is over for its task: requeued, from the
        fetch list if it is still there, or else removed from it as an ack does."""
        fetched = _RUNNING_FETCHED.pop(delivery_tag, None)
        if fetched is None or requeue:
            return super().reject(delivery_tag, requeue=requeue)
        self._ack_taken(delivery_tag, fetched)

    def _ack_taken(self, delivery_tag, fetched: str) -> None:
        """The ack of a message the fast take delivered: kombu's removal of the unacked copy and the
        fetch list's copy with it (one transaction), then kombu's bookkeeping in memory."""
        pipe = self._remove_from_indices(delivery_tag)
        pipe.lrem(self.channel.fetch_list, 1, fetched)
        pipe.execute()
        virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag, client=None, leftmost=False):
        """kombu's restore of an unacked message (a requeue, a closing channel, the visibility
        timeout); a message the fast take delivered whose task has ended and left it in the fetch list
        goes from there back to the head of its queue. One whose task still runs (or may claim it)
        stays (kombu restores claimed copies its own way: ``leftmost``, the tail)."""
        fetched = fetched_of(self._delivered.get(tag))
        super().restore_by_tag(tag, client=client, leftmost=leftmost)
        if fetched is not None and tag not in _RUNNING_FETCHED:
            self.channel.give_back_fetched([fetched])

    def append(self, message, delivery_tag):
        """Record ``message`` as unacked, unless the fetch already did (in its script)."""
        if getattr(self.channel.connection, "onelane_claimed", None) == delivery_tag:
            virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping only
            return
        super().append(message, delivery_tag)


#: the command a fetch mode sends, whose reply its read parses
_COMMAND_OF = {"take": "EVALSHA", "fast": "LMOVE", "wait": "BLMOVE"}


class LossProofFetch:
    """The fetch of one onelane queue, on top of kombu's Redis channel (plain or Sentinel)."""

    QoS = QoS
    #: one list per queue: the fetch reads kombu's list of level 0 only
    priority_steps = [0]

    _fetch = None  # (QueueFetch, "take" | "fast" | "wait") of the command in progress
    _wait_next = False  # the last take found the queue empty: block until something arrives
    _take_fast = False  # the ready list holds more, and the last take had no coalesce key: LMOVE
    _fetch_ready: str | None = None  # fetch list registered (and emptied) by this channel
    _plan: QueueFetch | None = None
    _kept_client = None

    def _plan_for(self, queues) -> QueueFetch | None:
        """The fetch steps when this is an onelane worker consuming its one queue; else None."""
        token = os.environ.get(WORKER_ID_ENV)
        if not token or len(queues) != 1 or self.global_keyprefix or len(self.priority_steps) != 1:
            return None
        if queues[0] != os.environ.get(WORKER_QUEUE_ENV):  # e.g. Celery's own reply queues
            return None
        if self._plan is None or self._plan.queue != queues[0]:
            s = get_settings()
            keys = Keys(s.key_prefix)
            # the bulk queue has many consumers: a take records which worker received the message
            self._plan = QueueFetch(keys, queues[0], keys.fetch_list(queues[0], token),
                                    receiver=token if queues[0] == s.bulk_queue else "")
        return self._plan

    def _brpop_start(self, timeout=None):
        queues = self._queue_cycle.consume(len(self.active_queues))
        plan = self._plan_for(queues) if queues else None
        if plan is None:  # kombu's own fetch
            return super()._brpop_start(timeout)
        if self._fetch_ready != plan.fetch_list:
            self._prepare(plan)
        if timeout is None:
            timeout = self.brpop_timeout
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        if self._wait_next:
            # blocks until kombu's list holds a message, and leaves it there: it is taken by the script
            self._fetch = (plan, "wait")
            connection.send_command("BLMOVE", plan.queue, plan.queue, "RIGHT", "RIGHT", timeout or 0)
        elif self._take_fast:
            self._fetch = (plan, "fast")
            connection.send_command(*plan.fast_take_command())
        else:
            self._fetch = (plan, "take")
            connection.send_command(*plan.take_command(self._client()))

    def _brpop_read(self, **options):
        if self._fetch is None:
            return super()._brpop_read(**options)
        plan, mode = self._fetch
        self._fetch = None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, _COMMAND_OF[mode], **options)
            except redis.exceptions.NoScriptError:  # Redis lost its scripts (a restart): load, take again
                plan.load(self._client())
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                self._fetch_ready = None  # give anything left in the fetch list back first
                self._wait_next = False  # and take first: something may have come back meanwhile
                raise
            if mode == "fast":
                return self._deliver_fast(plan, reply)
            if mode == "wait":
                self._wait_next = False
                if reply is None:
                    self._check_master()
                    raise Empty()
                step = plan.absorb(self._client(), [reply], drain_first=True)
            else:
                step = Step.of(reply)
            return self._deliver_step(plan, step)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_step(self, plan: QueueFetch, step: Step) -> bool:
        """Absorb what the step read (up to the drain budget), then deliver the message it took."""
        budget = DRAIN_BUDGET
        while step.kind == "drain":
            budget -= len(step.drained)
            step = plan.absorb(self._client(), step.drained, drain_first=budget > 0)
        if step.kind == "empty":
            self._wait_next = True
            raise Empty()
        self._queue_cycle.rotate(plan.queue)
        if step.kind == "bad":
            self._dead_letter_unreadable(self._client(), plan, step.message)
            return True
        payload = loads(bytes_to_str(step.message))
        self._take_fast = step.ready_left > 0 and not arrival(step.message).key
        return self._deliver(plan, payload)

    def _deliver_fast(self, plan: QueueFetch, message) -> bool:
        """Deliver what the fast take moved to the fetch list (its callout runs from there).

        An empty ready list, or a callout with a coalesce key (coalescing is the script's work:
        the message goes back to the head first), ends the fast takes until the script has taken a
        callout without a key with more behind it."""
        if message is None:
            self._take_fast = False
            raise Empty()
        self._queue_cycle.rotate(plan.queue)
        try:
            payload = loads(bytes_to_str(message))
            readable = isinstance(payload["properties"]["delivery_tag"], str)
        except (ValueError, TypeError, KeyError):
            readable = False
        if not readable:  # as the take script judges it: not kombu's envelope
            self._dead_letter_unreadable(self._client(), plan, message)
            return True
        if arrival(message).key:
            self._take_fast = False
            self.give_back_fetched([message])
            raise Empty()
        payload["properties"][FETCHED] = fetched = bytes_to_str(message)
        tag = payload["properties"]["delivery_tag"]
        _running_fetched(tag, fetched)
        try:
            return self._deliver(plan, payload)
        except BaseException:  # not handed over: it goes back with the fetch list's next give-back
            _RUNNING_FETCHED.pop(tag, None)
            raise

    def _deliver(self, plan: QueueFetch, payload: dict) -> bool:
        """Hand a taken message to Celery, kombu's bookkeeping in memory only: the take script recorded
        it as unacked (and a bulk message's receiver), or it waits in the worker's fetch list (its
        callout runs from there)."""
        tag = payload["properties"]["delivery_tag"]
        replicas = Replicas.of(get_settings())
        if replicas.needed > 0:  # a take a failover could erase is not acted on
            replicas.ensure(self._client(), Keys(get_settings().key_prefix).replication_probe,
                            what=f"the take of message {tag}", log=log)
        self.connection.onelane_claimed = tag
        self.connection.onelane_receipt = tag if plan.receiver else None
        try:
            self.connection._deliver(payload, plan.queue)
        finally:
            self.connection.onelane_claimed = self.connection.onelane_receipt = None
        return True

    def _check_master(self) -> None:
        """Behind Sentinel: if this fetch connection is on a server the sentinels no longer name as
        master (a failover), drop it with a connection error, so Celery reconnects to the new
        master at once (kombu's Sentinel pool asks the sentinels on connect) instead of fetching
        from the old one until that one is turned into a replica."""
        s = get_settings()
        if not s.uses_sentinel:
            return
        try:
            (host, port), _settled = sentinel_master_view(s)
        except redis.RedisError:
            return
        conn = self.client.connection
        if (getattr(conn, "host", host), int(getattr(conn, "port", port))) != (host, port):
            log.warning("onelane: the sentinels name %s:%s as master now; reconnecting the fetch to it", host, port)
            conn.disconnect()
            raise redis.ConnectionError(f"the master moved to {host}:{port} (a failover)")

    @contextmanager
    def conn_or_acquire(self, client=None):
        """The client kombu sends a publish, an event or an ack through: one per connection pool,
        kept (kombu builds a new redis-py client, and its table of reply callbacks, for every
        one: a tenth of a worker's CPU per callout, measured with py-spy under make bench). A
        redis-py client is safe to share between threads: each command borrows a connection."""
        yield client or self._client()

    # -- the fetch list --------------------------------------------------------------
    def _client(self):
        """The channel's one redis-py client on its connection pool: the fetch's scripts, kombu's
        publishes, events and acks (a new one only when a reconnect made a new pool)."""
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        return kept

    def _prepare(self, plan: QueueFetch) -> None:
        """Register this worker's fetch list and give back anything left in it, but for the messages
        this worker's tasks are still running (delivered before a reconnect)."""
        client = self._client()
        keys = Keys(get_settings().key_prefix)
        register_fetch_list(client, keys, queue=plan.queue, token=os.environ.get(WORKER_ID_ENV, ""))
        running = set(_RUNNING_FETCHED.values())
        only = None
        if running:
            only = [m for m in client.lrange(plan.fetch_list, 0, -1) if bytes_to_str(m) not in running]
        moved = give_back(client, keys, fetch_list=plan.fetch_list, queue=plan.queue, forget=False, only=only)
        if moved:
            log.warning("onelane: gave %d fetched message(s) back to the head of %r", len(moved), plan.queue)
        self._fetch_ready = plan.fetch_list
        self._take_fast = False

    @property
    def fetch_list(self) -> str:
        """This channel's fetch list (its one queue's)."""
        return self._plan.fetch_list

    def give_back_fetched(self, messages: list) -> list:
        """Give these messages back from this worker's fetch list to the head of its queue, those it
        still holds (a message whose task claimed it meanwhile stays unacked)."""
        plan = self._plan
        return give_back(self._client(), Keys(get_settings().key_prefix), fetch_list=plan.fetch_list,
                         queue=plan.queue, forget=False, only=list(messages))

    def _dead_letter_unreadable(self, client, plan: QueueFetch, item: bytes) -> None:
        """A message that is not even kombu's envelope: into the queue's dead letters, never the log."""
        import hashlib

        queue, fetch_list = plan.queue, plan.fetch_list
        keys = Keys(get_settings().key_prefix)
        entry_id = f"unreadable-{hashlib.sha256(item).hexdigest()[:16]}"
        entry = {"id": entry_id, "task_id": entry_id, "queue": queue, "kind": "unrunnable", "attempts": [],
                 "reason": "the message is not kombu's JSON envelope; it is not kept",
                 "request": {"omitted": f"{len(item)} bytes, unreadable"}, "dead_lettered_at": time.time()}
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.dead_letters(queue), entry_id, json.dumps(entry))
        pipe.zadd(keys.dead_letter_index(queue), {entry_id: int(time.time() * 1000)})
        counters.count(pipe, keys, "dead_lettered", queue, queue)
        pipe.lrem(fetch_list, 1, item)
        pipe.execute()
        log.error("onelane: dead-lettered an unreadable message from %r as %s; it never ran", queue, entry_id)


def receipt_recorded(message) -> bool:
    """True while onelane's fetch delivers ``message`` (a kombu message) of the bulk queue: its take
    recorded the receiving worker already, or (the fast take) the worker's fetch list says whose it
    is while it is there (a claim, should one come, writes the record with the unacked copy).
    Nothing more to write on receipt."""
    transport = getattr(getattr(message, "channel", None), "connection", None)
    tag = getattr(message, "delivery_tag", None)
    return tag is not None and getattr(transport, "onelane_receipt", None) == tag


class Channel(LossProofFetch, kombu_redis.Channel):
    """kombu's Redis channel with the loss-proof fetch."""


class SentinelChannel(LossProofFetch, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it follows the current master) with the loss-proof fetch."""


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """For ``sentinel://`` URLs: the broker follows the master the sentinels name."""

    Channel = SentinelChannel


def same_transport_failover(alternates: list[str]):
    """The broker's failover strategy: reconnect with onelane's transport, every time.

    Given ``sentinel://h1;sentinel://h2;...``, kombu's ``Connection.switch()`` (called on every
    reconnect) parses the next URL and takes its scheme as the transport, so after the first lost
    connection the worker would consume through kombu's plain Sentinel transport: without the
    loss-proof fetch, and blind to the queue's ready list. Handing kombu a bare host name instead
    keeps the transport given at start. Which sentinel it names does not matter: the Sentinel pool
    asks every sentinel of the URL (``Connection.alt``) where the master is.
    """
    [(first, _port)] = sentinel_hosts(alternates[0])
    return itertools.repeat(first)
