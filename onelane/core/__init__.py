"""The bottom layer: settings, Redis key names, errors, Redis clients, the Lua loader, text.

It imports only the standard library and redis-py; every other part of onelane builds on it.
"""
