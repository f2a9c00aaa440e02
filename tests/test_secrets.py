"""Secrets never reach a log line or a metric: client keys (good, revoked, unknown,
malformed), the admin token and the upstream's api_key, through a session that also
fails in every way a log line is written for (upstream errors, bad bodies, 401s)."""

from __future__ import annotations

import os
import secrets

import httpx
import openai
from conftest import Gateway, free_port, start, stop
from openai import OpenAI

ADMIN = "adm-" + secrets.token_urlsafe(24)
UPSTREAM_KEY = "up-" + secrets.token_urlsafe(24)

TOML = """
[database]
url = "sqlite:///{db}"

[[upstreams]]
name = "sim"
url = "http://127.0.0.1:{sim}/v1"
api_key = "{upstream_key}"

[[upstreams]]
name = "dead"
url = "http://127.0.0.1:{dead}/v1"
api_key = "{upstream_key}"
connect_timeout_s = 1

[[models]]
id = "m"
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 100

[[models]]
id = "gone"
upstreams = ["dead"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 100

[[models]]
id = "broken"
upstream_model = "m@500"
upstreams = ["sim"]
input_price = "1.00"
output_price = "2.00"
max_output_tokens = 100
"""


def test_no_secret_in_any_log_line_or_metric(tmp_path, sim_port: int):
    config = tmp_path / "bastion.toml"
    config.write_text(
        TOML.format(db=tmp_path / "b.db", sim=sim_port, dead=free_port(), upstream_key=UPSTREAM_KEY)
    )
    port, log = free_port(), tmp_path / "gateway.log"
    with open(log, "w") as err:
        proc = start(
            ["serve", "--config", str(config), "--port", str(port)],
            f"http://127.0.0.1:{port}/healthz",
            env={**os.environ, "BASTION_ADMIN_TOKEN": ADMIN},
            stderr=err,
        )
    gw = Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", config,
                 f"sqlite:///{tmp_path / 'b.db'}", proc)  # fmt: skip
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        good, _ = gw.new_key()
        revoked, _ = gw.new_key()
        unknown = "qbt_" + secrets.token_urlsafe(32)
        c = OpenAI(base_url=gw.url, api_key=good, max_retries=0)
        c.responses.create(model="m", input="hello")
        list(c.responses.create(model="m", input="hello", stream=True))
        for model in ("gone", "broken"):
            try:
                c.responses.create(model=model, input="x")
            except openai.APIStatusError as exc:
                assert UPSTREAM_KEY not in exc.message and "127.0.0.1" not in str(exc.body)
        keys = httpx.get(gw.root + "/admin/v1/keys", headers=admin).json()
        [rid] = [k["id"] for k in keys if revoked.startswith(k["prefix"])]
        httpx.post(gw.root + f"/admin/v1/keys/{rid}/revoke", headers=admin)
        gw.wait_for_key(revoked, present=False)
        for key in (revoked, unknown, good[:-3], "Basic " + ADMIN):
            httpx.post(gw.url + "/responses", json={"model": "m", "input": "x"},
                       headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        httpx.get(gw.root + "/admin/v1/accounts", headers={"Authorization": f"Bearer {ADMIN}x"})
        httpx.post(gw.url + "/responses", content=b"{not json",
                   headers={"Authorization": f"Bearer {good}"})  # fmt: skip
        metrics = httpx.get(gw.root + "/metrics").text
    finally:
        stop(proc)
    logged = log.read_text()
    assert logged, "the gateway logged nothing at all: the search would prove nothing"
    for secret in (good, revoked, unknown, ADMIN, UPSTREAM_KEY, good[4:20]):
        assert secret not in logged, f"a secret is in the log: {secret[:6]}…"
        assert secret not in metrics, f"a secret is in /metrics: {secret[:6]}…"
