"""Upload a finished dictionary folder to the HuggingFace hub, with a generated model card.

The folder lands in the repo under its own name (`<repo>/<folder name>/cfg.json`, ...), which is
what SAELens's `SAE.from_pretrained(repo_id, sae_id)` expects with `sae_id` = that name, so several
dictionaries (a sweep, several sites) share one repo. A failed upload never touches the local
files: the error says why and the folder can be published again later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from saetrain.config import PublishConfig
from saetrain.errors import PublishError
from saetrain.export.model_card import write_model_card
from saetrain.export.saelens import CFG_FILE

log = logging.getLogger(__name__)

# Leftovers of interrupted atomic writes (saetrain.atomic) are never uploaded.
IGNORE_PATTERNS = [".*.tmp", "**/.*.tmp"]


def resolve_token(cfg: PublishConfig) -> str:
    """publish.token, else HF_TOKEN, else the token saved by `hf auth login`; none is an error."""
    from huggingface_hub import get_token  # here: only a run that publishes needs the hub

    token = cfg.token or get_token()
    if not token:
        raise PublishError(
            f"publish.repo_id={cfg.repo_id!r} needs a HuggingFace token with write access, and "
            "none is configured: set publish.token=<token>, export HF_TOKEN=<token>, or run "
            "`hf auth login` (older huggingface_hub: `huggingface-cli login`)"
        )
    return token


def check_publish(cfg: PublishConfig) -> str:
    """Check repo_id's form and find the token; run() calls it before training, so a missing
    token fails in seconds rather than after the run. Returns the token."""
    if not cfg.repo_id:
        raise PublishError("publish.repo_id is not set; nothing to publish")
    if cfg.repo_id.count("/") != 1 or not all(cfg.repo_id.split("/")):
        raise PublishError(
            f"publish.repo_id={cfg.repo_id!r} is not valid; use the form <user or org>/<name>"
        )
    return resolve_token(cfg)


def publish_folder(
    folder: str | Path,
    cfg: PublishConfig,
    metrics: dict[str, Any],
    path_in_repo: str | None = None,
) -> str:
    """Write the model card into `folder`, upload the folder to `cfg.repo_id`; return its URL."""
    # Imported here: HfApi takes a quarter of a second, and only a run that publishes needs it.
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    token = check_publish(cfg)
    if not (folder / CFG_FILE).is_file():
        raise PublishError(f"{folder} holds no {CFG_FILE}; is it a saved dictionary folder?")
    path_in_repo = path_in_repo or folder.name
    write_model_card(folder, metrics, cfg.repo_id, path_in_repo)

    endpoint = cfg.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{cfg.repo_id} at {endpoint}"
    try:
        repo_url = api.create_repo(
            cfg.repo_id, repo_type="model", private=cfg.private, exist_ok=True
        )
        if cfg.revision != "main":  # upload_folder needs the branch to exist
            api.create_branch(cfg.repo_id, branch=cfg.revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=cfg.repo_id,
            repo_type="model",
            path_in_repo=path_in_repo,
            revision=cfg.revision,
            commit_message=f"saetrain: upload {path_in_repo}",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except OfflineModeIsEnabled:
        raise PublishError(
            f"could not upload {folder} to {where}: HF_HUB_OFFLINE is set; unset it to publish "
            f"(the files are kept in {folder})"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PublishError(
            f"could not upload {folder} to {where}: HTTP {status}: {reason} (the files are kept in "
            f"{folder}; check publish.token's write access and publish.revision={cfg.revision!r})"
        ) from None
    except (OSError, ValueError) as e:
        # httpx's connection errors, timeouts and malformed answers; OSError covers sockets.
        raise PublishError(
            f"could not upload {folder} to {where}: the hub is unreachable or answered "
            f"unexpectedly: {type(e).__name__}: {e} (the files are kept in {folder}; check "
            "publish.endpoint / HF_ENDPOINT and the network)"
        ) from None
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise PublishError(
                f"could not upload {folder} to {where}: the hub is unreachable: "
                f"{type(e).__name__}: {e} (the files are kept in {folder}; check "
                "publish.endpoint / HF_ENDPOINT and the network)"
            ) from None
        raise
    url = f"{str(repo_url).rstrip('/')}/tree/{cfg.revision}/{path_in_repo}"
    log.info("published %s to %s", folder, url)
    return url
