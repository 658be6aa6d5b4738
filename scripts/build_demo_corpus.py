#!/usr/bin/env python
"""Build the bundled demo corpus (``demo/midi``) from the music21 core corpus.

Usage::

    python scripts/build_demo_corpus.py --out demo/midi                      # the bundled demo (116 files)
    python scripts/build_demo_corpus.py --reference --out data/reference-midi  # every file that passes

Reads scores that ship inside the installed ``music21`` package
(``music21.corpus``), converts each one to a Type-1 MIDI file with one track
per part and a General MIDI program chosen from the part name, and writes

* ``<out>/<collection>/<name>.mid``
* ``<out>/../SOURCES.md`` (per-file provenance, licence notes, summary table)

Only collections whose licence notes (as shipped with music21) allow
redistribution are used; see ``LICENCE_NOTES`` below and demo/SOURCES.md.

music21 is needed ONLY by this script (``pip install music21``), not by the
MeloFormer package.  symusic and miditoolkit are used for the final check.

The selection is deterministic (fixed candidate lists in natural-sorted
order, evenly spaced picks, fixed quotas), so rerunning the script rebuilds
the same files.  ``--reference`` applies the same licence rules and program
mapping but takes every candidate of every collection (all chorales, all
movements of the listed quartets, every tune of the tune books) with no quota
and a larger size cap: the reference corpus for real training runs, built,
not committed.  Conversion runs in a 2-process pool.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path

MAX_MIDI_BYTES = 80 * 1024  # skip pieces whose MIDI would exceed this
MAX_SOURCE_BYTES = 120 * 1024  # do not even try to convert bigger sources
REFERENCE_MAX_BYTES = 1024 * 1024  # both caps for the reference corpus

# ---------------------------------------------------------------------------
# Part name -> General MIDI program (0-based)
# ---------------------------------------------------------------------------
# Order matters: the first matching rule wins (e.g. "contrabass"/"violone"
# before "bass", "bassoon" before "bass", "viola" before "violin").
PROGRAM_RULES: list[tuple[str, int]] = [
    (r"continuo", 19),  # (basso) continuo -> organ
    (r"contrabass|double ?bass|kontrabass|violone", 43),
    (r"bassoon|fagott|fagotto", 70),
    (r"violoncello|\bcello|\bvc\b", 42),
    (r"viola\b|\bvla\b|alto viol", 41),
    (r"violin|violino|fiddle|\bvn\b|\bvl\b", 40),
    (r"harpsichord|cembalo|clavecin", 6),
    (r"organ|organo|orgel", 19),
    (r"piano|pianoforte|keyboard|klavier|clavier", 0),
    (r"recorder|flauto dolce|blockfl", 74),
    (r"flute|flauto|traverso|fl[oö]te|piccolo", 73),
    (r"oboe|hautbois", 68),
    (r"clarinet|clarinetto|klarinette", 71),
    (r"horn|corno", 60),
    (r"trumpet|tromba|trompete", 56),
    (r"guitar|lute|liuto|laute|theorbo", 24),
    # voices: upper voices -> choir aahs (52), lower voices -> voice oohs (53)
    (
        r"soprano|sopran|canto|cantus|quinto|quintus|superius|discantus|treble|"
        r"triplum|^s\.?$|^s\d?$",
        52,
    ),
    (r"alto|altus|contralto|^a\.?$|^a\d?$", 52),
    (r"tenor|tenore|^t\.?$|^t\d?$", 53),
    (r"bass|basso|bassus|baritone|^b\.?$|^b\d?$", 53),
    (r"voice|vox|voce|solo|chor", 53),
]
DEFAULT_PROGRAM = 0


def program_for(name: str | None) -> int:
    """Map a part / instrument name to a General MIDI program (0-based)."""
    if not name:
        return DEFAULT_PROGRAM
    n = name.strip().lower()
    for pattern, program in PROGRAM_RULES:
        if re.search(pattern, n):
            return program
    return DEFAULT_PROGRAM


# ---------------------------------------------------------------------------
# Licence notes per collection (what the notes shipped with music21 say)
# ---------------------------------------------------------------------------
LICENCE_NOTES = {
    "bach_chorales": (
        "J.S. Bach (1685-1750): the compositions are in the public domain. "
        "The MusicXML encodings are Margaret Greentree's edition of the "
        "chorales; music21's acknowledgements (about/about.rst, 'Licensing') "
        "state that she 'kindly gave permission for distribution of her "
        "edited collection of the Bach chorales in MusicXML format as part "
        "of the music21 corpus'. Most chorale files carry a credit such as "
        "'PDF \u00a9 2004 Margaret Greentree' / 'used by permission' (a claim on "
        "the PDF engraving, which a MIDI file does not contain); some older "
        "Finale exports carry no notice at all (the per-file table below quotes "
        "what each file says). No non-commercial or other "
        "restriction is embedded in these files or in the bach/ directory. The three CCARH Humdrum files in bach/ "
        "(bwv277.krn, bwv281.krn, bwv366.krn: 'Copyright 1994, CCARH ... "
        "Rights to all derivative electronic formats reserved') are NOT used."
    ),
    "string_quartets": (
        "Haydn (1732-1809), Mozart (1756-1791), Beethoven (1770-1827): "
        "public-domain compositions. music21's acknowledgements state that "
        "the quartets of Beethoven, Haydn and Mozart come from Project "
        "Gutenberg's public-domain MusicXML collection ('Project Gutenberg "
        "houses public domain music, including the quartets of Beethoven, "
        "Haydn, and Mozart, in musicxml format which we have been able to "
        "include in music21'). No rights notice or restriction is embedded in "
        "the files used. (The Humdrum copies beethoven/opus18no1/*.krn are not "
        "used; the .mxl versions are.)"
    ),
    "monteverdi_madrigals": (
        "Claudio Monteverdi (1567-1643), Il terzo libro de madrigali (1592) "
        "and Il quarto libro de madrigali (1603): public-domain compositions. "
        "The music21 encodings of Books III and IV carry no rights notice and "
        "no licence restriction (none in the files, none in the monteverdi/ "
        "directory); music21 distributes them under its general corpus "
        "statement (distributed with the permission of the encoders, free in "
        "the US to the best of its knowledge). CAVEAT: the source edition of "
        "these encodings is not documented. Book V is deliberately NOT used: "
        "madrigal.5.2/5.3/5.4/5.5/5.6/5.8 embed the rights line 'UT ORPHEUS "
        "EDIZIONI 2003' (a modern commercial edition), so the whole book is "
        "excluded."
    ),
    "pd_cc_marked": (
        "Individually licensed files whose own <rights> element grants "
        "redistribution: weber/concertino_clarinet ('Released to Public "
        "Domain in 1998'), johnson_j_r/lift_every_voice ('Public Domain "
        "(Encoding by MSAC: CC0)'), liliuokalani/aloha_oe ('Copyright 1884 by "
        "LILIUOKALANI (Now, Public Domain; Encoding by MSAC, CC0)'), "
        "lusitano/allor_che_ignuda ('Copyright 2022 Michael Scott Asato "
        "Cuthbert: released as CC0/Public Domain'), and corelli/opus3no1/"
        "1grave ('(c) 2014, Creative Commons License (CC-BY)': redistribution "
        "allowed with attribution, given here)."
    ),
    "oneills_1850": (
        "Francis O'Neill, 'O'Neill's Music of Ireland: 1850 Melodies' "
        "(Chicago, 1903): traditional tunes, public domain (published before "
        "1929; O'Neill died 1936). ABC transcriptions (credited per tune in "
        "their Z: field, e.g. Norbert Paap) provided to music21 by John "
        "Chambers, who per music21's acknowledgements 'has provided ABC "
        "editions to distribute with music21, including ... the O'Neill's "
        "Music of Ireland Collection'. No restriction is embedded."
    ),
    "ryans_mammoth": (
        "'Ryan's Mammoth Collection' (Boston, Elias Howe, 1883): traditional "
        "and 19th-century fiddle tunes, public domain. ABC editions provided "
        "to music21 by John Chambers ('... and Ryan's Mammoth Collection of "
        "fiddle tunes', music21 acknowledgements); contributor credits are "
        "copied from each tune's Z: field. No restriction is embedded."
    ),
}

COLLECTION_TITLES = {
    "bach_chorales": "J.S. Bach, four-part chorales",
    "string_quartets": "Haydn / Mozart / Beethoven string quartet movements",
    "monteverdi_madrigals": "Monteverdi, five-voice madrigals (Books III, IV)",
    "pd_cc_marked": "Individually PD/CC0/CC-BY-marked scores",
    "oneills_1850": "O'Neill's Music of Ireland (single-line tunes)",
    "ryans_mammoth": "Ryan's Mammoth Collection (single-line fiddle tunes)",
}

SKIPPED_COLLECTIONS = [
    (
        "essenFolksong/",
        "license.txt: permission only 'for non-commercial distribution and use of these files in music21'.",
    ),
    (
        "palestrina/",
        "every file: 'Copyright 2000, John Miller ... Rights to all "
        "derivative electronic formats reserved ... This file must be accompanied "
        "by the licensing agreement'.",
    ),
    (
        "bach/*.krn (3 files)",
        "'Copyright 1994, Center for Computer Assisted "
        "Research in the Humanities ... Rights to all derivative electronic formats "
        "reserved'.",
    ),
    ("monteverdi/ Book V", "files embed 'UT ORPHEUS EDIZIONI 2003' rights lines (modern commercial edition)."),
    (
        "trecento/",
        "transcriptions from 'Polyphonic Music of the Fourteenth "
        "Century' (Editions de L'Oiseau-Lyre), many files carry a 'Copyright' "
        "rights element; modern edition, not clearly redistributable.",
    ),
    (
        "josquin/",
        "Laura E. Conrad's editions are GPL-2+: redistributable, but "
        "copyleft obligations (licence text, corresponding source) would apply to "
        "the derived files; skipped to keep the demo corpus free of share-alike "
        "terms.",
    ),
    ("beach/, webern/, ciconia/, luca/", "CC-BY-SA (share-alike) encodings; skipped for the same reason."),
    (
        "joplin/, schumann_clara/, handel/, verdi/, schubert/, leadSheet/, "
        "nottingham-dataset/, airdsAirs/, miscFolk/, cpebach/, mozart/k545, "
        "schumann_robert/, schoenberg/",
        "not needed, and/or no licence statement "
        "in the file (MuseScore/Wikifonia uploads, a bare 'Copyright' notice, "
        "or one lead sheet marked 'All Rights Reserved'); not used.",
    ),
]

# ---------------------------------------------------------------------------
# Candidate selection (deterministic)
# ---------------------------------------------------------------------------
QUARTET_TITLES = {
    "haydn/opus1no1": ("Joseph Haydn", "String Quartet in B-flat major, Op. 1 No. 1 (Hob. III:1)"),
    "haydn/opus74no1": ("Joseph Haydn", "String Quartet in C major, Op. 74 No. 1 (Hob. III:72)"),
    "mozart/k80": ("W. A. Mozart", "String Quartet No. 1 in G major, K. 80"),
    "mozart/k155": ("W. A. Mozart", "String Quartet No. 2 in D major, K. 155"),
    "mozart/k156": ("W. A. Mozart", "String Quartet No. 3 in G major, K. 156"),
    "mozart/k458": ("W. A. Mozart", "String Quartet No. 17 in B-flat major, K. 458 'Hunt'"),
    "beethoven/opus18no1": ("Ludwig van Beethoven", "String Quartet No. 1 in F major, Op. 18 No. 1"),
    "beethoven/opus59no1": ("Ludwig van Beethoven", "String Quartet No. 7 in F major, Op. 59 No. 1"),
    "beethoven/opus59no2": ("Ludwig van Beethoven", "String Quartet No. 8 in E minor, Op. 59 No. 2"),
    "beethoven/opus59no3": ("Ludwig van Beethoven", "String Quartet No. 9 in C major, Op. 59 No. 3"),
}

PD_CC_FILES = [
    (
        "corelli/opus3no1/1grave.xml",
        "Arcangelo Corelli",
        "Sonata da chiesa Op. 3 No. 1, I. Grave",
        "CC-BY (encoding (c) 2014, as stated in the file); composition public domain",
    ),
    (
        "johnson_j_r/lift_every_voice.mxl",
        "J. Rosamond Johnson",
        "Lift Every Voice and Sing (1900)",
        "Public domain; encoding CC0 (Michael Scott Asato Cuthbert)",
    ),
    (
        "liliuokalani/aloha_oe.mxl",
        "Liliuokalani",
        "Aloha 'Oe (1884)",
        "Public domain; encoding CC0 (Michael Scott Asato Cuthbert)",
    ),
    (
        "lusitano/allor_che_ignuda.mxl",
        "Vicente Lusitano",
        "Allor che ignuda d'herb et fior la terra",
        "CC0 / public domain (Michael Scott Asato Cuthbert, 2022)",
    ),
    (
        "weber/concertino_clarinet.mxl",
        "Carl Maria von Weber",
        "Concertino for Clarinet and Piano, Op. 26",
        "Public domain ('Released to Public Domain in 1998')",
    ),
]

QUOTAS = {
    "bach_chorales": 40,
    "string_quartets": 25,
    "monteverdi_madrigals": 16,
    "pd_cc_marked": len(PD_CC_FILES),
    "oneills_1850": 18,
    "ryans_mammoth": 12,
}
# how many evenly spaced candidates to try per collection (quota + margin)
MARGIN = {
    "bach_chorales": 10,
    "monteverdi_madrigals": 6,
    "oneills_1850": 6,
    "ryans_mammoth": 6,
}


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _spread(items: list, k: int) -> list:
    """k evenly spaced items of a sorted list (deterministic)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def corpus_root() -> Path:
    import music21.corpus

    return Path(music21.corpus.__file__).resolve().parent


def build_candidates(reference: bool = False) -> dict[str, list[dict]]:
    """Candidates per collection: evenly spaced picks for the demo, everything for ``reference``."""
    root = corpus_root()
    pick = (
        (lambda items, coll: list(items))
        if reference
        else (lambda items, coll: _spread(items, QUOTAS[coll] + MARGIN[coll]))
    )
    max_source = REFERENCE_MAX_BYTES if reference else MAX_SOURCE_BYTES
    cands: dict[str, list[dict]] = {}

    # Bach chorales: bach/bwv<N>.<M>.mxl and bach/bwv<N>.mxl only (no variants)
    chorales = sorted(
        (
            p.name
            for p in (root / "bach").glob("*.mxl")
            if re.fullmatch(r"bwv\d+(\.\d+)?\.mxl", p.name) and p.name not in ("bwv846.mxl",)
        ),  # 846 = WTC prelude, not a chorale
        key=_natural_key,
    )
    picks = pick(chorales, "bach_chorales")
    cands["bach_chorales"] = [dict(path=f"bach/{n}", out=n[:-4].replace(".", "_")) for n in picks]

    # String quartets: every movement file of the listed works (source size
    # capped), interleaved round-robin over composers so the quota mixes them.
    per_composer: dict[str, list[dict]] = collections.OrderedDict()
    for work in QUARTET_TITLES:
        for p in sorted((root / work).glob("*.mxl"), key=lambda p: _natural_key(p.name)):
            if p.stat().st_size <= max_source:
                rel = f"{work}/{p.name}"
                per_composer.setdefault(work.split("/")[0], []).append(dict(path=rel, out=rel[:-4].replace("/", "_")))
    q = []
    for i in range(max(len(v) for v in per_composer.values())):
        q.extend(v[i] for v in per_composer.values() if i < len(v))
    cands["string_quartets"] = q

    # Monteverdi Books III and IV only (Book V excluded, see LICENCE_NOTES)
    mads = sorted(
        (
            p.name
            for p in (root / "monteverdi").glob("madrigal.*.mxl")
            if re.fullmatch(r"madrigal\.[34]\.\d+\.mxl", p.name)
        ),
        key=_natural_key,
    )
    picks = pick(mads, "monteverdi_madrigals")
    cands["monteverdi_madrigals"] = [dict(path=f"monteverdi/{n}", out=n[:-4].replace(".", "_")) for n in picks]

    cands["pd_cc_marked"] = [
        dict(path=p, out=Path(p).with_suffix("").as_posix().replace("/", "_")) for p, *_ in PD_CC_FILES
    ]

    # O'Neill's: the first tune (lowest X:) of evenly spaced book files; every tune for the reference corpus
    files = sorted((p.name for p in (root / "oneills1850").glob("*.abc")), key=_natural_key)
    c = []
    for n in pick(files, "oneills_1850"):
        text = (root / "oneills1850" / n).read_text(encoding="utf-8", errors="replace")
        xs = [int(x) for x in re.findall(r"^X:\s*(\d+)", text, re.M)]
        xs = [x for x in xs if x > 0]
        for x in xs if reference else xs[:1]:
            c.append(dict(path=f"oneills1850/{n}", number=x, out=f"oneills_{n[:-4]}_x{x}"))
    cands["oneills_1850"] = c

    # Ryan's Mammoth: evenly spaced single-tune files
    files = sorted((p.name for p in (root / "ryansMammoth").glob("*.abc")), key=_natural_key)
    cands["ryans_mammoth"] = [
        dict(path=f"ryansMammoth/{n}", out=f"ryans_{n[:-4]}") for n in pick(files, "ryans_mammoth")
    ]

    for coll, lst in cands.items():
        for d in lst:
            d["collection"] = coll
    return cands


# ---------------------------------------------------------------------------
# Conversion (runs in worker processes)
# ---------------------------------------------------------------------------
def _abc_field(root: Path, rel: str, number: int | None, field: str) -> list[str]:
    text = (root / rel).read_text(encoding="utf-8", errors="replace")
    if number is not None:
        m = re.search(rf"^X:\s*{number}\b.*?(?=^X:|\Z)", text, re.M | re.S)
        text = m.group(0) if m else ""
    return [v.strip().strip('"') for v in re.findall(rf"^{field}:\s*(.*)$", text, re.M) if v.strip()]


def source_notices(rel: str) -> tuple[list[str], list[str]]:
    """(<rights> texts, <credit-words> texts) in the header of a MusicXML source."""
    import zipfile

    f = corpus_root() / rel
    if f.suffix == ".mxl":
        with zipfile.ZipFile(f) as z:
            names = [n for n in z.namelist() if not n.startswith("META-INF")]
            raw = z.read(names[0])
    elif f.suffix in (".xml", ".musicxml"):
        raw = f.read_bytes()
    else:
        return [], []
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8", "replace")
    i = text.find("<part-list")
    head = text[: i if i > 0 else 20000]
    clean = lambda x: re.sub(r"\s+", " ", x).strip()  # noqa: E731
    rights = [clean(x) for x in re.findall(r"<rights[^>]*>(.*?)</rights>", head, re.S) if clean(x)]
    credits = [clean(x) for x in re.findall(r"<credit-words[^>]*>(.*?)</credit-words>", head, re.S) if clean(x)]
    return rights, credits


def convert_one(cand: dict) -> dict:
    """Parse one corpus score, set per-part programs, write MIDI bytes."""
    import warnings

    warnings.filterwarnings("ignore")
    from music21 import corpus, instrument, note

    res = dict(cand)
    t0 = time.time()
    try:
        kw = {"number": cand["number"]} if cand.get("number") is not None else {}
        score = corpus.parse(cand["path"], **kw)
        parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
        part_info = []
        for part in parts:
            insts = list(part.recurse().getElementsByClass(instrument.Instrument))
            name = part.partName
            if not name and insts:
                name = insts[0].partName or insts[0].instrumentName
            prog = program_for(name)
            if insts:
                for inst in insts:
                    inst.midiProgram = prog
            else:
                inst = instrument.Instrument()
                inst.midiProgram = prog
                if name:
                    inst.partName = name
                part.insert(0, inst)
            part_info.append((name or "", prog))
            # Lyrics are not needed and make symusic create note-less
            # lyric-only tracks; drop them.
            for n in part.recurse().getElementsByClass(note.GeneralNote):
                if n.lyrics:
                    n.lyrics = []
        with tempfile.TemporaryDirectory() as td:
            fp = os.path.join(td, "out.mid")
            score.write("midi", fp=fp)
            data = Path(fp).read_bytes()
        md = score.metadata
        res.update(
            ok=True,
            data=data,
            parts=part_info,
            m21_title=(md.title or md.movementName) if md else None,
            m21_composer=md.composer if md else None,
        )
        res["src_rights"], res["src_credits"] = source_notices(cand["path"])
        if cand["path"].endswith(".abc"):
            root = corpus_root()
            res["abc_T"] = _abc_field(root, cand["path"], cand.get("number"), "T")
            res["abc_Z"] = _abc_field(root, cand["path"], cand.get("number"), "Z")
            res["abc_B"] = _abc_field(root, cand["path"], cand.get("number"), "B")
    except Exception as e:  # noqa: BLE001 - log and skip
        msg = re.sub(r"\s*,?\s*id\(\)=\d+|\s+0x[0-9a-f]+", "", str(e))  # no run-specific ids
        res.update(ok=False, error=f"{type(e).__name__}: {msg[:200]}")
    res["seconds"] = round(time.time() - t0, 2)
    return res


# ---------------------------------------------------------------------------
# Metadata for SOURCES.md
# ---------------------------------------------------------------------------
_BOOK = {"3": "Il terzo libro de madrigali (1592)", "4": "Il quarto libro de madrigali (1603)"}


def clean_credit(z: str) -> str:
    """Transcriber credit from an ABC Z: field, without e-mail addresses/URLs."""
    if re.match(r"^\s*(abc|abcmus)\b", z, re.I):  # software version, not a credit
        return ""
    out = []
    for tok in z.split():
        core = tok.strip("()<>,;\"'")
        if "@" in core:
            local = core.split("@")[0]
            if "." in local:
                out.append(local)  # e.g. henrik.norbeck@... -> henrik.norbeck
            continue
        if "http" in core or re.search(r"\w:\w", core) or re.search(r"\.(com|org|net|edu|uk|ca|dk|se|nl)$", core):
            continue  # URLs and obfuscated addresses
        out.append(tok)
    return " ".join(out).strip(" ,;\"'")


def describe(res: dict, chorale_titles: dict) -> tuple[str, str, str]:
    """(composer, title, licence) for one converted file."""
    coll, path = res["collection"], res["path"]
    if coll == "bach_chorales":
        bwv = re.fullmatch(r"bach/bwv(.+)\.mxl", path).group(1)
        t = chorale_titles.get(bwv)
        title = f"Chorale BWV {bwv}" + (f", '{t}'" if t else "")
        credit = [c for c in res.get("src_credits", []) if re.search(r"greentree|permission", c, re.I)]
        if credit:
            lic = "PD composition; encoding credit in file: '" + "' / '".join(credit) + "'"
        else:
            lic = "PD composition; no rights notice or credit in the encoding"
        if res.get("src_rights"):
            lic += f"; <rights>: {'; '.join(res['src_rights'])}"
        return "Johann Sebastian Bach", title, lic
    if coll == "string_quartets":
        work, mv = path.rsplit("/", 1)
        comp, title = QUARTET_TITLES[work]
        m = re.match(r"movement(\d+)", mv)
        lic = "PD composition; no rights notice in the encoding (Gutenberg quartets, see notes)"
        if res.get("src_rights"):
            lic += f"; <rights>: {'; '.join(res['src_rights'])}"
        return comp, f"{title}, movement {m.group(1) if m else mv}", lic
    if coll == "monteverdi_madrigals":
        _, b, n = re.fullmatch(r"monteverdi/madrigal\.(\d)\.(\d+)\.mxl", path).group(0, 1, 2)
        lic = "PD composition; no rights notice in the encoding (see caveat)"
        if res.get("src_rights"):
            lic += f"; <rights>: {'; '.join(res['src_rights'])}"
        return "Claudio Monteverdi", f"{_BOOK[b]}, no. {n}", lic
    if coll == "pd_cc_marked":
        for p, comp, title, lic in PD_CC_FILES:
            if p == path:
                return comp, title, lic
    if coll in ("oneills_1850", "ryans_mammoth"):
        title = " / ".join(res.get("abc_T") or []) or (res.get("m21_title") or "?")
        z = "; ".join(c for c in map(clean_credit, res.get("abc_Z") or []) if c)
        book = "O'Neill's Music of Ireland (1903)" if coll == "oneills_1850" else "Ryan's Mammoth Collection (1883)"
        lic = f"PD tune ({book}); ABC via John Chambers" + (f"; transcr.: {z}" if z else "")
        if res.get("number") is not None:
            title = f"{title} (X:{res['number']})"
        return "Traditional", title, lic
    return res.get("m21_composer") or "?", res.get("m21_title") or "?", "?"


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------
def verify(out_dir: Path, expected: dict[str, list[int]]) -> dict:
    import miditoolkit
    import symusic

    files = sorted(out_dir.rglob("*.mid"))
    total = sum(f.stat().st_size for f in files)
    track_dist = collections.Counter()
    prog_dist = collections.Counter()
    problems = []
    for f in files:
        rel = f.relative_to(out_dir).as_posix()
        try:
            sc = symusic.Score(str(f))
            mt = miditoolkit.MidiFile(str(f))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{rel}: load failed: {e}")
            continue
        tracks = [t for t in sc.tracks]
        n_notes = sum(len(t.notes) for t in tracks)
        if n_notes == 0 or sum(len(i.notes) for i in mt.instruments) == 0:
            problems.append(f"{rel}: no notes")
        if any(len(t.notes) == 0 for t in tracks):
            problems.append(f"{rel}: symusic sees a note-less track")
        progs = [int(t.program) for t in tracks]
        if rel in expected and sorted(progs) != sorted(expected[rel]):
            problems.append(f"{rel}: programs {progs} != expected {expected[rel]}")
        if len(mt.instruments) != len(tracks):
            problems.append(f"{rel}: miditoolkit {len(mt.instruments)} vs symusic {len(tracks)} tracks")
        with open(f, "rb") as fh:
            head = fh.read(10)
        if head[:4] != b"MThd" or int.from_bytes(head[8:10], "big") != 1:
            problems.append(f"{rel}: not a Type-1 MIDI file")
        track_dist[len(tracks)] += 1
        prog_dist.update(progs)
    return dict(n=len(files), total=total, track_dist=track_dist, prog_dist=prog_dist, problems=problems)


GM_NAMES = {
    0: "Acoustic Grand Piano",
    6: "Harpsichord",
    19: "Church Organ",
    24: "Nylon Guitar",
    40: "Violin",
    41: "Viola",
    42: "Cello",
    43: "Contrabass",
    52: "Choir Aahs",
    53: "Voice Oohs",
    56: "Trumpet",
    60: "French Horn",
    68: "Oboe",
    70: "Bassoon",
    71: "Clarinet",
    73: "Flute",
    74: "Recorder",
}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo/midi", help="output folder for .mid files")
    ap.add_argument("--sources", default=None, help="SOURCES.md path (default: <out>/../, --reference: <out>/)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="every candidate that passes, no quotas (see above)")
    args = ap.parse_args(argv)

    import music21

    out_dir = Path(args.out)
    sources_md = Path(args.sources or (out_dir / "SOURCES.md" if args.reference else out_dir.parent / "SOURCES.md"))
    t0 = time.time()

    cands = build_candidates(args.reference)
    quota = (lambda coll: len(cands[coll])) if args.reference else QUOTAS.__getitem__
    max_midi = REFERENCE_MAX_BYTES if args.reference else MAX_MIDI_BYTES
    flat = [c for coll in cands.values() for c in coll]
    print(f"music21 {music21.__version__}: {len(flat)} candidates, {args.workers} workers", flush=True)

    results: dict[tuple, dict] = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=20) as pool:
        for res in pool.imap_unordered(convert_one, flat):
            key = (res["path"], res.get("number"))
            results[key] = res
            status = "ok" if res["ok"] else "FAIL " + res["error"]
            size = len(res.get("data", b""))
            print(
                f"  [{len(results):3d}/{len(flat)}] {res['path']}"
                f"{'#' + str(res['number']) if res.get('number') is not None else ''}"
                f" {res['seconds']}s {size}B {status}",
                flush=True,
            )

    # Deterministic selection: candidate order, fixed quota per collection.
    selected: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for coll, lst in cands.items():
        taken = 0
        for c in lst:
            res = results[(c["path"], c.get("number"))]
            label = c["path"] + (f" (X:{c['number']})" if c.get("number") is not None else "")
            if not res["ok"]:
                skipped.append((label, res["error"]))
                continue
            if coll != "pd_cc_marked" and res.get("src_rights"):
                # only files without any rights notice are taken from the
                # collections whose licence is established at collection level
                skipped.append((label, f"unexpected <rights> notice: {res['src_rights']}"))
                continue
            if len(res["data"]) > max_midi:
                skipped.append((label, f"MIDI too large ({len(res['data'])} bytes > {max_midi})"))
                continue
            if taken < quota(coll):
                selected.append(res)
                taken += 1
        if taken < quota(coll):
            print(f"WARNING: {coll}: only {taken}/{quota(coll)} files", flush=True)

    # Write files (clear previous .mid output first so reruns are exact).
    if out_dir.exists():
        for old in out_dir.rglob("*.mid"):
            old.unlink()
        for d in sorted((p for p in out_dir.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
    expected: dict[str, list[int]] = {}
    for res in selected:
        rel = f"{res['collection']}/{res['out']}.mid"
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(res["data"])
        expected[rel] = [p for _, p in res["parts"]]

    rep = verify(out_dir, expected)
    print(f"\nfiles: {rep['n']}  total: {rep['total']} bytes ({rep['total'] / 1e6:.2f} MB)")
    print("tracks per file:", dict(sorted(rep["track_dist"].items())))
    print(
        "programs (track count):",
        {f"{k} {GM_NAMES.get(k, '')}".strip(): v for k, v in sorted(rep["prog_dist"].items())},
    )
    for p in rep["problems"]:
        print("PROBLEM:", p)
    for label, why in skipped:
        print("skipped:", label, "-", why)

    command = (
        f"python scripts/build_demo_corpus.py {'--reference ' if args.reference else ''}--out {out_dir.as_posix()}"
    )
    write_sources(sources_md, out_dir, selected, skipped, rep, music21.__version__, command, max_midi)
    print(f"wrote {sources_md}  ({time.time() - t0:.0f}s total, {args.workers} workers)")
    return 1 if rep["problems"] else 0


def write_sources(path: Path, out_dir: Path, selected, skipped, rep, m21_version, command, max_midi):
    from music21.corpus import chorales

    chorale_titles = {k: v.get("title") for k, v in chorales.ChoraleListRKBWV().byBWV.items()}
    try:
        rel_out = out_dir.resolve().relative_to(path.parent.resolve()).as_posix()
    except ValueError:
        rel_out = out_dir.as_posix()

    by_coll = collections.defaultdict(list)
    for r in selected:
        by_coll[r["collection"]].append(r)

    L = []
    L.append("# Demo corpus: sources and licences\n")
    L.append(
        f"MIDI files under `{rel_out}/` were generated by `scripts/build_demo_corpus.py` "
        f"from scores in the corpus that ships with **music21 {m21_version}** "
        "(`music21.corpus`). Rebuild with:\n"
    )
    L.append(f"```\npip install music21\n{command}\n```\n")
    L.append("## Summary\n")
    L.append("| collection | files | bytes | tracks per file |")
    L.append("|---|---:|---:|---|")
    for coll, rs in by_coll.items():
        sizes = sum(len(r["data"]) for r in rs)
        tc = collections.Counter(len(r["parts"]) for r in rs)
        L.append(
            f"| {coll} ({COLLECTION_TITLES[coll]}) | {len(rs)} | {sizes} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(tc.items()))
            + " |"
        )
    L.append(
        f"| **total** | **{rep['n']}** | **{rep['total']}** ({rep['total'] / 1e6:.2f} MB) | "
        + ", ".join(f"{k}: {v}" for k, v in sorted(rep["track_dist"].items()))
        + " |\n"
    )
    L.append(
        "Track-count distribution (tracks with notes, as read by `symusic.Score`): "
        + ", ".join(f"{k} track{'s' if k > 1 else ''}: {v} files" for k, v in sorted(rep["track_dist"].items()))
        + ".\n"
    )
    L.append(
        "Programs (number of tracks): "
        + ", ".join(f"{k} {GM_NAMES.get(k, '')}: {v}" for k, v in sorted(rep["prog_dist"].items()))
        + ".\n"
    )
    L.append("## Conversion\n")
    L.append(
        "* `music21.corpus.parse(path)` then `score.write('midi')`: Type-1 MIDI, one track "
        "per part (a piano written on two staves gives two piano tracks), a conductor track "
        "with the tempo marks, time and key signatures exactly as music21 writes them "
        "(music21 expands repeats; scores without a tempo mark get 120 bpm)."
    )
    L.append(
        "* Each part gets a General MIDI program from its part name (violin 40, viola 41, "
        "cello 42, violone/contrabass 43, soprano/alto/canto/quinto voices 52, tenor/bass "
        "voices 53, piano 0, organ 19, clarinet 71, ...; unknown or unnamed parts 0). The "
        "rule table is `PROGRAM_RULES` in the script."
    )
    L.append(
        "* Lyrics are dropped (they are not needed, and lyric-only events make some readers "
        "report extra empty tracks). Nothing is truncated; pieces whose MIDI would exceed "
        f"{max_midi // 1024} KB are skipped instead."
    )
    L.append(
        "* Selection is deterministic: natural-sorted candidate lists, evenly spaced picks, "
        "fixed quotas per collection (`--reference`: every candidate, no quotas).\n"
    )
    L.append("## Why these encodings may be redistributed\n")
    L.append(
        "music21's corpus notes (`music21/corpus/license.txt`, and the 'Licensing and "
        "Copyright' section of music21's *Authors, Acknowledgments, Contributing, and "
        "Licensing* page) say the corpus is distributed with the permission of the encoders "
        "and that *some encodings may not be used for commercial uses or have other "
        "restrictions: please see the licenses embedded in individual compositions or "
        "directories*. Every candidate collection was therefore checked for embedded "
        "licences (`license.txt` files, MusicXML `<rights>`/credits, Humdrum `!!!YEC`/`!!!YEM` "
        "records, ABC comments). Only collections with no restriction, or with an explicit "
        "public-domain / CC0 / CC-BY grant, are used. All compositions are public domain "
        "(composers dead for more than 70 years / published before 1929). The MIDI files "
        "contain only notes, timing, tempo, meter and key: none of the engraving, layout or "
        "text of the editions.\n"
    )
    for coll in by_coll:
        L.append(f"* **{coll}**: {LICENCE_NOTES[coll]}")
    L.append("")
    L.append(
        "Not legal advice. The weakest link is the Monteverdi Books III/IV encodings, whose "
        "source edition is undocumented (no restriction is stated anywhere). Delete "
        "`monteverdi_madrigals/` if that is not acceptable for your use.\n"
    )
    L.append("### Collections deliberately not used\n")
    for where, why in SKIPPED_COLLECTIONS:
        L.append(f"* `{where}`: {why}")
    L.append("")
    if skipped:
        L.append("### Candidates skipped during the build\n")
        for label, why in skipped:
            L.append(f"* `{label}`: {_md(why)}")
        L.append("")
    L.append("## Files\n")
    for coll, rs in by_coll.items():
        L.append(f"### {coll}: {COLLECTION_TITLES[coll]}\n")
        L.append("| file | music21 corpus path | composer | title | parts -> programs | licence |")
        L.append("|---|---|---|---|---|---|")
        for r in rs:
            comp, title, lic = describe(r, chorale_titles)
            src = r["path"] + (f" (number={r['number']})" if r.get("number") is not None else "")
            parts = ", ".join(f"{n or '(unnamed)'}->{p}" for n, p in r["parts"])
            L.append(f"| `{coll}/{r['out']}.mid` | `{src}` | {_md(comp)} | {_md(title)} | {_md(parts)} | {_md(lic)} |")
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
