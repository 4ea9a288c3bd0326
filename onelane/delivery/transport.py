"""The Redis transport onelane's workers consume with: kombu's own, with a fetch that cannot lose.

kombu's Redis transport takes a message off the queue with BRPOP and only then records it
as unacknowledged, in a second round trip: a worker killed between the two (or a reply
lost on a dropped connection) loses that message for good. Here a consuming worker takes
it with BLMOVE into a fetch list of its own (one per worker and queue), then records it
as unacked and removes it from the fetch list in one script (``lua/fetch_claim.lua``).

Guarantee: at every moment the message is in the queue, in exactly one worker's fetch
list, or in kombu's unacked hash, never nowhere. A worker gives its own fetch list back
to the head of the queue when it (re)connects; the reaper gives back the fetch list of a
worker that is gone (:func:`onelane.delivery.fetching.return_fetched`). A worker whose fetch
was given back while it was cut off from Redis does not deliver it (the claim fails).

It applies to an onelane worker, which consumes exactly one queue (a lane or the bulk
queue; the guard refuses more); any other consumer keeps kombu's fetch unchanged. The
fetch reads the queue's own list only (BLMOVE takes from one list): a message a plain
producer published with a priority lands in kombu's sub-list for that level, and the
worker's heartbeat moves it to the queue (:func:`onelane.delivery.flow.absorb_priorities`).

It overrides two internal methods of kombu's Redis channel (``_brpop_start`` and
``_brpop_read``), so pyproject.toml requires the kombu line the test suite runs on.
"""
from __future__ import annotations

import json
import logging
import os
import time
from queue import Empty

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from onelane.core.keys import Keys
from onelane.core.settings import WORKER_ID_ENV, WORKER_QUEUE_ENV, get_settings
from onelane.delivery.fetching import claim, give_back

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        """Record ``message`` as unacked, unless the fetch already did (in the claim script)."""
        if getattr(self.channel.connection, "onelane_claimed", None) == delivery_tag:
            virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping only
            return
        super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    #: one list per queue: BLMOVE takes from one list only
    priority_steps = [0]

    _fetch = None  # (queue, fetch list) of the BLMOVE in progress
    _fetch_ready: str | None = None  # fetch list registered (and emptied) by this channel
    _claim_client = None

    def _fetch_list_for(self, queues) -> tuple[str, str] | None:
        """(queue, fetch list) when this is an onelane worker consuming its one queue; else None."""
        token = os.environ.get(WORKER_ID_ENV)
        if not token or len(queues) != 1 or self.global_keyprefix or len(self.priority_steps) != 1:
            return None
        if queues[0] != os.environ.get(WORKER_QUEUE_ENV):  # e.g. Celery's own reply queues
            return None
        return queues[0], Keys(get_settings().key_prefix).fetch_list(queues[0], token)

    def _brpop_start(self, timeout=None):
        queues = self._queue_cycle.consume(len(self.active_queues))
        plan = self._fetch_list_for(queues) if queues else None
        if plan is None:  # kombu's own fetch
            return super()._brpop_start(timeout)
        queue, fetch_list = plan
        if self._fetch_ready != fetch_list:
            self._prepare(queue, fetch_list)
        if timeout is None:
            timeout = self.brpop_timeout
        self._fetch = plan
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command("BLMOVE", queue, fetch_list, "RIGHT", "LEFT", timeout or 0)

    def _brpop_read(self, **options):
        if self._fetch is None:
            return super()._brpop_read(**options)
        queue, fetch_list = self._fetch
        self._fetch = None
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._fetch_ready = None  # a reply may be lost: give the fetch list back first
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            payload = self._claim(fetch_list, item)
            if payload is None:
                return True
            self.connection.onelane_claimed = payload["properties"]["delivery_tag"]
            try:
                self.connection._deliver(payload, queue)
            finally:
                self.connection.onelane_claimed = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    # -- the fetch list --------------------------------------------------------------
    def _client(self):
        if self._claim_client is None:
            self._claim_client = self._create_client()
        return self._claim_client

    def _prepare(self, queue: str, fetch_list: str) -> None:
        """Register this worker's fetch list and give back anything a lost reply left in it."""
        client = self._client()
        keys = Keys(get_settings().key_prefix)
        client.hset(keys.fetch_lists, fetch_list,
                    json.dumps({"queue": queue, "token": os.environ.get(WORKER_ID_ENV, "")}))
        moved = give_back(client, keys, fetch_list=fetch_list, queue=queue, forget=False)
        if moved:
            log.warning("onelane: gave %d fetched message(s) back to the head of %r (a reply was lost)",
                        len(moved), queue)
        self._fetch_ready = fetch_list

    def _claim(self, fetch_list: str, item: bytes) -> dict | None:
        """Record the fetched message as unacked; None if it cannot or must not be delivered."""
        client = self._client()
        try:
            payload = loads(bytes_to_str(item))
            props = payload["properties"]
            info = props.get("delivery_info") or {}
            tag = props["delivery_tag"]
        except (ValueError, KeyError, TypeError) as exc:
            client.lrem(fetch_list, 1, item)
            log.error("onelane: dropped an unreadable message from %r (%s): %.200r", fetch_list, exc, item)
            return None
        unacked = dumps([payload, info.get("exchange", ""), info.get("routing_key", "")])
        if not claim(client, fetch_list=fetch_list, item=item, delivery_tag=tag, unacked=unacked):
            log.warning("onelane: message %s was given back to its queue while this worker was cut off "
                        "from Redis; not delivering it here", tag)
            return None
        return payload


class Transport(kombu_redis.Transport):
    Channel = Channel
