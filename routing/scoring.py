"""The numbers the router ranks by, and the arrays that make ranking cheap.

Scoring ("balanced", the default strategy)
------------------------------------------
Each eligible endpoint gets three components in 0..1, higher is better, and the score is
their weighted sum::

    score = W_QUALITY * quality + W_PRICE * price + W_LATENCY * latency

* ``quality``: the endpoint's measured quality for this request: the mean over the
  requested capability tags of ``EndpointView.quality[tag]`` (for a slug request, the
  overall ``quality["*"]``). A tag without a measurement falls back to ``quality["*"]``,
  then to ``QUALITY_PRIOR``. Already on a 0..1 scale, so used as is.
* ``price``: the quoted (surged) blended price of a typical request, 1 part input + 1 part
  output per million tokens, min-max normalised over the eligible endpoints of *this*
  request: the cheapest gets 1, the most expensive 0 (all 1 when they cost the same).
* ``latency``: the live EWMA latency in ms (``LATENCY_PRIOR_MS`` while unmeasured),
  min-max normalised the same way: the fastest gets 1.

Quality weighs most because a cheap wrong answer is the costliest outcome for a customer;
price before latency because the marketplace's promise is cost, and small models answer
fast enough that latency mostly separates overloaded vendors (who also surge in price).

Why arrays
----------
The gateway routes every request, and a popular tag may be served by a thousand
endpoints. A per-endpoint Python loop costs about a microsecond per endpoint per step; so
the static side of the snapshot (prices, curves, capacities, tags, regions, quality per
tag) is turned once per snapshot into numpy arrays (``SnapshotIndex``), the live side
once per refresh of the live numbers (``LiveView``), and a request only gathers, compares
and sorts arrays. The surge multiplier and quote are computed elementwise with exactly the
float operations of ``vendors.pricing`` (same expression order, round half to even, integer
ceiling division), so the price the router quotes is the price ``pricing.quote`` gives.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from routing.snapshot import EndpointView, Snapshot
from vendors.pricing import quote

W_QUALITY = 0.5
W_PRICE = 0.3
W_LATENCY = 0.2

QUALITY_PRIOR = 0.5  # an unprobed endpoint is assumed middling, neither trusted nor shunned
LATENCY_PRIOR_MS = 1_000.0  # a typical small-model answer of ~100 tokens, queueing included
THROUGHPUT_PRIOR_TPS = 50.0  # tokens per second of a small model on a modest GPU

OVERALL = "*"  # the quality key of an endpoint's overall quality

CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN = 0, 1, 2
_CIRCUITS = {"closed": CIRCUIT_CLOSED, "half_open": CIRCUIT_HALF_OPEN, "open": CIRCUIT_OPEN}

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_EMPTY = np.empty(0, np.int64)
_TAG_SET_CACHE = 4_096  # distinct tag combinations kept per snapshot
_VISIBLE_SET_CACHE = 1_024  # (tag combination, organisation) pairs with private endpoints
_QUOTE_SCALE = 10_000  # vendors.pricing.quote rounds the multiplier to 1/10,000
_PAD_START = 2.0  # utilisation is clipped to 1, so padding points beyond it are never reached


@dataclass(frozen=True, slots=True)
class EndpointLive:
    """What the gateway knows right now about one endpoint (from Redis, refreshed often)."""

    inflight: int = 0
    utilisation: float = 0.0  # smoothed in-flight / capacity, 0..1 (and above when overfull)
    circuit: str = "closed"  # "closed" | "half_open" | "open"
    half_open_trial: bool = False  # half-open: may this request be the trial one?
    latency_ms: float | None = None  # EWMA; None until measured
    throughput_tps: float | None = None  # EWMA of completion tokens per second
    requests: int = 0  # requests served so far (exploration counts)
    success_ratio: float | None = None  # EWMA of vendor success (1) / failure (0)

    def __post_init__(self) -> None:
        if self.circuit not in _CIRCUITS:
            raise ValueError(f"circuit must be one of {sorted(_CIRCUITS)}, not {self.circuit!r}")


class LiveView(Mapping[int, EndpointLive]):
    """An immutable table of ``EndpointLive`` by endpoint id, for the router.

    Build one per refresh of the live numbers (not per request): the router caches the
    arrays it derives from it (including every endpoint's surged quote) for the current
    snapshot, so later requests only gather from them. Any other ``Mapping`` works too but
    is converted on every request.
    """

    __slots__ = ("__weakref__", "_base", "_cache", "_data")

    def __init__(
        self,
        data: Mapping[int, EndpointLive] | None = None,
        *,
        since: LiveView | None = None,
        moved: Collection[int] = (),
    ) -> None:
        """``since``: the view this one replaces, where only the endpoints in ``moved``
        differ; its arrays are then patched instead of rebuilt (see ``columns_for``)."""
        self._data: dict[int, EndpointLive] = dict(data or {})
        self._cache: tuple[weakref.ref[SnapshotIndex], LiveColumns] | None = None
        self._base: tuple[tuple[weakref.ref[SnapshotIndex], LiveColumns], frozenset[int]] | None
        self._base = None
        # Patching pays for a copy of the arrays plus a row per moved endpoint: past a
        # quarter of them, building afresh is as quick. (Only the arrays are kept, not the
        # previous view: views never chain.)
        if since is not None and since._cache is not None and len(moved) <= len(self._data) // 4:
            self._base = (since._cache, frozenset(moved))

    def __getitem__(self, endpoint_id: int) -> EndpointLive:
        return self._data[endpoint_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def prepare(self, snapshot: Snapshot) -> None:
        """Derive the arrays for ``snapshot`` now (after each refresh, off the request path)."""
        self.columns_for(index_for(snapshot))

    def as_dict(self) -> dict[int, EndpointLive]:
        """A copy of the table (a C copy, not one lookup per endpoint)."""
        return self._data.copy()

    def columns_for(self, index: SnapshotIndex) -> LiveColumns:
        """Arrays over every endpoint of ``index``'s snapshot (computed once, then cached)."""
        cached = self._cache
        if cached is not None and cached[0]() is index:
            return cached[1]
        base, self._base = self._base, None
        if base is not None and base[0][0]() is index:
            position_of = index.position_of
            rows = sorted(position_of[i] for i in base[1] if i in position_of)
            columns = base[0][1].patched(index, self._data, np.array(rows, np.int64))
        else:
            columns = LiveColumns.build(index, self._data, None)
        self._cache = (weakref.ref(index), columns)
        return columns


class LiveColumns:
    """Live numbers as arrays aligned with a list of snapshot positions.

    Kept as two matrices (integers, floats) so that selecting the rows of a request's
    endpoints is two gathers, not eleven; the named columns are views.
    """

    __slots__ = ("floats", "ints")

    def __init__(self, ints: IntArray, floats: FloatArray) -> None:
        self.ints = ints  # inflight, requests, circuit, trial, quote_input, quote_output
        self.floats = floats  # utilisation, latency, throughput, success, multiplier

    inflight = property(lambda self: self.ints[:, 0])
    requests = property(lambda self: self.ints[:, 1])
    circuit = property(lambda self: self.ints[:, 2])  # CIRCUIT_* codes
    trial = property(lambda self: self.ints[:, 3])  # 1: a half-open trial slot is free
    quote_input = property(lambda self: self.ints[:, 4])  # nanos per million, surged
    quote_output = property(lambda self: self.ints[:, 5])
    utilisation = property(lambda self: self.floats[:, 0])
    latency = property(lambda self: self.floats[:, 1])  # NaN = unmeasured
    throughput = property(lambda self: self.floats[:, 2])  # NaN = unmeasured
    success = property(lambda self: self.floats[:, 3])  # NaN = unmeasured
    multiplier = property(lambda self: self.floats[:, 4])

    @classmethod
    def build(
        cls,
        index: SnapshotIndex,
        live: Mapping[int, EndpointLive],
        positions: IntArray | None,
    ) -> LiveColumns:
        """Columns for ``positions`` (None = every endpoint of the snapshot)."""
        if positions is None:
            size = index.size
            present = (
                [(p, live[i]) for p, i in enumerate(index.id_list) if i in live] if live else []
            )
        else:
            size = len(positions)
            get = live.get
            present = []
            for p, i in enumerate(index.ids[positions].tolist()):
                item = get(i)
                if item is not None:
                    present.append((p, item))
        ints = np.zeros((size, 6), np.int64)
        floats = np.zeros((size, 5), np.float64)
        floats[:, 1:4] = np.nan
        if present:
            at = np.fromiter((p for p, _ in present), np.int64, len(present))
            rows = [item for _, item in present]
            ints[at, 0] = [r.inflight for r in rows]
            ints[at, 1] = [r.requests for r in rows]
            ints[at, 2] = [_CIRCUITS[r.circuit] for r in rows]
            ints[at, 3] = [r.half_open_trial for r in rows]
            floats[at, 0] = [_finite(r.utilisation, 0.0) for r in rows]
            floats[at, 1] = [_finite(r.latency_ms, math.nan) for r in rows]
            floats[at, 2] = [_finite(r.throughput_tps, math.nan) for r in rows]
            floats[at, 3] = [_finite(r.success_ratio, math.nan) for r in rows]
        where = slice(None) if positions is None else positions
        multiplier = surge_multipliers(
            index.curve_x[where], index.curve_y[where], index.surge_cap[where], floats[:, 0]
        )
        floats[:, 4] = multiplier
        ints[:, 4] = index.quotes(index.price_input[where], multiplier)
        ints[:, 5] = index.quotes(index.price_output[where], multiplier)
        return cls(ints, floats)

    def patched(
        self, index: SnapshotIndex, live: Mapping[int, EndpointLive], rows: IntArray
    ) -> LiveColumns:
        """A copy of these columns (over every endpoint of ``index``) with ``rows`` built
        again from ``live``: the same arrays ``build(index, live, None)`` gives when only
        those rows' endpoints changed."""
        if not len(rows):
            return self
        part = LiveColumns.build(index, live, rows)
        ints, floats = self.ints.copy(), self.floats.copy()
        ints[rows] = part.ints
        floats[rows] = part.floats
        return LiveColumns(ints, floats)

    def take(self, rows: IntArray) -> LiveColumns:
        # np.take along axis 0 copies whole rows: four times faster than ``ints[rows]``.
        return LiveColumns(np.take(self.ints, rows, axis=0), np.take(self.floats, rows, axis=0))


def _finite(value: float | None, default: float) -> float:
    return value if value is not None and math.isfinite(value) else default


def live_columns(
    index: SnapshotIndex, live: Mapping[int, EndpointLive], positions: IntArray
) -> LiveColumns:
    """The live numbers of the endpoints at ``positions``, as arrays."""
    if isinstance(live, LiveView):
        return live.columns_for(index).take(positions)
    if not live:
        return index.resting.take(positions)
    return LiveColumns.build(index, live, positions)


def surge_multipliers(
    curve_x: FloatArray, curve_y: FloatArray, cap: FloatArray, utilisation: FloatArray
) -> FloatArray:
    """``vendors.pricing.surge_multiplier`` for many endpoints at once, bit for bit.

    Curves are padded to the same number of points with flat segments past utilisation 1,
    which the clipped utilisation never reaches, so the padding changes nothing.
    """
    u = np.clip(utilisation, 0.0, 1.0)
    result = curve_y[:, 0].copy()
    for k in range(curve_x.shape[1] - 1):
        x0, x1 = curve_x[:, k], curve_x[:, k + 1]
        above = u > x0
        beyond = above & (u >= x1)
        result[beyond] = curve_y[beyond, k + 1]
        inside = np.flatnonzero(above & (u < x1))
        if inside.size:
            y0, y1 = curve_y[inside, k], curve_y[inside, k + 1]
            result[inside] = y0 + (y1 - y0) * (u[inside] - x0[inside]) / (x1[inside] - x0[inside])
    return np.maximum(1.0, np.minimum(result, cap))


class SnapshotIndex:
    """The static side of a snapshot as arrays, built once per snapshot (``index_for``).

    Positions are indices into ``snapshot.endpoints``.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        endpoints = snapshot.endpoints
        self.endpoints = endpoints
        self.size = len(endpoints)
        self.id_list = [e.id for e in endpoints]
        self.position_of = {e.id: p for p, e in enumerate(endpoints)}
        self.ids = np.array(self.id_list, np.int64)
        self.slug_position = {e.full_slug: p for p, e in enumerate(endpoints)}
        self.vendor_codes: dict[str, int] = {}
        self.vendor = np.array(
            [
                self.vendor_codes.setdefault(e.vendor_slug, len(self.vendor_codes))
                for e in endpoints
            ],
            np.int64,
        )
        self.kind_codes: dict[str, int] = {}
        self.kind = np.array(
            [self.kind_codes.setdefault(e.kind, len(self.kind_codes)) for e in endpoints], np.int64
        )
        self.private_to = np.array(
            [-1 if e.private_to is None else e.private_to for e in endpoints], np.int64
        )
        self.capacity = np.array([e.capacity for e in endpoints], np.int64)
        self.price_input = np.array([e.price_input for e in endpoints], np.int64)
        self.price_output = np.array([e.price_output for e in endpoints], np.int64)
        self.retention = np.array([e.data_retention_days for e in endpoints], np.int64)
        self.region_codes: dict[str, int] = {}
        self.region = np.array(
            [
                self.region_codes.setdefault(e.region.lower(), len(self.region_codes))
                for e in endpoints
            ],
            np.int64,
        )
        self._build_parameters(endpoints)
        self._build_curves(endpoints)
        self.tag_positions: dict[str, IntArray] = {}
        for tag, members in snapshot.by_tag.items():
            self.tag_positions[tag] = np.array([self.position_of[e.id] for e in members], np.int64)
        self._tag_masks: dict[str, BoolArray] = {}
        self._tag_sets: dict[tuple[str, ...], tuple[IntArray, IntArray]] = {}
        self._visible_sets: dict[tuple[tuple[str, ...], int], tuple[IntArray, IntArray]] = {}
        self._quality: dict[str, FloatArray] = {}
        self.quality_overall = np.array(
            [e.quality.get(OVERALL, QUALITY_PRIOR) for e in endpoints], np.float64
        )
        self._quality[OVERALL] = self.quality_overall
        self.resting = LiveColumns.build(self, {}, None)

    def _build_parameters(self, endpoints: tuple[EndpointView, ...]) -> None:
        distinct = {e.supported_parameters for e in endpoints}
        vocabulary = sorted(set().union(*distinct))
        # One bit per parameter in an int64 mask; past 62 names fall back to set checks.
        self.parameter_bits: dict[str, int] | None = None
        self.parameters: IntArray | None = None
        if len(vocabulary) <= 62:
            bits = self.parameter_bits = {name: 1 << b for b, name in enumerate(vocabulary)}
            masks = {names: sum(bits[name] for name in names) for names in distinct}
            self.parameters = np.array([masks[e.supported_parameters] for e in endpoints], np.int64)

    def _build_curves(self, endpoints: tuple[EndpointView, ...]) -> None:
        # Few distinct curves are shared by many endpoints: pad each distinct one once.
        distinct: dict[tuple[tuple[float, float], ...], int] = {}
        which = np.array(
            [distinct.setdefault(e.surge_curve, len(distinct)) for e in endpoints], np.int64
        )
        width = max((len(curve) for curve in distinct), default=1) or 1
        x = np.empty((max(len(distinct), 1), width), np.float64)
        y = np.empty((max(len(distinct), 1), width), np.float64)
        x[0], y[0] = 0.0, 1.0  # only used when the snapshot is empty
        for row, curve in enumerate(distinct):
            points = curve or ((0.0, 1.0),)
            count = len(points)
            # The snapshot made the points numbers once (routing.snapshot); the arrays'
            # dtype takes them as they are.
            x[row, :count] = [u for u, _ in points]
            y[row, :count] = [m for _, m in points]
            x[row, count:] = _PAD_START + np.arange(width - count)
            y[row, count:] = y[row, count - 1]
        self.curve_x, self.curve_y = x[which], y[which]
        self.surge_cap = np.array([e.surge_cap for e in endpoints], np.float64)
        # Vectorised quotes must not overflow int64: base price x rounded multiplier.
        top_multiplier = max(self.surge_cap.max(initial=1.0).item(), 1.0)
        top_price = max(int(self.price_input.max(initial=0)), int(self.price_output.max(initial=0)))
        self._exact_quotes = top_price * (round(top_multiplier * _QUOTE_SCALE) + 1) >= 2**62

    def quotes(self, base: IntArray, multiplier: FloatArray) -> IntArray:
        """``vendors.pricing.quote`` elementwise (nanos per million, rounded up)."""
        if self._exact_quotes:  # prices beyond int64 arithmetic: the slow, exact way
            return np.array(
                [quote(b, m) for b, m in zip(base.tolist(), multiplier.tolist(), strict=True)],
                np.int64,
            )
        scaled = base * np.rint(multiplier * _QUOTE_SCALE).astype(np.int64)
        return -((-scaled) // _QUOTE_SCALE)

    def tag_set(self, tags: tuple[str, ...]) -> tuple[IntArray, IntArray]:
        """The positions of the endpoints carrying every tag in ``tags``, and the rows of
        the private ones among them (cached: popular tag sets are asked for constantly)."""
        cached = self._tag_sets.get(tags)
        if cached is None:
            pools = [self.tag_positions.get(tag, _EMPTY) for tag in tags]
            smallest = min(range(len(tags)), key=lambda i: len(pools[i]))
            positions = pools[smallest]
            for i, tag in enumerate(tags):
                if i != smallest and positions.size:
                    positions = positions[self.tag_mask(tag)[positions]]
            private_rows = np.flatnonzero(self.private_to[positions] >= 0)
            if len(self._tag_sets) >= _TAG_SET_CACHE:
                self._tag_sets.clear()
            cached = self._tag_sets[tags] = (positions, private_rows)
        return cached

    def visible_tag_set(
        self, tags: tuple[str, ...], organization_id: int
    ) -> tuple[IntArray, IntArray]:
        """(positions visible to the organisation, positions private to others) of the
        endpoints carrying every tag; cached per organisation only when private endpoints
        are involved, so the common case stays one dictionary lookup."""
        positions, private_rows = self.tag_set(tags)
        if not private_rows.size:
            return positions, _EMPTY
        key = (tags, organization_id)
        cached = self._visible_sets.get(key)
        if cached is None:
            hidden = self.private_to[positions[private_rows]] != organization_id
            hidden_rows = private_rows[hidden]
            keep = np.ones(positions.size, np.bool_)
            keep[hidden_rows] = False
            if len(self._visible_sets) >= _VISIBLE_SET_CACHE:
                self._visible_sets.clear()
            cached = self._visible_sets[key] = (positions[keep], positions[hidden_rows])
        return cached

    def tag_mask(self, tag: str) -> BoolArray:
        mask = self._tag_masks.get(tag)
        if mask is None:
            mask = np.zeros(self.size, np.bool_)
            mask[self.tag_positions.get(tag, _EMPTY)] = True
            self._tag_masks[tag] = mask
        return mask

    def quality(self, tag: str) -> FloatArray:
        """Every endpoint's quality for ``tag`` (overall quality, then the prior, if unmeasured)."""
        values = self._quality.get(tag)
        if values is None:
            values = self.quality_overall.copy()
            for p in self.tag_positions.get(tag, ()):
                measured = self.endpoints[p].quality.get(tag)
                if measured is not None:
                    values[p] = measured
            self._quality[tag] = values
        return values

    def parameters_supported(self, positions: IntArray, wanted: frozenset[str]) -> BoolArray:
        """Which endpoints at ``positions`` support every parameter in ``wanted``."""
        if not wanted:
            return np.ones(len(positions), np.bool_)
        if self.parameter_bits is not None and self.parameters is not None:
            if any(name not in self.parameter_bits for name in wanted):
                return np.zeros(len(positions), np.bool_)
            need = sum(self.parameter_bits[name] for name in wanted)
            return np.asarray((self.parameters[positions] & need) == need)
        return np.fromiter(
            (wanted <= self.endpoints[p].supported_parameters for p in positions.tolist()),
            np.bool_,
            len(positions),
        )


_INDEXES: dict[int, SnapshotIndex] = {}
_INDEX_OWNERS: dict[int, weakref.ref[Snapshot]] = {}


def index_for(snapshot: Snapshot) -> SnapshotIndex:
    """The snapshot's index, built on first use and dropped with the snapshot.

    Building costs a few milliseconds per 1,000 endpoints: call it (``prepare_snapshot``) right
    after loading a snapshot so no request pays for it.
    """
    key = id(snapshot)
    owner = _INDEX_OWNERS.get(key)
    if owner is not None and owner() is snapshot:
        return _INDEXES[key]
    index = SnapshotIndex(snapshot)
    _INDEXES[key] = index
    _INDEX_OWNERS[key] = weakref.ref(snapshot)
    weakref.finalize(snapshot, _forget, key)
    return index


def _forget(key: int) -> None:
    _INDEXES.pop(key, None)
    _INDEX_OWNERS.pop(key, None)


def normalised_lower_better(values: FloatArray) -> FloatArray:
    """Min-max normalisation where the smallest value scores 1 and the largest 0."""
    if values.size == 0:
        return values
    low, high = np.minimum.reduce(values), np.maximum.reduce(values)
    if high <= low:
        return np.ones(values.size, np.float64)
    return np.asarray((high - values) / (high - low), np.float64)


def balanced_scores(
    quality: FloatArray, blended_price: FloatArray, latency_ms: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(score, price component, latency component) of the balanced strategy."""
    price = normalised_lower_better(blended_price)
    latency = normalised_lower_better(latency_ms)
    return W_QUALITY * quality + W_PRICE * price + W_LATENCY * latency, price, latency
