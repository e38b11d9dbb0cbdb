"""Which tasks the eval stage runs, and on which data.

    plan = resolve(cfg.eval)            # pure: names -> YAMLs, local data -> files; raises TaskError
    manager = materialize(plan, folder) # writes the local-data YAMLs; an lm-eval TaskManager over them

A task name is, in this order: a YAML in `eval.task_dir` (the tiny-world tasks, the OLMES group); one of
lm-eval's built-in tasks or groups (gsm8k, mmlu, ifeval, ...); or a judge benchmark (alpaca_eval,
mt_bench_101: dist_bench/evaluation/alpaca_eval.py, mt_bench_101.py).

Built-in tasks are found by a text scan of lm-eval's task folder for `task: <name>` / `group: <name>` (2 s),
and only the folders holding the named tasks are indexed: indexing all of lm-eval's ~14k YAMLs costs ~20 s.

Local data (`eval.data.<task or group>`): for every task it covers, the stage writes a YAML that `include:`s
lm-eval's own task file and replaces only the data source (`dataset_path: json|parquet|csv|arrow`,
`dataset_kwargs.data_files`), so prompts, few-shot settings, filters and metrics stay lm-eval's. The file is
then a full lm-eval task: `lm_eval --include_path <folder> --tasks gsm8k` runs it the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bench.config import PROJECT_ROOT, EvalConfig

JUDGED = ("alpaca_eval", "mt_bench_101")  # benchmarks whose scores come from a judge model, not lm-eval
# The tasks users cite (seed 001), shown by `dist-bench eval --tasks list` beside the task_dir's own.
CITED = (
    "gsm8k", "mmlu", "ifeval", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "piqa", "boolq",
    "openbookqa", "commonsense_qa", "social_iqa", "olmes", *JUDGED,
)  # fmt: skip
# Python modules a task imports beyond lm-eval's own requirements (lm-eval lists them as extras).
DEPENDENCIES = {
    "ifeval": ("langdetect", "immutabledict", "nltk"),
    "alpaca_eval": ("alpaca_eval",),
    "mt_bench_101": (),
}
# Hub datasets whose "all" data names a row's subset in a column: one local file then serves every subset.
SUBSET_COLUMNS = {"cais/mmlu": "subject"}
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


class TaskError(ValueError):
    """A task that cannot run as configured (unknown name, missing or unreadable local data)."""


@dataclass
class LeafData:
    """A task's local data: lm-eval's YAML for it, and what replaces its data source."""

    task: str
    yaml_path: Path  # lm-eval's (or task_dir's) own YAML for the task
    builder: str  # datasets' packaged builder: json, parquet, csv, arrow
    data_files: dict[str, list[str]]  # split -> files
    splits: dict[str, str | None]  # the task's split fields, as they must read for these files
    subset_filter: tuple[str, str] | None = None  # (column, value): rows of one subset out of "all" data


@dataclass
class TaskPlan:
    name: str
    kind: str  # "task_dir" | "builtin" | "judge"
    yaml_path: Path | None  # the task's (or group's) YAML; None for judge benchmarks
    data: str | dict[str, str] | None  # eval.data's entry for it
    subtasks: list[tuple[str, Path]] = field(
        default_factory=list
    )  # (task, YAML) it runs: itself or a group's
    leaves: list[LeafData] = field(default_factory=list)  # local data per task it runs (a group's subtasks)

    @property
    def source(self) -> str:
        """Where the task's data comes from, in words (for --tasks list and the pre-flight line)."""
        if self.data is not None:
            return f"local {self.data}"
        if self.kind == "judge":
            return "missing (eval.data." + self.name + ")"
        return "hub"


@dataclass
class Plan:
    tasks: list[TaskPlan]
    folders: list[Path]  # what the TaskManager indexes, later ones winning: the built-in folders, task_dir

    @property
    def lm_eval_tasks(self) -> list[TaskPlan]:
        return [t for t in self.tasks if t.kind != "judge"]


def task_dir_path(task_dir: str | Path) -> Path:
    path = Path(task_dir).expanduser()
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not path.is_dir():
        raise TaskError(f"eval.task_dir: {path} is not a folder")
    return path


def builtin_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


@functools.cache
def builtin_index() -> dict[str, Path]:
    """lm-eval's task and group names -> the YAML defining them, from a text scan (no YAML parsing)."""
    pattern = re.compile(r"^[\"']?(?:task|group)[\"']?:\s*[\"']?([\w\-.]+)", re.M)
    index: dict[str, Path] = {}
    for path in sorted(builtin_root().rglob("*.yaml")):
        for match in pattern.finditer(path.read_text(errors="ignore")):
            index.setdefault(match.group(1), path)
    return index


def resolve(cfg: EvalConfig, names: list[str] | None = None) -> Plan:
    """Every task of cfg.tasks (or `names`) with its YAML and local data; raises TaskError naming the task."""
    from lm_eval.tasks import TaskManager

    folder = task_dir_path(cfg.task_dir)
    own = TaskManager(include_path=str(folder), include_defaults=False)
    unknown_data = set(cfg.data) - set(names or cfg.tasks)
    tasks: list[TaskPlan] = []
    folders: list[Path] = []  # lm-eval's folders holding the built-in tasks named
    for name in names or cfg.tasks:
        entry = own.task_index.get(name)
        if entry is not None:
            tasks.append(TaskPlan(name, "task_dir", entry.yaml_path, cfg.data.get(name)))
        elif name in JUDGED:
            tasks.append(TaskPlan(name, "judge", None, cfg.data.get(name)))
        elif name in builtin_index():
            path = builtin_index()[name]
            tasks.append(TaskPlan(name, "builtin", path, cfg.data.get(name)))
            folders.append(path.parent)
        else:
            known = _known_names(own)
            raise TaskError(
                f"eval.tasks: unknown task '{name}': not a YAML in {folder} (known there: {known}), not one of "
                f"lm-eval's built-in tasks or groups, not a judge benchmark ({', '.join(JUDGED)})"
            )
    folders = [*dict.fromkeys(folders), folder]  # the project's own YAMLs win a name lm-eval also uses
    manager = TaskManager(include_path=[str(p) for p in folders], include_defaults=False)
    for task in tasks:
        if task.kind == "judge":
            if task.data is not None:
                _judge_file(task.name, task.data)
            continue
        tree = _tree(manager, task.name)
        task.subtasks = [(leaf, path) for leaf, path, _ in tree]
        for leaf, path, groups in tree:
            # eval.data names the task, a group on the way down to it, or itself: the nearest one counts
            # (olmes: eval.data.olmes_arc_challenge serves both of its formulations)
            key = next((k for k in (leaf, *reversed(groups)) if k in cfg.data), None)
            if key is not None:
                task.leaves.append(_leaf_data(leaf, path, key, cfg.data[key]))
                unknown_data.discard(key)
    _check_subsets([leaf for task in tasks for leaf in task.leaves])
    if unknown_data:
        raise TaskError(
            f"eval.data: {', '.join(sorted(unknown_data))}: not a task in eval.tasks, nor a group or task within one"
        )
    return Plan(tasks, folders)


def materialize(plan: Plan, folder: Path, write: bool = True) -> Any:
    """Write the local-data YAMLs (and subset files) under `folder`; an lm-eval TaskManager that finds them
    before lm-eval's own (later include paths win in lm-eval's index). `write=False`: index what another
    rank wrote there."""
    from lm_eval.tasks import TaskManager

    overrides = folder / "task_overrides"
    if write:
        overrides.mkdir(parents=True, exist_ok=True)
        for task in plan.lm_eval_tasks:
            for leaf in task.leaves:
                _write_override(leaf, overrides)
            replaced = {leaf.task for leaf in task.leaves}
            if task.kind == "task_dir":
                for name, yaml_path in task.subtasks:
                    if name not in replaced:
                        _write_absolute_paths(name, yaml_path, overrides)
    # lm-eval warns once per replaced task ("overrides existing task"): the replacing is the point here
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        return TaskManager(
            include_path=[*(str(p) for p in plan.folders), str(overrides)], include_defaults=False
        )
    finally:
        index_log.setLevel(level)


NLTK_DATA = Path(__file__).parent / "nltk_data"  # punkt_tab for IFEval; see nltk_data/SOURCE.md


def ship_nltk_data() -> None:
    """Let NLTK find the shipped punkt_tab: lm-eval's IFEval module calls nltk.download("punkt_tab") at import
    when nltk.data.find fails, which needs the internet and a server's current state. Data the user installed
    elsewhere is searched first."""
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(NLTK_DATA) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([p for p in paths if p] + [str(NLTK_DATA)])
    import sys

    if "nltk" in sys.modules:  # imported already: NLTK read NLTK_DATA then
        import nltk

        if str(NLTK_DATA) not in nltk.data.path:
            nltk.data.path.append(str(NLTK_DATA))


def scored_by_rolling_loglikelihood(task: TaskPlan) -> bool:
    """Some task it runs is a perplexity task (output_type loglikelihood_rolling). lm-eval gives those answers
    only when the whole call is done, while the tokens and energy of its batches accrue, and its ranks exchange
    counts inside that call: such a task keeps no answer log and resumes whole (an attempt's work inside it
    is neither kept nor committed, so it is measured once, by the attempt that finishes it)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return any(
        load_yaml(path, resolve_func=False).get("output_type") == "loglikelihood_rolling"
        for _, path in task.subtasks
    )


def data_source(task: TaskPlan) -> str:
    """Where a task's data comes from, in words: eval.data's files, its YAML's own files, or the Hub (cached
    or not), for `--tasks list` and the pre-flight line."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if task.data is not None or task.kind == "judge":
        return task.source
    hubs = []
    for _, path in task.subtasks:
        config = load_yaml(path, resolve_func=False)
        if (config.get("dataset_kwargs") or {}).get("data_files") is not None:
            hubs.append("local (the task YAML's files)")
            continue
        dataset = str(config.get("dataset_path") or "")
        hubs.append(f"hub {dataset} ({'cached' if hub_dataset_cached(dataset) else 'not cached'})")
    hubs = list(dict.fromkeys(hubs))
    if len(hubs) > 2:  # a group over many datasets (olmes)
        cached = sum(h.endswith("(cached)") for h in hubs)
        return f"hub: {len(hubs)} datasets, {cached} cached"
    return ", ".join(hubs) or "none"


def hub_dataset_cached(dataset: str) -> bool:
    """Whether a Hub dataset is in the local Hugging Face cache (hub download or datasets' own cache)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub.is_dir() or (datasets_cache / dataset.replace("/", "___")).is_dir()


def missing_dependencies(name: str) -> list[str]:
    return [module for module in DEPENDENCIES.get(name, ()) if importlib.util.find_spec(module) is None]


# ---- a group's subtasks ------------------------------------------------------------------------------------


def _known_names(manager: Any) -> str:
    """The task_dir's names no group there contains, in words: a group's 200 subtasks would make the error
    line unreadable."""
    members = {member for group in manager.all_groups for member in group_members(manager, group)}
    top = sorted(name for name in manager.all_tasks if name not in members)
    within = len(manager.all_tasks) - len(top)
    return (", ".join(top) or "none") + (f", and {within} tasks and groups within them" if within else "")


def group_members(manager: Any, group: str) -> list[str]:
    """The names a group's YAML lists (its `task:` entries), without descending."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[group]
    cfg = entry.cfg or load_yaml(entry.yaml_path, resolve_func=False)
    listed = cfg.get("task", [])
    return [
        m if isinstance(m, str) else m.get("task", "")
        for m in (listed if isinstance(listed, list) else [listed])
    ]


def _leaves(manager: Any, name: str) -> list[tuple[str, Path]]:
    """The tasks a task, group or tag name runs: (name, YAML), in order, each once."""
    return [(leaf, path) for leaf, path, _ in _tree(manager, name)]


def _tree(manager: Any, name: str, within: tuple[str, ...] = ()) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(task, YAML, the groups and tags above it from `name` down) for every task `name` runs, each once."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None:
        raise TaskError(f"eval.tasks: '{name}' names a task that lm-eval's index does not hold")
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [(name, Path(entry.yaml_path), within)]
    members = sorted(entry.tags) if entry.kind == Kind.TAG else group_members(manager, name)
    found: dict[str, tuple[Path, tuple[str, ...]]] = {}
    for member in members:
        for leaf, path, chain in _tree(manager, member, (*within, name)):
            found.setdefault(leaf, (path, chain))
    return [(leaf, path, chain) for leaf, (path, chain) in found.items()]


# ---- local data ------------------------------------------------------------------------------------------


def _leaf_data(task: str, yaml_path: Path, key: str, source: str | dict[str, str]) -> LeafData:
    """The data files replacing `task`'s Hub dataset, from eval.data.<key>."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=False)
    splits = {name: cfg.get(name) for name in SPLIT_FIELDS}
    evaluated = splits["test_split"] or splits["validation_split"]
    if evaluated is None:
        raise TaskError(f"eval.data.{key}: task '{task}' names no test or validation split in {yaml_path}")
    where = f"eval.data.{key}"
    subset = cfg.get("dataset_name")
    if isinstance(source, dict):
        files = {split: [_existing(path, where)] for split, path in source.items()}
    else:
        path = _existing(source, where)
        files = _split_files(path, subset, where) if path.is_dir() else {evaluated: [path]}
    if evaluated not in files and len(files) == 1:
        files = {evaluated: next(iter(files.values()))}  # one unnamed file (ifeval_input_data.jsonl)
    if evaluated not in files:
        raise TaskError(
            f"{where}: no file for task '{task}''s evaluation split '{evaluated}' in {source} "
            f"(found splits: {', '.join(sorted(files)) or 'none'}); name files by split (test.jsonl, "
            "test-00000-of-00001.parquet) or give a {split: file} mapping"
        )
    used = {split: name for split, name in splits.items() if name is None or name in files}
    shots = splits["fewshot_split"] or splits["training_split"]
    if shots is not None and shots not in files:
        used["fewshot_split"] = evaluated  # lm-eval's sampler never shows a document as its own example
    suffixes = {Path(f).suffix for paths in files.values() for f in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
        raise TaskError(
            f"{where}: data files must share one of the formats {', '.join(BUILDERS)}; got {sorted(suffixes)}"
        )
    for paths in files.values():
        for path in paths:
            _check_rows(Path(path), where)
    column = SUBSET_COLUMNS.get(str(cfg.get("dataset_path")))
    subset_filter = (column, subset) if column and subset and not _has_subfolder(source, subset) else None
    return LeafData(
        task=task,
        yaml_path=yaml_path,
        builder=BUILDERS[next(iter(suffixes))],
        data_files={split: [str(f) for f in paths] for split, paths in files.items()},
        splits=used,
        subset_filter=subset_filter,
    )


def _check_rows(path: Path, where: str) -> None:
    """A data file has rows and its first one reads: an empty split otherwise stops the stage after the model
    has loaded ("corresponds to no data")."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as err:  # pyarrow raises several kinds for a file that is not Parquet
            raise TaskError(f"{where}: {path}: not a Parquet file ({type(err).__name__})") from None
        if rows == 0:
            raise TaskError(f"{where}: {path} has no rows")
        return
    rows = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            rows += 1
            if path.suffix != ".jsonl":
                break  # JSON, CSV and Arrow files are read whole by datasets; a row is there
            try:
                json.loads(line)
            except ValueError as err:
                raise TaskError(f"{where}: {path}:{number}: not JSON ({err})") from None
    if rows == 0:
        raise TaskError(f"{where}: {path} has no rows")


def _existing(path: str, where: str) -> Path:
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else Path.cwd() / resolved
    if not resolved.exists():
        raise TaskError(f"{where}: {resolved} not found")
    return resolved.resolve()


def _has_subfolder(source: str | dict[str, str], subset: str) -> bool:
    return isinstance(source, str) and (Path(source).expanduser() / subset).is_dir()


def _split_files(folder: Path, subset: str | None, where: str) -> dict[str, list[Path]]:
    """A folder's data files by split: a file belongs to split S when its name is S or starts with "S-",
    "S_" or "S." (test-00000-of-00001.parquet, dev.jsonl). datasets' own patterns are not used because they
    merge "dev" into "validation", and MMLU few-shots from its dev split. A subfolder named by the task's
    subset (gsm8k's main/, ARC's ARC-Challenge/, MMLU's abstract_algebra/) is where a Hub snapshot keeps it;
    without one, MMLU's all/ holds every subject."""
    root = folder
    if subset and (folder / subset).is_dir():
        root = folder / subset
    elif (folder / "all").is_dir():
        root = folder / "all"
    data = sorted(p for p in root.rglob("*") if p.suffix in BUILDERS and p.is_file())
    if not data:
        raise TaskError(f"{where}: no data files ({', '.join(BUILDERS)}) in {root}")
    files: dict[str, list[Path]] = {}
    for path in data:
        match = re.match(r"^([A-Za-z]+)(?:[-_.]|$)", path.name)
        split = match.group(1) if match else path.stem
        files.setdefault(split, []).append(path)
    return files


def _write_override(leaf: LeafData, folder: Path) -> Path:
    """A YAML that is lm-eval's task with only its data source replaced (and a subset's rows extracted)."""
    data_files = leaf.data_files
    if leaf.subset_filter is not None:
        data_files = _subset_files(leaf, folder / "data" / leaf.task)
    lines = [
        f"# Written by dist-bench: lm-eval's task '{leaf.task}' on local data; only the data source differs.",
        f"include: {json.dumps(str(leaf.yaml_path))}",
        f"task: {json.dumps(leaf.task)}",
        "tag: []  # the task stays in its groups through lm-eval's own index of the original",
        f"dataset_path: {leaf.builder}",
        "dataset_name: null",
        f"dataset_kwargs: {json.dumps({'data_files': data_files})}",
        *(f"{name}: {json.dumps(value)}" for name, value in leaf.splits.items()),
    ]
    path = folder / f"{leaf.task}.yaml"
    _write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _subset_files(leaf: LeafData, folder: Path) -> dict[str, list[str]]:
    """One subset's rows of every split, as JSON-lines files (a column names each row's subset)."""
    import datasets

    column, value = leaf.subset_filter  # type: ignore[misc]
    out: dict[str, list[str]] = {}
    for split, files in leaf.data_files.items():
        rows = datasets.load_dataset(leaf.builder, data_files={split: files}, split=split)
        if column not in rows.column_names:
            raise TaskError(
                f"eval.data: task '{leaf.task}': {files[0]} has no '{column}' column to pick subset '{value}' "
                f"from (give a folder with a '{value}' subfolder instead)"
            )
        picked = rows.filter(lambda row: row[column] == value)
        if len(picked) == 0 and split == (
            leaf.splits.get("test_split") or leaf.splits.get("validation_split")
        ):
            raise TaskError(f"eval.data: task '{leaf.task}': no rows with {column} = '{value}' in {files[0]}")
        path = folder / f"{split}.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in picked))
        out[split] = [str(path)]
    return out


def _check_subsets(leaves: list[LeafData]) -> None:
    """Every subset picked out of "all" data has rows in its evaluation split (MMLU: all 57 subjects)."""
    import datasets

    present: dict[tuple[str, ...], set[str]] = {}
    for leaf in leaves:
        if leaf.subset_filter is None:
            continue
        split = leaf.splits.get("test_split") or leaf.splits.get("validation_split")
        files = tuple(leaf.data_files[split])  # type: ignore[index]
        column, value = leaf.subset_filter
        if files not in present:
            rows = datasets.load_dataset(leaf.builder, data_files={"x": list(files)}, split="x")
            if column not in rows.column_names:
                raise TaskError(
                    f"eval.data: task '{leaf.task}': {files[0]} has no '{column}' column to pick subset "
                    f"'{value}' from (give a folder with a '{value}' subfolder instead)"
                )
            present[files] = set(rows[column])
        if value not in present[files]:
            raise TaskError(
                f"eval.data: task '{leaf.task}': no rows with {column} = '{value}' in {files[0]}; "
                "a group runs every subtask (name the subtasks in eval.tasks to run some)"
            )


def _judge_file(name: str, source: str | dict[str, str]) -> Path:
    if not isinstance(source, str):
        raise TaskError(f"eval.data.{name}: a file (JSON or JSON-lines), not a split mapping")
    path = _existing(source, f"eval.data.{name}")
    if not path.is_file():
        raise TaskError(f"eval.data.{name}: {path} is not a file")
    return path


# ---- task_dir data paths ----------------------------------------------------------------------------------

_GLOB_CHARS = set("*?[")


def absolute_data_paths(cfg: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
    """The fields of a task_dir task's config that name local data relative to its YAML (dataset_kwargs with
    data_files, a "./" or "../" dataset_path), made absolute; {} when there are none. lm-eval would resolve
    them against the working directory. Raises FileNotFoundError naming a data file that is not there."""
    fields: dict[str, Any] = {}
    kwargs = cfg.get("dataset_kwargs") or {}
    if kwargs.get("data_files") is not None:
        files = _map_paths(kwargs["data_files"], lambda p: _data_file(p, yaml_path, cfg["task"]))
        if files != kwargs["data_files"]:
            fields["dataset_kwargs"] = {**kwargs, "data_files": files}
    dataset_path = str(cfg.get("dataset_path", ""))
    if dataset_path.startswith(("./", "../")):  # a local dataset folder
        fields["dataset_path"] = str((yaml_path.parent / dataset_path).resolve())
    return fields


def _map_paths(files: Any, fn: Callable[[str], str]) -> Any:
    # data_files may be a path, a list of paths, or a {split: path or list} mapping (datasets' forms).
    if isinstance(files, dict):
        return {split: _map_paths(value, fn) for split, value in files.items()}
    if isinstance(files, list | tuple):
        return [fn(str(p)) for p in files]
    return fn(str(files))


def _data_file(path: str, yaml_path: Path, task: str) -> str:
    if "://" in path:  # hf://, s3://, https://: datasets fetches those itself
        return path
    resolved = (yaml_path.parent / Path(path).expanduser()).resolve()
    if not _GLOB_CHARS & set(path) and not resolved.is_file():
        raise FileNotFoundError(f"task '{task}': data file {resolved} not found (data_files in {yaml_path})")
    return str(resolved)


def _write_absolute_paths(task: str, yaml_path: Path, folder: Path) -> None:
    """A group's task from task_dir reaches lm-eval by name, so it is loaded from its YAML and the YAML's
    relative paths would be read against the working directory: a YAML that includes it with the paths made
    absolute takes its place (a single task is handed to lm-eval as a config with them resolved instead)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    fields = absolute_data_paths(load_yaml(yaml_path, resolve_func=False), yaml_path)
    if not fields:
        return
    lines = [
        f"# Written by dist-bench: task '{task}' of {yaml_path} with its data paths relative to that YAML made absolute.",
        f"include: {json.dumps(str(yaml_path))}",
        f"task: {json.dumps(task)}",
        "tag: []  # the task stays in its groups through lm-eval's own index of the original",
        *(f"{name}: {json.dumps(value)}" for name, value in fields.items()),
    ]
    _write_text_atomic(folder / f"{task}.yaml", "\n".join(lines) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
