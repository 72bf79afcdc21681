"""GuidanceModelNotFoundError: one line with the model id, the cause and how to point at a local folder."""

from __future__ import annotations

import pytest

from recipes.guidance.loading import GuidanceModelNotFoundError, load_pretrained


class _Failing:
    """A ``from_pretrained`` that fails like huggingface_hub does, with ``cause`` as the root error."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause

    def from_pretrained(self, name_or_path, **kwargs):
        try:
            raise self.cause
        except BaseException as error:
            raise OSError(f"We couldn't connect or find {name_or_path} in the cached files") from error


class ConnectionError(OSError):
    pass


class GatedRepoError(OSError):
    pass


HINT = "guidance.model.pretrained_model_name_or_path"


def _message(monkeypatch, offline: bool, cause: BaseException, name: str = "org/model") -> str:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(GuidanceModelNotFoundError) as error:
        load_pretrained(_Failing(cause), name, "unet", config_hint=HINT)
    message = str(error.value)
    assert "\n" not in message
    assert f"set {HINT}=/path/to/folder" in message  # how to point at a local folder
    return message


def test_offline_mode_is_named_as_the_cause(monkeypatch):
    message = _message(monkeypatch, True, FileNotFoundError("no cache"))
    assert message.startswith("Guidance model 'org/model' (part 'unet') is not available")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message
    assert "`hf download org/model`" in message


def test_no_network_and_gated_repositories_are_told_apart(monkeypatch):
    assert "the hub cannot be reached (no network)" in _message(
        monkeypatch, False, ConnectionError("refused")
    )
    gated = _message(monkeypatch, False, GatedRepoError("401"))
    assert "gated" in gated and "hf auth login" in gated


def test_a_missing_local_folder_or_part_is_named(monkeypatch, tmp_path):
    missing = _message(monkeypatch, True, FileNotFoundError(), name=str(tmp_path / "nowhere"))
    assert f"the local folder {tmp_path / 'nowhere'} does not exist" in missing
    assert "hf download <hub id> --local-dir" in missing
    assert "has no 'unet' subfolder" in _message(monkeypatch, True, FileNotFoundError(), name=str(tmp_path))
