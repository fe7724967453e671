"""Case files (``cases/*.toml``) turned into the frozen ``SweepCase`` list a sweep runs.

A case file is TOML. Top-level keys give defaults for every entry; each ``[[case]]`` entry names
one LM-head shape (or a family of shapes). Example::

    description = "LM heads of released models"
    tokens = [4096, 8192]            # default token counts (N) for every entry
    dtypes = ["bfloat16"]            # default dtypes
    # implementations = ["torch-eager", "chunked"]   # default: every implementation

    [[case]]
    name = "gemma2-2b"
    vocab = 256000                   # V
    dim = 2304                       # D (older files say ``hidden``)
    tied = true                      # head weight shared with the embedding (recorded; the
                                     # head's own cost does not depend on it)
    options = { softcap = 30.0 }     # options by name (harness.spec.OPTION_DECLARATIONS) and reduction
    # logits = ["random", "peaked"]  # the inputs' logits (harness.case.make_inputs); default random
    # modes = ["forward_backward"]   # default: every mode the sweep measures
    note = "google/gemma-2-2b config.json"

``vocab``, ``dim``, ``tokens``, ``dtypes`` and ``logits`` may each be one value or a list; an entry
expands to every combination, so a sweep over V is one entry with a list of vocabularies. Each
resulting case is named ``<name>[/V=..][/D=..][/peaked]/N=<tokens>/<dtype>`` (V and D appear when
the entry varies them, the logits when they are not random), and that name is unique within a sweep.

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

from harness.case import LOGIT_MODES, Case, OptionValues, format_case, parse_case
from harness.errors import HarnessError
from harness.machine_load import COMPANION_SESSIONS
from harness.results import MODES
from harness.spec import DTYPES, OPTION_DECLARATIONS, REDUCTIONS

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
CASES_DIR = PROJECT_ROOT / "cases"
# Every sweep case draws its inputs from this seed (on the device: see harness.case.make_inputs).
INPUT_SEED = 1234

FILE_KEYS = ("description", "tokens", "dtypes", "implementations", "case")
ENTRY_KEYS = ("name", "vocab", "dim", "hidden", "tokens", "dtypes", "logits", "tied", "options", "implementations",
              "modes", "companions", "companion_session", "note")
# Keys a case file's ``options`` table takes: the options and their older names, and the reduction.
OPTION_KEYS = ("reduction", *(key for option in OPTION_DECLARATIONS for key in (option.name, *option.aliases)))


@dataclass(frozen=True)
class SweepCase:
    """One measured configuration: a named ``Case`` from a case file, and what the sweep runs on it."""

    name: str  # unique within a sweep, e.g. "llama3-8b/N=8192/bfloat16"
    entry: str  # the case-file entry it came from, e.g. "llama3-8b" or "vocab-sweep"
    case: Case
    tied: bool = False  # the model ties its head to its embedding (recorded: the head's cost is the same)
    implementations: tuple[str, ...] | None = None  # None: every implementation the sweep runs
    modes: tuple[str, ...] | None = None  # None: every mode the sweep measures
    source: str = ""  # the case file
    companions: int = 0  # CPU-bound processes running beside its jobs (harness.machine_load.companion_processes)
    companion_session: str = "own"  # where they run: a session of their own, or the job's (COMPANION_SESSIONS)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "case": format_case(self.case)}

    @staticmethod
    def from_json(data: dict) -> SweepCase:
        data = dict(data, case=parse_case(data["case"]))
        for key in ("implementations", "modes"):
            if data[key] is not None:
                data[key] = tuple(data[key])
        return SweepCase(**data)


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

    def logits(self) -> list[str]:
        value = self.table.get("logits", "random")
        values = value if isinstance(value, list) else [value]
        if not values or any(v not in LOGIT_MODES for v in values):
            self.fail(f"'logits' must be among {', '.join(LOGIT_MODES)} (or a list of them), got {value!r}")
        return values

    def implementations(self, default) -> tuple[str, ...] | None:
        value = self.table.get("implementations", default)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            self.fail(f"'implementations' must be a non-empty list of names, got {value!r}")
        return tuple(value)

    def companions(self) -> int:
        value = self.table.get("companions", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(f"'companions' must be a number of processes (0 or more), got {value!r}")
        return value

    def companion_session(self) -> str:
        value = self.table.get("companion_session", "own")
        if value not in COMPANION_SESSIONS:
            self.fail(f"'companion_session' must be one of {', '.join(map(repr, COMPANION_SESSIONS))}, got {value!r}")
        if "companion_session" in self.table and not self.companions():
            self.fail("'companion_session' says where companions run, but the entry has no 'companions'")
        return value

    def modes(self) -> tuple[str, ...] | None:
        value = self.table.get("modes")
        if value is None:
            return None
        if not isinstance(value, list) or not value or any(v not in MODES for v in value):
            self.fail(f"'modes' must be a non-empty list among {', '.join(MODES)}, got {value!r}")
        return tuple(m for m in MODES if m in value)

    def options(self) -> tuple[str, OptionValues]:
        """The reduction and the option values of the entry's ``options`` table."""
        value = self.table.get("options", {})
        if not isinstance(value, dict):
            self.fail(f"'options' must be a table such as {{ softcap = 30.0 }}, got {value!r}")
        unknown = sorted(set(value) - set(OPTION_KEYS))
        if unknown:
            self.fail(f"unknown option {unknown[0]!r}; expected one of {', '.join(OPTION_KEYS)}")
        reduction = value.get("reduction", "mean")
        if reduction not in REDUCTIONS:
            self.fail(f"option 'reduction' has a bad value {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        values = {}
        for option in OPTION_DECLARATIONS:
            for key in (option.name, *option.aliases):
                if key in value:
                    try:
                        values[option.name] = option.from_toml(value[key])
                    except ValueError as exc:
                        self.fail(f"option {key!r} has a bad value {value[key]!r} ({exc})")
        return reduction, OptionValues.of(**values)


def load_case_file(path: Path) -> list[SweepCase]:
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

    cases: list[SweepCase] = []
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
        if "dim" in entry and "hidden" in entry:
            reader.fail("give D once: 'dim' (or its older name 'hidden'), not both")
        vocabs = reader.positive_ints("vocab")
        dims = reader.positive_ints("hidden" if "hidden" in entry else "dim")
        tokens = reader.positive_ints("tokens", default_tokens)
        dtypes = reader.dtypes(default_dtypes)
        logit_modes = reader.logits()
        tied = entry.get("tied", False)
        if not isinstance(tied, bool):
            reader.fail(f"'tied' must be true or false, got {tied!r}")
        if "note" in entry and not isinstance(entry["note"], str):
            reader.fail("'note' must be a string")
        reduction, options = reader.options()
        implementations = reader.implementations(default_impls)
        modes = reader.modes()
        companions, companion_session = reader.companions(), reader.companion_session()
        for vocab, dim, logits, n, dtype in itertools.product(vocabs, dims, logit_modes, tokens, dtypes):
            parts = [name]
            if len(vocabs) > 1:
                parts.append(f"V={vocab}")
            if len(dims) > 1:
                parts.append(f"D={dim}")
            if logits != "random":  # the names of random cases stay those of runs made before peaked existed
                parts.append(logits)
            parts += [f"N={n}", dtype]
            try:
                case = Case(tokens=(n,), dim=dim, vocab=vocab, dtype=dtype, reduction=reduction, options=options,
                            logits=logits, seed=INPUT_SEED)
            except HarnessError as exc:  # the options' own range checks (e.g. softcap > 0)
                reader.fail(str(exc))
            cases.append(SweepCase("/".join(parts), name, case, tied, implementations, modes, where, companions,
                                   companion_session))
    return cases


def load_cases(names: list[str]) -> list[SweepCase]:
    """The cases of several files (paths or names in cases/), each case name unique.

    ``FILE:ENTRY[,ENTRY...]`` keeps only the named entries of a file, e.g. ``models:llama3-8b``.
    """
    cases: dict[str, SweepCase] = {}
    for name in names:
        file_name, _, entry_filter = (name, "", "") if Path(name).is_file() else name.partition(":")
        path = find_case_file(file_name)
        loaded = load_case_file(path)
        if entry_filter:
            wanted = [e for e in entry_filter.split(",") if e]
            known = {case.entry for case in loaded}
            missing = [e for e in wanted if e not in known]
            if missing:
                raise HarnessError(
                    f"{_display_path(path)}: no entry {missing[0]!r}; entries: {', '.join(sorted(known))}"
                )
            loaded = [case for case in loaded if case.entry in wanted]
        for case in loaded:
            previous = cases.get(case.name)
            if previous is not None and previous != case:
                raise HarnessError(f"case {case.name!r} is declared in both {previous.source} and {case.source}")
            cases[case.name] = case
    return list(cases.values())


def with_dtypes(cases: list[SweepCase], dtypes: list[str]) -> list[SweepCase]:
    """The same cases in other dtypes (``--dtype``), renamed to match."""
    renamed: dict[str, SweepCase] = {}
    for case in cases:
        stem = case.name.rsplit("/", 1)[0]
        for dtype in dtypes:
            new = dataclasses.replace(case, name=f"{stem}/{dtype}", case=case.case.replace(dtype=dtype))
            renamed.setdefault(new.name, new)
    return list(renamed.values())


def canonical_case_argument(name: str) -> str:
    """A CASES argument as an absolute path (keeping any ``:ENTRY`` filter), to store for ``--resume``."""
    if Path(name).is_file():
        return str(Path(name).resolve())
    file_name, separator, entries = name.partition(":")
    return str(find_case_file(file_name).resolve()) + separator + entries
