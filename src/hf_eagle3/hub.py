"""Publishing a draft head on the Hugging Face Hub together with its model card."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from .checkpoint_formats import NATIVE_LAYOUT, checkpoint_layout, covering_max_positions
from .model_card import create_model_card

if TYPE_CHECKING:
    from .modeling_eagle3 import Eagle3DraftModel


# Failures before any answer from the Hub (no network, DNS, timeouts) surface as the HTTP client's own errors (httpx, or
# httpx2 in recent huggingface_hub releases); the Hub's answers come as HfHubHTTPError, derived from the same base.
_HTTP_CLIENT_ERROR = next(
    (base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"), HfHubHTTPError
)


@contextmanager
def explaining_network_errors(repo_id: str, token: bool | str | None) -> Iterator[None]:
    """Turn a connection failure of the HTTP client into an error naming the Hub endpoint, the token and the fix."""
    try:
        yield
    except _HTTP_CLIENT_ERROR as error:
        if isinstance(error, HfHubHTTPError):
            raise
        if isinstance(token, str):
            found = "given as `token=`"
        elif token is not False and get_token() is not None:
            found = "found by huggingface_hub (HF_TOKEN or `hf auth login`)"
        else:
            found = "none: run `hf auth login` or pass `token=`"
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub at {constants.ENDPOINT} to push {repo_id} "
            f"({type(error).__name__}: {error}); no commit was made. Check the network connection (or HF_ENDPOINT, "
            f"for a mirror) and retry; a push also needs a write token (token: {found}). Meanwhile "
            "`save_pretrained` keeps the head on disk."
        ) from error


def push_to_hub(
    model: Eagle3DraftModel,
    repo_id: str,
    *,
    format: str = NATIVE_LAYOUT,
    target_max_position_embeddings: int | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    base_model: str | None = None,
    training_data: str | None = None,
    datasets: list[str] | None = None,
    acceptance: dict[str, float] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload the head (in `format`) and its rendered model card as one commit; returns the commit info.

    transformers' own `push_to_hub` would keep the repo's README or write a generic one; a draft head's card must
    say which target it drafts for and how to run it, so the card is rendered here (`create_model_card`, which
    documents the card arguments) and uploaded with the weights. An existing README.md is replaced.
    """
    from . import __version__

    checkpoint_layout(format)  # an unknown format fails before anything is created on the hub
    api = HfApi(library_name="hf-eagle3", library_version=__version__)
    with explaining_network_errors(repo_id, token), tempfile.TemporaryDirectory() as save_directory:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        model.save_pretrained(
            save_directory,
            format=format,
            target_max_position_embeddings=target_max_position_embeddings,
            max_shard_size=max_shard_size,
        )
        with covering_max_positions(model.config, target_max_position_embeddings):
            card = create_model_card(
                model.config,
                repo_id,
                format,
                base_model=base_model,
                training_data=training_data,
                datasets=datasets,
                acceptance=acceptance,
                license=license,
                tags=tags,
            )
        card.save(os.path.join(save_directory, "README.md"))
        # The step transformers' own `push_to_hub` ends with: one commit of every file, creating `revision`'s
        # branch when needed.
        return model._upload_modified_files(
            save_directory,
            repo_id,
            files_timestamps={},
            commit_message=commit_message or "Upload EAGLE-3 draft head",
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


__all__ = ["push_to_hub"]
