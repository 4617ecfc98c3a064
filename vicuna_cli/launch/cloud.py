"""Start and manage recipes through SkyPilot's Python SDK (0.9+: every call returns a request id,
which `sky.stream_and_get` follows to its result, streaming its logs)."""

from __future__ import annotations

from typing import Any

from ..core import console
from ..core.errors import VicunaError
from ..core.extras import require
from .recipe import Recipe


def _sky() -> Any:
    return require("sky", "sky", "vicuna launch")


def _call(what: str, request: Any) -> Any:
    """Follow a request to its result; SkyPilot's failures become one line with what to do."""
    sky = _sky()
    try:
        return sky.stream_and_get(request)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # SkyPilot's own exceptions, or a request that failed on its API server
        message = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise VicunaError(f"{what}: {message}", hint=_hint(exc)) from None


def _hint(exc: Exception) -> str:
    name = type(exc).__name__
    if "Credential" in name or "NoCloudAccess" in name or "Identity" in name:
        return "run `sky check` and set up one cloud's credentials"
    if "ResourcesUnavailable" in name:
        return "no zone had the resources; try other accelerators in the recipe, or later"
    if "ApiServer" in name:
        return "the SkyPilot API server is not reachable: `sky api start`, or check `sky api info`"
    return "run again with --debug, or see SkyPilot's own logs (`sky api logs`)"


def check_credentials() -> list[str]:
    """SkyPilot's credential check, summarised: the enabled clouds, or one error with the fix."""
    sky = _sky()
    enabled = _call("SkyPilot's credential check", sky.check(None, verbose=False))
    clouds = list(enabled or [])
    if not clouds:
        raise VicunaError("no cloud is enabled: SkyPilot's check found no usable credentials",
                          hint="run `sky check` to see why; e.g. `gcloud auth application-default login` or `aws configure`")
    return [str(c) for c in clouds]


def launch(recipe: Recipe, name: str, down: bool = False) -> Any:
    sky = _sky()
    clouds = check_credentials()
    console.info(f"clouds enabled: {', '.join(clouds)}; starting {recipe.path.name} as a {recipe.kind} named {name!r}")
    if recipe.kind == "job":
        return _call("sky.jobs.launch", sky.jobs.launch(recipe.task, name=name))
    if recipe.kind == "service":
        return _call("sky.serve.up", sky.serve.up(recipe.task, service_name=name))
    return _call("sky.launch", sky.launch(recipe.task, cluster_name=name, down=down))


def status(kind: str) -> Any:
    sky = _sky()
    if kind == "job":
        return _call("sky.jobs.queue", sky.jobs.queue(refresh=False))
    if kind == "service":
        return _call("sky.serve.status", sky.serve.status(None))
    return _call("sky.status", sky.status())


def logs(kind: str, name: str, follow: bool = True) -> None:
    sky = _sky()
    try:
        if kind == "job":
            sky.jobs.tail_logs(name=name, follow=follow)
        elif kind == "service":
            sky.serve.tail_logs(name, target="replica", replica_id=1, follow=follow)
        else:
            sky.tail_logs(name, job_id=None, follow=follow)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise VicunaError(f"logs of {kind} {name!r}: {' '.join(str(exc).split())[:400]}", hint=_hint(exc)) from None


def down(kind: str, name: str) -> Any:
    sky = _sky()
    if kind == "job":
        return _call("sky.jobs.cancel", sky.jobs.cancel(name=name))
    if kind == "service":
        return _call("sky.serve.down", sky.serve.down(name))
    return _call("sky.down", sky.down(name))
