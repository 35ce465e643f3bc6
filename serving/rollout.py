"""Shadow, canary, promote, roll back: a candidate version of a served model meets live traffic
before it replaces it, behind gates.

    GET  /rollout                    every rollout under way: its figures and gates, and the last ends
    POST /rollout/{model}            {"candidate": "NAME:VERSION", "percent": 0}: start a rollout, or change
                                     its percent; 0 is a shadow, 1 to 100 a canary
    POST /rollout/{model}/promote    the candidate becomes the live model, if the gates allow it
    POST /rollout/{model}/rollback   the candidate goes; the live model stays

**One decode, two scores.** While a model has a candidate, each image a request sends it (by name,
not pinned to a version) is decoded once and scored by both versions: by the one that answers,
and, off the request's path, by the other (a *shadow* score; past ``SERVING_ROLLOUT_SHADOW_MAX`` in
flight one is skipped and counted, so a slow candidate never queues live traffic). A canary's
percent decides which version answers: by a hash of the request's ``X-Rollout-Key`` header where
given, so that one client stays on one side, else at random. Every answer names its version. A
candidate that fails while answering is answered for by the live model's score of the same image.

**Gates** (README, "Rollout"): over at least ``SERVING_ROLLOUT_MIN_REQUESTS`` images scored by both,
a canary rolls itself back when the candidate's unsure share exceeds the live model's by more
than ``SERVING_ROLLOUT_UNSURE_MARGIN`` or its error rate by more than ``SERVING_ROLLOUT_ERROR_MARGIN``;
promotion is refused until that many images the live model answered sure were scored by both, and
while the candidate agrees with fewer than ``SERVING_ROLLOUT_MIN_AGREEMENT`` of them.

**What survives a restart:** the state file (``SERVING_ROLLOUT_STATE``) holds, per model name, the
live version (a promotion pins it, so a restart never serves an unvetted candidate merely because
it was registered last: BentoML's ``latest``), the candidate and its percent, and the last ends.
A restarted service serves the pinned version and resumes the rollout; its counts start again.

Rollout is model control: off without ``SERVING_MODEL_CONTROL`` (one worker, the token when set).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_store.captures import is_held_out
from model_store.engine import Scored
from model_store.errors import UsageError
from model_store.files import atomic_output
from serving import metrics
from serving.errors import Conflict, Forbidden, MethodNotAllowed, NotFound, RequestError
from serving.logs import log_event

ROLLOUT_PREFIX = "/rollout"
KEY_HEADER = b"x-rollout-key"
STATE_VERSION = 1
ENDS_KEPT = 10  # promotions and rollbacks kept per model in the state file and GET /rollout
# The card fields that make an image into the input: a candidate must share them with the live
# model, or one decode could not feed both.
INPUT_FIELDS = ("in_channels", "height", "width", "resize", "interpolation", "decode", "class_names")
LABELLED_MAX = 2000  # labelled captures scored by both models for GET /rollout, newest first
LABELLED_EVERY_S = 60.0  # ... at most this often per rollout


@dataclass
class Side:
    """One version's outcomes during a rollout, counted over every image it scored."""

    scored: int = 0
    unsure: int = 0
    out_of_distribution: int = 0
    errors: int = 0

    def add(self, row: Scored | None, reason: str | None) -> None:
        if row is None:
            self.errors += 1
            return
        self.scored += 1
        self.unsure += reason is not None
        self.out_of_distribution += reason == "out_of_distribution"

    def shares(self) -> dict:
        total = self.scored + self.errors
        return {
            "scored": self.scored,
            "errors": self.errors,
            "unsure_share": self.unsure / self.scored if self.scored else None,
            "out_of_distribution_share": self.out_of_distribution / self.scored if self.scored else None,
            "error_rate": self.errors / total if total else None,
        }


@dataclass(frozen=True)
class Gates:
    min_requests: int
    unsure_margin: float
    error_margin: float
    min_agreement: float

    @classmethod
    def of(cls, config) -> Gates:
        return cls(
            config.rollout_min_requests,
            config.rollout_unsure_margin,
            config.rollout_error_margin,
            config.rollout_min_agreement,
        )


@dataclass
class Rollout:
    """A candidate beside a served model: what each version scored, and how often they agreed."""

    name: str
    candidate: object  # serving.model_set.ServedModel
    percent: int
    gates: Gates
    started: float = field(default_factory=time.time)
    live: Side = field(default_factory=Side)
    new: Side = field(default_factory=Side)
    paired: int = 0  # images both versions scored
    live_sure: int = 0  # ... that the live model answered sure
    agreed: int = 0  # ... and the candidate gave the same class
    shadow_in_flight: int = 0
    shadow_skipped: int = 0
    labelled: dict | None = None  # both versions' accuracy on labelled captures, when last measured
    labelled_at: float = -float("inf")

    def candidate_answers(self, key: bytes | None) -> bool:
        if self.percent <= 0:
            return False
        if self.percent >= 100:
            return True
        if key:  # the same client, the same side, as long as the percent stays
            return zlib.crc32(key) % 100 < self.percent
        return random.random() * 100 < self.percent

    def agreement(self) -> float | None:
        return self.agreed / self.live_sure if self.live_sure else None

    def tripped(self) -> str | None:
        """Why the canary must roll back now, or None: the candidate's unsure share or error rate
        above the live model's by more than the margin, over enough images scored by both."""
        if self.paired < self.gates.min_requests:
            return None
        live, new = self.live.shares(), self.new.shares()
        if new["error_rate"] > live["error_rate"] + self.gates.error_margin:
            return (
                f"the candidate's error rate {new['error_rate']:.3f} exceeds the live model's "
                f"{live['error_rate']:.3f} by more than {self.gates.error_margin}"
            )
        if (new["unsure_share"] or 0) > (live["unsure_share"] or 0) + self.gates.unsure_margin:
            return (
                f"the candidate's unsure share {new['unsure_share']:.3f} exceeds the live model's "
                f"{live['unsure_share']:.3f} by more than {self.gates.unsure_margin} over {self.paired} images"
            )
        return None

    def promotable(self) -> str | None:
        """Why promotion is refused now, or None."""
        if self.live_sure < self.gates.min_requests:
            return (
                f"only {self.live_sure} images the live model answered sure were scored by both versions; "
                f"promotion needs {self.gates.min_requests} (SERVING_ROLLOUT_MIN_REQUESTS)"
            )
        if self.agreement() < self.gates.min_agreement:
            return (
                f"the candidate agrees with {self.agreement():.3f} of the live model's sure answers, below "
                f"{self.gates.min_agreement} (SERVING_ROLLOUT_MIN_AGREEMENT)"
            )
        return self.tripped()

    def describe(self, live_tag: str) -> dict:
        refused = self.promotable()
        return {
            "model": self.name,
            "mode": "shadow" if self.percent == 0 else "canary",
            "percent": self.percent,
            "started": round(self.started, 3),
            "scored_by_both": self.paired,
            "live_sure": self.live_sure,
            "agreement_on_sure": self.agreement(),
            "live": {"tag": live_tag, **self.live.shares()},
            "candidate": {"tag": self.candidate.tag, **self.new.shares()},
            "shadow_skipped": self.shadow_skipped,
            "labelled": self.labelled,
            "gates": {
                "min_requests": self.gates.min_requests,
                "unsure_margin": self.gates.unsure_margin,
                "error_margin": self.gates.error_margin,
                "min_agreement": self.gates.min_agreement,
                "promotable": refused is None,
                "refused_because": refused,
            },
        }


class Rollouts:
    """Every rollout of one service, by model name, and the state file that outlives it."""

    def __init__(self, models, config, state_path: Path | None, store=None):
        self.models, self.config, self.gates = models, config, Gates.of(config)
        self.state_path, self.store = state_path, store  # store: the capture store, for labelled accuracy
        self.active: dict[str, Rollout] = {}  # replaced, never changed in place: requests read it unlocked
        self.state = read_state(state_path) if state_path else {}
        self.changing = asyncio.Lock()

    # The request path -------------------------------------------------------------------------------

    def of(self, live, requested: str | None) -> Rollout | None:
        """The rollout a request joins: one of its model's, unless it pinned a version."""
        rollout = self.active.get(live.name)
        if rollout is None or (requested and ":" in requested and not requested.endswith(":latest")):
            return None
        return rollout

    async def score(self, rollout: Rollout, live, pixels: np.ndarray, to_candidate: bool):
        """(the version that answers, its row) for one decoded image, the candidate answering when
        ``to_candidate`` (:meth:`Rollout.candidate_answers`), the other version scoring it too, off
        the request's path."""
        candidate = rollout.candidate
        answering, other = (candidate, live) if to_candidate else (live, candidate)
        shadow = None
        if rollout.shadow_in_flight < self.config.rollout_shadow_max:
            rollout.shadow_in_flight += 1
            shadow = asyncio.ensure_future(other.batcher.submit(pixels))
        else:
            rollout.shadow_skipped += 1
            metrics.rollout_events.labels(model=rollout.name, event="shadow_skipped").inc()
        try:
            row = await answering.batcher.submit(pixels)
        except Exception:
            self.count(rollout, answering is candidate, None)
            if shadow is None or answering is not candidate:
                raise
            answering, row = live, await shadow  # a candidate that fails: the live model's answer
            shadow = None
        if shadow is not None:
            shadow.add_done_callback(lambda done: self.pair(rollout, answering is candidate, row, done))
        else:
            self.count(rollout, answering is candidate, row)
        return answering, row

    def pair(self, rollout: Rollout, candidate_answered: bool, row: Scored, shadow: asyncio.Future) -> None:
        rollout.shadow_in_flight -= 1
        other = None if shadow.cancelled() or shadow.exception() is not None else shadow.result()
        live_row, new_row = (other, row) if candidate_answered else (row, other)
        live_reason = self.count(rollout, False, live_row)
        self.count(rollout, True, new_row)
        if live_row is None or new_row is None:
            return self.check(rollout)
        rollout.paired += 1
        if live_reason is None:
            rollout.live_sure += 1
            rollout.agreed += int(live_row.probabilities.argmax() == new_row.probabilities.argmax())
            metrics.rollout_agreement.labels(model=rollout.name).set(rollout.agreement())
        self.check(rollout)

    def count(self, rollout: Rollout, candidate: bool, row: Scored | None) -> str | None:
        """Count one version's outcome for an image; returns its unsure reason."""
        model = rollout.candidate if candidate else self.models.find(rollout.name)
        reason = None
        if row is not None and model is not None and model.engine.card.calibration is not None:
            calibration = model.engine.card.calibration
            reason = calibration.unsure_reason(float(row.probabilities.max()), row.energy, row.distance)
        (rollout.new if candidate else rollout.live).add(row, reason)
        outcome = "error" if row is None else "unsure" if reason else "sure"
        metrics.rollout_answers.labels(
            model=rollout.name, side="candidate" if candidate else "live", outcome=outcome
        ).inc()
        return reason

    def check(self, rollout: Rollout) -> None:
        """A canary whose gate trips rolls back, now, on the event loop."""
        if rollout.percent > 0 and self.active.get(rollout.name) is rollout and (why := rollout.tripped()):
            self.end(rollout.name, "auto_rolled_back", why)

    # Control ---------------------------------------------------------------------------------------

    async def answer(self, route: RolloutRoute, body: bytes) -> dict:
        if route.kind == "index":
            return await self.index()
        if not self.config.model_control:
            raise Forbidden("rollout is model control; start the service with SERVING_MODEL_CONTROL=true to use it")
        async with self.changing:  # one change at a time; requests go on meanwhile
            live = self.models.get(route.model)  # UnknownModel (404) names the served ones
            if route.kind == "start":
                tag, percent = _start_body(body)
                return await self.start(live, tag, percent)
            rollout = self.active.get(live.name)
            if rollout is None:
                raise NotFound(f"model {live.name} has no rollout under way; start one with POST /rollout/{live.name}")
            if route.kind == "rollback":
                return self.end(live.name, "rolled_back", "asked")
            if why := rollout.promotable():
                raise Conflict(f"promotion of {rollout.candidate.tag} refused: {why}")
            return self.end(live.name, "promoted", "asked")

    async def start(self, live, tag: str, percent: int) -> dict:
        rollout = self.active.get(live.name)
        if rollout is not None:
            if rollout.candidate.tag != tag and f"{rollout.candidate.name}:latest" != tag:
                raise Conflict(
                    f"model {live.name} already has candidate {rollout.candidate.tag}; promote it or roll it back first"
                )
            rollout.percent = percent  # the counts go on: the same candidate, more or less traffic
        else:
            candidate = await asyncio.to_thread(self.models.prepare, tag, f"{live.name}:candidate")
            if candidate.name != live.name:
                candidate.batcher.close()
                raise RequestError(f"candidate {candidate.tag} is not a version of {live.name}")
            if candidate.version == live.version:
                candidate.batcher.close()
                raise RequestError(f"{candidate.tag} is the live version already")
            differs = [f for f in INPUT_FIELDS if getattr(candidate.engine.card, f) != getattr(live.engine.card, f)]
            if differs:
                candidate.batcher.close()
                raise RequestError(
                    f"candidate {candidate.tag} differs from {live.tag} in {', '.join(differs)}: a rollout decodes each "
                    "image once for both, so they must take the same input and answer the same classes"
                )
            rollout = Rollout(live.name, candidate, percent, self.gates)
            self.active = {**self.active, live.name: rollout}
        metrics.rollout_percent.labels(model=live.name).set(percent)
        metrics.rollout_events.labels(model=live.name, event="started" if percent == 0 else "canary").inc()
        log_event("rollout", model=live.name, live=live.tag, candidate=rollout.candidate.tag, percent=percent)
        self.save()
        return rollout.describe(live.tag)

    def end(self, name: str, how: str, why: str) -> dict:
        """Promote the candidate (``how`` "promoted") or drop it (rolled back, by hand or by a gate)."""
        rollout = self.active[name]
        self.active = {k: v for k, v in self.active.items() if k != name}
        live = self.models.find(name)
        summary = rollout.describe(live.tag if live else "")
        candidate = rollout.candidate
        if how == "promoted":
            candidate.monitor.rename(name)
            self.models.install(candidate)  # one step; requests holding the old version finish on it
        else:
            candidate.batcher.close()
            candidate.monitor.retire()
        metrics.rollout_percent.labels(model=name).set(0)
        metrics.rollout_events.labels(model=name, event=how).inc()
        log_event(
            "rollout_ended",
            logging.WARNING if how == "auto_rolled_back" else logging.INFO,
            model=name,
            candidate=candidate.tag,
            ended=how,
            why=why,
        )
        entry = {"candidate": candidate.tag, "ended": how, "why": why, "time": round(time.time(), 3)}
        entry["figures"] = {k: summary[k] for k in ("scored_by_both", "agreement_on_sure", "live", "candidate")}
        ends = [entry, *self.state.get(name, {}).get("ends", [])][:ENDS_KEPT]
        self.state = {**self.state, name: {**self.state.get(name, {}), "ends": ends}}
        self.save()
        return {**summary, "ended": how, "why": why, "serving": self.models.find(name).tag}

    async def index(self) -> dict:
        rollouts = []
        for name, rollout in self.active.items():
            if self.store is not None and time.monotonic() - rollout.labelled_at >= LABELLED_EVERY_S:
                rollout.labelled_at = time.monotonic()
                live = self.models.find(name)
                rollout.labelled = await asyncio.to_thread(labelled_accuracy, self.store, live, rollout.candidate)
            live = self.models.find(name)
            rollouts.append(rollout.describe(live.tag if live else ""))
        ends = {name: entry.get("ends", []) for name, entry in self.state.items() if entry.get("ends")}
        return {"control": self.config.model_control, "rollouts": rollouts, "ended": ends}

    def monitored(self, answer: dict) -> dict:
        """``GET /monitor``'s answer with each rollout beside its live model, and the candidate's
        own drift window after it."""
        entries = []
        for entry in answer["models"]:
            entries.append(entry)
            name = entry["model"].split(":")[0]
            if (rollout := self.active.get(name)) is not None:
                described = rollout.describe(entry["model"])
                entry["rollout"] = described
                candidate = rollout.candidate
                entries.append(
                    {**candidate.monitor.describe(candidate.tag), "candidate_of": name, "rollout": described}
                )
        return {**answer, "models": entries}

    # State -----------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the state file: per model that has had a rollout, the live version, the candidate
        and its percent, and the last ends. Models that never had one are not pinned."""
        state = {}
        for model in self.models.models:
            if model.name not in self.state and model.name not in self.active:
                continue
            entry = dict(self.state.get(model.name, {}))
            entry["live"] = model.tag
            rollout = self.active.get(model.name)
            entry["candidate"] = rollout.candidate.tag if rollout else None
            entry["percent"] = rollout.percent if rollout else 0
            state[model.name] = entry
        self.state = state
        if self.state_path is not None:
            write_state(self.state_path, state)

    def restore(self) -> None:
        """Resume the rollouts the state file names (after warm-up, on the warm-up thread); a
        candidate that cannot be loaded any more is logged and dropped."""
        for name, entry in self.state.items():
            live = self.models.find(name)
            if not entry.get("candidate") or live is None:
                continue
            try:
                candidate = self.models.prepare(entry["candidate"], f"{name}:candidate")
            except Exception as err:
                log_event(
                    "rollout_not_resumed", logging.WARNING, model=name, candidate=entry["candidate"], error=str(err)
                )
                continue
            self.active = {**self.active, name: Rollout(name, candidate, int(entry.get("percent", 0)), self.gates)}
            metrics.rollout_percent.labels(model=name).set(int(entry.get("percent", 0)))
            log_event(
                "rollout_resumed", model=name, live=live.tag, candidate=candidate.tag, percent=entry.get("percent")
            )


def read_state(path: Path) -> dict:
    """The state file's models, or {} when there is none yet; a file that is not ours stops the
    service with a message naming it, since serving unpinned versions could serve a rolled-back one."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION or not isinstance(data.get("models"), dict):
            raise ValueError(f"expected version {STATE_VERSION} and a models object")
        return data["models"]
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise UsageError(f"SERVING_ROLLOUT_STATE {path} is not a rollout state file: {err}; move it away") from None


def read_pins(path: Path) -> dict[str, str]:
    """The live version of each model name that the state file at ``path`` records."""
    return {name: entry["live"] for name, entry in read_state(path).items() if entry.get("live")}


def write_state(path: Path, models: dict) -> None:
    with atomic_output(path, "w") as f:
        json.dump({"version": STATE_VERSION, "models": models}, f, indent=1)


def labelled_accuracy(store, live, candidate) -> dict:
    """Both versions' accuracy on the model's labelled captures (the newest LABELLED_MAX, not
    labelled not_in_domain), and on those a fine-tune held out (``is_held_out``): the others may
    be what the candidate was trained on."""
    from model_store.preprocess import image_bytes_to_input

    labels = store.labels(live.name)
    classes = live.engine.card.class_names
    chosen = sorted(
        (
            (entry["time"], sha, classes.index(entry["label"]))
            for sha, entry in labels.items()
            if entry["label"] in classes
        ),
        reverse=True,
    )[:LABELLED_MAX]
    pixels, truth, held = [], [], []
    for _, sha, label in chosen:
        found = store.image(live.name, sha)
        if found is None:
            continue
        try:
            pixels.append(image_bytes_to_input(found[0], live.engine.card))
        except Exception:  # a capture that no longer decodes is not a label to score
            continue
        truth.append(label)
        held.append(is_held_out(sha))
    if not pixels:
        return {"images": 0, "held_out_images": 0}
    inputs, truth, held = np.stack(pixels), np.array(truth), np.array(held)
    result = {"images": len(truth), "held_out_images": int(held.sum())}
    for side, model in (("live", live), ("candidate", candidate)):
        right = model.engine.outcomes(inputs).probabilities.argmax(axis=1) == truth
        result[f"{side}_accuracy"] = float(right.mean())
        result[f"{side}_held_out_accuracy"] = float(right[held].mean()) if held.any() else None
    return result


@dataclass(frozen=True)
class RolloutRoute:
    kind: str  # "index", "start", "promote", "rollback"
    model: str = ""


def is_rollout(path: str) -> bool:
    return path == ROLLOUT_PREFIX or path.startswith(ROLLOUT_PREFIX + "/")


def route(method: str, path: str) -> RolloutRoute:
    parts = path[len(ROLLOUT_PREFIX) + 1 :].split("/") if path != ROLLOUT_PREFIX else []
    kind = "index" if not parts else "start" if len(parts) == 1 else parts[1] if len(parts) == 2 else None
    if kind not in ("index", "start", "promote", "rollback") or not all(parts):
        raise NotFound(
            "no such rollout path; the routes are GET /rollout, POST /rollout/{model}, "
            "POST /rollout/{model}/promote and POST /rollout/{model}/rollback"
        )
    allowed = "GET" if kind == "index" else "POST"
    if method != allowed:
        raise MethodNotAllowed(f"{method} is not allowed here; this rollout route takes {allowed}")
    return RolloutRoute(kind, parts[0] if parts else "")


def _start_body(body: bytes) -> tuple[str, int]:
    how = 'send {"candidate": "NAME:VERSION", "percent": 0} (0: shadow; 1 to 100: canary)'
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(f"the body is not JSON; {how}") from None
    if not isinstance(data, dict) or not isinstance(data.get("candidate"), str) or not data["candidate"]:
        raise RequestError(f"no candidate; {how}")
    percent = data.get("percent", 0)
    if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise RequestError(f"percent must be a whole number from 0 to 100, got {str(percent)[:40]!r}; {how}")
    return data["candidate"], percent
