"""Where ``clip.load``'s weights come from: a name, a hub repository, a folder or a file, turned
into a state dict and the configuration to build it with.

- OpenAI's nine names: downloaded from OpenAI's URLs and verified (:mod:`clip.download`).
- Registry names (``"ViT-L-14/dfn2b"``, :mod:`clip.registry`): the hub repository they name, with
  the registry's configuration, which is authoritative (a hub config that omits ``quick_gelu``,
  as some do, must not turn QuickGELU weights into GELU ones).
- ``"hf-hub:ORG/REPO[@REVISION]"``: a hub repository in open_clip's layout (:mod:`clip.hub`).
- A folder in that layout, or a checkpoint file (:mod:`clip.checkpoint`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import Tensor

from clip.checkpoint import read_checkpoint, read_folder, saved_config
from clip.config import CLIPConfig, UnsupportedModelError
from clip.download import MODELS, available_models, download
from clip.folder import check_describes, config_from_open_clip, find_weights, read_config_file

__all__ = ["HUB_PREFIX", "WeightsSource", "open_weights", "resolve_config"]

HUB_PREFIX = "hf-hub:"

PathLike = Union[str, "os.PathLike[str]"]
ConfigArg = Union[CLIPConfig, Mapping[str, Any], str, "os.PathLike[str]"]


@dataclass
class WeightsSource:
    """Weights ready to build a model from.

    Attributes:
        state_dict: OpenAI-format tensors on the CPU.
        config: the configuration to build with; None to read it from the shapes (OpenAI's
            values for the rest).
        is_archive: the weights came from an OpenAI TorchScript archive.
        traceable: ``jit=True`` traces the model (every source but a bare state-dict file).
    """

    state_dict: dict[str, Tensor]
    config: Optional[CLIPConfig]
    is_archive: bool = False
    traceable: bool = True


def open_weights(
    name: PathLike, download_root: Optional[PathLike] = None, config: Optional[ConfigArg] = None
) -> WeightsSource:
    """Fetch (if needed) and read the weights ``name`` refers to, with their configuration.

    Args:
        name: a name, ``hf-hub:`` repository, folder or file (see :func:`clip.load`).
        download_root: cache directory for downloads.
        config: replaces the weights' own configuration (see :func:`resolve_config`).

    Returns:
        The state dict and configuration.

    Raises:
        RuntimeError: if ``name`` is nothing of the above.
    """
    root = None if download_root is None else os.path.expanduser(os.fspath(download_root))
    if isinstance(name, str) and name in MODELS:
        state_dict, is_archive = read_checkpoint(download(MODELS[name], root))
        return WeightsSource(state_dict, resolve_config(config, state_dict), is_archive)
    if isinstance(name, str) and name.startswith(HUB_PREFIX):
        from clip import hub

        repo_id, revision = hub.parse_hub_name(name)
        folder = hub.download_folder(
            repo_id, revision=revision, cache_dir=root, config_required=config is None
        )
        return _from_folder(folder, config)
    if isinstance(name, str) and _is_registered(name):
        return _from_registry(name, root, config)
    path = os.path.expanduser(os.fspath(name))
    if os.path.isdir(path):
        return _from_folder(path, config)
    if os.path.isfile(path):
        return _from_file(path, config)
    raise RuntimeError(_not_found(str(name)))


def _from_folder(folder: str, config: Optional[ConfigArg]) -> WeightsSource:
    if config is None:
        state_dict, found = read_folder(folder)
        return WeightsSource(state_dict, found)
    state_dict, _ = read_checkpoint(find_weights(folder))
    return WeightsSource(state_dict, resolve_config(config, state_dict))


def _from_file(path: str, config: Optional[ConfigArg]) -> WeightsSource:
    state_dict, is_archive = read_checkpoint(path)
    if config is None:
        stored = saved_config(path)
        found = None if stored is None else config_from_open_clip(stored, state_dict)
        if found is None:
            found = _shapes_alone(path, state_dict)
        return WeightsSource(state_dict, found, is_archive, traceable=is_archive)
    return WeightsSource(state_dict, resolve_config(config, state_dict), is_archive, is_archive)


def _shapes_alone(path: str, state_dict: Mapping[str, Tensor]) -> CLIPConfig:
    """The configuration of weights without a config: shapes, and OpenAI's values for the rest.

    Raises:
        ValueError: if OpenAI's values do not fit the shapes (heads of 64 for an image tower
            whose width is not a multiple of 64), saying to pass ``config=``.
    """
    try:
        return CLIPConfig.from_state_dict(state_dict)
    except UnsupportedModelError:
        raise
    except ValueError as e:
        raise ValueError(
            f"{path!r}: {e}. Weights not in OpenAI's exact architecture need their config: pass "
            "config= (their open_clip_config.json, a registry name or a clip.config.CLIPConfig)"
        ) from e


def _is_registered(name: str) -> bool:
    from clip import registry

    return registry.is_registered(name)


def _from_registry(name: str, root: Optional[str], config: Optional[ConfigArg]) -> WeightsSource:
    from clip import registry

    entry = registry.get(name)
    if entry.openai_name is not None:
        state_dict, is_archive = read_checkpoint(download(MODELS[entry.openai_name], root))
    else:
        from clip import hub

        assert entry.hub_repo is not None
        # The file fetch() verified, not whatever else the snapshot holds.
        fetched = hub.fetch(
            entry.hub_repo, cache_dir=root, weights=entry.filenames, config_required=False
        )
        state_dict, is_archive = read_checkpoint(fetched.weights)
    if config is None:
        check_describes(entry.config, state_dict)
    chosen = entry.config if config is None else resolve_config(config, state_dict)
    return WeightsSource(state_dict, chosen, is_archive)


def resolve_config(
    config: Optional[ConfigArg], state_dict: Mapping[str, Tensor]
) -> Optional[CLIPConfig]:
    """The :class:`CLIPConfig` a ``config=`` argument gives for these weights.

    Args:
        config: a :class:`CLIPConfig`; an open_clip config (the dict, or the path of an
            ``open_clip_config.json`` or a model folder); a name from
            :func:`clip.available_weights`; or None.
        state_dict: the weights it must describe.

    Returns:
        The configuration, or None for ``config=None``.

    Raises:
        ValueError: if ``config`` is none of the above, or does not describe the weights.
    """
    if config is None:
        return None
    if isinstance(config, CLIPConfig):
        check_describes(config, state_dict)
        return config
    if isinstance(config, Mapping):
        return config_from_open_clip(config, state_dict)
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if isinstance(config, str) and _is_registered(text):
            from clip import registry

            found = registry.get(text).config
            check_describes(found, state_dict)
            return found
        path = os.path.expanduser(text)
        if os.path.isdir(path):
            path = os.path.join(path, "open_clip_config.json")
        if os.path.isfile(path):
            return config_from_open_clip(read_config_file(path), state_dict)
        raise ValueError(
            f"config={text!r} is neither a registry name (clip.available_weights()) nor an "
            "existing open_clip_config.json"
        )
    raise TypeError(
        "config must be a clip.config.CLIPConfig, an open_clip config dict, the path of an "
        f"open_clip_config.json, or a registry name; got {type(config).__name__}"
    )


def _not_found(name: str) -> str:
    names = list(available_models())
    try:
        from clip import registry

        names += registry.available_weights()
    except ImportError:  # pragma: no cover - the registry ships with the package
        pass
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Model {name} not found; available models = {available_models()}, more weights in "
        "clip.available_weights(), 'hf-hub:ORG/REPO', or pass the path of a checkpoint file "
        f"or model folder.{hint}"
    )
