"""Case files (``cases/*.toml``) turned into the frozen ``Case`` list a sweep runs.

A case file is TOML. Top-level keys give defaults for every entry; each ``[[case]]`` entry names
one LM-head shape (or a family of shapes). Example::

    description = "LM heads of released models"
    tokens = [4096, 8192]            # default token counts (N) for every entry
    dtypes = ["bfloat16"]            # default dtypes
    # implementations = ["torch-eager", "chunked"]   # default: every implementation

    [[case]]
    name = "gemma2-2b"
    vocab = 256000                   # V
    hidden = 2304                    # D
    tied = true                      # head weight shared with the embedding (recorded; the
                                     # head's own cost does not depend on it)
    options = { softcap = 30.0 }     # LossSpec fields, plus bias = true / class_weight = true
    # modes = ["forward_backward"]   # default: every mode the sweep measures
    note = "google/gemma-2-2b config.json"

``vocab``, ``hidden``, ``tokens`` and ``dtypes`` may each be one value or a list; an entry expands
to every combination, so a sweep over V is one entry with a list of vocabularies. Each resulting
case is named ``<name>[/V=..][/D=..]/N=<tokens>/<dtype>`` (V and D appear when the entry varies
them), and that name is unique within a sweep.

Every problem is reported as one ``HarnessError`` naming the file, the entry and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

import torch

from harness.errors import HarnessError
from harness.spec import DTYPES, REDUCTIONS, LossSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
CASES_DIR = PROJECT_ROOT / "cases"

# What one timed call does; see harness.sweep.measure.
MODES = ("forward", "forward_backward", "backward")

FILE_KEYS = ("description", "tokens", "dtypes", "implementations", "case")
ENTRY_KEYS = ("name", "vocab", "hidden", "tokens", "dtypes", "tied", "options", "implementations", "modes", "note")


@dataclass(frozen=True)
class CaseOptions:
    """The loss options of a case: ``LossSpec`` fields, plus whether a bias / class weights are used.

    Tensors (bias, class weights) are made by the worker from a fixed seed; a case file only says
    whether they are there.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss_multiplier: float = 0.0
    softcap: float | None = None
    loss_div_factor: float = 1.0
    bias: bool = False
    class_weight: bool = False

    def spec(self, class_weight=None) -> LossSpec:
        """The ``LossSpec`` of these options (``class_weight`` is the tensor when the case has one)."""
        return LossSpec(
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss_multiplier=self.z_loss_multiplier,
            softcap=self.softcap,
            loss_div_factor=self.loss_div_factor,
            class_weight=class_weight,
        )

    def describe(self) -> str:
        """The ``options`` column: ``LossSpec.describe()`` plus ``, bias`` when a bias is used."""
        text = self.spec().describe()
        if self.class_weight:
            text += ", class_weight=<tensor>"
        if self.bias:
            text += ", bias"
        return text


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(CaseOptions))
FLOAT_OPTIONS = ("label_smoothing", "z_loss_multiplier", "softcap", "loss_div_factor")


@dataclass(frozen=True)
class Case:
    """One measured configuration: a head shape, a token count, a dtype and loss options."""

    name: str  # unique within a sweep, e.g. "llama3-8b/N=8192/bfloat16"
    shape: str  # the entry it came from, e.g. "llama3-8b" or "vocab-sweep"
    vocab: int
    hidden: int
    tokens: int
    dtype: str
    tied: bool = False
    options: CaseOptions = CaseOptions()
    implementations: tuple[str, ...] | None = None  # None: every implementation the sweep runs
    modes: tuple[str, ...] | None = None  # None: every mode the sweep measures
    source: str = ""  # the case file

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> Case:
        data = dict(data)
        data["options"] = CaseOptions(**data["options"])
        for key in ("implementations", "modes"):
            if data[key] is not None:
                data[key] = tuple(data[key])
        return Case(**data)

    @property
    def logits_bytes(self) -> int:
        """Bytes of the N x V logits in the input dtype."""
        return self.tokens * self.vocab * DTYPES[self.dtype].itemsize

    @property
    def gradient_bytes(self) -> int:
        """The lower bound on memory (Cut Cross-Entropy paper): the gradients of hidden and weight."""
        elements = self.tokens * self.hidden + self.vocab * self.hidden + (self.vocab if self.options.bias else 0)
        return elements * DTYPES[self.dtype].itemsize

    def unsupported_reason(self, impl, device: str) -> str | None:
        """Why ``impl`` says it cannot run this case on ``device`` ("cpu" or "cuda"), or None."""
        # A stand-in class-weight tensor: only its presence matters for what is supported.
        class_weight = torch.ones(self.vocab) if self.options.class_weight else None
        return impl.unsupported_reason(
            self.options.spec(class_weight), dtype=DTYPES[self.dtype], device=device, has_bias=self.options.bias
        )

    def matmul_flops(self, mode: str) -> int:
        """Matmul work: 2*N*D*V forward (the logits), 6*N*D*V forward+backward (plus both gradients)."""
        per_pass = 2 * self.tokens * self.hidden * self.vocab
        return {"forward": per_pass, "forward_backward": 3 * per_pass}[mode]


def available_case_files() -> list[str]:
    return sorted(p.stem for p in CASES_DIR.glob("*.toml"))


def find_case_file(name: str) -> Path:
    """A case file from a path, or from a name in ``cases/`` (with or without ``.toml``)."""
    candidates = [Path(name), CASES_DIR / name, CASES_DIR / f"{name}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise HarnessError(
        f"case file {name!r} not found (looked for {name} and cases/{Path(name).stem}.toml); "
        f"available in cases/: {', '.join(available_case_files()) or 'none'}"
    )


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


class _EntryReader:
    """Reads typed values out of one entry, raising errors that name the file and the entry."""

    def __init__(self, where: str, table: dict):
        self.where = where
        self.table = table

    def fail(self, message: str):
        raise HarnessError(f"{self.where}: {message}")

    def positive_ints(self, key: str, default=None) -> list[int]:
        value = self.table.get(key, default)
        if value is None:
            self.fail(f"missing {key!r}")
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            self.fail(f"{key!r} must be a positive integer or a list of them, got {value!r}")
        return values

    def dtypes(self, default) -> list[str]:
        value = self.table.get("dtypes", default)
        if value is None:
            self.fail("missing 'dtypes' (give it in the entry or at the top of the file)")
        values = value if isinstance(value, list) else [value]
        if not values or any(v not in DTYPES for v in values):
            self.fail(f"'dtypes' must be among {', '.join(DTYPES)}, got {value!r}")
        return values

    def implementations(self, default) -> tuple[str, ...] | None:
        value = self.table.get("implementations", default)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.fail(f"'implementations' must be a non-empty list of names, got {value!r}")
        return tuple(value)

    def modes(self) -> tuple[str, ...] | None:
        value = self.table.get("modes")
        if value is None:
            return None
        if not isinstance(value, list) or not value or any(v not in MODES for v in value):
            self.fail(f"'modes' must be a non-empty list among {', '.join(MODES)}, got {value!r}")
        return tuple(m for m in MODES if m in value)

    def options(self) -> CaseOptions:
        value = self.table.get("options", {})
        if not isinstance(value, dict):
            self.fail(f"'options' must be a table such as {{ softcap = 30.0 }}, got {value!r}")
        unknown = sorted(set(value) - set(OPTION_KEYS))
        if unknown:
            self.fail(f"unknown option {unknown[0]!r}; expected one of {', '.join(OPTION_KEYS)}")
        for key, item in value.items():
            if key == "reduction":
                ok = item in REDUCTIONS
            elif key in ("bias", "class_weight"):
                ok = isinstance(item, bool)
            elif key == "ignore_index":
                ok = isinstance(item, int) and not isinstance(item, bool)
            else:
                ok = isinstance(item, (int, float)) and not isinstance(item, bool)
            if not ok:
                self.fail(f"option {key!r} has a bad value {item!r}")
        floats = {key: float(item) for key, item in value.items() if key in FLOAT_OPTIONS}
        options = CaseOptions(**{**value, **floats})
        try:
            options.spec()  # LossSpec's own range checks (e.g. softcap > 0)
        except HarnessError as exc:
            self.fail(str(exc))
        return options


def load_case_file(path: Path) -> list[Case]:
    """Every case of one file, in file order; ``HarnessError`` naming file, entry and problem."""
    where = _display_path(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{where}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{where}: cannot read: {exc}") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise HarnessError(f"{where}: unknown top-level key {unknown[0]!r}; expected one of {', '.join(FILE_KEYS)}")
    entries = data.get("case")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise HarnessError(f"{where}: no [[case]] entries")
    defaults = _EntryReader(where, data)
    default_tokens = defaults.positive_ints("tokens") if "tokens" in data else None
    default_dtypes = defaults.dtypes(None) if "dtypes" in data else None
    default_impls = defaults.implementations(None)

    cases: list[Case] = []
    seen_entries: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        name = entry.get("name")
        if not isinstance(name, str) or not name or "/" in name or ":" in name:
            raise HarnessError(f"{where}: entry {index}: 'name' must be a non-empty string without '/' or ':'")
        if name in seen_entries:
            raise HarnessError(f"{where}: entry {name!r}: the name is used twice in this file")
        seen_entries.add(name)
        reader = _EntryReader(f"{where}: entry {name!r}", entry)
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            reader.fail(f"unknown key {unknown[0]!r}; expected one of {', '.join(ENTRY_KEYS)}")
        vocabs = reader.positive_ints("vocab")
        hiddens = reader.positive_ints("hidden")
        tokens = reader.positive_ints("tokens", default_tokens)
        dtypes = reader.dtypes(default_dtypes)
        tied = entry.get("tied", False)
        if not isinstance(tied, bool):
            reader.fail(f"'tied' must be true or false, got {tied!r}")
        if "note" in entry and not isinstance(entry["note"], str):
            reader.fail("'note' must be a string")
        options = reader.options()
        implementations = reader.implementations(default_impls)
        modes = reader.modes()
        for vocab, hidden, n, dtype in itertools.product(vocabs, hiddens, tokens, dtypes):
            parts = [name]
            if len(vocabs) > 1:
                parts.append(f"V={vocab}")
            if len(hiddens) > 1:
                parts.append(f"D={hidden}")
            parts += [f"N={n}", dtype]
            cases.append(
                Case(
                    name="/".join(parts),
                    shape=name,
                    vocab=vocab,
                    hidden=hidden,
                    tokens=n,
                    dtype=dtype,
                    tied=tied,
                    options=options,
                    implementations=implementations,
                    modes=modes,
                    source=where,
                )
            )
    return cases


def load_cases(names: list[str]) -> list[Case]:
    """The cases of several files (paths or names in cases/), each case name unique.

    ``FILE:ENTRY[,ENTRY...]`` keeps only the named entries of a file, e.g. ``models:llama3-8b``.
    """
    cases: dict[str, Case] = {}
    for name in names:
        file_name, _, entry_filter = (name, "", "") if Path(name).is_file() else name.partition(":")
        path = find_case_file(file_name)
        loaded = load_case_file(path)
        if entry_filter:
            wanted = [e for e in entry_filter.split(",") if e]
            known = {case.shape for case in loaded}
            missing = [e for e in wanted if e not in known]
            if missing:
                raise HarnessError(
                    f"{_display_path(path)}: no entry {missing[0]!r}; entries: {', '.join(sorted(known))}"
                )
            loaded = [case for case in loaded if case.shape in wanted]
        for case in loaded:
            previous = cases.get(case.name)
            if previous is not None and previous != case:
                raise HarnessError(f"case {case.name!r} is declared in both {previous.source} and {case.source}")
            cases[case.name] = case
    return list(cases.values())


def with_dtypes(cases: list[Case], dtypes: list[str]) -> list[Case]:
    """The same cases in other dtypes (``--dtype``), renamed to match."""
    renamed: dict[str, Case] = {}
    for case in cases:
        stem = case.name.rsplit("/", 1)[0]
        for dtype in dtypes:
            new = dataclasses.replace(case, name=f"{stem}/{dtype}", dtype=dtype)
            renamed.setdefault(new.name, new)
    return list(renamed.values())


def canonical_case_argument(name: str) -> str:
    """A CASES argument as an absolute path (keeping any ``:ENTRY`` filter), to store for ``--resume``."""
    if Path(name).is_file():
        return str(Path(name).resolve())
    file_name, separator, entries = name.partition(":")
    return str(find_case_file(file_name).resolve()) + separator + entries
