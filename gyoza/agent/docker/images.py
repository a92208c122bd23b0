"""Making sure an op's image is on the machine: use it when present, else pull it.

The SDK's ``pull`` waits without any timeout, so a registry that stops answering would
hold an attempt forever. This pull streams the daemon's progress messages with a read
timeout instead: it may take as long as it needs while bytes keep coming, and fails once
nothing has arrived for ``stall_timeout_s``. Blocking; call it from a thread.
"""

from __future__ import annotations

import json
from typing import Any

import docker.errors
import requests
from docker import auth
from docker.utils import parse_repository_tag


class ImageUnavailable(Exception):
    """The image is not on the machine and could not be pulled (the daemon's reason)."""


def ensure_image(api: Any, image: str, *, stall_timeout_s: float) -> bool:
    """Return True when the image had to be pulled, False when it was already present.

    Raises
    ------
    ImageUnavailable
        The pull failed or stalled.
    docker.errors.APIError
        The daemon failed to answer the inspect.
    """
    try:
        api.inspect_image(image)
        return False
    except docker.errors.ImageNotFound:
        pass
    pull_image(api, image, stall_timeout_s=stall_timeout_s)
    return True


def pull_image(api: Any, image: str, *, stall_timeout_s: float) -> None:
    """Pull ``image`` (``latest`` when it names no tag or digest).

    Raises
    ------
    ImageUnavailable
        The daemon refused or failed the pull, or sent nothing for ``stall_timeout_s``.
    """
    repository, tag = parse_repository_tag(image)
    params = {"fromImage": repository, "tag": tag or "latest"}
    headers = {}
    registry, _ = auth.resolve_repository_name(repository)
    header = auth.get_config_header(api, registry)
    if header:
        headers["X-Registry-Auth"] = header
    try:
        response = api._post(
            api._url("/images/create"),
            params=params,
            headers=headers,
            stream=True,
            timeout=(stall_timeout_s, stall_timeout_s),
        )
        with response:
            if response.status_code >= 400:
                raise ImageUnavailable(f"pull {image}: {_error_text(response)}")
            # A pull that fails after it began reports the error as a progress message.
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("error"):
                    raise ImageUnavailable(f"pull {image}: {message['error']}")
    except requests.exceptions.Timeout:
        raise ImageUnavailable(
            f"pull {image}: the Docker daemon sent nothing for {stall_timeout_s:g} s"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise ImageUnavailable(f"pull {image}: {exc}") from None
    # The daemon can end a pull stream without an error yet without the image.
    try:
        api.inspect_image(image)
    except docker.errors.ImageNotFound:
        raise ImageUnavailable(f"pull {image}: the image is still missing after the pull") from None


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {response.status_code}"
