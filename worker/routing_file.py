"""`leadrouter apply FILE [--dry-run]`: routing declared in a file of operators, sources and
weights, applied as one transaction. Applying the same file again changes nothing.

The file is TOML (`.toml`) or YAML (`.yaml`, `.yml`)::

    [[operators]]
    name = "Alice"              # required; operators are identified by name
    max_load = 150              # required: most open contacts at once (0 or more)
    active = true               # optional, default true
    shift = "mon-fri 09:00-18:00"   # optional: weekly shift (worker/schedule.py), "" clears
    time_zone = "Europe/Berlin"     # with a shift: its IANA time zone
    leave = ["2026-12-24..2026-12-31"]  # optional: leave date ranges, [] clears

    [[operators]]
    name = "Bob"
    max_load = 150

    [[sources]]
    key = "telegram-bot"        # required; the slug bots publish with
    name = "Telegram bot"       # optional, default: the key
    description = "Main bot"    # optional, default ""
    strategy = "smooth"         # optional: smooth (default) | weighted_random | least_loaded
    affinity_hours = 24         # optional; absent or 0 = off
    accept_timeout = 30         # optional: offers, answered within this many seconds; 0 = off
    expire_to_away = 3          # optional: set away after this many offers in a row lapse; 0 = off
    queue_order = "fifo"        # optional: fifo (default) | lifo (newest first per priority)
    overflow_to = "web"         # optional, with overflow_after: another source's key
    overflow_after = 120        # optional; seconds queued before overflowing; absent or 0 = off
    alert_after = 300           # optional; contact.waiting after these seconds; absent or 0 = off
    weights = { Alice = 1, Bob = 3 }   # optional: operator name -> weight (> 0)

The same in YAML::

    operators:
      - {name: Alice, max_load: 150, active: true}
    sources:
      - key: telegram-bot
        strategy: smooth
        weights: {Alice: 1, Bob: 3}

Semantics:
- An operator or source the file names is set to what the file says; a field left out takes
  its default (so `active` left out re-activates an operator). One the database lacks is
  created. Operators and sources the file does not name are left alone (nothing is ever
  deleted).
- `shift`, `time_zone` and `leave` left out leave what `operators shift` / `operators
  leave` set alone (they are not reset like the other fields); presence is never in the
  file: it is the person's own, live.
- Operators are matched by exact name. Names are unique, within the file and in the
  database (which refuses a second operator of a name since migration 0011).
- A source's `weights` replace all of its weights (like `leadrouter weights set`); `{}`
  removes them all; no `weights` leaves them alone. Weights may name operators of the file
  or of the database.
- The whole file is validated before the database is touched; errors are one line with the
  location, list items counted from 0: `sources[1].weights.Carol: no operator named 'Carol'
  in the file or the database`. Then everything is applied in one transaction, all or
  nothing, and capacity it creates goes to queued contacts in that same transaction (their
  events are left in the outbox for the worker's relay, like every admin action).
"""

import json
import re
import tomllib
from collections import defaultdict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker import availability, distribution, schedule, source_queueing
from worker.errors import UserError
from worker.retry import in_transaction
from worker.sql import Q
from worker.strategies import DEFAULT_STRATEGY, STRATEGIES

INT32_MAX = 2**31 - 1
KEY = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

Name = Annotated[str, Field(min_length=1, max_length=256)]


class _Spec(BaseModel):
    # strict: TOML and YAML have real types, so "5" or 5.0 where an integer belongs is a
    # mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class OperatorSpec(_Spec):
    name: Name
    max_load: Annotated[int, Field(ge=0, le=INT32_MAX)]
    active: bool = True
    # Left out: left as they are (set by `operators shift` / `operators leave`); "" and []
    # clear them.
    shift: Annotated[str, Field(max_length=schedule.MAX_LENGTH)] | None = None
    time_zone: Annotated[str, Field(max_length=64)] | None = None
    leave: list[Annotated[str, Field(max_length=100)]] | None = None

    @field_validator("shift")
    @classmethod
    def _readable_shift(cls, shift: str | None) -> str | None:
        return schedule.parse_shift(shift).text if shift else shift

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, name: str | None) -> str | None:
        if name is not None:
            schedule.zone(name)
        return name

    @field_validator("leave")
    @classmethod
    def _readable_leave(cls, leave: list[str] | None) -> list[str] | None:
        if leave is None:
            return None
        text = schedule.leave_text([x for item in leave for x in schedule.parse_leave(item)])
        return [text] if text else []

    @model_validator(mode="after")
    def _shift_has_a_zone(self) -> "OperatorSpec":
        if self.shift and not self.time_zone:
            raise ValueError('a shift needs its time_zone, e.g. time_zone = "Europe/Berlin"')
        return self

    def schedule_fields(self) -> dict[str, str | None]:
        """The schedule fields the file sets (normalised), by column name."""
        fields: dict[str, str | None] = {}
        if self.shift is not None or self.time_zone is not None:
            fields["shift"] = self.shift or None
            fields["time_zone"] = self.time_zone
        if self.leave is not None:
            fields["leave"] = self.leave[0] if self.leave else None
        return fields


class SourceSpec(_Spec):
    key: str
    name: Name | None = None
    description: Annotated[str, Field(max_length=2000)] = ""
    strategy: str = DEFAULT_STRATEGY
    affinity_hours: Annotated[int, Field(ge=0, le=24 * 365)] = 0
    accept_timeout: Annotated[int, Field(ge=0, le=86_400)] = 0
    expire_to_away: Annotated[int, Field(ge=0, le=1000)] = 0
    queue_order: Literal["fifo", "lifo"] = "fifo"
    overflow_to: str | None = None
    overflow_after: Annotated[int, Field(ge=0, le=source_queueing.MAX_SECONDS)] = 0
    alert_after: Annotated[int, Field(ge=0, le=source_queueing.MAX_SECONDS)] = 0
    weights: dict[Name, Annotated[int, Field(gt=0, le=INT32_MAX)]] | None = None

    @model_validator(mode="after")
    def _overflow_pair(self) -> "SourceSpec":
        if (self.overflow_to is None) != (self.overflow_after == 0):
            raise ValueError("overflow_to and overflow_after (seconds, above 0) go together")
        if self.overflow_to == self.key:
            raise ValueError("a source cannot overflow to itself")
        return self

    def queueing(self) -> dict[str, Any]:
        """Its queueing settings as stored (0 and NULL both mean off)."""
        return {
            "queue_order": self.queue_order,
            "overflow_to": self.overflow_to,
            "overflow_after": self.overflow_after or None,
            "alert_after": self.alert_after or None,
        }

    @field_validator("key")
    @classmethod
    def _key_is_a_slug(cls, key: str) -> str:
        if not KEY.fullmatch(key):
            raise ValueError(
                "a key is lower-case letters, digits, '.', '_' or '-' "
                "(at most 128, starting with a letter or digit)"
            )
        return key

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy not in STRATEGIES:
            choices = ", ".join(STRATEGIES)
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {choices}")
        return strategy


class RoutingFile(_Spec):
    operators: list[OperatorSpec] = Field(default_factory=list)
    sources: list[SourceSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "RoutingFile":
        _check_unique("operators", "name", [op.name for op in self.operators])
        _check_unique("sources", "key", [s.key for s in self.sources])
        return self


def _check_unique(section: str, attr: str, values: list[str]) -> None:
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in first:
            raise ValueError(
                f"{section}[{i}].{attr}: {value!r} appears twice (also {section}[{first[value]}])"
            )
        first[value] = i


# --- reading a file (the only I/O before apply) ---------------------------------------


def load(path: str | Path) -> RoutingFile:
    """Read and validate a routing file; the extension says TOML or YAML."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: a routing file ends in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: not UTF-8 text") from None
    except ValueError:  # a NUL in the path, which no file name can hold
        raise UserError(f"cannot read {path}: a file name holds no NUL byte") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse(text, fmt, origin=str(path))


def parse(text: str, fmt: str, origin: str = "routing file") -> RoutingFile:
    """Parse and validate the text of a routing file (`fmt` is "toml" or "yaml")."""
    data: Any
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{origin}: invalid TOML: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{origin}: invalid YAML{where}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{origin}: invalid YAML: {' '.join(str(exc).split())}") from None
        data = {} if data is None else data  # an empty file declares nothing
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a mapping with 'operators' and 'sources'")
    try:
        return RoutingFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    error = errors[0]
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    elif error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
    else:
        message = error["msg"]
    where = _location(error["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _location(loc: Iterable[int | str]) -> str:
    """('sources', 1, 'weights', 'Carol') -> 'sources[1].weights.Carol'."""
    out = ""
    for part in loc:
        if isinstance(part, int) or part == "[key]":
            out += f"[{part}]" if isinstance(part, int) else part
        else:
            out += f".{_part(part)}" if out else _part(part)
    return out


def _part(name: str) -> str:
    return name if re.fullmatch(r"[\w-]+", name) else json.dumps(name, ensure_ascii=False)


# --- the diff (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operator:
    id: int
    name: str
    max_load: int
    active: bool
    shift: str | None = None
    time_zone: str | None = None
    leave: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    id: int
    key: str
    name: str
    description: str
    strategy: str
    affinity_hours: int | None
    weights: Mapping[int, int] = field(default_factory=dict)  # operator id -> weight
    accept_timeout: int = 0
    queueing: Mapping[str, Any] = field(default_factory=lambda: dict(_QUEUEING_DEFAULTS))
    expire_to_away: int = 0


_QUEUEING_DEFAULTS: dict[str, Any] = {
    "queue_order": "fifo",
    "overflow_to": None,
    "overflow_after": None,
    "alert_after": None,
}


@dataclass(frozen=True, slots=True)
class State:
    """The database as a routing file sees it: every operator, and the sources the file
    names with their weights."""

    operators: tuple[Operator, ...] = ()
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the diff: `update operator Alice: max_load 3 → 5`."""

    kind: Literal["create", "update", "unchanged"]
    entity: Literal["operator", "source", "weights"]
    name: str  # operator name or source key
    details: str = ""

    @property
    def what(self) -> str:
        return f"{self.entity} {self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.what}" + (f": {self.details}" if self.details else "")


class _Operators:
    """The database's operators by name; a name the file uses must resolve to one."""

    def __init__(self, operators: Iterable[Operator]) -> None:
        self.by_id = {op.id: op for op in operators}
        self.by_name: dict[str, list[Operator]] = defaultdict(list)
        for op in self.by_id.values():
            self.by_name[op.name].append(op)

    def find(self, name: str, where: str) -> Operator | None:
        found = self.by_name.get(name, [])
        if len(found) > 1:
            ids = ", ".join(str(op.id) for op in found)
            raise UserError(
                f"{where}: {len(found)} operators are named {name!r} (ids {ids}); rename all "
                "but one with `leadrouter operators update ID --name ...` first"
            )
        return found[0] if found else None

    def label(self, operator_id: int) -> str:
        op = self.by_id.get(operator_id)
        if op is None:
            return f"id {operator_id}"
        return op.name if len(self.by_name[op.name]) == 1 else f"{op.name} (id {op.id})"


def plan(current: State, desired: RoutingFile) -> list[Change]:
    """What applying `desired` to `current` would do, in file order. Raises UserError for
    names that resolve to no operator or to several."""
    operators = _Operators(current.operators)
    changes = [
        _operator_change(operators.find(op.name, f"operators[{i}].name"), op)
        for i, op in enumerate(desired.operators)
    ]
    in_file = {op.name for op in desired.operators}
    sources = {s.key: s for s in current.sources}
    for i, spec in enumerate(desired.sources):
        found = sources.get(spec.key)
        changes.append(_source_change(found, spec))
        if spec.weights is not None:
            changes.append(_weights_change(found, spec, i, operators, in_file))
    return changes


def _operator_change(found: Operator | None, op: OperatorSpec) -> Change:
    new: dict[str, Any] = {"max_load": op.max_load, "active": op.active, **op.schedule_fields()}
    if found is None:
        return _change("operator", op.name, None, {k: v for k, v in new.items() if v is not None})
    return _change("operator", op.name, {k: getattr(found, k) for k in new}, new)


def _source_change(found: Source | None, spec: SourceSpec) -> Change:
    def fields(s: Source | SourceSpec) -> dict[str, Any]:
        return {
            "name": s.name or s.key,
            "description": s.description,
            "strategy": s.strategy,
            "affinity_hours": s.affinity_hours or None,  # 0 and NULL both mean off
            "accept_timeout": s.accept_timeout or None,  # 0: offers off
            "expire_to_away": s.expire_to_away or None,  # 0: off
            **(s.queueing() if isinstance(s, SourceSpec) else s.queueing),
        }

    old, new = None if found is None else fields(found), fields(spec)
    for f in ("accept_timeout", "expire_to_away"):
        if not getattr(spec, f) and not (found and getattr(found, f)):
            # Off before and after: the diff reads as it did before offers existed.
            new.pop(f)
            if old is not None:
                old.pop(f)
    return _change("source", spec.key, old, new)


def _change(
    entity: Literal["operator", "source"],
    name: str,
    old: dict[str, Any] | None,
    new: dict[str, Any],
) -> Change:
    if old is None:
        listed = ", ".join(
            f"{f} {_show(v)}"
            for f, v in new.items()
            if v != "" and (f not in _QUEUEING_DEFAULTS or v != _QUEUEING_DEFAULTS[f])
        )
        return Change("create", entity, name, listed)
    diff = ", ".join(f"{f} {_show(old[f])} → {_show(v)}" for f, v in new.items() if old[f] != v)
    return Change("update" if diff else "unchanged", entity, name, diff)


def _weights_change(
    found: Source | None, spec: SourceSpec, index: int, operators: _Operators, in_file: set[str]
) -> Change:
    assert spec.weights is not None
    for name in spec.weights:
        where = f"sources[{index}].weights.{_part(name)}"
        if operators.find(name, where) is None and name not in in_file:
            raise UserError(f"{where}: no operator named {name!r} in the file or the database")
    # Labels stand for operator ids: names the file uses are unique in the database, and
    # others carry their id, so comparing by label is comparing by id.
    new = dict(spec.weights)
    if found is None:
        listed = ", ".join(f"{name} {weight}" for name, weight in new.items())
        return Change("create", "weights", spec.key, listed or "none")
    old = {operators.label(op_id): weight for op_id, weight in found.weights.items()}
    diff = ", ".join(
        f"{label} {_show(old.get(label), '-')} → {_show(new.get(label), '-')}"
        for label in {**new, **old}
        if old.get(label) != new.get(label)
    )
    return Change("update" if diff else "unchanged", "weights", spec.key, diff)


def _show(value: object, none: str = "off") -> str:
    if value is None:
        return none  # only affinity_hours, accept_timeout (and absent weights) can be None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:39] + "…")
    return str(value)


# --- applying (I/O) -------------------------------------------------------------------


async def apply(pool: asyncpg.Pool, routing: RoutingFile, dry_run: bool) -> list[Change]:
    """Bring the database in line with the file in one transaction, or with dry_run only
    say what that would change. Returns the diff (every entity of the file, in order)."""

    undrained: set[int] = set()

    async def run(conn: asyncpg.Connection) -> list[Change]:
        # One apply at a time: a second one sees what the first created. Dry runs wait
        # too: they show the diff against the state any running apply leaves.
        await conn.execute(Q.lock_apply)
        current = await _read_state(conn, routing)
        changes = plan(current, routing)
        undrained.clear()
        if not dry_run:
            try:
                undrained.update(await _execute(conn, current, routing, changes))
            except asyncpg.UniqueViolationError:  # `operators add` of the same name, meanwhile
                raise UserError(
                    "an operator or source of the file was created by someone else meanwhile; "
                    "nothing was changed, run apply again"
                ) from None
        return changes

    changes = await in_transaction(pool, run, readonly=dry_run)
    if undrained:
        await distribution.drain_after_commit(pool, undrained)
    return changes


async def _read_state(conn: asyncpg.Connection, routing: RoutingFile) -> State:
    operators = tuple(
        Operator(
            r["id"],
            r["name"],
            r["max_load"],
            r["is_active"],
            r["shift"],
            r["time_zone"],
            r["leave"],
        )
        for r in await conn.fetch(Q.list_operators)
    )
    keys = {s.key for s in routing.sources}
    sources = []
    for r in await conn.fetch(Q.list_sources):
        if r["key"] in keys:
            rows = await conn.fetch(Q.show_weights, r["id"])
            weights = {w["operator_id"]: w["weight"] for w in rows}
            sources.append(
                Source(
                    r["id"],
                    r["key"],
                    r["name"],
                    r["description"],
                    r["strategy"],
                    r["affinity_hours"],
                    weights,
                    r["accept_timeout"],
                    {f: r[f] for f in _QUEUEING_DEFAULTS},
                    r["expire_to_away"],
                )
            )
    return State(operators, tuple(sources))


async def _execute(
    conn: asyncpg.Connection, current: State, routing: RoutingFile, changes: list[Change]
) -> set[int]:
    """Make the changes; returns the sources given capacity whose locks were not held
    (the caller routes them after commit)."""
    todo = {(c.entity, c.name): c.kind for c in changes if c.kind != "unchanged"}
    if not todo:
        return set()
    # plan() made sure every name the file uses is unique in the database.
    operator_ids = {op.name: op.id for op in current.operators}
    source_ids = {s.key: s.id for s in current.sources}

    # The sources whose routing this changes: those the file changes, and those the
    # changed operators are weighted for. Their locks come first, in ascending order, as
    # in every routing transaction, so capacity we create is routed by us alone.
    affected = {
        source_ids[key] for entity, key in todo if entity != "operator" and key in source_ids
    }
    for entity, name in todo:
        if entity == "operator" and name in operator_ids:
            rows = await conn.fetch(Q.operator_source_ids, operator_ids[name])
            affected.update(r["source_id"] for r in rows)
    await distribution.lock_sources(conn, affected)

    for op in routing.operators:
        change = todo.get(("operator", op.name))
        if change == "create":
            row = await conn.fetchrow(Q.insert_operator, op.name, op.active, op.max_load)
            operator_ids[op.name] = row["id"]
        elif change == "update":
            await conn.execute(
                Q.update_operator, operator_ids[op.name], None, op.max_load, op.active
            )
        if change is not None and _schedule_changed(current, op):
            await availability.set_schedule(conn, operator_ids[op.name], op.schedule_fields())

    for spec in routing.sources:
        title, hours = spec.name or spec.key, spec.affinity_hours or None
        change = todo.get(("source", spec.key))
        if change == "create":
            try:
                row = await conn.fetchrow(
                    Q.insert_source,
                    spec.key,
                    title,
                    spec.description,
                    spec.strategy,
                    hours,
                    spec.accept_timeout,
                    spec.expire_to_away,
                )
            except asyncpg.UniqueViolationError:  # `sources add` does not take the apply lock
                raise UserError(
                    f"source {spec.key!r} was added while applying; nothing changed, apply again"
                ) from None
            source_ids[spec.key] = row["id"]
        elif change == "update":
            await conn.execute(
                Q.update_source,
                spec.key,
                title,
                spec.description,
                spec.strategy,
                True,
                hours,
                spec.accept_timeout,
                spec.expire_to_away,
            )
        if spec.weights is not None and ("weights", spec.key) in todo:
            source_id = source_ids[spec.key]
            await conn.execute(Q.delete_weights, source_id)
            await conn.execute(
                Q.insert_weights,
                source_id,
                [operator_ids[operator] for operator in spec.weights],
                list(spec.weights.values()),
            )

    await _store_queueing(conn, current, routing, todo, source_ids)
    await distribution.drain_sources(conn, affected)
    # Sources the changed operators were weighted for since they were read before the
    # locks (a concurrent `weights set`).
    now: set[int] = set()
    for entity, name in todo:
        if entity == "operator" and name in operator_ids:
            rows = await conn.fetch(Q.operator_source_ids, operator_ids[name])
            now.update(r["source_id"] for r in rows)
    return now - affected


async def _store_queueing(
    conn: asyncpg.Connection,
    current: State,
    routing: RoutingFile,
    todo: Container[tuple[str, str]],
    source_ids: Mapping[str, int],
) -> None:
    """The sources' queueing settings, once every source of the file exists (an overflow
    may name one created here): overflow turned off first where it changes, so that the
    file's final settings are checked for cycles, not a mix of old and new."""
    before = {s.key: dict(s.queueing) for s in current.sources}
    changed = [
        spec
        for spec in routing.sources
        if ("source", spec.key) in todo
        and spec.queueing() != before.get(spec.key, _QUEUEING_DEFAULTS)
    ]
    for spec in changed:
        old = before.get(spec.key, _QUEUEING_DEFAULTS)
        if old["overflow_to"] is not None and old["overflow_to"] != spec.overflow_to:
            off = source_queueing.QueueingChange(overflow_after=0)
            await source_queueing.store(conn, source_ids[spec.key], off)
    for spec in changed:
        change = source_queueing.QueueingChange(
            queue_order=spec.queue_order,
            overflow_to=spec.overflow_to,
            overflow_after=spec.overflow_after,
            alert_after=spec.alert_after,
        )
        try:
            await source_queueing.store(conn, source_ids[spec.key], change)
        except UserError as exc:
            index = routing.sources.index(spec)
            raise UserError(f"sources[{index}]: {exc}") from None


def _schedule_changed(current: State, op: OperatorSpec) -> bool:
    fields = op.schedule_fields()
    found = next((o for o in current.operators if o.name == op.name), None)
    if found is None:
        return any(v is not None for v in fields.values())
    return any(getattr(found, k) != v for k, v in fields.items())
