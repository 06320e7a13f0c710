"""The ``maml-run`` command (Typer). No ML imports at module top, so ``--help`` is instant.

Two forms:
    maml-run [HYDRA OVERRIDES...]     train (the default): ``maml-run task=sinusoid k=5``,
                                      ``maml-run -m k=5,10 seed=0,1,2`` (a Hydra multirun)
    maml-run COMMAND [ARGS...]        config | presets | evaluate | table | sweep-results
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml

HELP = """\
Config-driven MAML experiments (Finn, Abbeel & Levine, ICML 2017).

\b
Train (the default command; bare arguments are Hydra overrides):
  maml-run                                   MAML on sinusoid regression, K=5
  maml-run task=sinusoid k=5 seed=3          change any key of the config
  maml-run experiment=finn17_sinusoid        a paper preset (see: maml-run presets)
  maml-run -m k=5,10 seed=0,1,2              a Hydra multirun sweep (6 jobs)
  maml-run resume=outputs/DATE/TIME          continue a run from its checkpoint
  maml-run train --cfg job                   Hydra's own flags go after `train`

Each run writes metrics.json, metrics.jsonl, plots, checkpoints/ and an offline W&B run into
its folder (outputs/DATE/TIME, or multirun/DATE/TIME/N_... for sweeps).
"""

app = typer.Typer(
    help=HELP,
    add_completion=False,
    no_args_is_help=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
COMMANDS = ("train", "config", "presets", "evaluate", "table", "sweep-results")
GROUPS_WITHOUT_FILES = {"hydra"}
# Hydra plugins behind the `sweeps` extra: launcher/sweeper name → its module in hydra_plugins.
PLUGINS = {
    "joblib": "hydra_joblib_launcher",
    "submitit_local": "hydra_submitit_launcher",
    "submitit_slurm": "hydra_submitit_launcher",
    "optuna": "hydra_optuna_sweeper",
}
INSTALL_SWEEPS = "pip install 'maml-runner[sweeps]'"


class Refusal(typer.Exit):
    """A one-line refusal (exit 2); ``message`` is what ``fail`` prints."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


_QUIET: list[bool] = []  # inside ``_collecting()``: ``fail`` raises without printing


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2."""
    if not _QUIET:
        typer.echo(f"error: {message}", err=True)
    raise Refusal(message)


@contextlib.contextmanager
def _collecting() -> Iterator[None]:
    """Let ``fail`` raise its ``Refusal`` silently, for a caller that words the line itself."""
    _QUIET.append(True)
    try:
        yield
    finally:
        _QUIET.pop()


def _conf_dir() -> Path:
    from maml_runner.paths import conf_dir

    return conf_dir()


def group_options(*confs: Path) -> dict[str, list[str]]:
    """Every config group (a folder of each conf) and its options (the YAML files in it).

    With several folders (the package's ``conf/`` and those of ``hydra.searchpath``) a group's
    options are the union of theirs, as Hydra composes them.
    """
    groups: dict[str, set[str]] = {}
    for conf in confs:
        for d in sorted(conf.iterdir()):
            if d.is_dir() and d.name not in GROUPS_WITHOUT_FILES:
                groups.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {name: sorted(options) for name, options in sorted(groups.items())}


SEARCHPATH_KEYS = ("hydra.searchpath", "+hydra.searchpath", "++hydra.searchpath")


def searchpath_dirs(overrides: list[str]) -> list[Path]:
    """The folders that ``hydra.searchpath=[...]`` among ``overrides`` adds, in order.

    ``file://DIR`` (or a bare ``DIR``) is a folder, relative to the working directory as Hydra
    reads it; ``pkg://a.b`` is the folder of the importable package ``a.b``. One that does not
    exist is refused in one line: Hydra itself would skip it and then not find its options.
    """
    items = [o for o in overrides if o.split("=", 1)[0] in SEARCHPATH_KEYS]
    if not items:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(items[-1]).value()
    except HydraException as exc:
        fail(f"{items[-1]}: {str(exc).splitlines()[0]}; write hydra.searchpath=[file://DIR,...]")
    entries = value if isinstance(value, list) else [value]
    dirs = []
    for entry in entries:
        scheme, sep, where = str(entry).partition("://")
        scheme, where = (scheme, where) if sep else ("file", str(entry))
        if scheme == "file":
            folder = Path(where).expanduser()
            if not folder.is_dir():
                fail(
                    f"hydra.searchpath={entry}: no such folder ({folder.resolve()}); give "
                    f"file://DIR of an existing folder holding config groups (DIR/model/*.yaml)"
                )
        elif scheme == "pkg":
            folder = _package_folder(entry, where)
        else:
            fail(f"hydra.searchpath={entry}: unknown scheme {scheme}://; use file:// or pkg://")
        dirs.append(folder)
    return dirs


def _package_folder(entry: object, module: str) -> Path:
    """The folder of the importable package ``module`` (for ``pkg://module``), or exit 2."""
    from importlib.util import find_spec

    try:
        spec = find_spec(module.replace("/", "."))
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        fail(f"hydra.searchpath={entry}: no importable package {module}; check its name")
    return Path(locations[0])


def config_dirs(overrides: list[str]) -> list[Path]:
    """The package's ``conf/`` and the ``hydra.searchpath`` folders the overrides name."""
    return [_conf_dir(), *searchpath_dirs(overrides)]


def option_file(group: str, option: str, dirs: list[Path]) -> Path | None:
    """The YAML file of ``group=option`` (the last folder that has it, as Hydra), or None."""
    found = [d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()]
    return found[-1] if found else None


def check_group_choices(overrides: list[str]) -> None:
    """Reject ``task=foo`` before Hydra starts, with a "did you mean" and the choices, in one line.

    The options are those of the package's ``conf/`` and of the folders ``hydra.searchpath``
    adds (``maml-run 'hydra.searchpath=[file://./myconf]' model=mynet``).
    """
    import difflib

    dirs = config_dirs(overrides)
    groups = group_options(*dirs)
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value or value in ("null", ""):
            continue
        for choice in value.split(","):
            if choice not in groups[key]:
                close = difflib.get_close_matches(choice, groups[key], n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                fail(f"{key}={choice}: unknown {key}{hint}; choose one of {', '.join(groups[key])}")
    check_plugins(overrides, dirs)


def missing_plugin(key: str, value: str, dirs: list[Path] | None = None) -> str | None:
    """The Hydra plugin that override ``key=value`` needs and this environment lacks, or None.

    ``hydra/launcher=joblib`` names one directly; an option of ``conf/`` (``launcher=joblib``,
    ``hparams_search=sinusoid_lr``) needs the ones its defaults list overrides.
    """
    from importlib.util import find_spec

    if key in ("hydra/launcher", "hydra/sweeper"):
        names = [value]
    else:
        path = option_file(key, value, dirs or [_conf_dir()])
        text = path.read_text() if path is not None else ""
        names = re.findall(r"override /hydra/(?:launcher|sweeper): *(\w+)", text)
    for name in names:
        if name in PLUGINS and find_spec(f"hydra_plugins.{PLUGINS[name]}") is None:
            return PLUGINS[name].replace("_", "-")
    return None


def check_plugins(overrides: list[str], dirs: list[Path] | None = None) -> None:
    """``launcher=joblib`` without the joblib plugin installed: one line with the pip command."""
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            continue
        key, value = item.split("=", 1)
        for choice in value.split(","):
            package = missing_plugin(key.lstrip("+~"), choice, dirs)
            if package:
                fail(f"{key}={choice} needs the Hydra plugin {package}: {INSTALL_SWEEPS}")


def resume_overrides(overrides: list[str]) -> list[str]:
    """For ``resume=RUN``: reapply RUN's original overrides and write into RUN itself."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not values or values[-1] in ("", "null"):
        return overrides
    from maml_runner import checkpoint
    from maml_runner.errors import UserError

    path = Path(values[-1]).expanduser()
    try:
        checkpoint.resolve(path)  # a run folder with checkpoints/last.pt, or a checkpoint
    except UserError as err:
        fail(str(err))
    run_dir = path if path.is_dir() else path.parent.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    original: list[str] = []
    if saved.is_file():
        from omegaconf import OmegaConf

        original = [
            o
            for o in OmegaConf.load(saved)
            if not o.startswith(("resume=", "hydra.run.dir=", "hydra.output_subdir="))
            and o not in overrides
        ]
    extra = (
        []
        if any(o.startswith("hydra.run.dir=") for o in overrides)
        else [f"hydra.run.dir={run_dir}"]
    )
    # hydra.searchpath is a Hydra override (.hydra/hydra.yaml), not among the run's own: the
    # run's options from a user's config folder (model=mynet) need it back.
    searchpath = run_dir / ".hydra" / "hydra.yaml"
    if searchpath.is_file() and not any(o.split("=", 1)[0] in SEARCHPATH_KEYS for o in overrides):
        from omegaconf import OmegaConf

        saved_hydra = OmegaConf.select(OmegaConf.load(searchpath), "hydra.overrides.hydra") or []
        extra += [o for o in saved_hydra if o.split("=", 1)[0] in SEARCHPATH_KEYS][-1:]
    return [*original, *overrides, *extra]


def absolute_searchpath(overrides: list[str]) -> list[str]:
    """``hydra.searchpath`` with its ``file://`` folders made absolute (as checked, from here).

    The run's ``.hydra/hydra.yaml`` then names folders that a resume from elsewhere finds.
    """
    dirs = iter(searchpath_dirs(overrides))
    items = [o for o in overrides if o.split("=", 1)[0] in SEARCHPATH_KEYS]
    if not items:
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(items[-1])
    entries = parsed.value() if isinstance(parsed.value(), list) else [parsed.value()]
    absolute = []
    for entry, folder in zip(entries, dirs, strict=True):
        pkg = str(entry).startswith("pkg://")
        absolute.append(str(entry) if pkg else f"file://{folder.resolve()}")
    key = items[-1].split("=", 1)[0]
    rewritten = f"{key}=[{','.join(absolute)}]"
    return [rewritten if o is items[-1] else o for o in overrides]


def torchrun_overrides(overrides: list[str]) -> list[str]:
    """Under ``torchrun``: join the process group; every rank writes into rank 0's run folder.

    Rank 0 picks the folder (``outputs/DATE/TIME`` by its clock, unless ``hydra.run.dir`` or
    ``resume`` names one) and alone writes Hydra's ``.hydra/`` snapshot.
    """
    if any(o in ("-m", "--multirun") for o in overrides):
        fail("--multirun under torchrun: run the sweep's jobs one torchrun at a time")
    from maml_runner import distributed

    distributed.init_from_env()
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, f"hydra.run.dir={distributed.shared_run_dir()}"]
    if not distributed.is_lead():
        overrides = [*overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return overrides


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Meta-train and meta-test (the default command). Arguments are Hydra overrides.",
)
def train(ctx: typer.Context) -> None:
    overrides = list(ctx.args)
    check_group_choices(overrides)
    # a resume's own overrides are checked on top of the run's (task.robot=… on a cheetah run)
    overrides = resume_overrides(overrides)
    flags = [o for o in overrides if o.startswith("-")]
    cfg = None
    if all(f in ("-m", "--multirun") for f in flags):  # Hydra's --cfg/--info print and exit
        cfg = check_overrides(overrides, multirun=True)  # a sweep at its first value
        # a multirun by -m, or by the config (a table preset sets hydra.mode=MULTIRUN)
        if flags or str(cfg.hydra.mode).endswith("MULTIRUN"):
            check_sweep_jobs(overrides, cfg)
        elif any("," in o.partition("=")[2] for o in overrides):
            cfg = check_overrides(overrides, multirun=False)  # refuses a sweep without -m
    overrides = absolute_searchpath(overrides)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun:
        overrides = torchrun_overrides(overrides)
    else:
        from maml_runner.errors import UserError
        from maml_runner.run_folder import own_folder

        try:
            overrides = own_folder(overrides, cfg)
        except UserError as err:
            fail(str(err))
    from maml_runner.app import main as hydra_main

    sys.argv = ["maml-run", *overrides]
    try:
        hydra_main()
    finally:
        if torchrun:
            from maml_runner import distributed

            distributed.shutdown()


def compose(overrides: list[str], hydra: bool = False):
    """Compose the config read-only (Compose API), as Hydra would for a run.

    ``hydra``: keep the ``hydra`` node (for its mode and folders). A bad override is one line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from maml_runner import config as _schemas  # noqa: F401  (registers the schemas)

    check_group_choices(overrides)
    try:
        with initialize_config_dir(str(_conf_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)
    except HydraException as exc:
        text = str(exc)
        unknown = re.search(r"Could not override '([^']+)'|Key '([^']+)' (?:is )?not in", text)
        if unknown:
            key = unknown.group(1) or _full_key(text, unknown.group(2))
            fail(f"{key}: no such config key{_did_you_mean(key, overrides)}")
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        full = f"{text}{cause}"
        typed = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", full)
        if typed:
            key = _full_key(full, "?")
            kind = {"float": "a number", "integer": "an integer"}.get(typed.group(2).lower())
            fail(f"{key}={typed.group(1)}: must be {kind or typed.group(2)}")
        fail(f"{text.splitlines()[0]}{cause}".replace("\n", " "))


def _full_key(text: str, key: str) -> str:
    """OmegaConf names the node as ``full_key: trainer.stepz``; fall back to the bare key."""
    found = re.search(r"full_key: (\S+)", text)
    return found.group(1) if found else key


def known_keys(overrides: list[str] | None = None) -> list[str]:
    """Every key (dotted) of the config ``overrides`` compose (default: the default config) and
    every config group."""
    from omegaconf import OmegaConf

    cfg = compose(overrides or [])
    keys: list[str] = []

    def walk(node: object, prefix: str) -> None:
        for name in node:  # type: ignore[attr-defined]
            key = f"{prefix}{name}"
            keys.append(key)
            child = OmegaConf.select(cfg, key, throw_on_missing=False)
            if OmegaConf.is_dict(child):
                walk(child, f"{key}.")

    walk(cfg, "")
    return keys + list(group_options(_conf_dir()))


def _did_you_mean(key: str, overrides: list[str] | None = None) -> str:
    """The closest key of the run's own config (its other overrides composed: a preset's task
    keys, not the default task's), else of the default config."""
    others = [o for o in overrides or [] if o.partition("=")[0].lstrip("+~") != key]
    try:
        with _collecting():
            keys = known_keys(others)
    except Refusal:
        keys = known_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else "; maml-run config lists the keys"


SHORT_KNOBS = {"k": "K, support examples per task", "n_way": "N, classes per task", "seed": "seed"}


def check_overrides(overrides: list[str], multirun: bool):
    """Compose as the run will and refuse what composing lets through; return the config.

    Hydra's own errors become one line (with "did you mean"); ``+key=value`` may only add to
    an open dict (``task.env_kwargs``, a custom model's arguments), never a typo of a known key
    or a new top-level key; the short knobs must be integers. In a multirun each simple sweep
    (``k=5,10``) is checked at its first value.
    """
    from omegaconf import OmegaConf

    plain = []
    for item in overrides:
        if item.startswith("-"):
            continue
        key, _, value = item.partition("=")
        if multirun and "," in value and "(" not in value and not value.startswith(("[", "{")):
            item = f"{key}={value.split(',')[0]}"
        plain.append(item)
    cfg = compose(plain, hydra=True)
    groups = set(group_options(*config_dirs(overrides)))
    roots = set(compose([])) | groups
    for item in plain:
        key = item.partition("=")[0]
        if not key.startswith("+") or key.lstrip("+").startswith(("hydra", "~")):
            continue
        key = key.lstrip("+")
        head, _, rest = key.partition(".")
        parent = key.rsplit(".", 1)[0] if rest else ""
        if key.split("/")[0] in groups and not rest:
            continue  # +experiment=..., an option of a group
        structured = parent and OmegaConf.get_type(OmegaConf.select(cfg, parent)) not in (
            dict,
            None,
        )
        if head not in roots or structured:
            fail(f"+{key}: no such config key{_did_you_mean(key, plain)}")
    for knob, meaning in SHORT_KNOBS.items():
        value = cfg[knob]
        if not isinstance(value, int) or isinstance(value, bool):
            fail(f"{knob}={value}: {meaning} must be an integer")
    return cfg


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_sweep_jobs(overrides: list[str], cfg) -> None:
    """Compose and validate every job of a multirun before Hydra launches the first.

    The jobs are the basic sweeper's (the preset's ``hydra.sweeper.params``, then the command
    line's sweeps, as a product); a sampling sweeper (Optuna) draws its jobs as it goes, so its
    base config alone is checked. One line names the first invalid job and how many there are.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from maml_runner.build import validate
    from maml_runner.errors import UserError

    if cfg.hydra.sweeper._target_ != BASIC_SWEEPER:
        return
    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params) if params is not None else {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += [o for o in overrides if not o.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
        [jobs] = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        fail(f"the sweep: {str(exc).splitlines()[0]}")
    invalid = []
    for number, job in enumerate(jobs):
        try:
            with _collecting():
                job_cfg = check_overrides(job, multirun=False)
                validate(job_cfg)
        except Refusal as refusal:
            invalid.append((number, job, refusal.message))
        except UserError as err:
            invalid.append((number, job, str(err)))
    if invalid:
        number, job, message = invalid[0]
        swept = " ".join(o for o in job if o.partition("=")[0] in _swept_keys(parsed))
        others = f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else ""
        fail(
            f"job {number} of the sweep's {len(jobs)} ({swept or 'its base config'}) is "
            f"invalid{others}, so none was launched: {message}"
        )


def _swept_keys(parsed) -> set[str]:
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


@app.command("config", help="Print the composed config for the given overrides, resolved.")
def show_config(
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides")] = None,
    unresolved: Annotated[bool, typer.Option(help="keep ${...} interpolations")] = False,
) -> None:
    from omegaconf import OmegaConf

    cfg = compose(overrides or [])
    typer.echo(OmegaConf.to_yaml(cfg, resolve=not unresolved))


def _describe(path: Path) -> str:
    """A preset's first comment line that is not a directive or the command itself."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if not line.startswith("#"):
            break
        if text and not text.startswith(("@package", "maml-run")):
            return text
    return ""


@app.command(help="List every config group and its options (presets first).")
def presets() -> None:
    conf = _conf_dir()
    groups = group_options(conf)
    order = ["experiment"] + [g for g in groups if g != "experiment"]
    for group in order:
        typer.echo(f"{group}:")
        for option in groups[group]:
            typer.echo(f"  {group}={option:<28} {_describe(conf / group / f'{option}.yaml')}")


# What may change between training and a meta-test (`maml-run evaluate RUN KEY=VALUE ...`):
# where the data is, the device, the test tasks (K, N, query size, number, seed, chunk), how an
# RL test task's episodes are sampled and the adaptation (α, steps). Everything else is the
# run's own.
EVALUATE_KEYS = (
    "data.root",
    "device",
    "task.eval_k_shot",
    "task.n_way",
    "task.eval_query_size",
    "task.test_goals",
    "task.eval_later_lr_scale",
    "task.sampling",
    "inner.lr",
    "inner.eval_steps",
    "eval.num_tasks",
    "eval.seed",
    "eval.batch_size",
)


@app.command(
    help="Meta-test a saved run (its folder or a checkpoint) on new or more tasks; "
    f"KEY=VALUE overrides may set {', '.join(EVALUATE_KEYS)}."
)
def evaluate(
    run: Annotated[Path, typer.Argument(help="run folder or checkpoint file")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help=f"KEY=VALUE, KEY one of {', '.join(EVALUATE_KEYS)}")
    ] = None,
    num_tasks: Annotated[int | None, typer.Option(help="tasks (default: the run's)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the tasks (default: the run's)")] = None,
    steps: Annotated[
        int | None, typer.Option(help="inner steps (default: inner.eval_steps)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto")] = None,
    ensemble: Annotated[
        int | None,
        typer.Option(
            help="also meta-test the K best validation checkpoints as one ensemble (averaged "
            "predictions; the run must have kept them: trainer.keep_best >= K)"
        ),
    ] = None,
) -> None:
    from maml_runner.errors import UserError

    try:
        _evaluate(run, overrides or [], num_tasks, seed, steps, device, ensemble)
    except UserError as err:
        fail(str(err))


def _option_with_target(group: str, target: str) -> str | None:
    """The option of ``conf/<group>`` whose ``_target_`` is ``target`` (None: no such file)."""
    from omegaconf import OmegaConf

    for path in sorted((_conf_dir() / group).glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path.stem
    return None


def _evaluation_config(saved, overrides: list[str], options: dict):
    """The run's config with today's defaults for keys added since, then ``overrides``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from maml_runner.errors import UserError

    # Keys added to the configs since the run default to today's values; the run's own win.
    groups = [f"task={saved.task.name}", f"model={saved.model.name}"]
    groups.append(f"algorithm={saved.algorithm.name}")  # its schema (metasgd: lr_init, ...)
    outer = _option_with_target("outer", saved.outer._target_)
    if outer is not None:
        groups.append(f"outer={outer}")
    base = compose(groups)
    if "env_kwargs" in base.task:  # an open dict: a preset's keywords (frame_skip) are the run's
        OmegaConf.set_struct(base.task.env_kwargs, False)
    cfg = OmegaConf.merge(base, saved)
    if "env" in cfg.task:  # RL runs saved before a task kept only its robot's keys
        from maml_runner.build import unused_task_keys

        for key in unused_task_keys(cfg.task):  # the run ignored them: so does its test
            cfg.task[key] = {} if key == "env_kwargs" else None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in EVALUATE_KEYS:
            close = difflib.get_close_matches(key, EVALUATE_KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(
                f"{item}: evaluate takes KEY=VALUE for what may change after training; {hint}"
                f"(keys: {', '.join(EVALUATE_KEYS)}; the rest is the run's own)"
            )
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            reason = str(err).splitlines()[0]
            raise UserError(f"{item}: not a value for {key} ({reason})") from None
    for key, value in options.items():
        if value is not None:
            OmegaConf.update(cfg, key, value)
    return cfg


def _evaluate(run: Path, overrides, num_tasks, seed, steps, device, ensemble) -> None:
    from omegaconf import OmegaConf

    from maml_runner import checkpoint
    from maml_runner.build import build
    from maml_runner.errors import UserError
    from maml_runner.job import Tested
    from maml_runner.report import console, print_result

    path = checkpoint.resolve(run)
    state = checkpoint.load(path)
    saved = OmegaConf.create(state["config"])
    best = path.parent / checkpoint.BEST
    if run.is_dir() and saved.eval.get("checkpoint") == "best" and best.is_file():
        # a run folder: the θ its own meta-test tested (eval.checkpoint=best)
        path, state = best, checkpoint.load(best)
        console.print(f"evaluating {path} (the best validation step, {state['step']})")
    options = {"eval.num_tasks": num_tasks, "eval.seed": seed, "inner.eval_steps": steps}
    cfg = _evaluation_config(saved, overrides, {**options, "device": device})
    members = _ensemble_members(path, ensemble) if ensemble is not None else []
    computed = list(range(cfg.inner.eval_steps + 1))  # every step it computes is printed
    cfg.eval.report_steps = computed
    with build(cfg) as job:
        job.load(state, str(run))
        tested = job.meta_test(baselines=False)
        print_result(tested, computed, cfg.paper)
        record = {"checkpoint": str(path), "step": state["step"]}
        record["meta_test"] = tested.result.to_dict()
        if members:
            states = [checkpoint.load(p) for p in members]  # each checked as the job loads it
            steps_of = [s["step"] for s in states]
            ensembled = job.meta_test_ensemble(states)
            console.print(f"ensemble of the {len(states)} best validation steps {steps_of}:")
            print_result(Tested(ensembled), computed, None)
            record["ensemble"] = {"steps": steps_of, "meta_test": ensembled.to_dict()}
    if overrides:
        record["overrides"] = list(overrides)
    name = f"eval_step{state['step']}_seed{cfg.eval.seed}_n{cfg.eval.num_tasks}"
    if overrides or ensemble:
        digest = hashlib.sha1(json.dumps([overrides, ensemble]).encode()).hexdigest()[:8]
        name += f"_{digest}"
    out = path.parent / f"{name}.json"
    try:
        out.write_text(json.dumps(record, indent=2))
    except OSError as err:
        raise UserError(
            f"cannot write {out} ({err.strerror or err}); the table above stands"
        ) from None
    console.print(f"wrote {out}")


def _ensemble_members(path: Path, size: int) -> list[Path]:
    """The ``size`` best validation checkpoints kept beside ``path`` (``checkpoints/top/``)."""
    from maml_runner import checkpoint
    from maml_runner.errors import UserError

    folder = path.parent if path.parent.name != checkpoint.TOP else path.parent.parent
    last = folder / checkpoint.LAST
    top = checkpoint.load(last)["extra"].get("top", []) if last.is_file() else []
    if size < 1 or size > len(top):
        raise UserError(
            f"--ensemble {size}: {folder.parent} kept {len(top)} validation checkpoints "
            f"(trainer.keep_best); give 1 <= K <= {len(top)}, or train with "
            f"trainer.keep_best >= {size}"
            if top
            else f"--ensemble {size}: {folder.parent} kept no validation checkpoints; train "
            f"with trainer.keep_best >= {size} (and validation on)"
        )
    return [checkpoint.top_path(folder, r["step"]) for r in top[:size]]


def finished_runs(paths: list[Path]):
    """What ``results.collect`` finds under ``paths``: at least one readable run, or exit 2.

    Returns a ``results.Collected``; with no readable run, the skipped files (one line each on
    stderr) and a one-line error.
    """
    from maml_runner.results import collect

    found = collect(paths)
    if not found.runs:
        echo_skipped(found)
        given = " ".join(map(str, paths))
        if found.skipped:
            fail(
                f"paths={given}: none of its {len(found.skipped)} metrics.json is a finished "
                "run's (see the lines above)"
            )
        jobs = f"; {len(found.unfinished)} job folders have none" if found.unfinished else ""
        fail(f"paths={given}: no metrics.json found (finished runs write one){jobs}")
    return found


def check_outputs(**options: Path | None) -> None:
    """Refuse, before anything is read or written, an output option (``--out``, ``--plot``,
    ...) whose file cannot be written: its folder missing, or the path a folder."""
    for name, path in options.items():
        if path is None:
            continue
        flag = f"--{name.replace('_', '-')} {path}"
        if path.is_dir():
            fail(f"{flag}: is a folder; give a file name")
        if not path.parent.is_dir():
            fail(f"{flag}: folder {path.parent} does not exist")


def echo_skipped(found) -> None:
    """One line on stderr per metrics.json ``collect`` left out, naming the file and why."""
    for path, why in found.skipped:
        typer.echo(f"skipped {path}: {why}", err=True)


def echo_table(text: str, out: Path | None, found=None) -> None:
    """The table on stdout (and into ``out``); then, on stderr, what it leaves out and why."""
    from maml_runner.results import contents

    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")
    if found is None:
        return
    echo_skipped(found)
    if found.unfinished:
        typer.echo(
            f"no results from {len(found.unfinished)} job(s) without metrics.json "
            "(diverged, stopped or still running):",
            err=True,
        )
        for job in found.unfinished:
            typer.echo(f"  {job} ({contents(job)})", err=True)


@app.command(help="Turn run or sweep folders into a markdown table (ours beside the paper's).")
def table(
    paths: Annotated[list[Path], typer.Argument(help="run folders, sweep folders or metrics.json")],
    out: Annotated[Path | None, typer.Option(help="also write the table to this file")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="also draw all runs' curves to this PNG")
    ] = None,
) -> None:
    from maml_runner.results import markdown_table, plot_runs

    check_outputs(out=out, plot=plot)
    found = finished_runs(paths)
    runs = found.runs
    echo_table(markdown_table(runs), out, found)
    if plot is not None:
        plot_runs(runs, plot)
        typer.echo(f"wrote {plot}")


@app.command(
    "sweep-results",
    help="Turn a multirun folder into one row per setting: mean ± 95% CI over seeds.",
)
def sweep_results(
    paths: Annotated[list[Path], typer.Argument(help="sweep folders (multirun/DATE/TIME)")],
    csv: Annotated[Path | None, typer.Option(help="also write the rows to this CSV file")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the table to this file")] = None,
    metric: Annotated[str, typer.Option(help="query_loss | query_acc")] = "query_loss",
    wall_clock: Annotated[
        Path | None,
        typer.Option(
            help="also compare the settings at equal training time: draw each one's validation "
            "curve of --metric against training time to this PNG and print its value within "
            "the shortest setting's time"
        ),
    ] = None,
) -> None:
    from maml_runner.results import by_setting, setting_rows, settings_markdown, write_csv

    check_outputs(csv=csv, out=out, wall_clock=wall_clock)
    found = finished_runs(paths)
    runs = found.runs
    missing = [r.folder for r in runs if metric not in r.result.mean]
    if missing:
        fail(
            f"--metric {metric}: {missing[0]} has none; choose one of "
            f"{', '.join(runs[0].result.mean)}"
        )
    settings = by_setting(runs)
    rows = setting_rows(settings, metric)
    text = settings_markdown(rows, metric)
    if wall_clock is not None:
        text += "\n\n" + _wall_clock(settings, metric, wall_clock)
    echo_table(text, out, found)
    if csv is not None:
        write_csv(rows, csv)
        typer.echo(f"wrote {csv}")
    if wall_clock is not None:
        typer.echo(f"wrote {wall_clock}")


def _wall_clock(settings: list, metric: str, path: Path) -> str:
    """``sweep-results --wall-clock``: the equal-time table of ``meta_val/<metric>`` (its text)
    and plot; the runs without that validation curve named on stderr, exit 2 if none has one."""
    from maml_runner.results import plot_wall_clock, timed_settings, wall_clock_markdown

    timed, left = timed_settings(settings, metric)
    for folder, why in left:
        typer.echo(f"--wall-clock leaves out {folder}: {why}", err=True)
    if not timed:
        fail(f"--wall-clock {path}: no run has a meta_val/{metric} curve (see the lines above)")
    plot_wall_clock(timed, path, metric)
    return wall_clock_markdown(timed, metric)


def main() -> None:
    """Console-script entry: bare overrides (or nothing) mean ``train``."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-") and args[0] not in COMMANDS:
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        typer.echo(
            f"error: {args[0]}: not a command nor a key=value override; {hint}"
            f"(commands: {', '.join(COMMANDS)})",
            err=True,
        )
        raise SystemExit(2)
    if not args or args[0] not in (*COMMANDS, "-h", "--help"):
        args = ["train", *args]
    app(args=args, prog_name="maml-run")
