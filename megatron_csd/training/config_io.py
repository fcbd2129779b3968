"""Build a :class:`TrainConfig` from YAML plus Megatron-style command-line overrides.

Precedence: dataclass defaults < ``--config file.yaml`` < flags. Every leaf field of the tree
has one flag, declared next to the field (``metadata["flag"]``, e.g.
``--tensor-model-parallel-size``); model references use ``--student-preset``,
``--teacher-checkpoint``, ``--student-override hidden_size=32`` and so on; ``--packing`` takes
``auto`` / true / false and has a ``--no-packing`` (field metadata ``auto_bool``, ``negative``).
Unknown YAML keys and unknown flags are errors that list the allowed names. ``save_resolved_config`` writes the
final tree as YAML beside the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from typing import Any, Optional, Sequence

import yaml

from megatron_csd.training.config import SECTION_TYPES, ModelRef, TrainConfig

_TOP_LEVEL_FLAGS = {
    "mode": ("--mode", "distill | sft"),
    "device": ("--device", "cpu | cuda | auto"),
    "precision": ("--precision", "fp32 | bf16 | fp16 | auto"),
    "fp8_teacher": ("--fp8-teacher", "run the teacher in FP8: hybrid | e4m3 (GPU + transformer-engine)"),
}


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-5``, ``3E-4``, ``2e+3``).

    PyYAML follows YAML 1.1, whose float pattern requires a ``.``; ``lr: 1e-5`` would come back
    as the string ``'1e-5'``. YAML 1.2 and every other tool read it as a number, so we do too.
    """


_ConfigLoader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                  |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_text(text) -> Any:
    """``yaml.safe_load`` that reads ``1e-5`` as a float (see :class:`_ConfigLoader`)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_auto_bool(text: str):
    """``auto`` or a bool (fields declared with ``auto_bool``, e.g. ``--packing``)."""
    return "auto" if str(text).strip().lower() == "auto" else _parse_bool(text)


def _parse_optional(inner):
    def parse(text: str):
        return None if str(text).strip().lower() in ("none", "null", "") else inner(text)
    return parse


def _parser_for(annotation) -> tuple[Any, bool]:
    """(argparse type, is_bool) for a field annotation such as ``Optional[int]``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        inner, is_bool = _parser_for(args[0])
        return _parse_optional(inner), is_bool
    if annotation is bool:
        return _parse_bool, True
    if annotation in (int, float, str):
        return annotation, False
    raise TypeError(f"no command-line parser for field type {annotation!r}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a ModelConfig field), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), load_yaml_text(value)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_csd.training.cli",
        description="Distil (or SFT-train) a Megatron-Core GPT model. YAML via --config, "
                    "every field also as a flag; flags win.",
        allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file with the config tree")
    for name, (flag, help_text) in _TOP_LEVEL_FLAGS.items():
        parser.add_argument(flag, dest=name, default=None, help=help_text,
                            type=_parse_optional(str) if name == "fp8_teacher" else str)
    for role in ("student", "teacher"):
        parser.add_argument(f"--{role}-preset", dest=f"{role}.preset", default=None,
                            help=f"{role} preset name (random init), e.g. tiny-gemma, gemma-2b")
        parser.add_argument(f"--{role}-checkpoint", dest=f"{role}.checkpoint", default=None,
                            help=f"{role} model-only checkpoint dir (model_config.json + model/)")
        parser.add_argument(f"--{role}-override", dest=f"{role}.overrides", action="append",
                            type=_parse_override, default=None, metavar="FIELD=VALUE",
                            help=f"override a ModelConfig field of the {role} preset (repeatable)")
    for section, section_type in SECTION_TYPES.items():
        if section_type is ModelRef:
            continue
        hints = typing.get_type_hints(section_type)
        for fld in dataclasses.fields(section_type):
            if fld.metadata.get("auto_bool"):
                parse, is_bool = _parse_auto_bool, True
            else:
                parse, is_bool = _parser_for(hints[fld.name])
            kwargs = dict(dest=f"{section}.{fld.name}", default=None, type=parse,
                          help=f"{fld.metadata.get('help', '')} [{section}.{fld.name}, default {fld.default!r}]")
            if is_bool:  # `--sequence-parallel` alone means true; `--sequence-parallel false` works too
                kwargs.update(nargs="?", const=True)
            parser.add_argument(fld.metadata["flag"], **kwargs)
            if "negative" in fld.metadata:  # `--no-packing` = `--packing false`
                parser.add_argument(fld.metadata["negative"], dest=f"{section}.{fld.name}",
                                    action="store_const", const=False, default=None,
                                    help=f"same as {fld.metadata['flag']} false")
    return parser


def _check_keys(where: str, given: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def config_from_dict(tree: dict) -> TrainConfig:
    """A validated TrainConfig from a nested dict (YAML); unknown keys are errors."""
    if not isinstance(tree, dict):
        raise TypeError(f"the config must be a mapping, got {type(tree).__name__}")
    top_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    _check_keys("the config", tree, top_fields)
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        if key in SECTION_TYPES:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise TypeError(f"config section {key!r} must be a mapping, got {value!r}")
            section_type = SECTION_TYPES[key]
            _check_keys(f"section {key!r}", value, [f.name for f in dataclasses.fields(section_type)])
            kwargs[key] = section_type(**value)
        else:
            kwargs[key] = value
    return TrainConfig(**kwargs)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        tree = load_yaml_text(handle) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path!r} must hold a mapping at top level")
    return tree


def _let_model_flags_replace_yaml_source(tree: dict, namespace: argparse.Namespace) -> None:
    """Flags win over YAML for where a model comes from, too.

    ``--student-checkpoint`` replaces a YAML ``student.preset`` (and that preset's
    ``overrides``); ``--student-preset`` replaces a YAML ``student.checkpoint``. Same for the
    teacher. Giving both flags is still the "not both" error of :class:`ModelRef`.
    """
    for role in ("student", "teacher"):
        section = tree.get(role)
        if not isinstance(section, dict):
            continue
        preset_flag = getattr(namespace, f"{role}.preset") is not None
        checkpoint_flag = getattr(namespace, f"{role}.checkpoint") is not None
        if checkpoint_flag and not preset_flag:
            section.pop("preset", None)
            section.pop("overrides", None)
        elif preset_flag and not checkpoint_flag:
            section.pop("checkpoint", None)


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """YAML (``--config``) + flags -> TrainConfig. Bad flags exit with argparse's message."""
    parser = build_arg_parser()
    namespace = parser.parse_args(argv)
    tree: dict[str, Any] = load_yaml(namespace.config) if namespace.config else {}
    _let_model_flags_replace_yaml_source(tree, namespace)
    for dest, value in vars(namespace).items():
        if dest == "config" or value is None:
            continue
        if "." not in dest:
            tree[dest] = value
            continue
        section, key = dest.split(".", 1)
        section_tree = tree.setdefault(section, {})
        if not isinstance(section_tree, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {section_tree!r}")
        if key == "overrides":
            section_tree.setdefault("overrides", {}).update(dict(value))
        else:
            section_tree[key] = value
    return config_from_dict(tree)


def save_resolved_config(config: TrainConfig, directory: str, name: str = "config.yaml") -> str:
    """Write the resolved tree to ``directory/name`` (atomically); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
    os.replace(tmp, path)
    return path
