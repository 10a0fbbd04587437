"""Config validation: every key has a range, every error is one line that names the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml

from affinity_node.config import (
    BackendConfig,
    ConfigError,
    HostAllowList,
    NodeConfig,
    advice,
    config_hash,
    config_summary,
    load_config,
    unreloadable_changes,
    validate,
)

DSN = {"AFFINITY_DATABASE_DSN": "postgresql://u@db/affinity"}
MINIMAL = {"backends": [{"url": "http://10.0.0.7:8000", "models": ["m"]}]}


def load(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> NodeConfig:
    """The DSN from the environment, as in deployments, unless the data sets one."""
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    database = data.get("database", {})
    base = {} if "dsn" in database or "dsn_file" in database else DSN
    return load_config(path, env={**base, **(env or {})})


def error_of(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data, env)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def ranged_fields() -> list[tuple[str, str, dataclasses.Field[Any]]]:
    """(section, key, field) for every key that declares a range."""
    out = []
    hints = get_type_hints(NodeConfig)
    for section in dataclasses.fields(NodeConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            if "low" in f.metadata:
                out.append((section.name, f.name, f))
    return out


def test_every_numeric_key_declares_a_range() -> None:
    hints = get_type_hints(NodeConfig)
    missing = []
    for section in dataclasses.fields(NodeConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        sub = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = sub[f.name] in (int, float, int | None, float | None)
            if numeric and "low" not in f.metadata:
                missing.append(f"{section.name}.{f.name}")
    assert missing == []
    assert len(ranged_fields()) >= 19


@pytest.mark.parametrize(
    ("section", "key", "field"), ranged_fields(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_range_is_enforced_with_a_one_line_error(
    tmp_path: Path, section: str, key: str, field: dataclasses.Field[Any]
) -> None:
    low, high, above = field.metadata["low"], field.metadata["high"], field.metadata["above"]
    default = field.default if field.default is not None else 1
    # The default is inside its own range.
    load(tmp_path, {**MINIMAL, section: {key: default}})
    below = low if above else low - 1
    message = error_of(tmp_path, {**MINIMAL, section: {key: below}})
    assert message.startswith(f"{section}.{key}: must be"), message
    assert high is not None
    message = error_of(tmp_path, {**MINIMAL, section: {key: high * 2 + 1}})
    assert message.startswith(f"{section}.{key}: must be at most {high:g}, got "), message
    # The same check for an environment override, which names the key too.
    var = f"AFFINITY_{section}_{key}".upper()
    assert error_of(tmp_path, MINIMAL, {var: str(below)}).startswith(f"{section}.{key}: ")


def test_log_level_any_case_and_a_bad_one(tmp_path: Path) -> None:
    assert load(tmp_path, {**MINIMAL, "logging": {"level": "debug"}}).logging.level == "DEBUG"
    message = error_of(tmp_path, {**MINIMAL, "logging": {"level": "LOUD"}})
    assert message == ("logging.level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listen": {"port": 8080, "ops_port": 8080}}, "listen.ops_port: must differ"),
        ({"listen": {"host": " "}}, "listen.host: must not be empty"),
        ({"listen": {"port": "eighty"}}, "listen.port: expected a number"),
        ({"limits": {"drain_timeout_seconds": float("nan")}}, "expected a finite number"),
        ({"node_id": "has space"}, "node_id: 'has space' must be 1 to 128 printable"),
        ({"node_id": "x" * 129}, "node_id: "),
        ({"logging": {"access": "sometimes"}}, "logging.access: expected true or false"),
        ({"routing": {"fallback": "fastest"}}, "routing.fallback: 'fastest' is not one of"),
        ({"backends": []}, "backends: at least one backend is needed"),
        ({"backends": [{"url": "10.0.0.7:8000"}]}, "backends[0].url: '10.0.0.7:8000' must be"),
        ({"backends": [{"url": "http://h:99999"}]}, "backends[0].url: 'http://h:99999' is not"),
        ({"backends": [{"url": "http://h:8000/v1"}]}, "no path: the node appends /v1"),
        ({"backends": [{"url": "http://h:8000", "models": [""]}]}, "backends[0].models[0]"),
        ({"models": [{"name": " "}]}, "models[0].name: must not be empty"),
        ({"database": {"dsn": "host=db user=x"}}, "database.dsn: must start with postgresql://"),
        ({"limits": {"drain_timeout": 5}}, "limits: unknown key(s) drain_timeout"),
    ],
)
def test_errors_name_the_key_in_one_line(
    tmp_path: Path, data: dict[str, Any], expected: str
) -> None:
    assert expected in error_of(tmp_path, {**MINIMAL, **data})


def test_invalid_yaml_is_one_line_with_the_position(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("listen:\n  port: [8080\nbackends: []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path, env=DSN)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config {path} is not valid YAML: ") and "line 3" in message


def test_defaults_keep_the_timeout_relation() -> None:
    """read <= generation <= drain: the defaults let a generation finish during a drain."""
    cfg = NodeConfig(backends=[BackendConfig("http://h:8000")])
    cfg.database.dsn = DSN["AFFINITY_DATABASE_DSN"]
    validate(cfg)
    limits = cfg.limits
    assert limits.upstream_read_timeout_seconds <= limits.generation_timeout_seconds
    assert limits.generation_timeout_seconds >= 300  # a 5-minute generation is allowed...
    assert limits.drain_timeout_seconds >= limits.generation_timeout_seconds  # ...and drained
    assert advice(cfg) == []
    cfg.limits.drain_timeout_seconds = 30
    cfg.limits.upstream_read_timeout_seconds = 600
    notes = advice(cfg)
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert "limits.drain_timeout_seconds (30) is shorter than" in notes[0]


# -- backends.allow ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),  # IPv4 in a CIDR
        ("11.0.0.1", False),
        ("192.168.1.5", True),  # a bare address is its own /32
        ("192.168.1.6", False),
        ("fd00::1", True),  # IPv6 in a CIDR
        ("[fdff::7]", True),  # as urlsplit leaves it, or with brackets
        ("fe80::1", False),
        ("::ffff:10.0.0.9", True),  # IPv4-mapped IPv6 is the IPv4 address
        ("2001:db8::1", True),
        ("2001:db8::2", False),
        ("vllm.internal", True),  # a host name, exactly, any case, trailing dot
        ("VLLM.Internal.", True),
        ("evil.vllm.internal", False),  # a name does not cover its subdomains
        ("pod-1.vllm.svc.cluster.local", True),  # *.domain covers names under it
        ("vllm.svc.cluster.local", False),  # but not the domain itself
        ("evilvllm.svc.cluster.local", False),
        ("example.com", False),
    ],
)
def test_allow_list_matches_addresses_networks_and_names(host: str, allowed: bool) -> None:
    allow = HostAllowList.parse(
        [
            "10.0.0.0/8",
            "192.168.1.5",
            "fd00::/8",
            "2001:db8::1",
            "vllm.internal",
            "*.vllm.svc.cluster.local",
        ]
    )
    assert allow.allows_host(host) is allowed
    url = f"http://{host if ':' not in host or host.startswith('[') else f'[{host}]'}:8000"
    assert allow.allows_url(url) is allowed


def test_an_empty_allow_list_allows_everything_and_names_are_never_resolved() -> None:
    assert HostAllowList.parse([]).allows_url("http://example.com:1")
    by_address = HostAllowList.parse(["127.0.0.0/8"])
    assert not by_address.allows_url("http://localhost:8000")  # a name needs a name entry
    assert not by_address.allows_url("not a url")


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "a b", "http://x", "*.", "-bad-", "x/8"])
def test_a_bad_allow_entry_is_a_one_line_error_naming_it(tmp_path: Path, entry: str) -> None:
    data = {"backends": {"allow": ["10.0.0.0/8", entry], "list": MINIMAL["backends"]}}
    message = error_of(tmp_path, data)
    assert message.startswith("backends.allow[1]:") and repr(entry) in message


def test_backends_is_a_list_or_a_mapping_with_allow_and_list(tmp_path: Path) -> None:
    plain = load(tmp_path, MINIMAL)
    assert plain.backends_allow == [] and plain.allow.empty
    mapped = load(tmp_path, {"backends": {"allow": ["10.0.0.0/8"], "list": MINIMAL["backends"]}})
    assert [b.url for b in mapped.backends] == ["http://10.0.0.7:8000"]
    assert mapped.backends_allow == ["10.0.0.0/8"]
    assert "unknown key(s) alow" in error_of(tmp_path, {"backends": {"alow": [], "list": []}})
    assert "backends_allow" in error_of(tmp_path, {**MINIMAL, "backends_allow": ["x"]})


def test_a_configured_backend_outside_the_allow_list_is_an_error(tmp_path: Path) -> None:
    data = {"backends": {"allow": ["192.168.0.0/16"], "list": MINIMAL["backends"]}}
    message = error_of(tmp_path, data)
    assert message.startswith("backends[0].url:") and "backends.allow" in message


def test_the_allow_list_from_the_environment(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL, {"AFFINITY_BACKENDS_ALLOW": "10.0.0.0/8, vllm.internal"})
    assert cfg.backends_allow == ["10.0.0.0/8", "vllm.internal"]
    assert "backends.allow" in error_of(tmp_path, MINIMAL, {"AFFINITY_BACKENDS_ALLOW": "fd00::/8"})
    everything = load(tmp_path, {"backends": {"allow": ["fd00::/8"], "list": MINIMAL["backends"]}},
                      {"AFFINITY_BACKENDS_ALLOW": ""})  # fmt: skip
    assert everything.allow.empty


def test_listen_dsn_defaults_to_dsn_and_statement_cache_to_on(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.database.listener_dsn == DSN["AFFINITY_DATABASE_DSN"]
    assert cfg.database.statement_cache is True
    direct = "postgresql://u@pg-a:5432/affinity"
    cfg = load(
        tmp_path,
        {**MINIMAL, "database": {"listen_dsn": direct, "statement_cache": False}},
        {"AFFINITY_DATABASE_DSN": "postgresql://u@pgbouncer:6432/affinity"},
    )
    assert cfg.database.listener_dsn == direct
    assert cfg.database.dsn == "postgresql://u@pgbouncer:6432/affinity"
    assert cfg.database.statement_cache is False
    env = {**DSN, "AFFINITY_DATABASE_STATEMENT_CACHE": "off"}
    assert load(tmp_path, MINIMAL, env).database.statement_cache is False


def test_dsns_are_checked_and_multi_host_without_read_write_is_advised(tmp_path: Path) -> None:
    bad = error_of(tmp_path, {**MINIMAL, "database": {"listen_dsn": "mysql://u@db/x"}})
    assert bad.startswith("database.listen_dsn: must start with postgresql://")
    attrs = "postgresql://u@a,b/x?target_session_attrs=primary-ish"
    assert "target_session_attrs='primary-ish'" in error_of(
        tmp_path, MINIMAL, {"AFFINITY_DATABASE_DSN": attrs}
    )
    multi = {"AFFINITY_DATABASE_DSN": "postgresql://u@pg-a:5432,pg-b:5432/affinity"}
    notes = advice(load(tmp_path, MINIMAL, multi))
    assert any("database.dsn lists several hosts" in n for n in notes), notes
    ok = {
        "AFFINITY_DATABASE_DSN": multi["AFFINITY_DATABASE_DSN"] + "?target_session_attrs=read-write"
    }
    assert advice(load(tmp_path, MINIMAL, ok)) == []


def test_dsn_file_is_read_at_every_call_and_never_quoted_in_errors(tmp_path: Path) -> None:
    secret_dsn = "postgresql://u:hunter2@db/affinity"
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(secret_dsn + "\n", encoding="utf-8")
    env = {"AFFINITY_DATABASE_DSN_FILE": str(dsn_file)}
    cfg = load_config(_yaml(tmp_path, MINIMAL), env=env)
    source = cfg.database.dsn_source
    assert callable(source) and source() == secret_dsn
    assert cfg.database.listener_dsn is not None and callable(cfg.database.listener_dsn)
    dsn_file.write_text("postgresql://u:rotated@db/affinity", encoding="utf-8")
    assert source() == "postgresql://u:rotated@db/affinity"
    dsn_file.write_text("", encoding="utf-8")
    with pytest.raises(OSError, match="empty"):
        source()
    both = error_of(tmp_path, MINIMAL, {**DSN, **env})
    assert both.startswith("database.dsn and database.dsn_file are both set")
    dsn_file.write_text("mysql://u:hunter2@db/x", encoding="utf-8")
    bad = error_of(tmp_path, {**MINIMAL, "database": {"dsn_file": str(dsn_file)}})
    assert bad.startswith("database.dsn_file: must start with postgresql://")
    assert "hunter2" not in bad
    missing = error_of(tmp_path, {**MINIMAL, "database": {"dsn_file": str(tmp_path / "absent")}})
    assert missing.startswith("database.dsn_file") and "cannot read" in missing


def _yaml(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_reload_refuses_keys_that_need_a_restart_and_names_no_value(tmp_path: Path) -> None:
    old = load(tmp_path, MINIMAL)
    safe = load(
        tmp_path,
        {
            "backends": [*MINIMAL["backends"], {"url": "http://10.0.0.8:8000", "models": ["m"]}],
            "logging": {"level": "debug", "access": True},
            "limits": {"generation_timeout_seconds": 60, "drain_timeout_seconds": 90},
        },
    )
    assert unreloadable_changes(old, safe) == []
    assert config_hash(safe) != config_hash(old)
    secret = {"AFFINITY_DATABASE_DSN": "postgresql://u:hunter2@db/affinity"}
    restart = load(
        tmp_path, {**MINIMAL, "database": {"pool_max": 3}, "listen": {"port": 9}}, secret
    )
    refused = unreloadable_changes(old, restart)
    assert refused == ["database.dsn", "database.pool_max", "listen.port"]
    changed_models = load(
        tmp_path, {"backends": [{"url": "http://10.0.0.7:8000", "models": ["x"]}]}
    )
    assert unreloadable_changes(old, changed_models) == [
        "backends (http://10.0.0.7:8000: models or kind)"
    ]
    dns = load(tmp_path, {"backends": [*MINIMAL["backends"], {"dns": "vllm.svc", "port": 8000}]})
    assert unreloadable_changes(old, dns) == ["backends (dns entries)"]


def test_the_config_hash_leaves_out_node_id_and_passwords(tmp_path: Path) -> None:
    a = load(
        tmp_path, {**MINIMAL, "node_id": "a"}, {"AFFINITY_DATABASE_DSN": "postgresql://u:p1@db/x"}
    )
    b = load(
        tmp_path,
        {**MINIMAL, "node_id": "b"},
        {"AFFINITY_DATABASE_DSN": "postgresql://u:p2@db/x?password=z"},
    )
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12
    assert "p1" not in json.dumps(config_summary(a), default=str)
    other_db = load(tmp_path, MINIMAL, {"AFFINITY_DATABASE_DSN": "postgresql://u:p1@db2/x"})
    assert config_hash(other_db) != config_hash(a)


def test_tracing_and_access_log_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {
            **MINIMAL,
            "listen": {"trusted_proxies": ["10.0.0.0/8", "fd00::1"]},
            "logging": {"access": True, "key_ref": "name"},
            "tracing": {"otlp_endpoint": "http://collector:4318", "sample_ratio": 0.1},
        },
        env={
            "AFFINITY_LOGGING_KEY_REF_SECRET": "s3cret",
            "AFFINITY_TRACING_FLUSH_INTERVAL_SECONDS": "0.5",
        },
    )
    assert cfg.listen.trusted_proxies == ["10.0.0.0/8", "fd00::1"]
    assert (cfg.logging.key_ref, cfg.logging.key_ref_secret) == ("name", "s3cret")
    assert (cfg.tracing.sample_ratio, cfg.tracing.flush_interval_seconds) == (0.1, 0.5)
    env = {"AFFINITY_LISTEN_TRUSTED_PROXIES": "10.1.0.0/16, 192.0.2.1"}  # comma-separated
    assert load(tmp_path, MINIMAL, env).listen.trusted_proxies == ["10.1.0.0/16", "192.0.2.1"]
    assert load(tmp_path, MINIMAL).tracing.otlp_endpoint == ""  # off by default


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"listen": {"trusted_proxies": ["10.0.0.0/33"]}}, "listen.trusted_proxies[0]"),
        ({"listen": {"trusted_proxies": ["lb.local"]}}, "listen.trusted_proxies[0]"),
        ({"logging": {"key_ref": "id"}}, "logging.key_ref"),
        ({"tracing": {"otlp_endpoint": "collector:4318"}}, "tracing.otlp_endpoint"),
        ({"tracing": {"sample_ratio": 1.5}}, "tracing.sample_ratio"),
    ],
)
def test_tracing_and_access_log_bad_values(
    tmp_path: Path, data: dict[str, Any], fragment: str
) -> None:
    assert fragment in error_of(tmp_path, {**MINIMAL, **data})


def test_access_log_without_a_key_ref_secret_is_advised(tmp_path: Path) -> None:
    cfg = load(tmp_path, {**MINIMAL, "logging": {"access": True}})
    assert any("key_ref_secret" in note for note in advice(cfg))
    cfg.logging.key_ref_secret = "s"
    assert not any("key_ref_secret" in note for note in advice(cfg))
