"""The demo and the real parts the tests share: a private redis-server and a fragile API."""
