"""The search of one frontier row over its memory budgets, and the memory model that guides it (see
harness.running.frontier, which runs the probes): grid indices in, the next probe out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.storing.schema import Metrics

FITS, NO_FIT, FAILED = "fits", "oom", "failed"


# The memory model that guides the search: what a fitting probe needs grows linearly with the value (frozen
# weights and optimizer state fixed, activations and logits per token). The search aims at the budget itself: a
# guess too high costs a probe that runs out of memory within its first step, one too low a whole run.
SLOW_STEPS = 2  # guided probes in a row that did not halve the bracket: bisect instead
SECOND_POINT = 2  # grid steps above a row's only fitting point (with its need) where the second one is taken


def need_gib(m: Metrics) -> float | None:
    """What a probe needed, in GiB as NVML counts a process: torch's allocated peak plus what the process held
    outside torch's allocator (NVML peak less torch's reserved peak), or the NVML peak where torch's are missing.

    Under a memory cap NVML's peak says little: torch's caching allocator keeps freed blocks until the cap and
    returns them only then, so every probe near the budget peaks near the cap whatever it needed (on the H200,
    tunebench at 1,024 and 2,048 tokens under 8 GiB: NVML 7.76 and 7.77 GiB, allocated 6.36 and 6.76). A line
    through NVML peaks that flat puts the next budget's guess at the grid's top."""
    nvml, alloc, reserved = m.peak_vram_nvml_gib, m.peak_alloc_gib, m.peak_reserved_gib
    if nvml is None or alloc is None or reserved is None:
        return nvml
    return alloc + max(0.0, nvml - reserved)


def predicted_max(points: list[tuple[int, float]], budget: float) -> float | None:
    """The value at which the memory curve through the largest distinct fitting ``(value, peak GiB)`` points reaches
    ``budget``: a parabola through the three largest when it bends upwards (attention without a fused kernel,
    quadratic in the sequence), else the line through the two largest. None without two points or when the peak
    does not grow with the value."""
    pts = sorted(dict(sorted(points)).items())[-3:]  # the later (larger) peak of a repeated value
    if len(pts) < 2:
        return None
    (v1, p1), (v2, p2) = pts[-2:]
    if len(pts) == 3:
        (v0, p0) = pts[0]
        # the parabola through the three points (divided differences); its upward root beyond the largest point
        d1, d2 = (p1 - p0) / (v1 - v0), (p2 - p1) / (v2 - v1)
        curve = (d2 - d1) / (v2 - v0)
        if curve > 0:
            slope = d2 + curve * (v2 - v1)  # the parabola's slope at v2
            return v2 + (-slope + math.sqrt(slope * slope + 4 * curve * (budget - p2))) / (2 * curve) \
                if slope * slope + 4 * curve * (budget - p2) >= 0 else None
    slope = (p2 - p1) / (v2 - v1)
    if slope <= 0:
        return None
    return v2 + (budget - p2) / slope


@dataclass
class _Row:
    """One row's search at one budget: indices into the grid; ``lo`` fits (-1: none known), ``hi`` does not.

    A row with no fitting probe yet (under this budget or a smaller one) probes the grid's smallest value first: where
    even that runs out of memory (8B bf16 weights under 8 GiB) one probe closes the budget instead of a bisection
    of the whole grid, and where it fits it is the memory model's first point; the second is taken
    :data:`SECOND_POINT` grid steps above it (a short, cheap probe) rather than at the bracket's midpoint, so the
    line guides the search from the third probe on. Otherwise the next probe is the index the memory model predicts
    (:func:`predicted_max`, from this row's fitting probes and their needs, this budget's first) to reach ``aim`` of
    the budget (what the row's search under the budget below found usable: :meth:`usable_fraction`), kept strictly
    inside the bracket; or the bracket's midpoint when there is no model yet (fewer than two fitting probes with a
    peak: a CPU, the first probes), when the model says a value that ran out of memory fits, or when
    :data:`SLOW_STEPS` guided probes in a row did not halve the bracket (memory not linear in the value).
    """

    key: str
    lo: int
    hi: int
    lo_verified: bool
    stopped: str | None = None
    values: list[int] = field(default_factory=list)
    budget: float = 0.0
    points: list[tuple[int, float]] = field(default_factory=list)  # other budgets' fitting probes
    here: list[tuple[int, float]] = field(default_factory=list)  # this budget's
    slow: int = 0
    second: bool = False  # the probe for a second point of the memory line has been made
    aim: float = 1.0  # the share of the budget the line aims at (what a smaller budget's search found usable)
    back_off: bool = False  # a guess ran out of memory: probe a step below it next (once per budget)
    backed_off: bool = False
    verify_lo: bool = True  # probe a value found under a smaller budget before taking it (False: its measurement does)
    guided: bool = True  # False: a row that plans itself to the budget, whose need says nothing of the next value
    hint: int | None = None  # the index its tool predicts as this budget's answer (a row that plans itself)
    hinted: int = 0  # 0: the hint not yet probed; 1: probed; 2: the step past it on the side it proved wrong too

    def _line(self) -> list[tuple[int, float]]:
        return self.here if len(dict(self.here)) >= 2 else self.points + self.here

    def usable_fraction(self) -> float | None:
        """The share of the budget a closed search found usable: halfway between the need of the largest fitting
        value and the need the line puts at the next value, which ran out of memory (None without both)."""
        pts = sorted(dict(sorted(self._line())).items())[-2:]  # distinct values: the later need of a repeated one
        if self.lo < 0 or self.hi >= len(self.values) or self.stopped or len(pts) < 2:
            return None
        (v1, p1), (v2, p2) = pts
        slope = (p2 - p1) / (v2 - v1)
        mid = (self.values[self.lo] + self.values[self.hi]) / 2  # the line is straight: its need there is the middle
        return (p1 + slope * (mid - v1)) / self.budget if slope > 0 else None

    def _guess(self) -> int | None:
        if not self.guided:
            return None
        v = predicted_max(self._line(), self.budget * self.aim)
        if v is None or self.slow >= SLOW_STEPS:
            return None
        if self.hi < len(self.values) and v >= self.values[self.hi]:
            return None  # the line says a value that ran out of memory fits: it is wrong here (bisect)
        i = max((j for j, x in enumerate(self.values) if x <= v * (1 + 1e-9)), default=0)  # float round-off
        return min(max(i, self.lo + 1), self.hi - 1)

    def _hinted(self) -> int | None:
        """The tool's own prediction first, then the grid step past it on the side it proved wrong (above it where
        it fitted, below where it did not): a right prediction closes the budget in two probes; a wrong one has
        narrowed the bracket for the bisection that follows."""
        if self.hint is None or self.hinted >= 2:
            return None
        self.hinted += 1
        if self.hinted == 1:
            if self.lo < self.hint < self.hi:
                return self.hint
            self.hinted = 2  # what is known already answers it (a seed measured first): the step past it next
        if self.lo == self.hint and self.hint + 1 < self.hi:
            return self.hint + 1
        if self.hi == self.hint and self.hint - 1 > self.lo:
            return self.hint - 1
        return None

    def next_index(self) -> int | None:
        if self.stopped:
            return None
        if (i := self._hinted()) is not None:
            return i
        if self.lo < 0 and self.hi > 0 and not self.points and not self.here:
            return 0  # nothing known to fit this row: the smallest value first (out of memory there: none fits)
        if self.guided and self.hi - self.lo > 1 and not self.second and len(dict(self.points + self.here)) == 1 and \
                self.lo >= 0 and (self.points + self.here)[0][0] == self.values[self.lo]:
            self.second = True  # one point, the bracket's floor: a second just above it makes the line
            return min(self.lo + SECOND_POINT, (self.lo + self.hi) // 2)
        if self.back_off and self.hi - self.lo > 1:
            self.back_off, self.backed_off = False, True
            return self.hi - 1
        if self.hi - self.lo > 1:
            guess = self._guess()
            return guess if guess is not None else (self.lo + self.hi) // 2
        if self.lo >= 0 and not self.lo_verified and self.verify_lo:  # found under a smaller budget: probe it here
            return self.lo
        return None

    def seed(self, known: list[tuple[int, str, float | None]]) -> None:
        """Start from the probes stored under this budget (grid index, outcome, need), whatever path found them: the
        smallest value that ran out of memory closes the bracket above (where two kinds of probe of one value
        disagree, that one), the largest fitting value below it opens it, and the fitting ones are points of the
        line. So a resumed search takes up what it knew, even where new answers lead it elsewhere."""
        self.hi = min([self.hi] + [i for i, r, _ in known if r == NO_FIT])
        if self.lo >= self.hi:  # carried up from a smaller budget but out of memory here
            self.lo, self.lo_verified = -1, True
        fits = [(i, need) for i, r, need in known if r == FITS and i < self.hi]
        if (top := max((i for i, _ in fits), default=-1)) >= 0 and top >= self.lo:
            self.lo, self.lo_verified = top, True
        self.here += [(self.values[i], need) for i, need in fits if need is not None]

    def record(self, index: int, result: str, reason: str | None, need: float | None = None) -> None:
        width = self.hi - self.lo
        guided = self.hi - self.lo > 1 and self._guess() is not None
        if result == FAILED:
            self.stopped = reason or "failed"
        elif result == FITS:
            self.lo, self.lo_verified = index, True
            if need is not None:
                self.here.append((self.values[index], need))
        elif index == self.lo:  # fitted under a smaller budget but not this one: search below it afresh
            self.hi, self.lo, self.lo_verified = index, -1, True
        else:
            self.hi = index
        # a guess that ran out of memory overshot: a step below it next, the first time when the line aimed at what
        # the budget below found usable (the middle of a step: it misses by one about half the time), else bisect;
        # one that fitted but crept: count it
        if guided and result == NO_FIT and not self.backed_off and self.aim < 1.0:
            self.back_off = True
        elif guided:
            self.slow = SLOW_STEPS if result == NO_FIT else self.slow + 1 if 2 * (self.hi - self.lo) > width else 0
        elif self.hi - self.lo < width:
            self.slow = 0


class _RowSearch:
    """One row's search over every budget, smallest first: each budget's :class:`_Row` starts from the value the
    one below found, with the memory points measured so far. Rows are independent of each other."""

    def __init__(self, key: str, budgets: list[float], values: list[int], verify: bool = True,
                 known: dict[float, list[tuple[int, str, float | None]]] | None = None, guided: bool = True,
                 hints: dict[float, int] | None = None) -> None:
        self.key, self.budgets, self.values, self.verify, self.known = key, budgets, values, verify, known or {}
        self.guided, self.hints = guided, hints or {}
        self.best, self.points, self.stopped, self.at, self.aim = -1, [], None, 0, 1.0
        self.found: dict[float, int] = {}  # budget -> index of the largest fitting value, once the search closed
        self.state = self._start()

    def _start(self) -> _Row:
        row = _Row(self.key, self.best, len(self.values), lo_verified=self.best < 0, stopped=self.stopped,
                   values=self.values, budget=self.budgets[self.at], points=list(self.points),
                   verify_lo=self.verify, aim=self.aim, guided=self.guided, hint=self.hints.get(self.budgets[self.at]))
        row.seed(self.known.get(self.budgets[self.at], []))
        return row

    def next_probe(self, upto: float | None = None) -> tuple[float, int] | None:
        """The (budget, grid index) to probe next, or None when every budget (up to ``upto``) is done."""
        while self.at < len(self.budgets) and (upto is None or self.budgets[self.at] <= upto):
            if (i := self.state.next_index()) is not None:
                return self.budgets[self.at], i
            st = self.state
            self.stopped = self.stopped or st.stopped
            self.best = st.lo if st.lo_verified or not self.verify else -1
            if self.best >= 0 and not st.stopped:
                self.found[self.budgets[self.at]] = self.best
            self.points += st.here
            # the caching allocator, the CUDA context and fragmentation leave less than the cap usable: the next
            # budget's line aims at the share this one found (capped at the whole budget)
            self.aim = min(1.0, st.usable_fraction() or self.aim)
            self.at += 1
            if self.at < len(self.budgets):
                self.state = self._start()
        return None
