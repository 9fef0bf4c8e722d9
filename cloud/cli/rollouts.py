"""`diredi rollouts` and `diredi jobs`: start, steer and follow rollouts, and follow pipeline jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud.cli.common import ExitCode, console, fail
from cloud.cli.remote import (
    Column,
    Interval,
    JsonOut,
    Limit,
    Offset,
    Profile,
    Reason,
    Timeout,
    api,
    cell,
    emit,
    paged,
    uuid_argument,
    watch,
)
from cloud.exceptions import CloudError

rollouts_app = typer.Typer(help="Rollouts: start, list, show, pause, resume, halt, roll back, watch.")
jobs_app = typer.Typer(help="Pipeline jobs: list, show, cancel, retry, watch.")
# A halted rollout is being rolled back (the engine's next pass finishes it): a watch waits for that.
TERMINAL_ROLLOUT = {"completed", "rolled_back", "stopped"}
TERMINAL_JOB = {"succeeded", "failed", "cancelled"}


ROLLOUT_COLUMNS: list[Column] = [
    ("id", lambda r: r.id),
    ("cohort", lambda r: r.cohort_id),
    ("model", lambda r: r.model_id),
    ("for", lambda r: r.selector or r.scope),
    ("state", lambda r: r.state),
    ("wave", lambda r: r.current_wave),
    ("progress", lambda r: f"{r.progress:.0%}"),
    ("targets", lambda r: {state: n for state, n in r.targets.items() if n}),
    ("reason", lambda r: r.reason),
]


@rollouts_app.command("create")
def rollouts_create(
    model_id: str,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="These devices, in order (the first are the canary).")
    ] = None,
    selector: Annotated[
        str | None,
        typer.Option(
            "--selector",
            "-l",
            help="The devices of the model's cohort these labels select, resolved again before each wave.",
        ),
    ] = None,
    plan: Annotated[Path | None, typer.Option(help="A JSON file of waves and halt thresholds.")] = None,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Start a staged rollout of an approved edge model: its cohort's active devices (online first),
    or the devices named or selected; the canary wave first."""
    if device and selector:
        raise fail(CloudError("--device and --selector exclude each other"), ExitCode.ERROR)
    waves = _plan(plan) if plan is not None else None
    with api(profile) as client:
        rollout = client.start_rollout(
            model_id, plan=waves, device_ids=list(device) if device else None, selector=selector
        )
    emit(rollout, ROLLOUT_COLUMNS, as_json=as_json, title="rollout started")


def _plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(CloudError(f"cannot read the plan {path}: {exc}"), ExitCode.ERROR) from None
    if not isinstance(plan, dict):
        raise fail(CloudError(f"the plan {path} must be a JSON object"), ExitCode.ERROR)
    return plan


@rollouts_app.command("list")
def rollouts_list(
    cohort: Annotated[str | None, typer.Option(help="Only this cohort.")] = None,
    state: Annotated[str | None, typer.Option(help="e.g. running, paused, completed, halted.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """List rollouts, newest first."""
    with api(profile) as client:
        page = client.rollouts(cohort_id=cohort, state=state, limit=limit, offset=offset)
    emit(
        page.items,
        ROLLOUT_COLUMNS,
        as_json=as_json,
        title=paged("rollouts", page.total, len(page.items), offset),
    )


@rollouts_app.command("show")
def rollouts_show(rollout_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """One rollout and its targets by wave."""
    key = uuid_argument(rollout_id, "rollout")
    with api(profile) as client:
        rollout = client.rollout(key)
        targets = client.rollout_targets(key, limit=500)
    if as_json:
        data = {
            **rollout.model_dump(mode="json"),
            "target_list": [t.model_dump(mode="json") for t in targets.items],
        }
        console.print_json(json.dumps(data))
        return
    emit(rollout, ROLLOUT_COLUMNS, as_json=False)
    emit(
        targets.items,
        [("device", lambda t: t.device_id), ("wave", lambda t: t.wave), ("state", lambda t: t.state),
         ("reason", lambda t: t.reason), ("updated", lambda t: t.updated_at)],
        as_json=False,
        title=paged("targets", targets.total, len(targets.items), 0),
    )  # fmt: skip


def _steer(action: str, rollout_id: str, reason: str, as_json: bool, profile: str | None) -> None:
    key = uuid_argument(rollout_id, "rollout")
    with api(profile) as client:
        rollout = client.steer(key, action, reason)
    emit(rollout, ROLLOUT_COLUMNS, as_json=as_json)


@rollouts_app.command("pause")
def rollouts_pause(
    rollout_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Pause a rollout: no further device is offered the model until it resumes."""
    _steer("pause", rollout_id, reason, as_json, profile)


@rollouts_app.command("resume")
def rollouts_resume(
    rollout_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Resume a paused rollout where it stopped."""
    _steer("resume", rollout_id, reason, as_json, profile)


@rollouts_app.command("halt")
def rollouts_halt(
    rollout_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Halt a rollout without rolling it back: no further device is offered the model; the devices keep
    what they run. `rollback` afterwards undoes it."""
    _steer("halt", rollout_id, reason, as_json, profile)


@rollouts_app.command("rollback")
def rollouts_rollback(
    rollout_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None
) -> None:
    """Roll a rollout back: every device it reached goes back to the model it ran before."""
    _steer("rollback", rollout_id, reason, as_json, profile)


@rollouts_app.command("watch")
def rollouts_watch(
    rollout_id: str, interval: Interval = 2.0, timeout: Timeout = 3600, profile: Profile = None
) -> None:
    """Follow a rollout until it completes (exit 0), or is rolled back or halted (exit 1)."""
    key = uuid_argument(rollout_id, "rollout")
    with api(profile) as client:
        final = watch(
            lambda: client.rollout(key),
            describe=lambda r: f"{r.state.value} wave {r.current_wave} {cell(r.targets)}",
            done=lambda r: r.state.value in TERMINAL_ROLLOUT,
            fraction=lambda r: r.progress,
            interval=interval,
            timeout=timeout,
            label=f"rollout {key}",
        )
    console.print(f"rollout {key}: {final.state.value}" + (f" ({final.reason})" if final.reason else ""))
    if final.state.value != "completed":
        raise typer.Exit(ExitCode.FAILED)


# jobs

JOB_COLUMNS: list[Column] = [
    ("id", lambda j: j.id),
    ("type", lambda j: j.type),
    ("cohort", lambda j: j.cohort_id),
    ("state", lambda j: j.state),
    ("stage", lambda j: j.stage),
    ("progress", lambda j: f"{j.progress:.0%}"),
    ("attempts", lambda j: j.attempts),
    ("created", lambda j: j.created_at),
    ("error", lambda j: j.error),
]


@jobs_app.command("list")
def jobs_list(
    cohort: Annotated[str | None, typer.Option(help="Only this cohort.")] = None,
    state: Annotated[str | None, typer.Option(help="e.g. queued, running, succeeded, failed.")] = None,
    job_type: Annotated[str | None, typer.Option("--type", help="e.g. rd_cycle.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """List pipeline jobs, newest first."""
    with api(profile) as client:
        page = client.jobs(cohort_id=cohort, state=state, type=job_type, limit=limit, offset=offset)
    emit(page.items, JOB_COLUMNS, as_json=as_json, title=paged("jobs", page.total, len(page.items), offset))


@jobs_app.command("show")
def jobs_show(job_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """One job, with its result."""
    with api(profile) as client:
        job = client.job(uuid_argument(job_id, "job"))
    emit(job, [*JOB_COLUMNS, ("result", lambda j: j.result)], as_json=as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, reason: Reason = "", as_json: JsonOut = False, profile: Profile = None) -> None:
    """Cancel a pending or running job; a cycle's knowledge waits for the next one."""
    key = uuid_argument(job_id, "job")
    with api(profile) as client:
        job = client.cancel_job(key, reason)
    emit(job, JOB_COLUMNS, as_json=as_json)


@jobs_app.command("retry")
def jobs_retry(job_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """Run a failed or cancelled RD cycle again, as a new job."""
    key = uuid_argument(job_id, "job")
    with api(profile) as client:
        job = client.retry_job(key)
    emit(job, JOB_COLUMNS, as_json=as_json, title=f"retry of {key}")


@jobs_app.command("watch")
def jobswatch(
    job_id: str, interval: Interval = 2.0, timeout: Timeout = 3600, profile: Profile = None
) -> None:
    """Follow a job until it succeeds (exit 0) or fails (exit 1)."""
    key = uuid_argument(job_id, "job")
    with api(profile) as client:
        final = watch(
            lambda: client.job(key),
            describe=lambda j: f"{j.state.value} {j.stage}".strip(),
            done=lambda j: j.state.value in TERMINAL_JOB,
            fraction=lambda j: j.progress,
            interval=interval,
            timeout=timeout,
            label=f"job {key}",
        )
    console.print(f"job {key}: {final.state.value}" + (f" ({final.error})" if final.error else ""))
    if final.state.value != "succeeded":
        raise typer.Exit(ExitCode.FAILED)
