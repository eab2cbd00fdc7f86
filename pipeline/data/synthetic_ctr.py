"""A synthetic click log in the paper's scale regime, with planted collaborative structure (numpy only).

The generative model (docs/data_schema.md, "Synthetic scale-regime dataset"; parameters: :class:`SynthConfig`):

- **Taste clusters.** ``clusters`` (K) clusters; every item has one primary cluster (items dealt round-robin
  over the clusters after a seeded shuffle, so cluster sizes differ by at most one), its genre, and with
  probability ``secondary_genre`` a second, different cluster as a second genre. Within a cluster, item
  popularity is Zipf(``item_zipf``) over a random order of its items.
- **Users** mix ``taste_clusters`` (m) distinct clusters, drawn without replacement with Zipf(``cluster_zipf``)
  weights over the clusters (some clusters are popular with many users); the user's i-th cluster has weight
  ``w_i = (1/i) / sum_j (1/j)``, the user's **affinity** for it (0 for every other cluster).
- **Sessions.** A history is a run of sessions (a new session starts at an event with probability
  ``1 / session_mean``, so session lengths are geometric). A session's cluster is one of the user's taste
  clusters (weights w), or with probability ``explore`` a uniform random cluster. Its first item is drawn
  from the cluster's popularity; each next item is, with probability ``follow``, one of the ``neighbours``
  items of the previous item's fixed neighbourhood (drawn once per item from its cluster's popularity), else
  a fresh draw: the same item-to-item transitions recur across users (what a shared pool can share).
- **Lengths** are log-normal with median ``max_len / 2`` and sigma ``length_sigma``, clipped to 1..max_len.
- **Times.** The starts of a user's visits are uniform over ``span_days`` (sorted per user), the events of a
  visit 10..599 s apart; each user's timestamps are made strictly increasing, so an event's history is exactly its
  predecessors in the user's sequence.
- **Labels.** The planted score of an event at position t of a user u with target item i in cluster c is
  ``x = bias + share_weight * s + affinity_weight * w(u, c) + e_i``, where ``s`` is the share of u's last
  ``min(t, window)`` events in cluster c (0 at t = 0) and ``e_i ~ N(0, item_sd)`` a fixed item effect;
  ``label ~ Bernoulli(sigmoid(x + n))`` with per-event noise ``n ~ N(0, noise_sd)``. The Bayes-optimal click
  probability is ``E_n[sigmoid(x + n)]`` (:func:`planted_probability`), a monotone function of x.

Deterministic in ``seed``: the world comes from the generator seeded ``[seed, 0]``, users ``lo..lo+b`` from
``[seed, 1, lo]`` and their events from ``[seed, 2, lo]``, in chunks of :data:`CHUNK_USERS` users.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from collectivekv.pipeline.data.synthetic import zipf_cdf

CHUNK_USERS = 1000  # users generated together (part of the seeding: see the module docstring)
MAX_CLUSTERS = 62  # SIM's category bitmask holds at most 62 genres (model/longseq.py)
T0 = 1_700_000_000  # first possible timestamp (seconds)
GAP_S = (10, 600)  # seconds between the events of a session: uniform integers in [10, 600)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generative model (module docstring); all of them are recorded in meta.json."""

    users: int = 22_000
    items: int = 100_000
    clusters: int = 32
    max_len: int = 1000
    seed: int = 0
    taste_clusters: int = 3
    explore: float = 0.1
    cluster_zipf: float = 1.0
    item_zipf: float = 1.1
    secondary_genre: float = 0.3
    session_mean: float = 6.0
    neighbours: int = 10
    follow: float = 0.7
    length_sigma: float = 0.6
    span_days: int = 365
    window: int = 50
    bias: float = -2.5
    share_weight: float = 3.0
    affinity_weight: float = 3.0
    item_sd: float = 0.5
    noise_sd: float = 0.5

    def __post_init__(self) -> None:
        checks = [
            ("users", self.users >= 1), ("clusters", 1 <= self.clusters <= MAX_CLUSTERS),
            ("items", self.items >= 2 * self.clusters), ("max_len", self.max_len >= 1),
            ("taste_clusters", 1 <= self.taste_clusters <= self.clusters),
            ("explore", 0.0 <= self.explore <= 1.0), ("secondary_genre", 0.0 <= self.secondary_genre <= 1.0),
            ("follow", 0.0 <= self.follow <= 1.0), ("session_mean", self.session_mean >= 1.0),
            ("neighbours", self.neighbours >= 1), ("length_sigma", self.length_sigma >= 0.0),
            ("span_days", self.span_days >= 1), ("window", self.window >= 1),
            ("item_sd", self.item_sd >= 0.0), ("noise_sd", self.noise_sd >= 0.0),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"synthetic dataset: invalid {', '.join(bad)} ({self.params()}); clusters <= "
                             f"{MAX_CLUSTERS}, items >= 2 * clusters, taste_clusters <= clusters, rates in [0, 1]")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def taste_weights(self) -> np.ndarray:
        """(m,) weight of a user's 1st, 2nd, ... taste cluster: Zipf(1), summing to 1."""
        w = 1.0 / np.arange(1, self.taste_clusters + 1, dtype=np.float64)
        return w / w.sum()


@dataclass(frozen=True)
class World:
    """The item side, shared by every user. Raw item ids are 1..items (index 0 of the per-item arrays unused).

    cluster_items (K, S) int32: cluster c's items by popularity rank (S = ceil(items / K); -1 past its size);
    cluster_size (K,); item_cluster (items + 1,) int64 primary cluster; secondary (items + 1,) int64 second
    genre's cluster or -1; neighbours (items + 1, neighbours) int32; item_effect (items + 1,) float64;
    rank_cdf (S,) the Zipf(item_zipf) CDF of the ranks (a cluster of size s draws from its first s ranks).
    """

    cluster_items: np.ndarray
    cluster_size: np.ndarray
    item_cluster: np.ndarray
    secondary: np.ndarray
    neighbours: np.ndarray
    item_effect: np.ndarray
    rank_cdf: np.ndarray

    def draw(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """One item per entry of ``clusters`` (int array), by the cluster's popularity."""
        top = self.rank_cdf[self.cluster_size[clusters] - 1]  # mass of the cluster's ranks
        ranks = np.searchsorted(self.rank_cdf, rng.random(len(clusters)) * top, side="right")
        ranks = np.minimum(ranks, self.cluster_size[clusters] - 1)
        return self.cluster_items[clusters, ranks]

    def genre_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(raw item ids, cluster ids) of every (item, genre) pair: the primary, then the secondary genres."""
        ids = np.arange(1, len(self.item_cluster), dtype=np.int64)
        second = self.secondary[1:] >= 0
        return (np.concatenate([ids, ids[second]]),
                np.concatenate([self.item_cluster[1:], self.secondary[1:][second]]))


def build_world(cfg: SynthConfig) -> World:
    """The items' clusters, popularity, neighbourhoods, secondary genres and effects (seeded ``[seed, 0]``)."""
    rng = np.random.default_rng([cfg.seed, 0])
    k, n = cfg.clusters, cfg.items
    width = -(-n // k)
    perm = rng.permutation(n).astype(np.int32) + 1  # slot j -> raw item id; cluster j % K, rank j // K
    slots = np.arange(n)
    cluster_items = np.full((k, width), -1, np.int32)
    cluster_items[slots % k, slots // k] = perm
    cluster_size = np.bincount(slots % k, minlength=k)
    item_cluster = np.zeros(n + 1, np.int64)
    item_cluster[perm] = slots % k
    world = World(cluster_items, cluster_size, item_cluster, np.full(n + 1, -1, np.int64),
                  np.zeros((n + 1, cfg.neighbours), np.int32), np.zeros(n + 1), zipf_cdf(width, cfg.item_zipf))
    neighbours = world.neighbours.copy()
    neighbours[1:] = world.draw(rng, np.repeat(item_cluster[1:], cfg.neighbours)).reshape(n, cfg.neighbours)
    secondary = world.secondary.copy()
    if k > 1:
        has = rng.random(n) < cfg.secondary_genre
        other = (item_cluster[1:] + rng.integers(1, k, n)) % k  # a different cluster
        secondary[1:][has] = other[has]
    effect = np.concatenate([[0.0], rng.normal(0.0, cfg.item_sd, n)])
    return replace(world, neighbours=neighbours, secondary=secondary, item_effect=effect)


@dataclass(frozen=True)
class Users:
    """A chunk of users: ids (b,) int64, tastes (b, m) int64 cluster ids (1st = heaviest), lengths (b,) int64."""

    ids: np.ndarray
    tastes: np.ndarray
    lengths: np.ndarray


def chunk_users(cfg: SynthConfig, lo: int) -> Users:
    """Users lo .. lo + CHUNK_USERS - 1 (capped at cfg.users): tastes and history lengths (seeded ``[seed, 1, lo]``)."""
    rng = np.random.default_rng([cfg.seed, 1, lo])
    b = min(CHUNK_USERS, cfg.users - lo)
    log_w = np.log(np.diff(zipf_cdf(cfg.clusters, cfg.cluster_zipf), prepend=0.0))  # (K,)
    keys = log_w[None, :] + rng.gumbel(size=(b, cfg.clusters))  # (b, K): Gumbel top-m = draws w/o replacement
    tastes = np.argsort(-keys, axis=1, kind="stable")[:, : cfg.taste_clusters]
    raw = np.round(np.exp(rng.normal(np.log(cfg.max_len / 2.0), cfg.length_sigma, b)))
    lengths = np.clip(raw, 1, cfg.max_len).astype(np.int64)
    return Users(np.arange(lo, lo + b, dtype=np.int64), tastes.astype(np.int64), lengths)


@dataclass(frozen=True)
class Events:
    """A chunk's events in user-major time order: user (n,) int64, item (n,) int64 raw ids, timestamp (n,)
    int64 (strictly increasing per user), label (n,) int8, score (n,) float64 (the planted x), pos (n,) int64
    (the event's index in its user's history = its hist_len)."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    score: np.ndarray
    pos: np.ndarray


def _sessions(cfg: SynthConfig, rng: np.random.Generator, users: Users, pos: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(session id per event (n,), session start index (S,), session cluster (S,)) of one chunk."""
    start = (rng.random(len(pos)) < 1.0 / cfg.session_mean) | (pos == 0)
    first = np.flatnonzero(start)  # (S,)
    session = np.cumsum(start) - 1  # (n,)
    owner = np.repeat(np.arange(len(users.ids)), users.lengths)[first]  # (S,) local user of each session
    pick = np.minimum(np.searchsorted(np.cumsum(cfg.taste_weights), rng.random(len(first)), side="right"),
                      cfg.taste_clusters - 1)
    cluster = users.tastes[owner, pick]
    explore = rng.random(len(first)) < cfg.explore
    cluster[explore] = rng.integers(0, cfg.clusters, int(explore.sum()))
    return session, first, cluster


def _walk(cfg: SynthConfig, world: World, rng: np.random.Generator, session: np.ndarray, first: np.ndarray,
          cluster: np.ndarray) -> np.ndarray:
    """Items of the chunk's events: a fresh draw at a session's start, then neighbour steps (module docstring)."""
    n = len(session)
    items = world.draw(rng, cluster[session]).astype(np.int64)  # fresh draws (n,)
    follow = rng.random(n) < cfg.follow
    pick = rng.integers(0, cfg.neighbours, n)
    step = np.arange(n) - first[session]  # (n,) position inside the session
    order = np.argsort(step, kind="stable")
    bounds = np.searchsorted(step[order], np.arange(int(step.max()) + 2))
    for k in range(1, len(bounds) - 1):  # the events at in-session step k follow those at step k - 1
        at = order[bounds[k]: bounds[k + 1]]
        at = at[follow[at]]
        items[at] = world.neighbours[items[at - 1], pick[at]]
    return items


def _timestamps(cfg: SynthConfig, rng: np.random.Generator, local_user: np.ndarray, pos: np.ndarray,
                session: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(n,) int64 timestamps, strictly increasing per user: sorted uniform session starts + in-session gaps."""
    span = cfg.span_days * 86_400
    owner = local_user[first]  # (S,) non-decreasing
    starts = np.sort(owner * span + rng.integers(0, span, len(first))) - owner * span  # sorted per user
    gaps = rng.integers(*GAP_S, len(pos))
    gaps[first] = 0
    run = np.cumsum(gaps)
    ts = starts[session] + run - run[first][session]  # (n,) relative times
    big = 4 * span + 2 * GAP_S[1] * cfg.max_len  # > any (ts - pos) range inside one user
    lifted = local_user * big + ts - pos + cfg.max_len  # per user: running max of ts - pos, then + pos
    return np.maximum.accumulate(lifted) - local_user * big + pos - cfg.max_len + T0


def window_share(user: np.ndarray, cluster: np.ndarray, pos: np.ndarray, window: int, n_clusters: int,
                 max_len: int) -> np.ndarray:
    """(n,) share of each event's last ``min(pos, window)`` predecessors (same user, smaller pos) whose
    cluster equals the event's own; 0 for a first event. Events of one user have distinct ``pos``."""
    key = (user * n_clusters + cluster) * (max_len + 1)  # (n,) one block per (user, cluster)
    packed = key + pos
    ordered = np.sort(packed)
    count = np.searchsorted(ordered, packed) - np.searchsorted(ordered, key + np.maximum(pos - window, 0))
    return count / np.maximum(np.minimum(pos, window), 1)


def planted_score(cfg: SynthConfig, world: World, users: Users, local_user: np.ndarray, item: np.ndarray,
                  pos: np.ndarray) -> np.ndarray:
    """(n,) the planted x of each event (module docstring); ``local_user`` indexes ``users``."""
    cluster = world.item_cluster[item]
    share = window_share(local_user, cluster, pos, cfg.window, cfg.clusters, cfg.max_len)
    affinity = (cfg.taste_weights[None, :] * (users.tastes[local_user] == cluster[:, None])).sum(axis=1)
    return cfg.bias + cfg.share_weight * share + cfg.affinity_weight * affinity + world.item_effect[item]


def chunk_events(cfg: SynthConfig, world: World, users: Users) -> Events:
    """The events of one chunk of users (seeded ``[seed, 2, first user id]``)."""
    rng = np.random.default_rng([cfg.seed, 2, int(users.ids[0])])
    n = int(users.lengths.sum())
    local_user = np.repeat(np.arange(len(users.ids)), users.lengths)  # (n,)
    pos = np.arange(n) - np.repeat(np.cumsum(users.lengths) - users.lengths, users.lengths)  # (n,)
    session, first, cluster = _sessions(cfg, rng, users, pos)
    items = _walk(cfg, world, rng, session, first, cluster)
    ts = _timestamps(cfg, rng, local_user, pos, session, first)
    score = planted_score(cfg, world, users, local_user, items, pos)
    noisy = score + rng.normal(0.0, cfg.noise_sd, n)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-noisy))).astype(np.int8)
    return Events(users.ids[local_user], items, ts, label, score, pos)


def generate(cfg: SynthConfig, world: World | None = None) -> Iterator[tuple[Users, Events]]:
    """(users, their events) per chunk of :data:`CHUNK_USERS` users, in user id order."""
    world = world or build_world(cfg)
    for lo in range(0, cfg.users, CHUNK_USERS):
        users = chunk_users(cfg, lo)
        yield users, chunk_events(cfg, world, users)


def planted_probability(score: np.ndarray, noise_sd: float, nodes: int = 32) -> np.ndarray:
    """E_n[sigmoid(score + n)], n ~ N(0, noise_sd): the Bayes-optimal click probability (Gauss-Hermite)."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # probabilists' nodes: weight exp(-z^2 / 2)
    w = w / w.sum()
    x = np.asarray(score, dtype=np.float64)[:, None] + noise_sd * z[None, :]  # (n, nodes)
    return (w[None, :] / (1.0 + np.exp(-x))).sum(axis=1)
