"""Routing files: parsing, validation with locations, and the diff. No database."""

from pathlib import Path

import pytest

from worker.errors import UserError
from worker.routing_file import (
    Change,
    Operator,
    RoutingFile,
    Source,
    State,
    load,
    parse,
    plan,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The TOML flavour ships in the package: the demo applies it.
SAMPLE_TOML = Path(__file__).resolve().parents[2] / "worker" / "tools" / "demo_routing.toml"

SMALL = """
[[operators]]
name = "Alice"
max_load = 3

[[operators]]
name = "Bob"
max_load = 5
active = false

[[sources]]
key = "tg"
weights = { Alice = 1, Bob = 3 }
"""


def applied(routing: RoutingFile) -> State:
    """The state a database would be in after applying the file to an empty one."""
    ids = {op.name: n for n, op in enumerate(routing.operators, start=1)}
    return State(
        tuple(Operator(ids[op.name], op.name, op.max_load, op.active) for op in routing.operators),
        tuple(
            Source(
                n,
                s.key,
                s.name or s.key,
                s.description,
                s.strategy,
                s.affinity_hours or None,
                {ids[name]: w for name, w in (s.weights or {}).items()},
                s.accept_timeout,
            )
            for n, s in enumerate(routing.sources, start=1)
        ),
    )


# --- parsing -----------------------------------------------------------------------


def test_examples_parse_and_agree() -> None:
    toml, yaml = load(SAMPLE_TOML), load(EXAMPLES / "routing.yaml")
    assert toml == yaml
    assert [(o.name, o.max_load, o.active) for o in toml.operators] == [
        ("Alice", 1000, True),
        ("Bob", 1000, True),
        ("Carol", 1000, True),
        ("Dan", 10, True),
    ]
    assert [(s.key, s.strategy, s.weights) for s in toml.sources] == [
        ("telegram-bot", "smooth", {"Alice": 1, "Bob": 3, "Carol": 6}),
        ("web-form", "least_loaded", {"Alice": 1, "Bob": 1, "Carol": 1}),
        ("partner-api", "weighted_random", {"Dan": 1}),
    ]
    assert [s.accept_timeout for s in toml.sources] == [0, 2, 0]


def test_defaults() -> None:
    routing = parse('[[operators]]\nname = "A"\nmax_load = 1\n[[sources]]\nkey = "s"\n', "toml")
    [op], [source] = routing.operators, routing.sources
    assert op.active is True
    assert (source.name, source.description, source.strategy) == (None, "", "smooth")
    assert (source.affinity_hours, source.weights) == (0, None)
    assert parse("", "toml") == parse("", "yaml") == parse("# nothing\n", "yaml") == RoutingFile()


def test_yaml_reads_like_toml() -> None:
    yaml = """
operators:
  - {name: Alice, max_load: 3}
  - name: Bob
    max_load: 5
    active: false
sources:
  - key: tg
    weights: {Alice: 1, Bob: 3}
"""
    assert parse(yaml, "yaml") == parse(SMALL, "toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[operators]]\nname = "A"\nmax_load = 1\ncolour = "red"\n',
            "operators[0].colour: unknown field",
        ),
        ('[[operators]]\nname = "A"\n', "operators[0].max_load: required field is missing"),
        (
            '[[operators]]\nname = "A"\nmax_load = -1\n',
            "operators[0].max_load: Input should be greater than or equal to 0",
        ),
        (
            '[[operators]]\nname = "A"\nmax_load = "5"\n',
            "operators[0].max_load: Input should be a valid integer",
        ),
        (
            '[[operators]]\nname = "A"\nmax_load = 1\nactive = "yes"\n',
            "operators[0].active: Input should be a valid boolean",
        ),
        (
            '[[operators]]\nname = ""\nmax_load = 1\n',
            "operators[0].name: String should have at least 1 character",
        ),
        (
            '[[operators]]\nname = "A"\nmax_load = 1\n[[operators]]\nname = "A"\nmax_load = 2\n',
            "operators[1].name: 'A' appears twice (also operators[0])",
        ),
        (
            '[[sources]]\nkey = "a"\n[[sources]]\nkey = "b"\nstrategy = "fastest"\n',
            "sources[1].strategy: unknown strategy 'fastest'; "
            "choose one of smooth, weighted_random, least_loaded",
        ),
        (
            '[[sources]]\nkey = "Not A Slug"\n',
            "sources[0].key: a key is lower-case letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit)",
        ),
        (
            '[[sources]]\nkey = "a"\n[[sources]]\nkey = "a"\n',
            "sources[1].key: 'a' appears twice (also sources[0])",
        ),
        (
            '[[sources]]\nkey = "a"\nweights = { Alice = 0 }\n',
            "sources[0].weights.Alice: Input should be greater than 0",
        ),
        (
            '[[sources]]\nkey = "a"\nweights = { "Mary Ann" = 1.5 }\n',
            'sources[0].weights."Mary Ann": Input should be a valid integer',
        ),
        (
            '[[sources]]\nkey = "a"\nweights = { "" = 1 }\n',
            'sources[0].weights.""[key]: String should have at least 1 character',
        ),
        (
            '[[sources]]\nkey = "a"\naffinity_hours = 9000\n',
            "sources[0].affinity_hours: Input should be less than or equal to 8760",
        ),
        ('[[source]]\nkey = "a"\n', "source: unknown field"),
        ('operators = "Alice"\n', "operators: Input should be a valid list"),
    ],
)
def test_validation_errors_name_the_location(text: str, message: str) -> None:
    with pytest.raises(UserError) as raised:
        parse(text, "toml")
    assert str(raised.value) == message


def test_several_errors_report_the_first_and_count_the_rest() -> None:
    with pytest.raises(UserError) as raised:
        parse('[[operators]]\nname = "A"\nmax_load = -1\nactive = 1\n', "toml")
    assert str(raised.value) == (
        "operators[0].max_load: Input should be greater than or equal to 0 (and 1 more)"
    )


def test_yaml_errors() -> None:
    with pytest.raises(UserError) as raised:
        parse("operators:\n  - name: a: b\n", "yaml", origin="f.yaml")
    assert str(raised.value) == (
        "f.yaml: invalid YAML at line 2, column 12: mapping values are not allowed here"
    )
    with pytest.raises(UserError, match="expected a mapping with 'operators' and 'sources'"):
        parse("- name: A\n", "yaml")
    # YAML 1.1 reads `no` as false: a name must be a string, so say where.
    with pytest.raises(UserError, match=r"^operators\[0\]\.name: Input should be a valid string"):
        parse("operators:\n  - {name: no, max_load: 1}\n", "yaml")


def test_toml_syntax_error_is_one_line_with_the_position() -> None:
    with pytest.raises(UserError) as raised:
        parse("[[operators]]\nname = Alice\n", "toml", origin="r.toml")
    message = str(raised.value)
    assert message.startswith("r.toml: invalid TOML: ") and "line 2" in message
    assert "\n" not in message


def test_load_picks_the_format_by_extension(tmp_path: Path) -> None:
    (tmp_path / "r.yml").write_text("operators:\n  - {name: A, max_load: 1}\n", encoding="utf-8")
    assert load(tmp_path / "r.yml").operators[0].name == "A"
    (tmp_path / "r.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match=r"r\.json: a routing file ends in \.toml, \.yaml or \.yml"):
        load(tmp_path / "r.json")
    with pytest.raises(UserError, match=r"cannot read .*nope\.toml: No such file or directory"):
        load(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        load(tmp_path / "bin.toml")


# --- plan --------------------------------------------------------------------------


def test_plan_on_an_empty_database_creates_everything() -> None:
    changes = plan(State(), parse(SMALL, "toml"))
    assert [str(c) for c in changes] == [
        "create operator Alice: max_load 3, active true",
        "create operator Bob: max_load 5, active false",
        "create source tg: name 'tg', strategy 'smooth', affinity_hours off",
        "create weights tg: Alice 1, Bob 3",
    ]
    assert changes[0] == Change("create", "operator", "Alice", "max_load 3, active true")
    assert changes[0].what == "operator Alice"


def test_second_plan_is_all_unchanged() -> None:
    routing = load(SAMPLE_TOML)
    changes = plan(applied(routing), routing)
    assert {c.kind for c in changes} == {"unchanged"}
    assert [c.what for c in changes] == [c.what for c in plan(State(), routing)]
    assert all(c.details == "" for c in changes)


def test_plan_updates_say_what_changes() -> None:
    before = parse(SMALL, "toml")
    after = parse(
        """
[[operators]]
name = "Alice"
max_load = 5
active = false

[[operators]]
name = "Bob"
max_load = 5
active = false

[[operators]]
name = "Carol"
max_load = 2

[[sources]]
key = "tg"
name = "Telegram"
strategy = "least_loaded"
affinity_hours = 24
weights = { Alice = 2, Carol = 6 }
""",
        "toml",
    )
    assert [str(c) for c in plan(applied(before), after)] == [
        "update operator Alice: max_load 3 → 5, active true → false",
        "unchanged operator Bob",
        "create operator Carol: max_load 2, active true",
        "update source tg: name 'tg' → 'Telegram', strategy 'smooth' → 'least_loaded', "
        "affinity_hours off → 24",
        "update weights tg: Alice 1 → 2, Carol - → 6, Bob 3 → -",
    ]


def test_what_the_file_leaves_out_is_left_alone() -> None:
    state = State(
        (Operator(1, "Alice", 3, True), Operator(2, "Zed", 1, False)),
        (Source(7, "tg", "tg", "", "smooth", None, {1: 1, 2: 4}),),
    )
    # No weights: the source's weights are not managed; Zed is not mentioned at all.
    routing = parse('[[sources]]\nkey = "tg"\n', "toml")
    assert [str(c) for c in plan(state, routing)] == ["unchanged source tg"]
    # Weights may name an operator that only the database has.
    routing = parse('[[sources]]\nkey = "tg"\nweights = { Zed = 4, Alice = 1 }\n', "toml")
    assert [c.kind for c in plan(state, routing)] == ["unchanged", "unchanged"]
    # An empty table removes them all.
    routing = parse('[[sources]]\nkey = "tg"\nweights = {}\n', "toml")
    assert str(plan(state, routing)[1]) == "update weights tg: Alice 1 → -, Zed 4 → -"


def test_weights_must_name_a_known_operator() -> None:
    routing = parse(
        SMALL + '\n[[sources]]\nkey = "web"\nweights = { Alice = 1, Carol = 2 }\n', "toml"
    )
    with pytest.raises(UserError) as raised:
        plan(State(), routing)
    assert str(raised.value) == (
        "sources[1].weights.Carol: no operator named 'Carol' in the file or the database"
    )


def test_ambiguous_operator_names_are_an_error_where_the_file_uses_them() -> None:
    twins = State((Operator(1, "Bob", 1, True), Operator(2, "Bob", 1, True)))
    with pytest.raises(UserError) as raised:
        plan(twins, parse(SMALL, "toml"))
    assert str(raised.value).startswith(
        "operators[1].name: 2 operators are named 'Bob' (ids 1, 2); rename all but one"
    )
    weights_only = parse('[[sources]]\nkey = "tg"\nweights = { Bob = 1 }\n', "toml")
    with pytest.raises(UserError, match=r"^sources\[0\]\.weights\.Bob: 2 operators are named"):
        plan(twins, weights_only)
    # Twins the file does not use are no concern of it.
    assert plan(twins, parse('[[operators]]\nname = "Al"\nmax_load = 1\n', "toml"))


def test_twins_in_current_weights_show_their_ids() -> None:
    state = State(
        (Operator(1, "Bob", 1, True), Operator(2, "Bob", 1, True), Operator(3, "Al", 1, True)),
        (Source(7, "tg", "tg", "", "smooth", None, {1: 1, 2: 2}),),
    )
    routing = parse('[[sources]]\nkey = "tg"\nweights = { Al = 1 }\n', "toml")
    assert plan(state, routing)[1].details == "Al - → 1, Bob (id 1) 1 → -, Bob (id 2) 2 → -"


def test_affinity_zero_and_null_are_both_off() -> None:
    state = State(sources=(Source(1, "tg", "tg", "", "smooth", None),))
    assert plan(state, parse('[[sources]]\nkey = "tg"\naffinity_hours = 0\n', "toml"))[0] == (
        Change("unchanged", "source", "tg")
    )


def test_long_descriptions_are_shortened_in_the_diff() -> None:
    routing = parse(f'[[sources]]\nkey = "tg"\ndescription = "{"x" * 100}"\n', "toml")
    [change] = plan(State(), routing)
    assert f"description '{'x' * 39}…'" in change.details


def test_a_path_with_a_nul_byte_is_one_error() -> None:
    with pytest.raises(UserError, match="no NUL byte"):
        load("bad\x00name.toml")


def test_plan_turns_offers_on_and_off() -> None:
    before = parse(SMALL, "toml")
    on = before.model_copy(
        update={"sources": [before.sources[0].model_copy(update={"accept_timeout": 30})]}
    )
    [change] = [c for c in plan(applied(before), on) if c.entity == "source"]
    assert str(change) == "update source tg: accept_timeout off → 30"
    [change] = [c for c in plan(applied(on), before) if c.entity == "source"]
    assert str(change) == "update source tg: accept_timeout 30 → off"
    assert {c.kind for c in plan(applied(on), on)} == {"unchanged"}
