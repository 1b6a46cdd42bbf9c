"""What the CLI says before it reaches any API: bad addresses, a missing token, tables
whose ids must stay whole, and help examples that work when pasted. No I/O."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.backups import describe_counts, first_backup_hint, match_backup
from cli.client import Client, CliError, _hint
from cli.main import main, sleep_summary
from schemas.storage import beside_refusal


def test_an_api_address_without_a_scheme_says_what_to_type() -> None:
    with pytest.raises(CliError) as caught:
        Client("127.0.0.1:8080", "token")
    message = caught.value.format_message()
    assert "has no scheme" in message
    assert "orkestr login --api http://127.0.0.1:8080" in message
    assert Client("https://127.0.0.1:8443/", "t").api == "https://127.0.0.1:8443"


def test_login_without_a_token_says_how_to_give_one(tmp_path: Path) -> None:
    env = {"ORKESTR_CONFIG": str(tmp_path / "c.json"), "ORKESTR_TOKEN": "", "ORKESTR_API": ""}
    # stdin is not a terminal and empty: nothing to prompt, nothing read.
    result = CliRunner().invoke(main, ["login", "--api", "http://127.0.0.1:1"], input="", env=env)
    assert result.exit_code == 1
    assert "no token given" in result.output and "--token" in result.output
    assert not (tmp_path / "c.json").exists()


def test_a_backup_is_named_by_its_id_or_the_start_of_it() -> None:
    ids = [
        "02201a47f6b54311863eac3bd46aa196",
        "02201b00000000000000000000000000",
        "d1d7" + "0" * 28,
    ]
    assert match_backup(ids, ids[0], "db") == ids[0]
    assert match_backup(ids, "d1d7", "db") == ids[2]
    assert match_backup(ids, "02201a47f6b…", "db") == ids[0]  # as a narrow table cuts it
    with pytest.raises(CliError, match="starts 2 backup ids of db"):
        match_backup(ids, "02201", "db")
    for given in ("ffff", "", "…"):
        with pytest.raises(CliError, match=r"no backup .* of db"):
            match_backup(ids, given, "db")


def test_the_run_example_keeps_the_variable_for_the_jobs_shell() -> None:
    help_text = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    example = " ".join(help_text.split("Example: ", 1)[1].split(" (", 1)[0].split())
    assert example.startswith("orkestr run -- ")
    # Pasted into the user's shell (where DATABASE_URL is unset), the job's argv must still
    # name the variable, for the job's own shell to expand.
    printed = subprocess.run(
        ["bash", "-c", example.replace("orkestr run --", "printf '%s\\n'", 1)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "$DATABASE_URL" in printed, printed


def test_sleep_status_says_when_the_plan_keeps_an_add_on_awake() -> None:
    disabled = {"type": "Sleeping", "status": "False", "reason": "Disabled",
                "message": "the plan keeps it awake"}  # fmt: skip
    awake = dict(disabled, reason="Awake", message="serving clients directly")
    client = {"source": "10.200.1.5:40000", "via": "direct"}
    assert sleep_summary({"conditions": [disabled], "clients": []}) == (
        "It never sleeps: the plan keeps it awake."
    )
    assert sleep_summary({"conditions": [awake], "clients": []}).startswith("No client")
    assert sleep_summary({"conditions": [], "clients": [client]}).startswith("1 client")


def test_a_verified_backup_says_what_its_test_restore_compared() -> None:
    assert describe_counts({"keys": 203}) == "its 203 key(s)"
    assert (
        describe_counts({"public.orders": 1000, "public.items": 5}) == "1005 row(s) in 2 table(s)"
    )
    assert describe_counts({}) == "an empty database"


def test_the_first_backup_hint_says_what_the_plan_allows() -> None:
    # The probe of issue 9: on Starter the empty list suggested `capture`, which Starter
    # refuses.
    def plan(name: str, manual: int, days: int) -> dict[str, object]:
        return {"name": name, "manual_backups_per_day": manual, "backup_retention_days": days}

    assert first_backup_hint("db", plan("pro", 3, 7)) == "`orkestr backups capture db`"
    starter = first_backup_hint("db", plan("starter", 0, 0))
    assert "capture" not in starter and "plan 'starter' takes no backups" in starter
    # The plans are the operator's (controller/plans.toml): none is named here.
    assert "Pro" not in starter and "orkestr projects plan NAME PLAN" in starter
    assert "backups schedule db --on" in first_backup_hint("db", plan("nightly", 0, 7))


def test_a_restore_that_does_not_fit_beside_the_live_database_says_what_to_do() -> None:
    why = beside_refusal("b1", 600 * 2**20, 500 * 2**20, 1024 * 2**20, "pro")
    assert why is not None
    hint = _hint(409, "plan_limit_reached", why)
    assert hint.startswith("free the space the message names in the live database"), hint
    assert "orkestr projects plan" in hint and "move it back" in hint, hint


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--timeout", "nan", "--", "true"),  # was sent as NaN: "body is not valid JSON"
        ("run", "--timeout", "inf", "--", "true"),
        ("run", "--timeout", "0", "--", "true"),
        ("addons", "wait", "db", "--timeout", "nan"),  # was a wait that never ended
        ("addons", "create", "db", "--wait", "--timeout", "inf"),
        ("backups", "capture", "db", "--wait", "--timeout", "nan"),
        ("backups", "restore", "db", "ab12", "--wait", "--timeout", "-1"),
    ],
)
def test_a_timeout_must_be_a_finite_number_of_seconds(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    # Refused before any request: the address is one nothing listens on.
    env = {"ORKESTR_CONFIG": str(tmp_path / "c.json"), "ORKESTR_API": "http://127.0.0.1:1"}
    result = CliRunner().invoke(main, list(args), env=env | {"ORKESTR_TOKEN": "t"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--timeout'" in result.output, result.output
    assert "seconds" in result.output and "cannot reach" not in result.output


def test_a_deploy_command_with_an_open_quote_is_refused_before_any_request(
    tmp_path: Path,
) -> None:
    env = {"ORKESTR_CONFIG": str(tmp_path / "c.json"), "ORKESTR_API": "http://127.0.0.1:1"}
    args = ["deploy", "--app", "web=debian:12", "--command", "web=sh -c 'exec serve"]
    result = CliRunner().invoke(main, args, env=env | {"ORKESTR_TOKEN": "t"})
    assert result.exit_code == 1 and result.exception is not None, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    assert "cannot be split into words: No closing quotation" in result.output, result.output
    assert "hint: close the quotes" in result.output


def test_a_budget_refusal_says_to_wait_and_pace() -> None:
    # 429 from the project's write or read budget (controller/write_budget.py).
    assert "pace its writes" in _hint(429, "too_many_writes")
    reads = _hint(429, "too_many_reads")
    assert reads.startswith("wait the seconds the message names") and "poll less often" in reads
