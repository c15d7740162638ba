"""docker-compose.yml, Dockerfile and README agree with each other and with the code.

Read as text only: no Docker engine, no services.
"""

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"

SERVICES = ("postgres", "rabbitmq", "migrate", "worker")
ENV_PREFIX = "LEADROUTER_"
ROOT_USERS = frozenset({"root", "0"})
# `docker compose run` options that take a value, so the word after them is no service.
RUN_VALUE_OPTIONS = frozenset(
    {
        "-e",
        "--env",
        "--env-file",
        "-u",
        "--user",
        "-w",
        "--workdir",
        "--name",
        "--entrypoint",
        "-p",
        "--publish",
        "-v",
        "--volume",
        "-l",
        "--label",
        "--cap-add",
        "--cap-drop",
        "--pull",
    }
)


# --- helpers ---------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found = load_compose().get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    return found


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment, whether written as a mapping or as a list of K=V."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): None if v is None else str(v) for k, v in env.items()}
    result: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        result[key] = value if sep else None
    return result


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {str(name): "service_started" for name in deps}
    return {
        str(name): str((spec or {}).get("condition", "service_started"))
        for name, spec in deps.items()
    }


def fixed_host_port(entry: Any) -> bool:
    """Whether a `ports` entry publishes a fixed host port (which breaks --scale)."""
    if isinstance(entry, dict):
        return entry.get("published") not in (None, "")
    text = str(entry).split("/", 1)[0]
    if ":" not in text:
        return False  # container port only: Docker picks a free host port
    host_part = text.rsplit(":", 1)[0]
    host_port = host_part.rsplit(":", 1)[-1] if ":" in host_part else host_part
    return host_port != "" and not host_port.startswith("[")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    if pending:
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] + 1 :]


def env_assignments(args: str) -> dict[str, str]:
    """The variables of one ENV instruction, in either `K=V K2=V2` or `K V` form."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def compose_commands(readme: str) -> list[list[str]]:
    """The words of every `docker compose ...` / `docker-compose ...` command in a text."""
    commands: list[list[str]] = []
    for line in readme.splitlines():
        for match in re.finditer(r"docker(?: |-)compose\b([^`\n]*)", line):
            rest = match.group(1).split(" #", 1)[0].rstrip(" \\")
            try:
                commands.append(shlex.split(rest))
            except ValueError:
                commands.append(rest.split())
    return commands


def readme_problems(readme: str, known: set[str]) -> list[str]:
    """Service names in `docker compose` commands that the compose file does not define."""
    problems: list[str] = []
    for words in compose_commands(readme):
        for i, word in enumerate(words):
            if word == "--scale":
                value = words[i + 1] if i + 1 < len(words) else ""
            elif word.startswith("--scale="):
                value = word.removeprefix("--scale=")
            else:
                continue
            name, sep, count = value.partition("=")
            if not (sep and count.isdigit() and name in known):
                problems.append(f"--scale {value!r} is not SERVICE=N with a known service")
        for verb in ("run", "exec"):
            if verb not in words:
                continue
            rest = words[words.index(verb) + 1 :]
            j = 0
            while j < len(rest) and rest[j].startswith("-"):
                takes_value = rest[j] in RUN_VALUE_OPTIONS
                j += 2 if takes_value else 1
            if j < len(rest):
                name = rest[j]
                if not re.search(r"[<>$\[\]{}]", name) and name not in known:
                    problems.append(f"`{verb}` names unknown service {name!r}")
    return problems


# --- docker-compose.yml ----------------------------------------------------------------


def test_services_exist() -> None:
    missing = set(SERVICES) - set(services())
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


@pytest.mark.parametrize("name", ["postgres", "rabbitmq"])
def test_backing_services_have_healthchecks(name: str) -> None:
    healthcheck = services()[name].get("healthcheck") or {}
    assert healthcheck.get("test"), f"{name} has no healthcheck test"
    assert not healthcheck.get("disable"), f"{name} disables its healthcheck"


def test_worker_waits_for_healthy_services_and_finished_migrations() -> None:
    deps = depends_on(services()["worker"])
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("rabbitmq") == "service_healthy"
    assert deps.get("migrate") == "service_completed_successfully"


def test_migrate_waits_for_postgres_and_runs_once() -> None:
    migrate = services()["migrate"]
    assert depends_on(migrate).get("postgres") == "service_healthy"
    assert migrate.get("command") == ["migrate"]
    assert str(migrate.get("restart", "no")) == "no"


def test_worker_can_scale() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker, "a fixed container_name breaks --scale"
    fixed = [entry for entry in worker.get("ports") or [] if fixed_host_port(entry)]
    assert not fixed, f"fixed host ports break --scale: {fixed}"


@pytest.mark.parametrize(
    ("entry", "fixed"),
    [
        ("9100", False),
        ("8080:9100", True),
        ("127.0.0.1:8080:9100", True),
        ("127.0.0.1::9100", False),
        ("9100/tcp", False),
        ({"target": 9100}, False),
        ({"target": 9100, "published": 9100}, True),
    ],
)
def test_fixed_host_port_detection(entry: Any, fixed: bool) -> None:
    assert fixed_host_port(entry) is fixed


def test_leadrouter_env_vars_are_settings_fields() -> None:
    compose = load_compose()
    named: dict[str, str] = {}
    for name, service in compose["services"].items():
        for key in environment(service):
            named[key] = f"service {name}"
    for key, value in compose.items():
        if key.startswith("x-") and isinstance(value, dict):
            for var in value:
                named[str(var)] = key
    leadrouter = {var: where for var, where in named.items() if var.startswith(ENV_PREFIX)}
    assert leadrouter, "docker-compose.yml sets no LEADROUTER_* variables"
    fields = set(Settings.model_fields)
    unknown = {
        var: where
        for var, where in leadrouter.items()
        if var.removeprefix(ENV_PREFIX).lower() not in fields
    }
    assert not unknown, f"not fields of worker.settings.Settings (silently ignored): {unknown}"


@pytest.mark.parametrize("name", ["migrate", "worker"])
def test_leadrouter_services_reach_the_compose_services(name: str) -> None:
    env = environment(services()[name])
    known = set(services())
    for var in ("LEADROUTER_DATABASE_URL", "LEADROUTER_AMQP_URL"):
        url = env.get(var)
        assert url, f"{name} does not set {var}"
        assert urlsplit(url).hostname in known, f"{name}: {var} points outside the compose network"


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root() -> None:
    final = final_stage(dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")))
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage has no USER line, so it runs as root"
    user = users[-1].split(":", 1)[0].strip()
    assert user and user not in ROOT_USERS, f"the final stage runs as {users[-1]!r}"


def test_dockerfile_installs_the_migrations_with_the_package() -> None:
    """The image's `leadrouter migrate` uses the migrations the package carries: they are
    in the build context of `pip install .`, and no setting points elsewhere."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    install = next(
        i
        for i, (keyword, args) in enumerate(instructions)
        if keyword == "RUN" and re.search(r"pip install \.(\s|$)", args)
    )
    copied = {
        word.rstrip("/")
        for keyword, args in instructions[:install]
        if keyword == "COPY"
        for word in shlex.split(args)[:-1]
    }
    assert "migrations" in copied, "migrations/ is not copied before `pip install .`"
    names = {
        var for keyword, args in instructions if keyword == "ENV" for var in env_assignments(args)
    }
    assert "LEADROUTER_MIGRATIONS_DIR" not in names


def test_dockerfile_env_vars_are_settings_fields() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    names = {
        var for keyword, args in instructions if keyword == "ENV" for var in env_assignments(args)
    }
    leadrouter = {var for var in names if var.startswith(ENV_PREFIX)}
    assert leadrouter, "the Dockerfile sets no LEADROUTER_* variables"
    unknown = {
        v for v in leadrouter if v.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    }
    assert not unknown, f"not fields of worker.settings.Settings: {sorted(unknown)}"


def test_dockerfile_entrypoint_is_the_cli() -> None:
    final = final_stage(dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")))
    entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["leadrouter"]'


# --- README ----------------------------------------------------------------------------


def test_readme_compose_commands_name_real_services() -> None:
    readme = README.read_text(encoding="utf-8") if README.exists() else ""
    problems = readme_problems(readme, set(services()))
    assert not problems, f"README.md: {problems}"


def test_readme_check_catches_unknown_services() -> None:
    sample = (
        "    docker compose up --build --scale worker=3\n"
        "`docker compose run --rm -e LEADROUTER_LOG_LEVEL=DEBUG worker operators list`\n"
        "    docker compose up --scale workers=3\n"
        "    docker compose up --scale worker\n"
        "    docker-compose run --rm app operators list\n"
    )
    problems = readme_problems(sample, set(SERVICES))
    assert len(problems) == 3, problems
    assert any("'workers=3'" in p for p in problems)
    assert any("'worker'" in p for p in problems)
    assert any("'app'" in p for p in problems)


# --- the cluster profile ---------------------------------------------------------------

CLUSTER_NODES = ("rabbit1", "rabbit2", "rabbit3")


def cluster_config() -> dict[str, str]:
    """deploy/rabbitmq-cluster.conf as key -> value (rabbitmq.conf's sysctl format)."""
    path = ROOT / "deploy" / "rabbitmq-cluster.conf"
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_cluster_profile_has_three_nodes_that_find_each_other() -> None:
    found = services()
    config = cluster_config()
    assert config["cluster_formation.peer_discovery_backend"] == "classic_config"
    peers = {v for k, v in config.items() if k.startswith("cluster_formation.classic_config.")}
    cookies = set()
    for name in CLUSTER_NODES:
        node = found[name]
        assert node.get("profiles") == ["cluster"], f"{name} is not (only) in the profile"
        assert f"rabbit@{node['hostname']}" in peers, f"{name} is not in the peer list"
        assert node.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        mounts = [str(v) for v in node.get("volumes", [])]
        assert any(m.startswith("./deploy/rabbitmq-cluster.conf:") for m in mounts), name
        env = environment(node)
        cookie = env.get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS")
        assert cookie and "-setcookie" in cookie and env.get("RABBITMQ_CTL_ERL_ARGS") == cookie
        cookies.add(cookie)
    assert len(cookies) == 1, "the nodes must share one Erlang cookie"
    assert len(peers) == len(CLUSTER_NODES)
    # One node forms the cluster; the others join it once it runs.
    for name in CLUSTER_NODES[1:]:
        assert depends_on(found[name]) == {"rabbit1": "service_healthy"}


def test_cluster_worker_is_given_every_node_and_waits_for_them() -> None:
    from worker.settings import split_urls

    worker = services()["cluster-worker"]
    assert worker.get("profiles") == ["cluster"]
    urls = split_urls(str(environment(worker)["LEADROUTER_AMQP_URL"]))
    assert sorted(urlsplit(u).hostname or "" for u in urls) == list(CLUSTER_NODES)
    assert all(urlsplit(u).port == 5672 for u in urls)
    deps = depends_on(worker)
    # Declared with all three up, the inbound quorum queue has a member on each.
    assert all(deps.get(name) == "service_healthy" for name in CLUSTER_NODES), deps
    assert deps.get("migrate") == "service_completed_successfully"
    assert "container_name" not in worker
    assert not [entry for entry in worker.get("ports") or [] if fixed_host_port(entry)]


def test_the_default_services_stay_out_of_the_profile() -> None:
    assert all("profiles" not in services()[name] for name in SERVICES)
