"""Django's Redis cache, with one Redis client per connection pool instead of one per
operation: a client's construction (its table of reply handlers) cost more than the
round trip of a small GET, and a page reads the cache several times (the session,
throttling counters, what the viewer found). Clients share their pool's connections and
are safe to share between threads."""

from django.core.cache.backends import redis as django_redis


class RedisCacheClient(django_redis.RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = self._clients.get(id(pool))
        if client is None:
            client = self._clients[id(pool)] = self._client(connection_pool=pool)
        return client


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient
