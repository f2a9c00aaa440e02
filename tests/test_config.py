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
