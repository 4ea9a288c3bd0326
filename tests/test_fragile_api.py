"""The fragile API the tests measure onelane against: it must see every real overlap, and no other."""
from __future__ import annotations

import threading

import pytest
import requests

from demo.fragile_api import FragileAPI


@pytest.mark.unit
def test_two_calls_at_once_are_an_overlap_and_back_to_back_calls_are_not():
    with FragileAPI(delay_s=0.3) as api:
        # back to back: each call sent as soon as the previous answer arrived
        for i in range(5):
            assert requests.post(f"{api.url}/seq/{i}", json={}, timeout=5).status_code == 200
        assert api.overlaps == 0 and api.max_concurrency == 1
        # two at once: the second arrives while the first is being worked on
        answers = []
        threads = [threading.Thread(target=lambda i=i: answers.append(
            requests.post(f"{api.url}/both/{i}", json={}, timeout=5).status_code)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert api.overlaps == 1 and api.max_concurrency == 2
        assert sorted(answers) == [200, 500]  # the API breaks under concurrency, as it should


@pytest.mark.unit
def test_a_request_cut_off_before_its_body_arrived_is_no_call():
    import socket
    import time

    with FragileAPI() as api:
        # a client killed between sending the headers and the body (as a kill -9 of a worker can)
        with socket.create_connection(("127.0.0.1", api.port), timeout=5) as s:
            s.sendall(b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
                      b'{"half": ')
        # then a whole one
        assert requests.post(f"{api.url}/whole", json={"n": 1}, timeout=5).status_code == 200
        time.sleep(0.1)
        assert [(c.path, c.json()) for c in api.snapshot()] == [("/whole", {"n": 1})]
        assert api.overlaps == 0
