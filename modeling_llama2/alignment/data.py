"""The trainers' data, through Hugging Face `datasets`: a Hub name or a local file or folder of any format
`load_dataset` reads, or a `Dataset` from Python; tokenized once with `Dataset.map` (cached), or streamed.

Bad data is an `InputError` naming the record: `FILE:LINE` for a local JSON Lines file, `SOURCE, record N` otherwise.
"""

import functools
import gzip
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, IterableDataset, load_dataset, load_from_disk

from .training import InputError, json_record

Data = Dataset | IterableDataset
# `load_dataset`'s builder for each file extension (after a compression suffix, which it undoes itself).
BUILDERS = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class DataArguments:
    """Where the training and evaluation records come from; the trainers' own arguments extend this."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub data set name, or a local file or folder of any format `datasets.load_dataset` reads "
            "(JSON Lines, JSON, .gz, Parquet, CSV, Arrow, or a `save_to_disk` folder)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of --dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of --dataset to evaluate on."})
    eval_size: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction (below 1) or this number of training records for evaluation."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local data file to train on (JSON Lines, .gz, Parquet, CSV, Arrow)."}
    )
    eval_file: str | None = field(default=None, metadata={"help": "Local data file to evaluate on."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read and tokenize the records while training instead of all up front (memory does not grow "
            "with the data set); needs --max-steps."
        },
    )


@dataclass(frozen=True)
class Source:
    """A data set's name in error messages; `json_file` when it is a local JSON file whose lines can be named."""

    name: str
    json_file: bool = False

    def where(self, index: int) -> str:
        """Where record `index` (from 0) is: its line in a JSON Lines file, its number otherwise."""
        if self.json_file:
            line = record_line(self.name, index)
            if line is not None:
                return f"{self.name}:{line}"
        return f"{self.name}, record {index + 1}"


def open_text(path: str):
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8")


def record_line(path: str, index: int) -> int | None:
    """The line of record `index` in a JSON Lines file (blank lines hold none); None in a JSON array file."""
    with open_text(path) as f:
        if f.read(4096).lstrip().startswith("["):
            return None
        f.seek(0)
        lines = (line_no for line_no, line in enumerate(f, 1) if line.strip())
        return next(itertools.islice(lines, index, None), None)


def json_problem(path: str) -> str | None:
    """What keeps a JSON Lines file from loading, with its line: `load_dataset`'s own message names no line."""
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    json_record(line, f"{path}:{line_no}")
    except InputError as e:
        return str(e)
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text ({e})."
    return None


def builder_of(path: str) -> str | None:
    """`load_dataset`'s builder for a data file, from its extension; None if it has no known one."""
    stem = path
    for suffix in COMPRESSIONS:
        stem = stem.removesuffix(suffix)
    return BUILDERS.get(os.path.splitext(stem)[1].lower())


def load_records(source: str, *, config: str | None = None, split: str = "train", streaming: bool = False):
    """`(records, Source)` of split `split` of a local file, a local folder or a Hub data set; any failure is one
    `InputError`. A single file is the split "train" alone, with no configurations."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        builder = builder_of(path)
        if builder is None:
            raise InputError(f"{source}: unknown data file type; use {sorted(BUILDERS)} (optionally compressed).")
        if config:
            raise InputError(f"{source} is one file, with no configurations; drop --dataset-config.")
        if split != "train":
            raise InputError(
                f"{source} is one file, the split 'train' alone, with no split {split!r}; for evaluation data use "
                "--eval-file or --eval-size."
            )
        if os.path.getsize(path) == 0:
            raise InputError(f"{source} holds no records.")
        loaded = lambda: load_dataset(builder, data_files=path, split="train", streaming=streaming)  # noqa: E731
        where = Source(source, json_file=builder == "json")
    elif os.path.isdir(path) and {"state.json", "dataset_dict.json"} & set(os.listdir(path)):
        if config:
            raise InputError(f"{source} is a `save_to_disk` folder, with no configurations; drop --dataset-config.")

        def loaded():  # written by `save_to_disk`, which `load_dataset` does not read
            data = load_from_disk(path)
            if isinstance(data, DatasetDict):
                if split not in data:
                    raise InputError(f"{source} has no split {split!r}; it has {list(data)}.")
                data = data[split]
            elif split != "train":
                raise InputError(f"{source} holds one Dataset, the split 'train' alone, with no split {split!r}.")
            return data.to_iterable_dataset() if streaming else data

        where = Source(f"{source} ({split})" if split != "train" else source)
    elif not os.path.isdir(path) and (builder_of(path) is not None or source.startswith((".", "/", "~"))):
        raise InputError(f"{source}: no such file.")
    else:
        loaded = lambda: load_dataset(path, config, split=split, streaming=streaming)  # noqa: E731
        where = Source(f"{source} ({split})" if not os.path.isdir(path) or split != "train" else source)
    try:
        return loaded(), where
    except InputError:
        raise
    except Exception as e:  # anything datasets raises is about the source given
        problem = json_problem(path) if where.json_file else None
        if problem:
            raise InputError(problem) from e
        reason = str(e.__cause__ or e).strip().splitlines()
        raise InputError(f"{source}: cannot be loaded ({reason[0] if reason else type(e).__name__}).") from e


def prepare(
    args: DataArguments,
    function: Callable[[dict], dict],
    *,
    seed: int,
    desc: str,
    features: Features | None = None,
    train_dataset: Data | None = None,
    eval_dataset: Data | None = None,
) -> tuple[tuple[Data, Source], tuple[Data, Source] | None]:
    """The training and (optional) evaluation data, each with its name, as `function` turns its records into samples
    (see `tokenize`). Training data from exactly one of `--dataset`, `--train-file` or the Python API's
    `train_dataset`; evaluation data from at most one of `--eval-file`, `--eval-split`, `--eval-size` or
    `eval_dataset`. `features` are those of `function`'s outputs. `--eval-size` holds out samples after
    tokenizing, so that errors name the records as in the source."""
    given = [name for name, value in (("--dataset", args.dataset), ("--train-file", args.train_file)) if value]
    if len(given) + (train_dataset is not None) != 1:
        raise InputError("give the training data as exactly one of --dataset or --train-file (or train_dataset).")
    evals = [("--eval-file", args.eval_file), ("--eval-split", args.eval_split), ("--eval-size", args.eval_size)]
    evals = [name for name, value in evals if value is not None] + (["eval_dataset"] if eval_dataset else [])
    if len(evals) > 1:
        raise InputError(f"give at most one of {' and '.join(evals)}.")
    if not args.dataset:
        if args.eval_split:
            raise InputError("--eval-split names a split of --dataset; use --eval-file or --eval-size otherwise.")
        if args.train_split != "train" or args.dataset_config:
            raise InputError("--train-split and --dataset-config choose within --dataset; give --dataset.")

    def load(source: str | None, split: str, given: Data | None, name: str) -> tuple[Data, Source]:
        if given is not None:
            data, where = given, Source(name)
        else:
            config = args.dataset_config if source == args.dataset else None  # not an --eval-file's
            data, where = load_records(source, config=config, split=split, streaming=args.streaming)
        return tokenize(data, where, function, desc=f"{desc} ({where.name})", features=features), where

    train = load(args.dataset or args.train_file, args.train_split, train_dataset, "train_dataset")
    if eval_dataset is not None or args.eval_file or args.eval_split:
        return train, load(args.eval_file or args.dataset, args.eval_split or "train", eval_dataset, "eval_dataset")
    if args.eval_size is None:
        return train, None
    kept, held_out = hold_out(train[0], args.eval_size, seed=seed)
    return (kept, train[1]), (held_out, Source(f"{train[1].name} (held out)"))


def hold_out(data: Data, size: float, *, seed: int) -> tuple[Data, Data]:
    """`size` samples (a fraction below 1, else a count) split off for evaluation: at random from a `Dataset`, the
    first ones of a stream (a count only: a stream's size is unknown)."""
    count = int(size) if size >= 1 else None
    if size <= 0 or (count is not None and count != size):
        raise InputError(f"--eval-size must be a fraction in (0, 1) or a whole number of records, got {size}.")
    if isinstance(data, IterableDataset):
        if count is None:
            raise InputError("with --streaming, --eval-size must be a number of records (a stream's size is unknown).")
        return data.skip(count), data.take(count)
    try:
        split = data.train_test_split(test_size=count or size, seed=seed)
    except ValueError as e:
        raise InputError(f"--eval-size {size}: {e}") from e
    return split["train"], split["test"]


def _guarded(record: dict, index: int, *, function: Callable[[dict], dict], source: Source) -> dict:
    try:
        return function(record)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{source.where(index)}: {e}") from e


def tokenize(
    data: Data, source: Source, function: Callable[[dict], dict], *, desc: str, features: Features | None = None
) -> Data:
    """`function` applied to every record (its outputs, of `features` where given, replace the record's fields), a
    bad record refused with its location. A `Dataset` is mapped once here, with a progress bar, and cached by
    datasets; a stream as it is read."""
    guarded = functools.partial(_guarded, function=function, source=source)
    kwargs = dict(with_indices=True, remove_columns=data.column_names, features=features)
    if isinstance(data, IterableDataset):
        return data.map(guarded, **kwargs)
    return data.map(guarded, **kwargs, desc=desc)


def list_lengths(data: Dataset, column: str) -> list[int]:
    """Lengths of a list column, read from Arrow without building the lists in Python."""
    return pc.list_value_length(data.with_format("arrow")[column]).to_pylist()
