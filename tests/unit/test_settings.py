"""Settings: arguments, then OFFLOAD_* variables, then defaults; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload import ConfigurationError, Settings
from offload.settings import mask_url


def test_arguments_win_over_environment_over_defaults() -> None:
    env = {"OFFLOAD_DEFAULT_QUEUE": "emails", "OFFLOAD_WORKER_THREADS": "9"}
    settings = Settings.build(env, worker_threads=3)
    assert settings.worker_threads == 3
    assert settings.default_queue == "emails"
    assert settings.heartbeat_interval_s == 5.0


def test_by_default_ledger_and_broker_are_one_file_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.build({}, data_dir=tmp_path)
    assert settings.resolved_ledger_url == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    assert settings.resolved_broker_url == settings.resolved_ledger_url
    assert settings.broker_scheme == "sqlite"


def test_a_ledger_elsewhere_leaves_the_embedded_broker_its_own_file(tmp_path: Path) -> None:
    postgres = Settings.build({}, data_dir=tmp_path, ledger_url="postgresql://u@localhost/x")
    assert postgres.resolved_broker_url == f"sqlite:///{tmp_path / 'broker.sqlite'}"
    memory = Settings.build({}, data_dir=tmp_path, ledger_url="sqlite:///:memory:")
    assert memory.resolved_broker_url == f"sqlite:///{tmp_path / 'broker.sqlite'}"
    own = Settings.build({}, data_dir=tmp_path, ledger_url=f"sqlite:///{tmp_path / 'runs.db'}")
    assert own.resolved_broker_url == own.resolved_ledger_url


def test_a_url_without_scheme_names_the_variable_and_gives_an_example() -> None:
    with pytest.raises(ConfigurationError) as bad:
        Settings.build({"OFFLOAD_BROKER_URL": "redis//localhost"})
    assert str(bad.value) == (
        "environment variable OFFLOAD_BROKER_URL='redis//localhost' is invalid: 'redis//localhost' "
        "is not a URL (missing '://'); example: redis://localhost:6379/0"
    )


def test_a_bad_number_names_the_argument() -> None:
    with pytest.raises(ConfigurationError, match="argument worker_threads=0 is invalid"):
        Settings.build({}, worker_threads=0)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="Unknown setting"):
        Settings.build({}, brokr_url="x://y")


def test_passwords_never_reach_a_repr() -> None:
    settings = Settings.build({}, broker_url="redis://user:s3cret@host:6379/0")
    assert "s3cret" not in repr(settings)
    assert mask_url("amqp://guest:guest@h/v") == "amqp://guest:***@h/v"
    assert mask_url("redis://host/0") == "redis://host/0"


def test_settings_round_trip_through_the_environment(tmp_path: Path) -> None:
    settings = Settings.build({}, data_dir=tmp_path, broker_url="redis://h/1", worker_threads=7)
    assert Settings.build(settings.as_env()) == settings
