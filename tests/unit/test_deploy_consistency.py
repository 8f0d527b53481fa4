"""The deployment artifacts (Dockerfile, docker-compose.yml, deploy/kubernetes) agree with the code."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

import consent_ledger
from consent_ledger.adapters.avro.catalogue import default_schema_dir
from consent_ledger.adapters.policy_files import DEFAULT_TIMELINE
from consent_ledger.adapters.postgres.migrations import available_migrations
from consent_ledger.config import Settings, Topics
from consent_ledger.core.events import EVENT_TOPICS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

ENV_PREFIX = "CONSENT_LEDGER_"
# The image of the app, whatever registry or tag a deployment gives it.
APP_IMAGE = re.compile(r"(^|/)consent-ledger(:|@|$)")
# The writer and processors serve only Prometheus metrics on CONSENT_LEDGER_METRICS_PORT.
METRICS_PATHS = frozenset({"/metrics"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})
# Commands that serve until stopped; the others are one-shot.
LONG_RUNNING = frozenset({"ledger-writer", "stream-processor", "audit-api"})


# What the code offers --------------------------------------------------------------------------


def cli_commands() -> set[str]:
    from consent_ledger.cli import app

    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def setting_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def setting_default(variable: str) -> str:
    return str(Settings.model_fields[variable.removeprefix(ENV_PREFIX).lower()].default)


def code_topics(prefix: str = "") -> set[str]:
    topics = Topics(prefix)
    return {topics.name(base) for base in EVENT_TOPICS} | {topics.ledger_entries, topics.dead_letter}


def api_paths() -> set[str]:
    from consent_ledger.apps.audit_api.app import create_app

    # Building the app touches no server: the pool is opened by the lifespan, which never runs here.
    app = create_app(Settings(database_url="postgresql://unused@127.0.0.1/unused"))
    return {route.path for route in app.routes}  # type: ignore[attr-defined]


def source_relative_data_paths() -> set[PurePosixPath]:
    """Data files the code finds next to `services/` (not inside the package), relative to their root."""
    source_root = Path(consent_ledger.__file__).resolve().parents[2]
    return {
        PurePosixPath(path.resolve().relative_to(source_root).as_posix())
        for path in (default_schema_dir(), DEFAULT_TIMELINE)
    }


def service_group_roles() -> set[str]:
    """NOLOGIN roles the migrations create: what a service login must be granted."""
    pattern = re.compile(r"CREATE\s+ROLE\s+(\w+)\s+NOLOGIN", re.IGNORECASE)
    return {role for migration in available_migrations() for role in pattern.findall(migration.sql)}


# Loading the artifacts -------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def load_manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def compose_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose.get("services", {})
    return services


def is_app_service(service: Mapping[str, Any]) -> bool:
    return "build" in service or bool(APP_IMAGE.search(str(service.get("image", ""))))


def as_argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def env_value(env: Mapping[str, str], variable: str) -> str:
    return env.get(variable, setting_default(variable))


def k8s_objects(manifests: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in manifests}


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def workloads(manifests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (doc for doc in manifests if doc["kind"] in WORKLOAD_KINDS)


def containers(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, workload, container) for every container of every workload."""
    for workload in workloads(manifests):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            yield (
                f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}",
                workload,
                container,
            )


def is_app_container(container: Mapping[str, Any]) -> bool:
    return bool(APP_IMAGE.search(str(container.get("image", ""))))


def source_keys(doc: Mapping[str, Any]) -> dict[str, str]:
    """Keys (and, where readable, values) a ConfigMap or Secret feeds into `envFrom`."""
    keys = {key: str(value) for key, value in (doc.get("data") or {}).items()}
    keys.update({key: str(value) for key, value in (doc.get("stringData") or {}).items()})
    return keys


def env_sources(container: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of each ConfigMap or Secret the container's environment draws from."""
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            yield "ConfigMap", source["configMapRef"]["name"]
        if "secretRef" in source:
            yield "Secret", source["secretRef"]["name"]
    for item in container.get("env", []):
        ref = item.get("valueFrom") or {}
        if "configMapKeyRef" in ref:
            yield "ConfigMap", ref["configMapKeyRef"]["name"]
        if "secretKeyRef" in ref:
            yield "Secret", ref["secretKeyRef"]["name"]


def container_env(
    container: Mapping[str, Any],
    objects: Mapping[tuple[str, str], Mapping[str, Any]],
    image_env: Mapping[str, str],
) -> dict[str, str]:
    """The environment the process sees: image ENV, then envFrom, then env (later wins, as in Kubernetes)."""
    env = dict(image_env)
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source and (kind, source[key]["name"]) in objects:
                env.update(source_keys(objects[kind, source[key]["name"]]))
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", "<from a reference>"))
    return env


def app_command(container: Mapping[str, Any]) -> str | None:
    args = as_argv(container.get("args"))
    return args[0] if args else None


# Dockerfile parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    rest: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment lines inside a continued instruction are dropped by Docker
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    instructions = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[-1] :] if starts else instructions


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def copies(instructions: list[Instruction]) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of every COPY/ADD."""
    found = []
    for instruction in instructions:
        if instruction.keyword in {"COPY", "ADD"}:
            tokens = shlex.split(instruction.rest)
            flags = [token for token in tokens if token.startswith("--")]
            paths = [token for token in tokens if not token.startswith("--")]
            found.append((flags, paths[:-1], paths[-1]))
    return found


def normalized(path: str) -> PurePosixPath:
    return PurePosixPath(path.rstrip("/") or "/")


# Checks: each returns the problems it found, empty when the artifacts agree with the code ------


def compose_command_problems(compose: Mapping[str, Any], commands: set[str]) -> list[str]:
    problems = []
    for name, service in compose_services(compose).items():
        if not is_app_service(service):
            continue
        if "entrypoint" in service:
            problems.append(f"compose service {name!r} overrides the image's consent-ledger entrypoint")
        argv = as_argv(service.get("command"))
        if not argv:
            problems.append(f"compose service {name!r} runs the app without a command (it would only print --help)")
        elif argv[0] not in commands:
            problems.append(
                f"compose service {name!r} runs {argv[0]!r}, which is not a consent-ledger command "
                f"(known: {sorted(commands)})"
            )
    return problems


def compose_setting_problems(compose: Mapping[str, Any], settings: set[str]) -> list[str]:
    return [
        f"compose service {name!r} sets {variable}, which is not a Settings field (silently ignored)"
        for name, service in compose_services(compose).items()
        for variable in environment_of(service)
        if variable.startswith(ENV_PREFIX) and variable not in settings
    ]


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int | None
    replication: int | None


def created_topics(script: str) -> list[TopicSpec]:
    """Topics a shell script creates with kafka-topics.sh --create, one command per line."""
    specs = []
    for line in script.splitlines():
        if "kafka-topics.sh" not in line or "--create" not in line:
            continue
        tokens = shlex.split(line)
        options = {tokens[i]: tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i].startswith("--")}
        partitions, replication = options.get("--partitions"), options.get("--replication-factor")
        specs.append(
            TopicSpec(
                options.get("--topic", "<no --topic>"),
                int(partitions) if partitions and partitions.isdigit() else None,
                int(replication) if replication and replication.isdigit() else None,
            )
        )
    return specs


def topic_creation_problems(
    where: str, specs: list[TopicSpec], expected: set[str], partitions: int, replication: int
) -> list[str]:
    created = {spec.name for spec in specs}
    problems = [
        f"{where}: topic {topic!r} is used by the code but never created" for topic in sorted(expected - created)
    ]
    problems += [f"{where}: creates topic {topic!r}, which the code never uses" for topic in sorted(created - expected)]
    for spec in specs:
        if spec.partitions != partitions:
            problems.append(
                f"{where}: topic {spec.name!r} gets --partitions {spec.partitions}, but "
                f"CONSENT_LEDGER_TOPIC_PARTITIONS is {partitions}"
            )
        if spec.replication != replication:
            problems.append(
                f"{where}: topic {spec.name!r} gets --replication-factor {spec.replication}, but "
                f"CONSENT_LEDGER_TOPIC_REPLICATION is {replication}"
            )
    return problems


def shared_app_setting(where: str, envs: Mapping[str, Mapping[str, str]], variable: str, problems: list[str]) -> str:
    """The one value all app containers give a setting; a disagreement is itself a problem."""
    values = {name: env_value(env, variable) for name, env in envs.items()}
    if len(set(values.values())) > 1:
        problems.append(f"{where}: app containers disagree on {variable}: {values}")
    return next(iter(values.values()), setting_default(variable))


def compose_topic_problems(compose: Mapping[str, Any]) -> list[str]:
    services = compose_services(compose)
    if "topics" not in services:
        return ["compose has no 'topics' service creating the topics"]
    problems: list[str] = []
    envs = {name: environment_of(s) for name, s in services.items() if is_app_service(s)}
    prefix = shared_app_setting("compose", envs, "CONSENT_LEDGER_TOPIC_PREFIX", problems)
    partitions = shared_app_setting("compose", envs, "CONSENT_LEDGER_TOPIC_PARTITIONS", problems)
    replication = shared_app_setting("compose", envs, "CONSENT_LEDGER_TOPIC_REPLICATION", problems)
    script = "\n".join(as_argv(services["topics"].get("command")))
    specs = created_topics(script)
    return problems + topic_creation_problems(
        "compose service 'topics'", specs, code_topics(prefix), int(partitions), int(replication)
    )


def compose_dependency_problems(compose: Mapping[str, Any]) -> list[str]:
    services = compose_services(compose)
    problems = []
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, rule in depends.items():
            if target not in services:
                problems.append(f"compose service {name!r} depends on {target!r}, which does not exist")
            elif rule.get("condition") == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(
                    f"compose service {name!r} waits for {target!r} to be healthy, but it has no healthcheck"
                )
        argv = as_argv(service.get("command"))
        if is_app_service(service) and argv and argv[0] in LONG_RUNNING:
            if depends.get("migrate", {}).get("condition") != "service_completed_successfully":
                problems.append(f"compose service {name!r} does not wait for 'migrate' to complete")
            if "healthcheck" not in service:
                problems.append(f"compose service {name!r} runs {argv[0]!r} without a healthcheck")
            if argv[0] != "audit-api" and (
                depends.get("topics", {}).get("condition") != "service_completed_successfully"
            ):
                problems.append(f"compose service {name!r} does not wait for 'topics' to complete")
    return problems


def compose_infrastructure_problems(compose: Mapping[str, Any]) -> list[str]:
    services = compose_services(compose)
    problems = []
    kafka = environment_of(services.get("kafka", {}))
    if kafka.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true").lower() != "false":
        problems.append(
            "compose kafka: KAFKA_AUTO_CREATE_TOPICS_ENABLE must be false (a mistyped topic would "
            "be created empty instead of failing)"
        )
    if "KAFKA_MIN_INSYNC_REPLICAS" not in kafka:
        problems.append("compose kafka: KAFKA_MIN_INSYNC_REPLICAS is not set")
    if kafka.get("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false").lower() != "false":
        problems.append("compose kafka: unclean leader election must stay disabled")
    postgres_command = " ".join(as_argv(services.get("postgres", {}).get("command")))
    if "synchronous_commit=on" not in postgres_command:
        problems.append("compose postgres: run with -c synchronous_commit=on")
    return problems


def initdb_scripts(compose: Mapping[str, Any]) -> str:
    """The SQL the compose PostgreSQL runs on first start (what is mounted on docker-entrypoint-initdb.d)."""
    text = []
    for volume in compose_services(compose).get("postgres", {}).get("volumes", []):
        source, _, target = str(volume).partition(":")
        if target.split(":")[0] == "/docker-entrypoint-initdb.d" and source.startswith("."):
            text += [path.read_text() for path in sorted((ROOT / source).glob("*.sql"))]
    return "\n".join(text)


def compose_role_problems(compose: Mapping[str, Any], init_sql: str, group_roles: set[str]) -> list[str]:
    if not group_roles:
        return ["the migrations create no NOLOGIN group role for the services"]
    problems = []
    for name, service in compose_services(compose).items():
        url = environment_of(service).get("CONSENT_LEDGER_DATABASE_URL")
        if not url:
            continue
        parts = urlsplit(url)
        login, password = parts.username or "", parts.password or ""
        created = re.search(
            rf"CREATE\s+ROLE\s+{re.escape(login)}\s+LOGIN\b[^;]*?PASSWORD\s+'([^']*)'",
            init_sql,
            re.IGNORECASE,
        )
        if created is None:
            problems.append(
                f"compose service {name!r} logs in as {login!r}, which the init scripts never create "
                "as a LOGIN role with a password"
            )
        elif created.group(1) != password:
            problems.append(f"compose service {name!r}: the password of {login!r} differs from the init script's")
        for role in sorted(group_roles):
            if not re.search(rf"GRANT\s+{role}\s+TO\s+{re.escape(login)}\b", init_sql, re.IGNORECASE):
                problems.append(f"compose service {name!r} logs in as {login!r}, which is never granted {role}")
    return problems


def k8s_reference_problems(manifests: list[dict[str, Any]]) -> list[str]:
    objects = k8s_objects(manifests)
    problems = []
    for where, _, container in containers(manifests):
        problems += [
            f"{where} reads {kind} {name!r}, which deploy/kubernetes does not define"
            for kind, name in env_sources(container)
            if (kind, name) not in objects
        ]
        for item in container.get("env", []):
            ref = item.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if (
                    key in ref
                    and (kind, ref[key]["name"]) in objects
                    and (ref[key]["key"] not in source_keys(objects[kind, ref[key]["name"]]))
                ):
                    problems.append(f"{where} reads key {ref[key]['key']!r} missing from {kind} {ref[key]['name']!r}")
    return problems


def k8s_setting_problems(manifests: list[dict[str, Any]], settings: set[str]) -> list[str]:
    problems = []
    for doc in manifests:
        if doc["kind"] in {"ConfigMap", "Secret"}:
            problems += [
                f"{doc['kind']} {doc['metadata']['name']!r} defines {key}, which is not a Settings field"
                for key in source_keys(doc)
                if key.startswith(ENV_PREFIX) and key not in settings
            ]
    for where, _, container in containers(manifests):
        problems += [
            f"{where} sets {item['name']}, which is not a Settings field"
            for item in container.get("env", [])
            if item["name"].startswith(ENV_PREFIX) and item["name"] not in settings
        ]
    return problems


def k8s_command_problems(manifests: list[dict[str, Any]], commands: set[str]) -> list[str]:
    problems = []
    for where, _, container in containers(manifests):
        if not is_app_container(container):
            continue
        if "command" in container:
            problems.append(f"{where} overrides the image's consent-ledger entrypoint with `command`")
        command = app_command(container)
        if command not in commands:
            problems.append(f"{where} runs {command!r}, which is not a consent-ledger command")
    return problems


def k8s_resource_problems(manifests: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, _, container in containers(manifests):
        resources = container.get("resources") or {}
        missing = [f"requests.{r}" for r in ("cpu", "memory") if r not in (resources.get("requests") or {})]
        missing += ["limits.memory"] if "memory" not in (resources.get("limits") or {}) else []
        if missing:
            problems.append(f"{where} lacks resource {', '.join(missing)}")
    return problems


def declared_ports(container: Mapping[str, Any]) -> dict[str, int]:
    ports = {}
    for port in container.get("ports", []):
        ports[str(port["containerPort"])] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def k8s_probe_problems(
    manifests: list[dict[str, Any]], api_routes: set[str], image_env: Mapping[str, str]
) -> list[str]:
    objects = k8s_objects(manifests)
    problems = []
    for where, workload, container in containers(manifests):
        if workload["kind"] != "Deployment" or not is_app_container(container):
            continue
        command = app_command(container)
        env = container_env(container, objects, image_env)
        serves_api = command == "audit-api"
        paths = api_routes if serves_api else METRICS_PATHS
        port_variable = "CONSENT_LEDGER_API_PORT" if serves_api else "CONSENT_LEDGER_METRICS_PORT"
        listens_on = env_value(env, port_variable)
        required = ("livenessProbe", "readinessProbe") if serves_api else ("livenessProbe",)
        problems += [f"{where} has no {probe}" for probe in required if probe not in container]
        if env_value(env, "CONSENT_LEDGER_API_HOST") in LOOPBACK:
            problems.append(f"{where} listens on loopback (CONSENT_LEDGER_API_HOST): probes cannot reach it")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            http = (container.get(probe) or {}).get("httpGet")
            if http is None:
                continue
            if http.get("path") not in paths:
                problems.append(
                    f"{where} {probe} requests {http.get('path')!r}, which {command} does not serve "
                    f"(it serves {sorted(paths)})"
                )
            port = declared_ports(container).get(str(http.get("port")))
            if port is None:
                problems.append(
                    f"{where} {probe} targets port {http.get('port')!r}, which the container does not declare"
                )
            elif str(port) != listens_on:
                problems.append(f"{where} {probe} targets port {port}, but {port_variable} is {listens_on}")
    return problems


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(key) == value for key, value in wanted.items())


def k8s_selector_problems(manifests: list[dict[str, Any]]) -> list[str]:
    deployments = [doc for doc in manifests if doc["kind"] == "Deployment"]
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("labels", {}) for d in deployments}
    problems = [
        f"Deployment {name!r}: its selector does not match its own pod labels"
        for name, d in zip(pod_labels, deployments, strict=True)
        if not selects(d["spec"]["selector"], pod_labels[name])
    ]
    covered: set[str] = set()
    for pdb in (doc for doc in manifests if doc["kind"] == "PodDisruptionBudget"):
        matched = [name for name, labels in pod_labels.items() if selects(pdb["spec"]["selector"], labels)]
        if len(matched) != 1:
            problems.append(
                f"PodDisruptionBudget {pdb['metadata']['name']!r} selects the pods of "
                f"{len(matched)} Deployments ({matched}), not exactly one"
            )
        for name in matched:
            covered.add(name)
            replicas = next(d for d in deployments if d["metadata"]["name"] == name)["spec"].get("replicas", 1)
            minimum = pdb["spec"].get("minAvailable")
            if isinstance(minimum, int) and minimum >= replicas:
                problems.append(
                    f"PodDisruptionBudget {pdb['metadata']['name']!r} keeps {minimum} of {replicas} "
                    "pods: no node could ever be drained"
                )
    problems += [f"Deployment {name!r} has no PodDisruptionBudget" for name in sorted(set(pod_labels) - covered)]
    for service in (doc for doc in manifests if doc["kind"] == "Service"):
        selector = {"matchLabels": service["spec"].get("selector") or {}}
        matched = [d for d in deployments if selects(selector, pod_labels[d["metadata"]["name"]])]
        if not matched:
            problems.append(f"Service {service['metadata']['name']!r} selects no Deployment's pods")
        for deployment in matched:
            names = set().union(*(declared_ports(c) for c in pod_spec(deployment)["containers"]))
            problems += [
                f"Service {service['metadata']['name']!r} targets port {p['targetPort']!r}, which "
                f"Deployment {deployment['metadata']['name']!r} does not declare"
                for p in service["spec"].get("ports", [])
                if str(p.get("targetPort")) not in names
            ]
    return problems


def k8s_topic_problems(manifests: list[dict[str, Any]], image_env: Mapping[str, str]) -> list[str]:
    objects = k8s_objects(manifests)
    problems: list[str] = []
    envs = {
        where: container_env(container, objects, image_env)
        for where, _, container in containers(manifests)
        if is_app_container(container)
    }
    prefix = shared_app_setting("kubernetes", envs, "CONSENT_LEDGER_TOPIC_PREFIX", problems)
    partitions = shared_app_setting("kubernetes", envs, "CONSENT_LEDGER_TOPIC_PARTITIONS", problems)
    replication = shared_app_setting("kubernetes", envs, "CONSENT_LEDGER_TOPIC_REPLICATION", problems)
    scripts = [
        "\n".join(as_argv(container.get("command")) + as_argv(container.get("args")))
        for _, _, container in containers(manifests)
        if not is_app_container(container)
    ]
    specs = [spec for script in scripts for spec in created_topics(script)]
    if not specs:
        return [*problems, "deploy/kubernetes has no Job creating the topics"]
    return problems + topic_creation_problems(
        "deploy/kubernetes topics Job", specs, code_topics(prefix), int(partitions), int(replication)
    )


def scaling_problems(
    compose: Mapping[str, Any], manifests: list[dict[str, Any]], image_env: Mapping[str, str]
) -> list[str]:
    """More consumers than partitions in one group would idle: workers <= partitions."""
    problems = []
    services = compose_services(compose)
    for command in ("ledger-writer", "stream-processor"):
        runners = [s for s in services.values() if is_app_service(s) and as_argv(s.get("command"))[:1] == [command]]
        partitions = int(env_value(environment_of(runners[0]), "CONSENT_LEDGER_TOPIC_PARTITIONS")) if runners else 0
        if len(runners) > partitions:
            problems.append(f"compose runs {len(runners)} {command} services for {partitions} partitions")
    objects = k8s_objects(manifests)
    for where, workload, container in containers(manifests):
        if workload["kind"] == "Deployment" and app_command(container) in {
            "ledger-writer",
            "stream-processor",
        }:
            partitions = int(env_value(container_env(container, objects, image_env), "CONSENT_LEDGER_TOPIC_PARTITIONS"))
            replicas = workload["spec"].get("replicas", 1)
            if replicas > partitions:
                problems.append(f"{where}: {replicas} replicas for {partitions} partitions")
    return problems


def dockerfile_problems(
    text: str, script_target: tuple[str, str], data_paths: set[PurePosixPath], settings: set[str]
) -> list[str]:
    instructions = dockerfile_instructions(text)
    stage = final_stage(instructions)
    problems = []
    bases = [instruction.rest.split()[0] for instruction in instructions if instruction.keyword == "FROM"]
    if len(bases) < 2 or not any("--from" in " ".join(flags) for flags, _, _ in copies(stage)):
        problems.append("Dockerfile is not multi-stage (a builder stage copied into the runtime stage)")
    for base in bases:
        if base.startswith("--"):
            continue
        if (":" not in base and "@" not in base) or base.endswith(":latest"):
            problems.append(f"Dockerfile base {base!r} is not pinned to a tag or digest")
    if not bases or bases[-1] != "python:3.11-slim-bookworm":
        problems.append(f"Dockerfile runtime base is {bases[-1] if bases else None!r}, not python:3.11-slim-bookworm")
    users = [instruction.rest.split(":")[0] for instruction in stage if instruction.keyword == "USER"]
    if not users or users[-1] in {"root", "0"}:
        problems.append("Dockerfile runtime stage runs as root (add a non-root USER)")
    entrypoints = [json.loads(i.rest) for i in stage if i.keyword == "ENTRYPOINT"]
    if entrypoints[-1:] != [["consent-ledger"]]:
        problems.append(f'Dockerfile ENTRYPOINT is {entrypoints[-1] if entrypoints else None}, not ["consent-ledger"]')
    commands = [json.loads(i.rest) for i in stage if i.keyword == "CMD"]
    if commands[-1:] != [["--help"]]:
        problems.append(f'Dockerfile CMD is {commands[-1] if commands else None}, not ["--help"]')
    module, function = script_target
    if f"from {module} import {function}" not in text:
        problems.append(
            f"Dockerfile's consent-ledger launcher does not call {module}:{function} "
            "([project.scripts] in pyproject.toml)"
        )
    # The code finds its data next to services/, so the image must keep that layout.
    destinations = {
        normalized(src): normalized(dest) for flags, sources, dest in copies(stage) if not flags for src in sources
    }
    services_dir = destinations.get(PurePosixPath("services"))
    env = dockerfile_env(instructions)
    if services_dir is None:
        problems.append("Dockerfile runtime stage does not COPY services/")
    else:
        if str(services_dir) not in env.get("PYTHONPATH", "").split(":"):
            problems.append(f"Dockerfile PYTHONPATH does not include {services_dir}, where the package is copied")
        for top in sorted({PurePosixPath(path.parts[0]) for path in data_paths}):
            if destinations.get(top) != services_dir.parent / top:
                problems.append(
                    f"Dockerfile must COPY {top}/ to {services_dir.parent / top}: the code reads "
                    f"{sorted(str(p) for p in data_paths if p.parts[0] == top.name)} next to services/"
                )
    problems += [
        f"Dockerfile sets {name}, which is not a Settings field"
        for name in env
        if name.startswith(ENV_PREFIX) and name not in settings
    ]
    return problems


def dockerignore_problems(ignore_text: str, dockerfile_text: str) -> list[str]:
    """Every COPY source of the build context must survive .dockerignore (last matching pattern wins)."""
    patterns = [line.strip() for line in ignore_text.splitlines() if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                verdict = not negated
        return verdict

    return [
        f".dockerignore excludes {source!r}, which the Dockerfile copies"
        for flags, sources, _ in copies(dockerfile_instructions(dockerfile_text))
        if not flags
        for source in sources
        if ignored(str(normalized(source)))
    ]


# Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return load_manifests()


@pytest.fixture(scope="module")
def commands() -> set[str]:
    return cli_commands()


@pytest.fixture(scope="module")
def settings() -> set[str]:
    return setting_variables()


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return api_paths()


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def image_env(dockerfile_text: str) -> dict[str, str]:
    return dockerfile_env(dockerfile_instructions(dockerfile_text))


@pytest.fixture(scope="module")
def script_target() -> tuple[str, str]:
    target = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]["consent-ledger"]
    module, _, function = target.partition(":")
    return module, function


def compose_service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose_services(compose)[name]


def manifest(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in manifests if doc["kind"] == kind and doc["metadata"]["name"] == name)


def app_container_of(manifests: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    container: dict[str, Any] = pod_spec(manifest(manifests, "Deployment", deployment))["containers"][0]
    return container


def reported(problems: list[str], *fragments: str) -> bool:
    return any(all(fragment in problem for fragment in fragments) for problem in problems)


# The artifacts agree with the code -------------------------------------------------------------


def test_the_code_exposes_what_the_artifacts_rely_on(commands: set[str], routes: set[str]) -> None:
    assert {"migrate", "ledger-writer", "stream-processor", "audit-api", "verify", "replay"} <= commands
    assert {"/healthz", "/readyz", "/metrics"} <= routes


def test_compose_runs_only_real_commands(compose: dict[str, Any], commands: set[str]) -> None:
    assert compose_command_problems(compose, commands) == []


def test_compose_sets_only_real_settings(compose: dict[str, Any], settings: set[str]) -> None:
    assert compose_setting_problems(compose, settings) == []


def test_compose_creates_exactly_the_topics_the_code_uses(compose: dict[str, Any]) -> None:
    assert compose_topic_problems(compose) == []


def test_compose_starts_services_in_a_safe_order(compose: dict[str, Any]) -> None:
    assert compose_dependency_problems(compose) == []


def test_compose_kafka_and_postgres_are_configured_as_the_ledger_needs(compose: dict[str, Any]) -> None:
    assert compose_infrastructure_problems(compose) == []


def test_compose_service_login_is_created_and_granted_the_service_role(compose: dict[str, Any]) -> None:
    assert compose_role_problems(compose, initdb_scripts(compose), service_group_roles()) == []


def test_kubernetes_references_only_defined_configmaps_and_secrets(manifests: list[dict[str, Any]]) -> None:
    assert k8s_reference_problems(manifests) == []


def test_kubernetes_sets_only_real_settings(manifests: list[dict[str, Any]], settings: set[str]) -> None:
    assert k8s_setting_problems(manifests, settings) == []


def test_kubernetes_runs_only_real_commands(manifests: list[dict[str, Any]], commands: set[str]) -> None:
    assert k8s_command_problems(manifests, commands) == []


def test_kubernetes_workloads_declare_resources(manifests: list[dict[str, Any]]) -> None:
    assert k8s_resource_problems(manifests) == []


def test_kubernetes_probes_hit_served_endpoints(
    manifests: list[dict[str, Any]], routes: set[str], image_env: dict[str, str]
) -> None:
    assert k8s_probe_problems(manifests, routes, image_env) == []


def test_kubernetes_selectors_match(manifests: list[dict[str, Any]]) -> None:
    assert k8s_selector_problems(manifests) == []


def test_kubernetes_creates_exactly_the_topics_the_code_uses(
    manifests: list[dict[str, Any]], image_env: dict[str, str]
) -> None:
    assert k8s_topic_problems(manifests, image_env) == []


def test_workers_do_not_outnumber_partitions(
    compose: dict[str, Any], manifests: list[dict[str, Any]], image_env: dict[str, str]
) -> None:
    assert scaling_problems(compose, manifests, image_env) == []


def test_dockerfile_builds_the_layout_the_code_expects(
    dockerfile_text: str, script_target: tuple[str, str], settings: set[str]
) -> None:
    assert dockerfile_problems(dockerfile_text, script_target, source_relative_data_paths(), settings) == []


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile_text: str) -> None:
    assert dockerignore_problems(DOCKERIGNORE.read_text(), dockerfile_text) == []


# Each check can fail: a deliberately broken copy of the artifacts is reported ------------------


def test_compose_command_check_reports_an_unknown_command(compose: dict[str, Any], commands: set[str]) -> None:
    broken = copy.deepcopy(compose)
    compose_service(broken, "ledger-writer")["command"] = ["ledger-writter"]
    assert reported(compose_command_problems(broken, commands), "ledger-writer", "ledger-writter")


def test_compose_setting_check_reports_an_unknown_setting(compose: dict[str, Any], settings: set[str]) -> None:
    broken = copy.deepcopy(compose)
    compose_service(broken, "audit-api")["environment"]["CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVER"] = "kafka:9092"
    assert reported(compose_setting_problems(broken, settings), "CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVER")


def test_compose_topic_check_reports_a_misspelled_topic(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    topics = compose_service(broken, "topics")
    topics["command"] = [line.replace("--topic accounts ", "--topic acounts ") for line in topics["command"]]
    problems = compose_topic_problems(broken)
    assert reported(problems, "'acounts'", "never uses")
    assert reported(problems, "'accounts'", "never created")


def test_compose_topic_check_reports_partitions_that_disagree_with_the_setting(
    compose: dict[str, Any],
) -> None:
    broken = copy.deepcopy(compose)
    compose_service(broken, "ledger-writer")["environment"]["CONSENT_LEDGER_TOPIC_PARTITIONS"] = "8"
    assert reported(compose_topic_problems(broken), "disagree", "CONSENT_LEDGER_TOPIC_PARTITIONS")


def test_compose_dependency_check_reports_a_service_that_skips_migrations(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    writer = compose_service(broken, "ledger-writer")
    writer["depends_on"] = {k: v for k, v in writer["depends_on"].items() if k != "migrate"}
    compose_service(broken, "audit-api")["depends_on"]["kafka"] = {"condition": "service_healthy"}
    del compose_service(broken, "kafka")["healthcheck"]
    problems = compose_dependency_problems(broken)
    assert reported(problems, "'ledger-writer'", "'migrate'")
    assert reported(problems, "'audit-api'", "'kafka'", "no healthcheck")


def test_compose_infrastructure_check_reports_auto_topic_creation_and_async_commit(
    compose: dict[str, Any],
) -> None:
    broken = copy.deepcopy(compose)
    compose_service(broken, "kafka")["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] = "true"
    compose_service(broken, "postgres")["command"] = ["postgres", "-c", "synchronous_commit=off"]
    problems = compose_infrastructure_problems(broken)
    assert reported(problems, "KAFKA_AUTO_CREATE_TOPICS_ENABLE")
    assert reported(problems, "synchronous_commit")


def test_compose_role_check_reports_a_login_that_was_never_granted(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    url = "postgresql://consent_ledger_app:secret@postgres:5432/consent_ledger"
    compose_service(broken, "audit-api")["environment"]["CONSENT_LEDGER_DATABASE_URL"] = url
    problems = compose_role_problems(broken, initdb_scripts(compose), service_group_roles())
    assert reported(problems, "'consent_ledger_app'", "never create")
    assert reported(problems, "'consent_ledger_app'", "never granted consent_ledger_service")


def test_kubernetes_reference_check_reports_a_missing_secret(manifests: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(manifests)
    app_container_of(broken, "consent-ledger-audit-api")["envFrom"][2]["secretRef"]["name"] = "api-tokens"
    assert reported(k8s_reference_problems(broken), "Secret 'api-tokens'")


def test_kubernetes_setting_check_reports_unknown_settings(manifests: list[dict[str, Any]], settings: set[str]) -> None:
    broken = copy.deepcopy(manifests)
    manifest(broken, "ConfigMap", "consent-ledger-config")["data"]["CONSENT_LEDGER_API_PORTT"] = "8080"
    app_container_of(broken, "consent-ledger-writer")["env"].append(
        {"name": "CONSENT_LEDGER_METRIC_PORT", "value": "9100"}
    )
    problems = k8s_setting_problems(broken, settings)
    assert reported(problems, "CONSENT_LEDGER_API_PORTT")
    assert reported(problems, "CONSENT_LEDGER_METRIC_PORT")


def test_kubernetes_command_check_reports_an_unknown_command(
    manifests: list[dict[str, Any]], commands: set[str]
) -> None:
    broken = copy.deepcopy(manifests)
    app_container_of(broken, "consent-ledger-audit-api")["args"] = ["audit_api"]
    assert reported(k8s_command_problems(broken, commands), "'audit_api'")


def test_kubernetes_resource_check_reports_missing_requests(manifests: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(manifests)
    del app_container_of(broken, "consent-ledger-writer")["resources"]["requests"]
    assert reported(k8s_resource_problems(broken), "consent-ledger-writer", "requests.cpu")


def test_kubernetes_probe_check_reports_unserved_paths_and_wrong_ports(
    manifests: list[dict[str, Any]], routes: set[str], image_env: dict[str, str]
) -> None:
    broken = copy.deepcopy(manifests)
    api = app_container_of(broken, "consent-ledger-audit-api")
    api["readinessProbe"]["httpGet"]["path"] = "/ready"
    api["env"] = [{"name": "CONSENT_LEDGER_API_PORT", "value": "8081"}]
    writer = app_container_of(broken, "consent-ledger-writer")
    writer["livenessProbe"]["httpGet"]["path"] = "/healthz"
    problems = k8s_probe_problems(broken, routes, image_env)
    assert reported(problems, "readinessProbe", "'/ready'")
    assert reported(problems, "consent-ledger-audit-api", "CONSENT_LEDGER_API_PORT is 8081")
    assert reported(problems, "consent-ledger-writer", "'/healthz'")


def test_kubernetes_probe_check_reports_a_loopback_listener(
    manifests: list[dict[str, Any]], routes: set[str], image_env: dict[str, str]
) -> None:
    broken = copy.deepcopy(manifests)
    manifest(broken, "ConfigMap", "consent-ledger-config")["data"]["CONSENT_LEDGER_API_HOST"] = "127.0.0.1"
    assert reported(k8s_probe_problems(broken, routes, image_env), "loopback")


def test_kubernetes_selector_check_reports_a_pdb_and_service_selecting_nothing(
    manifests: list[dict[str, Any]],
) -> None:
    broken = copy.deepcopy(manifests)
    pdb = manifest(broken, "PodDisruptionBudget", "consent-ledger-writer")
    pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "ledger_writer"
    manifest(broken, "Service", "consent-ledger-audit-api")["spec"]["selector"]["app.kubernetes.io/component"] = "api"
    problems = k8s_selector_problems(broken)
    assert reported(problems, "PodDisruptionBudget 'consent-ledger-writer'", "0 Deployments")
    assert reported(problems, "Deployment 'consent-ledger-writer' has no PodDisruptionBudget")
    assert reported(problems, "Service 'consent-ledger-audit-api' selects no")


def test_kubernetes_topic_check_reports_a_topic_never_created(
    manifests: list[dict[str, Any]], image_env: dict[str, str]
) -> None:
    broken = copy.deepcopy(manifests)
    job = pod_spec(manifest(broken, "Job", "consent-ledger-topics"))["containers"][0]
    job["args"] = ["\n".join(line for line in job["args"][0].splitlines() if "ledger.entries" not in line)]
    assert reported(k8s_topic_problems(broken, image_env), "'ledger.entries'", "never created")


def test_scaling_check_reports_more_workers_than_partitions(
    compose: dict[str, Any], manifests: list[dict[str, Any]], image_env: dict[str, str]
) -> None:
    broken = copy.deepcopy(manifests)
    manifest(broken, "Deployment", "consent-ledger-stream-processor")["spec"]["replicas"] = 13
    assert reported(scaling_problems(compose, broken, image_env), "13 replicas for 12 partitions")


def test_dockerfile_check_reports_root_unpinned_base_and_lost_schemas(
    dockerfile_text: str, script_target: tuple[str, str], settings: set[str]
) -> None:
    broken = (
        dockerfile_text.replace("USER 10001:10001", "USER root")
        .replace("FROM python:3.11-slim-bookworm AS builder", "FROM python:latest AS builder")
        .replace("COPY schemas/ /app/schemas/", "COPY schemas/ /opt/schemas/")
        .replace('ENTRYPOINT ["consent-ledger"]', 'ENTRYPOINT ["consent_ledger"]')
        .replace("CONSENT_LEDGER_DATA_DIR=", "CONSENT_LEDGER_DATADIR=")
    )
    problems = dockerfile_problems(broken, script_target, source_relative_data_paths(), settings)
    assert reported(problems, "root")
    assert reported(problems, "'python:latest'")
    assert reported(problems, "COPY schemas/ to /app/schemas")
    assert reported(problems, "ENTRYPOINT")
    assert reported(problems, "CONSENT_LEDGER_DATADIR")


def test_dockerignore_check_reports_an_excluded_copy_source(dockerfile_text: str) -> None:
    broken = DOCKERIGNORE.read_text().replace("!schemas/\n", "")
    assert reported(dockerignore_problems(broken, dockerfile_text), "'schemas/'")
