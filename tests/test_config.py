import pytest

from bastion.config import ConfigError, load_config


def test_embedded_defaults_have_the_reference_catalogue():
    config = load_config(env={})
    responses = [m for m in config.models.values() if "responses" in m.endpoints]
    assert len(responses) == 9
    assert all("chat" in m.endpoints for m in responses)
    assert config.models["Mistral-7B-Instruct-v0.3"].endpoints == {"chat"}
    assert config.database_url == "sqlite:///bastion.db"
    assert config.ratelimit.url == "memory://"


def test_file_then_env_override(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('[server]\nport = 9999\n[database]\nurl = "sqlite:///x.db"\n')
    env = {"BASTION_DATABASE_URL": "postgresql://u@h/db", "BASTION_ADMIN_TOKEN": "t"}
    config = load_config(path, env=env)
    assert config.server.port == 9999
    assert config.database_url == "postgresql://u@h/db"
    assert config.admin_token == "t"
    assert len(config.models) == 10  # models not given: the defaults stay


@pytest.mark.parametrize(
    "text, message",
    [
        ('[server]\nport = "x"', "server"),
        ('[[upstreams]]\nname="a"\nurl="ftp://x"', "http"),
        (
            '[[upstreams]]\nname="a"\nurl="http://x"\n[[models]]\nid="m"\nupstreams=["b"]\n'
            'input_price="0.1"\noutput_price="0.1"\nmax_output_tokens=1',
            "no upstream named",
        ),
        (
            '[[upstreams]]\nname="a"\nurl="http://x"\n[[models]]\nid="m"\nupstreams=["a"]\n'
            'input_price=0.1\noutput_price="0.1"\nmax_output_tokens=1',
            "prices are decimal strings",
        ),
        ("[server\n", "b.toml"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


ISOLATED = """
[[upstreams]]
name = "vllm"
url = "http://gpu:8000/v1"

[[models]]
id = "shared"
upstreams = ["vllm"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1024

[[models]]
id = "private"
upstreams = ["vllm"]
input_price = "0.10"
output_price = "0.50"
max_output_tokens = 1024
cache_isolation = "account"
"""


def test_cache_isolation_is_per_model_and_off_by_default(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(ISOLATED)
    config = load_config(path, env={"BASTION_CACHE_SALT_SECRET": "s" * 32})
    assert config.models["shared"].cache_isolation == "none"
    assert config.models["private"].cache_isolation == "account"
    assert config.server.cache_salt_secret == "s" * 32
    assert "s" * 32 not in repr(config)  # a secret never reaches a log line
    path.write_text(f'[server]\ncache_salt_secret = "{"f" * 32}"\n' + ISOLATED)
    assert load_config(path, env={}).server.cache_salt_secret == "f" * 32


def test_cache_isolation_needs_a_secret(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(ISOLATED)
    with pytest.raises(ConfigError, match=r"models\[1\].cache_isolation.*server.cache_salt_secret"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_config(path, env={"BASTION_CACHE_SALT_SECRET": "short"})
    path.write_text(ISOLATED.replace('"account"', '"tenant"'))
    with pytest.raises(ConfigError, match=r"models\[1\].cache_isolation must be 'none' or"):
        load_config(path, env={"BASTION_CACHE_SALT_SECRET": "s" * 32})


def test_tracing_is_off_by_default_and_on_from_the_file_or_env(tmp_path):
    assert load_config(env={}).tracing.otlp_endpoint == ""
    path = tmp_path / "b.toml"
    path.write_text(
        '[tracing]\notlp_endpoint = "https://otel.example:4318"\nsample_ratio = 0.25\n'
        '[tracing.headers]\nauthorization = "Bearer collector-secret"\n'
    )
    tracing = load_config(path, env={}).tracing
    assert tracing.otlp_endpoint == "https://otel.example:4318/v1/traces"  # the traces path
    assert tracing.sample_ratio == 0.25 and tracing.service_name == "bastion"
    assert tracing.headers == {"authorization": "Bearer collector-secret"}
    assert "collector-secret" not in repr(tracing)
    env = {"BASTION_OTLP_ENDPOINT": "http://127.0.0.1:4318/otlp/v1/traces"}
    assert load_config(path, env=env).tracing.otlp_endpoint == env["BASTION_OTLP_ENDPOINT"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('otlp_endpoint = "127.0.0.1:4318"', "tracing.otlp_endpoint must be an http"),
        ('otlp_endpoint = "grpc://collector:4317"', "tracing.otlp_endpoint must be an http"),
        ('otlp_endpoint = "http://collector:port/v1/traces"', "tracing.otlp_endpoint"),
        ("sample_ratio = 1.5", "tracing.sample_ratio must be between 0 and 1"),
        ('sample_ratio = "nan"', "tracing.sample_ratio"),
        ('service_name = ""', "tracing.service_name"),
        ("headers = { authorization = 1 }", "tracing.headers must be a table of strings"),
        ('exporter = "grpc"', r"tracing: unknown keys \['exporter'\]"),
    ],
)
def test_bad_tracing_config_names_the_problem(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(f"[tracing]\n{text}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})
