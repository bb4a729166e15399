"""
Checks of a checkpoint's files before they are loaded, so that a truncated download, a broken shard index or a
config.json that does not describe the weights fails with the file's name and the fix, not a safetensors or
state-dict traceback.

The weight checks read only the safetensors headers (a few kilobytes) and compare the byte ranges they declare with
the file sizes; no tensor is read.
"""

import json
import os
import struct
from pathlib import Path

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


# A safetensors file: an 8-byte little-endian header length, a JSON header of that many bytes, then the tensor data.
_HEADER_LENGTH_BYTES = 8
# safetensors' own limit on the header size; a larger length is not a safetensors file.
_MAX_HEADER_BYTES = 100_000_000

_SUB_CONFIG_OF_MODULE = (
    # (key fragment, the sub-configs whose fields set that module's shapes)
    ("gen_vision_tower.", ("gen_vision_config",)),
    ("vision_tower.", ("vision_config",)),
    ("language_model.", ("text_config",)),
    ("lm_head.", ("text_config",)),
    ("und_projector.", ("vision_config", "text_config")),
    ("gen_projector.", ("gen_vision_config", "text_config")),
    ("gen_head.", ("text_config", "gen_vision_config")),
)


class CorruptCheckpointError(OSError):
    """A checkpoint's weights file or shard index is missing, incomplete or corrupt."""


class ConfigWeightsMismatchError(ValueError, RuntimeError):
    """
    A checkpoint's config.json describes tensors of other shapes than its weights hold. Also a `RuntimeError`, which
    transformers raises for a size mismatch, so that code catching that still does.
    """


def _redownload_hint(path: Path) -> str:
    return (
        f"The file is incomplete or corrupt (an interrupted download or save): download it again, or save the "
        f"checkpoint again with save_pretrained, into {path.parent}."
    )


def read_safetensors_header(path: str | os.PathLike, role: str = "weights") -> dict[str, dict]:
    """
    Reads the header of a safetensors file and checks it against the file's size, without reading any tensor.

    Args:
        path (`str` or `os.PathLike`): the `.safetensors` file.
        role (`str`, *optional*): what the file holds, for the error message (`"model weights"`, `"decoder weights"`).

    Returns:
        `dict[str, dict]`: per tensor name, its `dtype`, `shape` and `data_offsets` as the header declares them
        (the `__metadata__` entry left out).

    Raises:
        `CorruptCheckpointError` (an `OSError`): the file is missing, shorter or longer than its header declares, or
        its header is not a safetensors header.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"The {role} file {path} does not exist. {_redownload_hint(path)}")
    size = path.stat().st_size

    def corrupt(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"The {role} file {path} ({size} bytes) {reason}. {_redownload_hint(path)}")

    if size < _HEADER_LENGTH_BYTES:
        raise corrupt("is too short to be a safetensors file")
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(_HEADER_LENGTH_BYTES))
        if header_length > _MAX_HEADER_BYTES:
            raise corrupt("does not start with a safetensors header")
        if _HEADER_LENGTH_BYTES + header_length > size:
            raise corrupt(f"is cut inside its header (the header declares {header_length} bytes)")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("has a header that is not a JSON object")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    data_end = 0
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise corrupt(f"declares no valid byte range for tensor {name!r}")
        data_end = max(data_end, offsets[1])
    expected = _HEADER_LENGTH_BYTES + header_length + data_end
    if size != expected:
        relation = "shorter" if size < expected else "longer"
        raise corrupt(f"is {relation} than its header declares ({expected} bytes)")
    return tensors


def _weights_names(variant: str | None) -> tuple[str, str]:
    if variant is None:
        return SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME
    stem, extension = SAFE_WEIGHTS_NAME.rsplit(".", 1)
    index_stem = SAFE_WEIGHTS_INDEX_NAME[: -len(".safetensors.index.json")]
    return f"{stem}.{variant}.{extension}", f"{index_stem}.{variant}.safetensors.index.json"


def check_model_weights(folder: str | os.PathLike, variant: str | None = None) -> dict[str, dict] | None:
    """
    Checks the transformers weights of a local checkpoint folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists (with `variant`: `model.<variant>.safetensors` and its index).

    Returns:
        `dict[str, dict]` or `None`: the headers' entries of every tensor (see `read_safetensors_header`), or `None`
        when the folder holds neither file (nothing to check; the loader reports what is missing).

    Raises:
        `CorruptCheckpointError`: a weights file is incomplete or corrupt, the index is not valid JSON or has no
        `weight_map`, a shard it names is missing, or a shard lacks a tensor the index places in it.
    """
    folder = Path(folder)
    single_name, index_name = _weights_names(variant)
    single, index_file = folder / single_name, folder / index_name
    if single.is_file():
        return read_safetensors_header(single, "model weights")
    if not index_file.is_file():
        return None
    return check_shard_index(index_file)


def check_shard_index(index_file: str | os.PathLike) -> dict[str, dict]:
    """
    Checks a sharded checkpoint: its `*.safetensors.index.json` and every shard it lists (headers against sizes).

    Returns:
        `dict[str, dict]`: the headers' entries of every tensor of every shard.

    Raises:
        `CorruptCheckpointError`: the index is not valid JSON or has no `weight_map`, a shard it names is missing or
        incomplete, or a shard lacks a tensor the index places in it.
    """
    index_file = Path(index_file)
    folder, index_name = index_file.parent, index_file.name
    fix = (
        f"Download the checkpoint again, or save it again with save_pretrained, so that {index_name} and every shard "
        "it lists are complete."
    )
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CorruptCheckpointError(
            f"The shard index {index_file} is corrupt: it is not a JSON object with a weight_map from tensor names to "
            f"shard files. {fix}"
        ) from None
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"The checkpoint {folder} is missing {len(missing)} of the {len(shard_names)} shards its index "
            f"{index_name} lists: {', '.join(missing)}. {fix}"
        )
    headers = {name: read_safetensors_header(folder / name, "weights shard") for name in shard_names}
    absent = [key for key, shard in weight_map.items() if key not in headers[shard]]
    if absent:
        raise CorruptCheckpointError(
            f"The shard index {index_file} places {len(absent)} tensor(s) in shards that do not hold them (first: "
            f"{absent[0]!r} in {weight_map[absent[0]]}). {fix}"
        )
    return {key: entry for header in headers.values() for key, entry in header.items()}


def check_pretrained_weights(pretrained_model_name_or_path, subfolder: str = "", variant: str | None = None):
    """
    `check_model_weights` for the arguments of `from_pretrained`: a local folder only (a Hub id is checked by
    the download's own hashes), returning its tensor headers or `None`.
    """
    if pretrained_model_name_or_path is None:
        return None
    folder = Path(pretrained_model_name_or_path) / (subfolder or "")
    if not folder.is_dir():
        return None
    return check_model_weights(folder, variant)


def _config_fields_left_out(config_file: Path, sub_config_names) -> list[str]:
    """Fields a saved sub-config carries that `config_file` leaves out (their defaults were used instead)."""
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    from transformers import AutoConfig, PretrainedConfig

    # The fields every config has (chunk_size_feed_forward, ...) set no shape; some versions do not save them.
    generic = set(PretrainedConfig().to_dict())
    left_out = []
    for name in sub_config_names:
        sub = saved.get(name)
        if not isinstance(sub, dict) or "model_type" not in sub:
            continue
        try:
            defaults = AutoConfig.for_model(sub["model_type"]).to_dict()
        except (ValueError, KeyError):
            continue
        shape_fields = [key for key, value in defaults.items() if type(value) is int and key not in generic]
        left_out += [f"{name}.{key} (defaulted to {defaults[key]})" for key in shape_fields if key not in sub]
    return left_out


def explain_config_mismatch(model_class, config, folder, tensors: dict[str, dict]) -> ConfigWeightsMismatchError | None:
    """
    The error to raise when transformers refused to load weights whose shapes differ from the model `config` builds:
    which tensors differ, which sub-config sets them and which of its fields config.json leaves out. Builds the
    model on the meta device (no memory). Returns `None` when no tensor shape differs (another failure).
    """
    with torch.device("meta"):
        expected = {name: tuple(value.shape) for name, value in model_class(config).state_dict().items()}
    mismatched = []
    for key, entry in tensors.items():
        for candidate in (key, key.removeprefix("model."), f"model.{key}"):
            if candidate in expected:
                if tuple(entry.get("shape", ())) != expected[candidate]:
                    mismatched.append((key, tuple(entry["shape"]), expected[candidate]))
                break
    if not mismatched:
        return None
    sub_configs = []
    for key, _, _ in mismatched:
        for fragment, names in _SUB_CONFIG_OF_MODULE:
            if fragment in key:
                sub_configs += [name for name in names if name not in sub_configs]
                break
    folder = Path(folder)
    config_file = folder / "config.json"
    shown = "; ".join(f"{key}: {saved} in the weights, {built} from the config" for key, saved, built in mismatched[:3])
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    left_out = _config_fields_left_out(config_file, sub_configs)
    cause = (
        f"config.json leaves out {', '.join(left_out)}"
        if left_out
        else f"the fields of {' / '.join(sub_configs) or 'the config'} differ from those the weights were saved with"
    )
    return ConfigWeightsMismatchError(
        f"The config of {folder} does not match its weights: {len(mismatched)} tensor(s) have other shapes than "
        f"{' / '.join(sub_configs) or 'the config'} gives ({shown}{more}). Probably {cause}. Restore config.json as "
        "save_pretrained wrote it with these weights."
    )


__all__ = [
    "ConfigWeightsMismatchError",
    "CorruptCheckpointError",
    "check_model_weights",
    "check_shard_index",
    "check_pretrained_weights",
    "explain_config_mismatch",
    "load_with_checked_files",
    "read_safetensors_header",
]


def _module_of(key: str) -> str | None:
    """The Pisces sub-module a weight belongs to (a fragment of `_SUB_CONFIG_OF_MODULE`), or `None`."""
    for fragment, _ in _SUB_CONFIG_OF_MODULE:
        if fragment in key and not (fragment == "vision_tower." and "gen_vision_tower." in key):
            return fragment
    return None


def _missing_from_saved_modules(missing_keys, tensors: dict[str, dict]) -> list[str]:
    """
    Missing keys of sub-modules the checkpoint does hold weights of: a config that builds more layers (or other
    modules) than were saved, left randomly initialized. Whole modules the checkpoint lacks (a `PiscesModel` checkpoint
    loaded with heads) stay transformers' warning.
    """
    saved_modules = {_module_of(key) for key in tensors} - {None}
    return sorted(key for key in missing_keys if _module_of(key) in saved_modules)


def _missing_keys_error(folder: Path, missing: list[str], tensors: dict[str, dict]) -> ConfigWeightsMismatchError:
    sub_configs = []
    for key in missing:
        for fragment, names in _SUB_CONFIG_OF_MODULE:
            if fragment == _module_of(key):
                sub_configs += [name for name in names[:1] if name not in sub_configs]
    left_out = _config_fields_left_out(folder / "config.json", sub_configs)
    cause = f"config.json leaves out {', '.join(left_out)}" if left_out else f"{' / '.join(sub_configs)} differs"
    return ConfigWeightsMismatchError(
        f"The config of {folder} builds {len(missing)} weight(s) its checkpoint does not hold (first: {missing[0]}), "
        f"in modules whose other weights it does hold: the model would be left partly random. Probably {cause}. "
        "Restore config.json as save_pretrained wrote it with these weights."
    )


def load_with_checked_files(load, model_class, *args, **kwargs):
    """
    Calls `load(*args, **kwargs)` (a `from_pretrained`) after `check_pretrained_weights`, and turns transformers'
    refusal of mismatched tensor shapes into a `ConfigWeightsMismatchError` that names the tensors and the config
    fields behind them.
    """
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    subfolder = kwargs.get("subfolder") or ""
    tensors = check_pretrained_weights(path, subfolder, kwargs.get("variant"))
    wants_loading_info = kwargs.get("output_loading_info", False)
    if tensors is not None:
        kwargs["output_loading_info"] = True
    try:
        loaded = load(*args, **kwargs)
        if tensors is None:
            return loaded
        model, loading_info = loaded
        missing = _missing_from_saved_modules(loading_info.get("missing_keys", ()), tensors)
        if missing:
            raise _missing_keys_error(Path(path) / subfolder, missing, tensors)
        return (model, loading_info) if wants_loading_info else model
    except RuntimeError as error:
        if tensors is None or kwargs.get("ignore_mismatched_sizes"):
            raise
        config = kwargs.get("config")
        try:
            if not isinstance(config, model_class.config_class):
                config = model_class.config_class.from_pretrained(Path(path) / subfolder)
            mismatch = explain_config_mismatch(model_class, config, Path(path) / subfolder, tensors)
        except Exception:  # the diagnosis is best-effort; the original error stands
            mismatch = None
        if mismatch is None:
            raise
        raise mismatch from error
