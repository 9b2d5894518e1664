"""Instruction tasks over real text that ships with Python, for the real-LM learning benchmark
(``bench/federated.py``, SmolLM2-135M-Instruct) and ``fedquic demo --real``.

Every task is a short instruction with a few-token answer, built deterministically (no network, no
randomness beyond ``random.Random(seed)``) from data in the Python standard library:

  * ``unicodedata`` (Unicode 14.0 in CPython 3.11) names and properties,
  * ``html.entities.html5`` (WHATWG entity table),
  * docstrings of a fixed allow-list of pure-Python / C stdlib modules,
  * ``ast`` over the source of a fixed allow-list of stdlib ``.py`` files.

``task_examples(name, n, seed) -> list[(prompt, answer)]``.  Items are drawn without replacement from
the task's pool after a seed-dependent shuffle; ``split_examples`` gives disjoint train/test parts.
Labels come from the data's real provenance (the module a docstring lives in, the ``unicodedata``
property, the entity table) or from a deterministic rule (``ast`` node type).
Pools depend on the Python version (Unicode database, stdlib docstrings): pin it in the benchmark.
"""

from __future__ import annotations

import ast
import functools
import html.entities
import importlib
import inspect
import os
import random
import sysconfig
import unicodedata
from collections import defaultdict

# ------------------------------------------------------------------------------------------------ pools

# Code points considered for the Unicode tasks: the "alphabetic" part of the BMP up to Miscellaneous
# Symbols and Arrows (no CJK ideographs / Hangul syllables whose names are just code numbers).
_UNI_RANGE = range(0x20, 0x2C00)
_SKIP_CATS = {"Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Cf"}


@functools.cache
def _unicode_pool() -> tuple[tuple[str, str], ...]:
    out = []
    for cp in _UNI_RANGE:
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name or unicodedata.category(ch) in _SKIP_CATS:
            continue
        out.append((ch, name))
    return tuple(out)


@functools.cache
def _entity_pool() -> tuple[tuple[str, str, str], ...]:
    """(char, unicode name, entity): one canonical entity per single-code-point character.

    Canonical = the HTML 4 name when there is one, else the shortest (then alphabetically first)
    html5 name. Entities differing only by the trailing ';' are the same entity."""
    names = defaultdict(set)
    for ent, val in html.entities.html5.items():
        if len(val) == 1:
            names[val].add(ent.rstrip(";"))
    out = []
    for ch, ents in names.items():
        uname = unicodedata.name(ch, "")
        if not uname or unicodedata.category(ch) in _SKIP_CATS:
            continue
        html4 = html.entities.codepoint2name.get(ord(ch))
        ent = html4 if html4 else sorted(ents, key=lambda e: (len(e), e))[0]
        out.append((ch, uname, ent))
    out.sort(key=lambda t: ord(t[0]))
    return tuple(out)


# Modules whose own public callables provide docstrings (no GUI / side-effect modules).
DOC_MODULES = (
    "math",
    "os",
    "os.path",
    "string",
    "random",
    "statistics",
    "itertools",
    "functools",
    "shutil",
    "socket",
    "time",
    "datetime",
    "calendar",
    "textwrap",
    "difflib",
    "heapq",
    "base64",
    "binascii",
    "hashlib",
    "zlib",
    "struct",
    "inspect",
    "ast",
    "tokenize",
    "urllib.parse",
    "email.utils",
    "pathlib",
    "tarfile",
    "zipfile",
    "gzip",
    "csv",
    "configparser",
    "logging",
    "threading",
    "subprocess",
    "decimal",
    "fractions",
    "codecs",
    "locale",
    "gettext",
    "argparse",
    "enum",
    "dataclasses",
    "contextlib",
    "pickle",
    "tempfile",
    "uuid",
    "ipaddress",
    "json",
    "re",
    "html",
    "collections",
    "operator",
    "copy",
    "glob",
    "fnmatch",
    "sqlite3",
    "cmath",
    "io",
    "platform",
    "sysconfig",
    "warnings",
    "traceback",
    "pprint",
    "unittest",
    "doctest",
    "smtplib",
    "ftplib",
    "http.client",
    "mailbox",
    "imaplib",
    "xml.dom.minidom",
    "wave",
    "colorsys",
    "quopri",
    "secrets",
    "bisect",
    "array",
    "select",
    "signal",
)


def _summary(doc: str | None) -> str | None:
    if not doc:
        return None
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    line = " ".join(line.split())
    if "(" in line.split(" ")[0] or "->" in line or len(line.split()) < 4 or len(line) > 110:
        return None  # C signature lines, too short or too long
    return line


@functools.cache
def _doc_pool() -> tuple[tuple[str, str, str, str], ...]:
    """(summary, module, name, kind) for public functions/classes defined in DOC_MODULES.

    kind: 'function' | 'class' | 'exception'. Methods of those classes are included as kind
    'method' with name 'Class.method'."""
    seen_docs: set[str] = set()
    out = []
    for modname in DOC_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            owner = getattr(obj, "__module__", None)
            if owner not in (modname, "_" + modname, "posix" if modname == "os" else None) and not (
                modname == "os.path" and owner == "posixpath"
            ):
                continue
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                items = [(obj.__doc__, attr, kind)]
                for mname, meth in sorted(vars(obj).items()):
                    if not mname.startswith("_") and callable(meth):
                        items.append((getattr(meth, "__doc__", None), f"{attr}.{mname}", "method"))
            elif callable(obj):
                items = [(obj.__doc__, attr, "function")]
            else:
                continue
            for doc, name, kind in items:
                s = _summary(doc)
                if s is None or s in seen_docs:
                    continue
                seen_docs.add(s)
                out.append((s, modname, name, kind))
    return tuple(out)


SRC_FILES = (
    "os.py",
    "shutil.py",
    "argparse.py",
    "textwrap.py",
    "difflib.py",
    "tarfile.py",
    "zipfile/__init__.py",
    "zipfile.py",
    "logging/__init__.py",
    "subprocess.py",
    "inspect.py",
    "configparser.py",
    "calendar.py",
    "pathlib.py",
    "threading.py",
    "tempfile.py",
    "email/message.py",
    "http/client.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "gzip.py",
    "socket.py",
    "random.py",
    "statistics.py",
    "fractions.py",
    "datetime.py",
    "uuid.py",
    "ipaddress.py",
    "smtplib.py",
    "ftplib.py",
    "mailbox.py",
)


@functools.cache
def _src_pool() -> tuple[tuple[str, str], ...]:
    """(line, statement type, module) for one-line simple statements / compound-statement headers."""
    libdir = sysconfig.get_paths()["stdlib"]
    seen: set[str] = set()
    out = []
    for rel in SRC_FILES:
        path = os.path.join(libdir, rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            src = fh.read()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.stmt):
                continue
            line = lines[node.lineno - 1].strip()
            if isinstance(
                node,
                (ast.FunctionDef, ast.ClassDef, ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFunctionDef),
            ):
                if not line.endswith(":"):
                    continue
            elif node.end_lineno != node.lineno:
                continue
            if not (8 <= len(line) <= 60) or line in seen or line.startswith(("@", "#")):
                continue
            seen.add(line)
            mod = rel[:-3].replace("/__init__", "").replace("/", ".")
            out.append((line, type(node).__name__, mod))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ tasks


def _balanced(items, label_of, rng, n, top_k):
    """Round-robin over the top_k most frequent labels (ties by label), each label's items shuffled."""
    by = defaultdict(list)
    for it in items:
        by[label_of(it)].append(it)
    labels = sorted(by, key=lambda lab: (-len(by[lab]), lab))[:top_k]
    for lab in labels:
        rng.shuffle(by[lab])
    out, i = [], 0
    while len(out) < n and any(by[lab] for lab in labels):
        lab = labels[i % len(labels)]
        if by[lab]:
            out.append(by[lab].pop())
        i += 1
    rng.shuffle(out)
    return out


def _uni_category(rng, n):
    pool = _balanced(_unicode_pool(), lambda t: unicodedata.category(t[0]), rng, n, 8)
    return [(f"Unicode category of {name}?", unicodedata.category(ch)) for ch, name in pool]


def _uni_bidi(rng, n):
    pool = _balanced(_unicode_pool(), lambda t: unicodedata.bidirectional(t[0]), rng, n, 8)
    return [(f"Bidi class of {name}?", unicodedata.bidirectional(ch)) for ch, name in pool]


def _uni_char(rng, n):
    pool = list(_unicode_pool())
    rng.shuffle(pool)
    pool = [t for t in pool if unicodedata.category(t[0])[0] in "LNPS"]
    return [(f"Write the character {name}.", ch) for ch, name in pool[:n]]


def _uni_script(rng, n):
    """First word of the character name (its script or symbol family): a copy task."""
    pool = _balanced(_unicode_pool(), lambda t: t[1].split()[0], rng, n, 16)
    return [(f"Script of {name}?", name.split()[0].lower()) for ch, name in pool]


def _uni_case(rng, n):
    """Letter case by a deterministic rule over the general category: Lu/Lt -> upper, Ll -> lower,
    any other letter (Lm/Lo) -> caseless, anything else -> none. Same inputs as uni_category, coarser
    and re-mapped labels."""

    def case(ch):
        c = unicodedata.category(ch)
        return {"Lu": "upper", "Lt": "upper", "Ll": "lower"}.get(c, "caseless" if c[0] == "L" else "none")

    pool = _balanced(_unicode_pool(), lambda t: case(t[0]), rng, n, 4)
    return [(f"Letter case of {name}?", case(ch)) for ch, name in pool]


def _html_entity(rng, n):
    pool = list(_entity_pool())
    rng.shuffle(pool)
    return [(f"HTML entity for {name}?", ent) for ch, name, ent in pool[:n]]


def _doc_module(rng, n):
    pool = _balanced(_doc_pool(), lambda t: t[1], rng, n, 12)
    return [(f'Which Python module? "{s}"', mod) for s, mod, name, kind in pool]


def _doc_name(rng, n):
    pool = [t for t in _doc_pool() if t[3] == "function"]
    pool = list(pool)
    rng.shuffle(pool)
    return [(f'Name the {mod} function: "{s}"', name) for s, mod, name, kind in pool[:n]]


def _doc_kind(rng, n):
    pool = _balanced(_doc_pool(), lambda t: t[3], rng, n, 4)
    return [(f'Function, method, class or exception? "{s}"', kind) for s, mod, name, kind in pool]


def _src_stmt(rng, n):
    pool = _balanced(_src_pool(), lambda t: t[1], rng, n, 10)
    return [(f"Statement type of: {line}", kind) for line, kind, mod in pool]


def _src_module(rng, n):
    """Which stdlib file a source line comes from (provenance), among the 8 files with most lines."""
    pool = _balanced(_src_pool(), lambda t: t[2], rng, n, 8)
    return [(f"Which stdlib module has this line? {line}", mod) for line, kind, mod in pool]


TASKS = {
    "uni_category": _uni_category,
    "uni_bidi": _uni_bidi,
    "uni_char": _uni_char,
    "uni_script": _uni_script,
    "uni_case": _uni_case,
    "html_entity": _html_entity,
    "doc_module": _doc_module,
    "doc_name": _doc_name,
    "doc_kind": _doc_kind,
    "src_stmt": _src_stmt,
    "src_module": _src_module,
}


def pool_size(name: str) -> int:
    return len(TASKS[name](random.Random(0), 10**9))


def task_examples(name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of task ``name``; deterministic in (name, n, seed).

    Raises ValueError when the task's pool holds fewer than n items."""
    items = TASKS[name](random.Random(f"{name}:{seed}"), n)
    if len(items) < n:
        raise ValueError(f"task {name!r} has only {len(items)} items, {n} asked")
    return items


def split_examples(name: str, n_train: int, n_test: int, seed: int = 0):
    """Disjoint (train, test) lists: one draw of n_train + n_test items, cut in two."""
    items = task_examples(name, n_train + n_test, seed)
    return items[:n_train], items[n_train:]


if __name__ == "__main__":
    from collections import Counter

    for t in TASKS:
        items = TASKS[t](random.Random(0), 10**9)
        c = Counter(a for _, a in items)
        print(f"{t:14s} pool={len(items):5d} labels={len(c):5d} top={c.most_common(4)}")
        for p, a in task_examples(t, 3, 0):
            print("    ", repr(p), "->", repr(a))
