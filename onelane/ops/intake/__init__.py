"""The HTTP intake (``onelane intake``): any platform hands its callouts to a lane with one quick request.

Needs the optional extra ``onelane[intake]`` (Starlette on uvicorn); only :mod:`.app` and
:mod:`.server` import it, so the rest of onelane — and ``onelane intake token add`` — work
without it. The modules, each named for what it holds:

* :mod:`.tokens` — bearer tokens, stored hashed, found in constant time; the tokens file;
* :mod:`.auth` — who may do what: token, lane, per-token rate;
* :mod:`.accept` — a callout (or a batch) validated, deduplicated by Idempotency-Key, published;
* :mod:`.state` — how a callout is doing, read from onelane's own records;
* :mod:`.openapi` — the OpenAPI document served at ``/openapi.json``;
* :mod:`.app` — the Starlette application: routes, JSON answers, Redis down as 503;
* :mod:`.server` — start-up checks and uvicorn.
"""
