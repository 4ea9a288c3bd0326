"""Coordination across workers and hosts, all state in Redis: the lease (with fencing tokens),
the semaphore of a capped resource, the global rate limit, the adaptive cap, the circuit
breaker. Each primitive runs its Lua scripts from ``lua/`` beside it."""
