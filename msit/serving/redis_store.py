"""The history store in Redis: one copy of every user's sequence shared by all replicas, and new events.

Key layout (prefix `{namespace}:{feature spec fingerprint}:`, so that two deployments, or two models
with different vocabularies, share one Redis without reading each other's encoded ids):

    {prefix}u:{<user key>}    hash: u  encoded user id (ASCII)
                                    e  the sequence, oldest first, packed little-endian records of EVENT
                                       (item int32, scene int16, label int8, timestamp int64: 15 bytes each),
                                       at most `events_per_user` of them (the latest)
                                    t  a random token, new on every write (compare-and-set)
                                    f:<name>  each user side feature, little-endian (int64 / float32)
    {prefix}ids:{<user key>}  sorted set of the user's recent event ids (score: the event's timestamp),
                              the latest `event_ids_per_user`: de-duplication

The braces are Redis Cluster hash tags: both keys of a user live in one slot. A read is one HGETALL per
user (one pipeline per request batch). An append reads the records of a batch's users (one pipeline),
merges each user's new events into their sequence in event order (timestamp, ties by item key, as prepare
orders them; `merge_events`) and writes each back with a Lua compare-and-set on the token (one pipeline):
a write lost to a concurrent one is merged again from the newer record, so replicas never lose or
half-apply an event. An event id already in the user's set is skipped.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeGuard, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from msit.data.feature_spec import FeatureSpec
from msit.data.history import items_are_numbers, sorted_event_order
from msit.errors import ConfigError
from msit.model.features import fields_of
from msit.serving.history_store import (
    USER_FEATURE_DTYPES,
    Appended,
    HistoryUnavailable,
    InMemoryHistoryStore,
    NewEvents,
    UserRecord,
    items_numeric,
)

logger = logging.getLogger("msit.serving")
PASSWORD_ENV, PASSWORD_FILE_ENV = "MSIT_REDIS_PASSWORD", "MSIT_REDIS_PASSWORD_FILE"
EVENT = np.dtype([("item", "<i4"), ("scene", "<i2"), ("label", "i1"), ("timestamp", "<i8")])  # packed: 15 bytes
DEFAULT_EVENTS_PER_USER = 1000
SOCKET_TIMEOUT_S = 1.0  # a Redis that stopped answering costs a request about 2 s (one retry), not a hang
WRITE_ATTEMPTS = 50  # compare-and-set rounds before an append gives up (only under heavy contention on one user)

# KEYS: the user's record hash, their event-id set. ARGV: the token read ('' = no record), the new token,
# the merged events, the encoded user id (for a new user), the most event ids kept, then (event id, timestamp)
# pairs. Returns {1, token} when written; {0, current token} when the record changed since it was read; {2, ''}
# when an event id arrived meanwhile. Nothing is written unless everything is.
COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 't') or ''
if current ~= ARGV[1] then return {0, current} end
for i = 6, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then return {2, ''} end
end
redis.call('HSET', KEYS[1], 'e', ARGV[3], 't', ARGV[2])
redis.call('HSETNX', KEYS[1], 'u', ARGV[4])
if #ARGV >= 6 then
  for i = 6, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i]) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[5]) + 1))
end
return {1, ARGV[2]}
"""


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def password_from_env() -> str | None:
    """MSIT_REDIS_PASSWORD, or the contents of the file MSIT_REDIS_PASSWORD_FILE names; None if neither is set."""
    password, path = os.environ.get(PASSWORD_ENV), os.environ.get(PASSWORD_FILE_ENV)
    if not password and path:
        try:
            password = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"{PASSWORD_FILE_ENV}={path}: cannot read the Redis password file ({e.strerror})"
            ) from None
        if not password:
            raise ConfigError(f"{PASSWORD_FILE_ENV}={path} is empty")
    return password or None


def is_redis_url(value: str | None) -> TypeGuard[str]:
    return value is not None and value.split("://", 1)[0] in ("redis", "rediss", "unix")


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis://host:port/db, rediss:// for TLS) with short timeouts and one immediate retry
    (a connection Redis closed while it restarted is replaced without a failed request)."""
    if not is_redis_url(url):
        raise ConfigError(f"history store URL {redact(url)!r}: expected redis://HOST:PORT/DB (or rediss://, unix://)")
    password = password_from_env()
    try:
        return redis.Redis.from_url(
            url,
            **({"password": password} if password else {}),
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
    except ValueError as e:
        raise ConfigError(f"history store URL {redact(url)!r}: {e}") from None


def pack_events(item_ids, scene_ids, labels, timestamps) -> np.ndarray:
    """(E,) EVENT records from the four (E,) arrays."""
    events = np.empty(len(item_ids), EVENT)
    events["item"], events["scene"], events["label"], events["timestamp"] = item_ids, scene_ids, labels, timestamps
    return events


_P = TypeVar("_P", dict[str, NewEvents], list[str])  # the users still to write, as a round takes them


class RedisHistoryStore:
    """Every user's sequence and side features in Redis (module docstring: layout, reads, atomic appends)."""

    def __init__(
        self,
        url: str,
        spec: FeatureSpec,
        events_per_user: int = DEFAULT_EVENTS_PER_USER,
        namespace: str = "msit",
        event_ids_per_user: int | None = None,
        client: redis.Redis | None = None,
    ):
        if events_per_user < 1:
            raise ConfigError(f"history store: events_per_user must be at least 1, got {events_per_user}")
        self.url, self.events_per_user = redact(url), events_per_user
        self.event_ids_per_user = event_ids_per_user or events_per_user
        self.prefix = f"{namespace}:{spec.fingerprint()}:"
        self.client = client or connect(url)
        self._cas = self.client.register_script(COMPARE_AND_SET)
        self._items = np.asarray(spec.vocabularies["item_id"], dtype=object)  # encoded id -> raw key
        self._items_numeric = items_numeric(spec)
        self._feature_dtypes = {
            name: np.dtype(dtype).newbyteorder("<")
            for kind, dtype in USER_FEATURE_DTYPES.items()
            for name in fields_of(spec, "user", kind)
        }
        self._multi = set(fields_of(spec, "user", "multi"))

    # -- keys and (de)serialisation ----------------------------------------------------------------------------

    def record_key(self, user_key: str) -> bytes:
        return f"{self.prefix}u:{{{user_key}}}".encode()

    def ids_key(self, user_key: str) -> bytes:
        return f"{self.prefix}ids:{{{user_key}}}".encode()

    def _record(self, fields: dict[bytes, bytes]) -> UserRecord | None:
        if not fields:
            return None
        events = np.frombuffer(fields.get(b"e", b""), EVENT)
        features = {}
        for name, dtype in self._feature_dtypes.items():
            value = fields.get(f"f:{name}".encode())
            if value is not None:
                array = np.frombuffer(value, dtype).astype(dtype.newbyteorder("="))
                features[name] = array if name in self._multi else array[0]
        return UserRecord(
            int(fields.get(b"u", b"1")),
            events["item"].astype(np.int32),
            events["scene"].astype(np.int16),
            events["label"].astype(np.int8),
            events["timestamp"].astype(np.int64),
            features=features,
        )

    def _fields(self, record: UserRecord) -> dict[bytes, bytes]:
        events = pack_events(record.item_ids, record.scene_ids, record.labels, record.timestamps)
        fields = {
            b"u": str(int(record.user_id)).encode(),
            b"e": events[-self.events_per_user :].tobytes(),
            b"t": secrets.token_hex(8).encode(),
        }
        for name, value in record.features.items():
            fields[f"f:{name}".encode()] = np.asarray(value, self._feature_dtypes[name]).tobytes()
        return fields

    def _unavailable(self, error: redis.RedisError, doing: str) -> HistoryUnavailable:
        message = " ".join(str(error).split())[:200]
        logger.warning(f"history store {self.url}: {doing} failed: {type(error).__name__}: {message}")
        return HistoryUnavailable(
            f"the history store (Redis at {self.url}) is unavailable: {doing} failed "
            f"({type(error).__name__}: {message})"
        )

    # -- reads --------------------------------------------------------------------------------------------------

    def user(self, user_key: str) -> UserRecord | None:
        try:
            # the client is bytes-mode (decode_responses=False); redis-py types replies for both modes
            return self._record(self.client.hgetall(self.record_key(user_key)))  # type: ignore[arg-type]
        except redis.RedisError as error:
            raise self._unavailable(error, "reading a user's history") from None

    def users(self, user_keys: list[str]) -> list[UserRecord | None]:
        """Many users' records in one round trip."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in user_keys:
                pipe.hgetall(self.record_key(key))
            return [self._record(fields) for fields in pipe.execute()]
        except redis.RedisError as error:
            raise self._unavailable(error, "reading users' histories") from None

    def health(self) -> dict:
        state = {
            "kind": "redis",
            "url": self.url,
            "prefix": self.prefix,
            "events_per_user": self.events_per_user,
            "writable": True,
        }
        try:
            self.client.ping()
        except redis.RedisError as error:
            message = " ".join(str(error).split())[:200]
            return {**state, "state": "unavailable", "error": f"{type(error).__name__}: {message}"}
        return {**state, "state": "ok"}

    # -- writes -------------------------------------------------------------------------------------------------

    def append(self, batch: list[NewEvents]) -> Appended:
        """Each user's new events merged into their sequence, atomically per user (module docstring). Raises
        HistoryUnavailable if Redis fails; a user whose write went through before the failure keeps it, and
        sending the batch again with event ids applies the rest only."""
        result = Appended()
        try:
            self._write_until_done(
                {new.user_key: new for new in batch},  # one NewEvents per user
                lambda pending: self._append_round(pending, result),
                "users' events could not be written",
                "send them again",
            )
        except redis.RedisError as error:
            raise self._unavailable(error, "appending events") from None
        return result

    def _write_until_done(self, pending: _P, write_round: Callable[[_P], _P], failed: str, advice: str) -> None:
        """Compare-and-set rounds until no user is left whose record changed meanwhile (`write_round` returns
        them), at most WRITE_ATTEMPTS: beyond, only heavy contention on some users is left to blame."""
        for _ in range(WRITE_ATTEMPTS):
            pending = write_round(pending)
            if not pending:
                return
        raise HistoryUnavailable(
            f"the history store (Redis at {self.url}): {len(pending)} {failed} in {WRITE_ATTEMPTS} attempts "
            f"(concurrent writers); {advice}"
        )

    @staticmethod
    def _landed(reply: list, next_token: bytes) -> bool:
        """Whether a COMPARE_AND_SET reply means the write is in Redis: status 1, or status 0 with our own new
        token (the write landed and its reply was lost, so the client sent it again)."""
        status, current = reply
        return status == 1 or current == next_token

    def _append_round(self, pending: dict[str, NewEvents], result: Appended) -> dict[str, NewEvents]:
        """One read-merge-write round; returns the users whose record changed meanwhile (to merge again)."""
        users = list(pending.values())
        pipe = self.client.pipeline(transaction=False)
        for new in users:
            pipe.hmget(self.record_key(new.user_key), [b"e", b"t"])
            ids = [i for i in new.event_ids if i is not None]
            if ids:
                pipe.zmscore(self.ids_key(new.user_key), ids)
        answers = iter(pipe.execute())
        writes = []
        for new in users:
            stored, token = next(answers)
            seen = iter(next(answers) if any(i is not None for i in new.event_ids) else [])
            fresh = np.array([i is None or next(seen) is None for i in new.event_ids], dtype=bool)
            result.duplicates += int((~fresh).sum())
            new = _select(new, fresh)
            if not len(new.item_ids):
                continue
            merged = merge_events(
                np.frombuffer(stored or b"", EVENT), new, self._items, self._items_numeric, self.events_per_user
            )
            writes.append((new, token or b"", secrets.token_hex(8).encode(), merged))
        if not writes:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for new, token, next_token, merged in writes:
            stamped = [(i, int(t)) for i, t in zip(new.event_ids, new.timestamps, strict=True) if i is not None]
            self._cas(
                keys=[self.record_key(new.user_key), self.ids_key(new.user_key)],
                args=[
                    token,
                    next_token,
                    merged.tobytes(),
                    int(new.user_id),
                    self.event_ids_per_user,
                    *(x for pair in stamped for x in pair),
                ],
                client=pipe,
            )
        again = {}
        for (new, _, next_token, _), reply in zip(writes, pipe.execute(), strict=True):
            if self._landed(reply, next_token):
                result.applied += len(new.item_ids)
            else:
                again[new.user_key] = new
        return again

    # -- bulk load ----------------------------------------------------------------------------------------------

    def load(self, source: InMemoryHistoryStore, chunk: int = 500, progress: bool = True) -> int:
        """Write each of `source`'s users (sequence and side features) into Redis, `chunk` users per round trip.
        Nothing posted meanwhile is lost: events Redis holds that `source` lacks (posted to /v1/events since the
        snapshot) are merged into the snapshot's sequence in event order, event ids are kept, users only Redis
        holds are left as they are, and each sequence is written with the appends' compare-and-set (a user
        appended to during the load is merged again). So loading again is safe and changes nothing. A reader
        may see a user's new sequence a moment before their new side features. Returns the users written."""
        from tqdm import tqdm

        keys = list(source)
        try:
            with tqdm(total=len(keys), desc="users", unit="user", disable=not progress) as bar:
                for start in range(0, len(keys), chunk):
                    self._write_until_done(
                        keys[start : start + chunk],
                        lambda pending: self._load_round(source, pending),
                        "users could not be loaded",
                        "run the load again",
                    )
                    bar.update(len(keys[start : start + chunk]))
        except redis.RedisError as error:
            raise self._unavailable(error, "loading histories") from None
        return len(keys)

    def _load_round(self, source: InMemoryHistoryStore, keys: list[str]) -> list[str]:
        """One read-merge-write round of a load; returns the users whose record changed meanwhile."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self.record_key(key), [b"e", b"t"])
        writes = []
        for key, (stored, token) in zip(keys, pipe.execute(), strict=True):
            record = source.user(key)
            assert record is not None  # one of the source's own keys
            fields = self._fields(record)
            snapshot = np.frombuffer(fields.pop(b"e"), EVENT)
            events = self._with_posted_events(key, snapshot, np.frombuffer(stored or b"", EVENT))
            writes.append((key, token or b"", fields, events))
        pipe = self.client.pipeline(transaction=False)
        for key, token, fields, events in writes:
            self._cas(
                keys=[self.record_key(key), self.ids_key(key)],
                args=[token, fields[b"t"], events.tobytes(), fields[b"u"], self.event_ids_per_user],
                client=pipe,
            )
            pipe.hset(self.record_key(key), mapping={k: v for k, v in fields.items() if k != b"t"})  # u, f:*
        replies = pipe.execute()[0::2]  # the compare-and-sets' (each is followed by its HSET)
        return [
            key
            for (key, _, fields, _), reply in zip(writes, replies, strict=True)
            if not self._landed(reply, fields[b"t"])
        ]

    def _with_posted_events(self, user_key: str, snapshot: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """The snapshot's sequence with the stored events it does not hold merged in (the latest events_per_user)."""
        known = {event.tobytes() for event in snapshot}
        extra = (
            stored[np.array([event.tobytes() not in known for event in stored], dtype=bool)] if len(stored) else stored
        )
        if not len(extra):
            return snapshot[-self.events_per_user :]
        posted = NewEvents(
            user_key,
            0,
            extra["item"],
            extra["scene"],
            extra["label"],
            extra["timestamp"],
            [str(k) for k in self._items[extra["item"]]],
            [None] * len(extra),
        )
        return merge_events(snapshot, posted, self._items, self._items_numeric, self.events_per_user)

    def scan_users(self) -> Iterator[str]:
        """Every user key the store holds under this prefix (SCAN: does not block Redis)."""
        start = len(f"{self.prefix}u:{{")
        for key in self.client.scan_iter(match=f"{self.prefix}u:*".encode(), count=1000):
            yield key[start:-1].decode()


def _select(new: NewEvents, keep: np.ndarray) -> NewEvents:
    if keep.all():
        return new
    return NewEvents(
        new.user_key,
        new.user_id,
        new.item_ids[keep],
        new.scene_ids[keep],
        new.labels[keep],
        new.timestamps[keep],
        [k for k, f in zip(new.item_keys, keep, strict=True) if f],
        [i for i, f in zip(new.event_ids, keep, strict=True) if f],
    )


def merge_events(stored: np.ndarray, new: NewEvents, item_keys: np.ndarray, numeric: bool, keep: int) -> np.ndarray:
    """The user's sequence with `new` merged in, in event order (by timestamp, ties by item key: as numbers where
    the model's log had numeric item keys and every key in the tie region is one, as the scorer orders a request's
    history), the latest `keep` events. Stored events keep their order; only the tail from the earliest new
    timestamp is sorted again, with the stored items' keys read back from the vocabulary (an out-of-vocabulary
    item's raw key is not kept: it ties as the key "<oov>")."""
    fresh = pack_events(new.item_ids, new.scene_ids, new.labels, new.timestamps)
    cut = int(np.searchsorted(stored["timestamp"], fresh["timestamp"].min(), side="left")) if len(stored) else 0
    tail = np.concatenate([stored[cut:], fresh])
    keys = pa.array([str(k) for k in item_keys[stored["item"][cut:]]] + list(new.item_keys), pa.string())
    order = sorted_event_order(
        pa.array(np.zeros(len(tail), np.int8)), pa.array(tail["timestamp"]), keys, numeric and items_are_numbers(keys)
    )
    return np.concatenate([stored[:cut], tail[order]])[-keep:]
