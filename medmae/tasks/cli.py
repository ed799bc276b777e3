"""Running a task's LightningCLI from ``medmae`` subcommands."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from medmae.tasks.channels import check_model_channels, take_channels_from_manifest


def default_precision() -> str:
    """bf16 mixed precision on GPUs that support it, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def task_classes(name: str) -> tuple[type, type]:
    """The (LightningModule, LightningDataModule) classes of a task name."""
    if name == "pretrain":
        from medmae.data.datamodule import PretrainDataModule
        from medmae.tasks.pretrain import MAEPretrainTask

        return MAEPretrainTask, PretrainDataModule
    if name == "segment":
        from medmae.data.seg_datamodule import SegDataModule
        from medmae.tasks.segment import SegmentTask

        return SegmentTask, SegDataModule
    if name == "restore":
        from medmae.data.datamodule import PretrainDataModule
        from medmae.tasks.restore import MAERestoreTask

        return MAERestoreTask, PretrainDataModule
    raise ValueError(f"unknown task {name!r}")


def wandb_logger(mode: str, save_dir: str) -> object:
    """A WandbLogger; ``offline`` runs with no account or network (sync later with ``wandb sync``)."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install 'medmae[wandb]'") from None
    return WandbLogger(project="medmae", save_dir=save_dir, offline=mode == "offline")


def finish_wandb(trainer: object) -> None:
    """Close the run of a WandbLogger (rank zero), so a later run in the same process starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


# the medmae command of each task, for error messages
COMMANDS = {"pretrain": "pretrain", "segment": "finetune", "restore": "finetune-restore"}
# jsonargparse's messages for an unknown key: on the command line, in a group of a config file, at its top level
UNKNOWN_KEY = (
    re.compile(r"unrecognized arguments: --?(?P<key>[^\s=]+)"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Option '(?P<key>[^']+)' is not accepted"),
)
# an unknown argument of a class given by class_path (e.g. the logger's init_args)
UNKNOWN_CLASS_ARGUMENT = re.compile(
    r"^Parser key \"(?P<parent>[^\"]+)\":.*?class_path '(?P<class_path>[^']+)':\s*Option '(?P<key>[^']+)' is not",
    re.DOTALL,
)
# the lines of jsonargparse's nested report that only describe the type being validated
TYPE_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value type:", "Given value:")


class ConfigError(ValueError):
    """A bad option or config file of a LightningCLI command; the ``medmae`` command prints it as one line."""


class _CLI(LightningCLI):
    """LightningCLI whose parse errors raise :class:`ConfigError` instead of printing the whole usage."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            self.config = parser.parse_args(args)  # always a list: no "args and sys.argv" warning
        except ArgumentError as error:
            raise ConfigError(config_error_message(str(error), parser, list(args or []))) from None
        loggers_follow_root_dir(self.config, list(args or []))

    def before_instantiate_classes(self) -> None:
        """Take the model's input channels from the manifest when it does not set them (refuse a mismatch)."""
        self.manifest_channels = take_channels_from_manifest(self.config, self.parser.prog)


def _on_command_line(argv: Sequence[str], key: str) -> bool:
    """Whether ``--key`` (or ``--key=...``, or a ``--key.sub`` option) is in ``argv``."""
    return any(arg == f"--{key}" or arg.startswith((f"--{key}=", f"--{key}.")) for arg in argv)


def loggers_follow_root_dir(config: Any, argv: Sequence[str]) -> None:
    """``--trainer.default_root_dir DIR`` on the command line moves the config's loggers to DIR as well.

    The configs name their run folder twice (``default_root_dir`` and the logger's ``save_dir``, where the
    checkpoints go); without this, overriding only the first leaves checkpoints in the config's folder.
    A logger given on the command line (``--trainer.logger...``) is left as it is.
    """
    if not _on_command_line(argv, "trainer.default_root_dir") or _on_command_line(argv, "trainer.logger"):
        return
    loggers = config.trainer.logger
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = config.trainer.default_root_dir


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config``/``-c`` files of ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def _yaml_keys(data: Any, prefix: str = "") -> set[str]:
    """Dotted keys of a parsed YAML mapping (``{"model": {"lr": 1}}`` → ``{"model", "model.lr"}``)."""
    keys = set()
    for key, value in data.items() if isinstance(data, dict) else []:
        keys.add(prefix + str(key))
        keys |= _yaml_keys(value, f"{prefix}{key}.")
    return keys


def _read_yaml(path: str) -> tuple[Any, str]:
    """``(data, "")`` or ``(None, what is wrong with the file)``."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")), ""
    except OSError as error:
        return None, error.strerror or type(error).__name__
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, f"not valid YAML ({getattr(error, 'problem', None) or 'syntax error'}{where})"


def _parser_keys(parser: LightningArgumentParser) -> list[str]:
    try:
        return list(parser.get_defaults().keys())
    except Exception:  # no suggestion rather than a second error
        return []


def _class_arguments(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (none when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _unknown_key(message: str, parser: LightningArgumentParser) -> tuple[str, list[str]] | None:
    """``(the unknown dotted key, the valid keys it may have meant)`` of a jsonargparse message, or None."""
    for pattern in UNKNOWN_KEY:
        match = pattern.search(message)
        if match:
            group = match.groupdict().get("group")
            return (f"{group}.{match['key']}" if group else match["key"]), _parser_keys(parser)
    match = UNKNOWN_CLASS_ARGUMENT.search(message)
    if match:
        prefix = f"{match['parent']}.init_args."
        return prefix + match["key"], [prefix + name for name in _class_arguments(match["class_path"])]
    return None


def _nested_reason(message: str) -> str:
    """``Parser key "K": ...`` with an indented report below → ``K: <its first informative line>``."""
    match = re.match(r'Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)', message, re.DOTALL)
    if match is None:
        return " ".join(message.split())
    lines = [line.strip().removeprefix("- ").strip() for line in match["rest"].splitlines()]
    details = [line for line in lines if line and not line.startswith(TYPE_NOISE)]
    details = [line for line in details if not line.startswith("Problem with given class_path")] or details
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", details[0] if details else "invalid value")
    return f"{match['key']}: {reason}"


def config_error_message(message: str, parser: LightningArgumentParser, argv: Sequence[str]) -> str:
    """One readable line for a jsonargparse error: the bad key, the file it is in, the closest valid key."""
    files = config_files(argv)
    if message.startswith("Problems parsing config"):
        problems = [f"{path}: {problem}" for path in files for problem in [_read_yaml(path)[1]] if problem]
        if problems:
            return problems[0]
    unknown = _unknown_key(message, parser)
    if unknown is None:
        return _nested_reason(message)
    key, valid = unknown
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    suggestion = f" (did you mean {close[0]}?)" if close else ""
    on_command_line = _on_command_line(argv, key)
    in_file = next((path for path in reversed(files) if key in _yaml_keys(_read_yaml(path)[0])), None)
    where = f"{in_file}: " if in_file and not on_command_line else ""
    return f"{where}unknown key {key}{suggestion}"


def fit_with_cli(
    task: str,
    argv: Sequence[str],
    ckpt_path: str | None = None,
    wandb: str | None = None,
) -> int:
    """Parse ``argv`` with LightningCLI for ``task`` and run ``trainer.fit``. Returns the exit code.

    Raises:
        ConfigError: an unknown key, a bad value or an unreadable config file (one line naming it).
    """
    module_class, data_class = task_classes(task)
    trainer_defaults = {
        "precision": default_precision(),
        "default_root_dir": f"runs/{task}",
        "log_every_n_steps": 10,
    }
    command = COMMANDS[task]
    try:
        cli = _CLI(
            module_class,
            data_class,
            args=list(argv),
            run=False,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"medmae {command}", "exit_on_error": False},
        )
    except (ConfigError, ArgumentError) as error:
        message = str(error) if isinstance(error, ConfigError) else " ".join(str(error).split())
        raise ConfigError(f"{command}: {message}; see `medmae {command} --help`") from None
    except SystemExit as exit_:  # --help, --print_config
        return int(exit_.code or 0)
    source = f"its checkpoint {cli.config.model.pretrained}" if cli.config.model.get("pretrained") else "the model"
    check_model_channels(cli.model, cli.manifest_channels, str(cli.config.data.get("manifest")), source)
    trainer = cli.trainer
    if wandb:
        trainer.loggers = [*trainer.loggers, wandb_logger(wandb, trainer.default_root_dir)]
    if ckpt_path is not None and ckpt_path != "last" and not Path(ckpt_path).is_file():
        print(f"medmae: error: {ckpt_path}: checkpoint not found", file=sys.stderr)
        return 2
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    finally:
        if wandb:
            finish_wandb(trainer)
    print_run_summary(trainer)
    return 0


def print_run_summary(trainer: object) -> None:
    """Where the run's checkpoints, logs and figures are."""
    from medmae.tasks.figures import run_folder

    if not trainer.is_global_zero:
        return
    callback = trainer.checkpoint_callback
    print(f"\nfinished at step {trainer.global_step}")
    if callback is not None:
        print(f"  last checkpoint: {callback.last_model_path}")
        if callback.best_model_path:
            print(f"  best checkpoint: {callback.best_model_path} ({callback.monitor} = {callback.best_model_score})")
    print(f"  logs and figures: {run_folder(trainer)}")
