"""Which store the CLI opens, and that reading never creates one.

Run from the wrong directory, the built-in default (``sqlite:///bastion.db``, relative
to the working directory) used to create an empty database and answer from it: no
accounts, "no account named 'demo'". Now reading refuses a database that is not
there, and every command can say which store it uses (``--verbose``; a note on
stderr whenever the built-in default is used).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

READS = [
    ["accounts", "list"],
    ["accounts", "show", "demo"],
    ["keys", "list"],
    ["usage"],
    ["audit"],
]


def bastion(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command in ``cwd``, with no BASTION_* variable but those in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "COLUMNS": "200", **(env or {})},
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("args", READS, ids=" ".join)
def test_reading_never_creates_the_default_database(tmp_path: Path, args: list[str]) -> None:
    proc = bastion(tmp_path, *args)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert one_line(proc.stderr) == (
        f"error: no database at {tmp_path / 'bastion.db'} (the default sqlite:///bastion.db,"
        " relative to this directory); pass --config or set BASTION_DATABASE_URL"
    )
    assert list(tmp_path.iterdir()) == []  # no bastion.db, no -wal, no -shm


def test_reading_a_missing_configured_database_names_the_config(tmp_path: Path) -> None:
    config = tmp_path / "b.toml"
    config.write_text('[database]\nurl = "sqlite:///data/x.db"\n')
    proc = bastion(tmp_path, "accounts", "list", "--config", str(config))
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith(f"error: no database at {tmp_path / 'data' / 'x.db'} ")
    assert f"config file {config}" in line
    proc = bastion(tmp_path, "usage", env={"BASTION_DATABASE_URL": "sqlite:///y.db"})
    assert "BASTION_DATABASE_URL" in one_line(proc.stderr)
    assert not (tmp_path / "y.db").exists()


def test_writing_creates_the_default_database_and_says_so(tmp_path: Path) -> None:
    made = bastion(tmp_path, "accounts", "create", "demo", "--credit", "10", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "demo"  # stdout stays pure JSON
    assert one_line(made.stderr).startswith(f"note: creating ./bastion.db in {tmp_path} ")
    assert (tmp_path / "bastion.db").is_file()

    shown = bastion(tmp_path, "accounts", "show", "demo", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["balance"] == "10.00"
    assert one_line(shown.stderr) == (
        f"note: using ./bastion.db in {tmp_path} (the built-in default;"
        " --config or BASTION_DATABASE_URL chooses another)"
    )


def test_verbose_says_which_store_and_why(tmp_path: Path) -> None:
    default = tmp_path / "bastion.db"
    bastion(tmp_path, "accounts", "create", "demo")
    proc = bastion(tmp_path, "accounts", "list", "--json", "-v")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["name"] == "demo"
    assert one_line(proc.stderr) == (
        f"store: sqlite:///{default} (the built-in default, relative to this directory;"
        " --config or BASTION_DATABASE_URL chooses another)"
    )

    config = tmp_path / "b.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{default}"\n')
    proc = bastion(tmp_path, "keys", "list", "--config", str(config), "--verbose")
    assert one_line(proc.stderr) == f"store: sqlite:///{default} (config file {config})"
    proc = bastion(tmp_path, "usage", "--verbose", env={"BASTION_CONFIG": str(config)})
    assert one_line(proc.stderr) == f"store: sqlite:///{default} (config file {config})"
    proc = bastion(tmp_path, "audit", "-v", env={"BASTION_DATABASE_URL": "sqlite:///bastion.db"})
    assert one_line(proc.stderr) == f"store: sqlite:///{default} (BASTION_DATABASE_URL)"
    proc = bastion(tmp_path, "accounts", "list")  # a config or env choice: no note
    assert proc.stderr.count("note:") == 1
    proc = bastion(tmp_path, "accounts", "list", "--config", str(config))
    assert proc.stderr == ""


def test_verbose_masks_a_postgres_password(tmp_path: Path, pg_url: str) -> None:
    scheme, rest = pg_url.split("://", 1)
    user, host = rest.split("@", 1)
    with_password = f"{scheme}://{user.split(':')[0]}:s3cret@{host}"  # trust auth ignores it
    proc = bastion(
        tmp_path, "accounts", "list", "--json", "-v", env={"BASTION_DATABASE_URL": with_password}
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    line = one_line(proc.stderr)
    assert "s3cret" not in line
    assert line == f"store: {scheme}://{user.split(':')[0]}:***@{host} (BASTION_DATABASE_URL)"
