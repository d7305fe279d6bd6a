"""Real labelled data sets for the quality benchmark, built offline from Debian
packages (two image sets, two text sets). Nothing here is hand-written or
generated: every example is a file or record shipped by a package.

Install the sources first (Debian bookworm, as root; about 170 MB download,
mostly the Tux Paint stamps):

    apt-get install -y --no-install-recommends \\
        fonts-noto-color-emoji unicode-data tuxpaint-stamps-default librsvg2-bin fortunes

then materialise the sets (default folder ``bench/data/``, git-ignored):

    python bench/datasets.py                      # all four
    python bench/datasets.py emoji fortunes --out /tmp/sets
    python bench/datasets.py --list               # names, sources, licences

Each set is written as ``OUT/<name>/`` with a ``dataset.json`` (source package
and version, licence, how labels are defined, class counts, sub-sampling) and
either one sub-folder per class of PNGs (images) or ``data.csv`` with the
columns ``text,label`` (texts). Sub-sampling is balanced and seeded: the
candidates of each class are sorted by a stable key, shuffled with
``numpy.random.default_rng(seed)`` and the first ``per_class`` kept, so the same
package versions and the same ``--seed`` give the same set, byte for byte for
the texts (PNG bytes may differ with the Pillow/librsvg version; the pixels
come from the same source files).

The sets (``--list`` prints the same):

- ``emoji`` (image): Noto Color Emoji glyphs (``fonts-noto-color-emoji``,
  SIL OFL 1.1 / Apache-2.0), labelled by their Unicode emoji group from
  ``emoji-test.txt`` (``unicode-data``, Unicode licence). Fully-qualified emoji
  without skin-tone modifiers; the groups Flags and Component are left out
  (flags are one uniform rectangle style, components are not emoji). 8 classes,
  at most 100 each (Activities has 85): 785 images.
- ``stamps`` (image): Tux Paint's stamp clip-art (``tuxpaint-stamps-default``,
  GPL-2), labelled by their top-level stamp folder (animals, clothes, food,
  household, seasonal, symbols, town, vehicles). PNG and SVG stamps, mirrored
  variants left out, each drawn on white and padded to a square. 8 classes, at
  most 100 each: 604 images (clothes has 48, vehicles 58).
- ``debian-sections`` (text): Debian package descriptions (the one-line synopsis,
  plus the first paragraph of the long description where the index carries one;
  bookworm's main index carries almost none) from the apt package index
  (``apt-cache dumpavail``), labelled by the package's Section (admin, devel,
  games, graphics, mail, science, sound, web). Package names are not in the
  text. Descriptions are each package's own (Debian main, DFSG-free licences).
  Transitional/dummy packages, debug, documentation and -dev/-data/-common
  helper packages and duplicate descriptions are left out. 8 x 100 = 800 texts.
- ``fortunes`` (text): fortune cookies (``fortunes``, BSD-licensed fortune-mod;
  the cookie files are collections in the public domain or quoted for fair use,
  see /usr/share/doc/fortunes/copyright), labelled by their cookie file
  (computers, education, food, law, love, politics, science, sports). Cookies
  of 20 to 200 characters (:data:`FORTUNE_MAX_CHARS`), whitespace collapsed.
  8 x 100 = 800 texts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "data"
IMAGE_PX = 96  # stored size; the benchmark decodes them at its own image_size

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
STAMPS = Path("/usr/share/tuxpaint/stamps")
FORTUNES = Path("/usr/share/games/fortunes")

EMOJI_GROUPS = {
    "Smileys & Emotion": "smileys", "People & Body": "people", "Animals & Nature": "animals",
    "Food & Drink": "food", "Travel & Places": "travel", "Activities": "activities",
    "Objects": "objects", "Symbols": "symbols",
}
STAMP_CLASSES = ["animals", "clothes", "food", "household", "seasonal", "symbols", "town",
                 "vehicles"]
DEBIAN_SECTIONS = ["admin", "devel", "games", "graphics", "mail", "science", "sound", "web"]
FORTUNE_FILES = ["computers", "education", "food", "law", "love", "politics", "science",
                 "sports"]


def package_version(name: str) -> str:
    """The installed Debian version of ``name`` (dpkg-query), or 'not installed'."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not installed"


def need(path: Path, package: str) -> None:
    if not path.exists():
        sys.exit(f"error: {path} is missing: apt-get install -y {package}")


def balanced(groups: dict[str, list[Any]], per_class: int, seed: int,
             key: Callable[[Any], str] = str) -> dict[str, list[Any]]:
    """At most ``per_class`` items per class: sorted by ``key``, shuffled with
    the seed (one generator per class, so a class's pick does not depend on the
    others), first ``per_class`` kept."""
    picked = {}
    for label in sorted(groups):
        items = sorted(groups[label], key=key)
        digest = int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(digest).permutation(len(items))
        picked[label] = [items[i] for i in order[:per_class]]
    return picked


def square_on_white(img: Any, size: int = IMAGE_PX) -> Any:
    """RGBA or RGB image -> RGB on white, padded to a square, resized to ``size``."""
    from PIL import Image

    img = img.convert("RGBA")
    bbox = img.getbbox()
    if bbox:
        img = img.crop(bbox)
    side = max(img.size) + 8
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------- image sets

def build_emoji(out: Path, per_class: int, seed: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw, ImageFont

    need(EMOJI_FONT, "fonts-noto-color-emoji")
    need(EMOJI_TEST, "unicode-data")
    groups: dict[str, list[str]] = {name: [] for name in EMOJI_GROUPS.values()}
    group = None
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = EMOJI_GROUPS.get(line.split(":", 1)[1].strip())
            continue
        if not line.strip() or line.startswith("#") or group is None:
            continue
        codes, rest = line.split(";", 1)
        points = [int(c, 16) for c in codes.split()]
        if rest.split("#")[0].strip() != "fully-qualified":
            continue
        if any(0x1F3FB <= p <= 0x1F3FF for p in points):  # skin-tone variants
            continue
        groups[group].append("".join(chr(p) for p in points))
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's only bitmap size

    def render(text: str) -> Any:
        img = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
        ImageDraw.Draw(img).text((10, 10), text, font=font, embedded_color=True)
        return img

    missing = render("\U0010fffd")  # what an unsupported sequence draws (tofu / nothing)
    picked = balanced(groups, per_class, seed, key=lambda s: "-".join(f"{ord(c):x}" for c in s))
    counts, skipped = {}, 0
    for label, items in picked.items():
        folder = out / label
        folder.mkdir(parents=True)
        n = 0
        for text in items:
            img = render(text)
            if img.getbbox() is None or img.tobytes() == missing.tobytes():
                skipped += 1
                continue
            name = "-".join(f"{ord(c):04x}" for c in text)
            square_on_white(img).save(folder / f"{name}.png")
            n += 1
        counts[label] = n
    return {
        "modality": "image",
        "source": f"Debian fonts-noto-color-emoji {package_version('fonts-noto-color-emoji')}"
                  f" (NotoColorEmoji.ttf) + unicode-data {package_version('unicode-data')}"
                  " (emoji/emoji-test.txt)",
        "licence": "font: SIL Open Font License 1.1 (Apache-2.0 for the tools); emoji-test.txt:"
                   " Unicode License",
        "labels": "Unicode emoji group of each fully-qualified emoji (emoji-test.txt), skin-tone"
                  " variants, Flags and Component left out",
        "skipped_unrenderable": skipped,
        "counts": counts,
    }


def build_stamps(out: Path, per_class: int, seed: int) -> dict[str, Any]:
    from PIL import Image

    need(STAMPS, "tuxpaint-stamps-default")
    if shutil.which("rsvg-convert") is None:
        sys.exit("error: rsvg-convert is missing: apt-get install -y librsvg2-bin")
    groups: dict[str, list[str]] = {}
    for label in STAMP_CLASSES:
        files = [p for p in (STAMPS / label).rglob("*") if p.suffix in (".png", ".svg")]
        files = [p for p in files if "_mirror" not in p.stem and "_flip" not in p.stem]
        # a stamp shipped as both SVG and PNG is one stamp: keep the SVG
        stems = {p.with_suffix("") for p in files if p.suffix == ".svg"}
        files = [p for p in files if p.suffix == ".svg" or p.with_suffix("") not in stems]
        groups[label] = [str(p.relative_to(STAMPS)) for p in files]
    picked = balanced(groups, per_class, seed)
    counts = {}
    for label, items in picked.items():
        folder = out / label
        folder.mkdir(parents=True)
        for rel in items:
            src = STAMPS / rel
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(Path(rel).with_suffix("")))
            if src.suffix == ".svg":
                png = subprocess.run(["rsvg-convert", "-w", "256", "-h", "256", "-a", str(src)],
                                     capture_output=True, check=True).stdout
                from io import BytesIO
                img = Image.open(BytesIO(png))
            else:
                img = Image.open(src)
            square_on_white(img).save(folder / f"{name}.png")
        counts[label] = len(items)
    return {
        "modality": "image",
        "source": f"Debian tuxpaint-stamps-default {package_version('tuxpaint-stamps-default')}"
                  " (/usr/share/tuxpaint/stamps)",
        "licence": "GPL-2 (per /usr/share/doc/tuxpaint-stamps-default/copyright)",
        "labels": "top-level stamp folder; PNG and SVG stamps, mirrored variants left out, an"
                  " SVG preferred over a PNG of the same name",
        "counts": counts,
    }


# ------------------------------------------------------------------ text sets

def write_csv(out: Path, rows: list[tuple[str, str]]) -> None:
    with (out / "data.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def build_debian_sections(out: Path, per_class: int, seed: int) -> dict[str, Any]:
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True,
                          check=True).stdout
    skip_name = re.compile(r"(-dbg|-dbgsym|-doc|-dev|-data|-common|-l10n|-locales?)$")
    skip_text = re.compile(r"transitional|dummy package|debug symbols", re.I)
    seen: set[str] = set()
    groups: dict[str, list[str]] = {s: [] for s in DEBIAN_SECTIONS}
    for stanza in dump.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.splitlines():
            if line.startswith(" ") and last:
                fields[last] += "\n" + line
            elif ":" in line:
                last, value = line.split(":", 1)
                fields[last] = value.strip()
        section = fields.get("Section", "").split("/")[-1]
        if section not in groups or skip_name.search(fields.get("Package", "")):
            continue
        desc = fields.get("Description", "")
        if not desc or skip_text.search(desc):
            continue
        synopsis, _, long = desc.partition("\n")
        para = []
        for line in long.splitlines():
            line = line.strip()
            if line == ".":
                break
            para.append(line)
        text = " ".join([synopsis.strip().rstrip(".") + "."] + para)
        text = re.sub(r"\s+", " ", text).strip()[:600]
        if text in seen or len(text) < 20:
            continue
        seen.add(text)
        groups[section].append(text)
    picked = balanced(groups, per_class, seed)
    rows = [(t, label) for label, texts in picked.items() for t in texts]
    write_csv(out, rows)
    return {
        "modality": "text",
        "source": "Debian bookworm main package index via `apt-cache dumpavail` (apt "
                  f"{package_version('apt')}); the index's Release date is recorded in"
                  " dataset.json 'index'",
        "index": apt_index_dates(),
        "licence": "each description is its package's own (Debian main: DFSG-free licences)",
        "labels": "the package's Section field (archive area prefix dropped); text = synopsis +"
                  " first paragraph of the long description where the index carries one"
                  " (bookworm's main index carries almost none: the texts are synopses), max"
                  " 600 characters; package names not included",
        "counts": {label: len(texts) for label, texts in picked.items()},
        "available": {label: len(texts) for label, texts in groups.items()},
    }


def apt_index_dates() -> list[str]:
    dates = []
    for release in sorted(Path("/var/lib/apt/lists").glob("*Release")):
        for line in release.read_text(errors="replace").splitlines():
            if line.startswith(("Date:", "Suite:")):
                dates.append(f"{release.name.split('_dists_')[-1]} {line}")
    return dates


FORTUNE_MAX_CHARS = 200
"""Longest cookie kept. Up to 600 (before 2026-11-30) made every batch pad to
about 128 tokens and a 6-epoch MiniLM fine-tune of 192 texts take 400 s on one
core, 4x the debian-sections set: the benchmark could not run in an hour."""


def build_fortunes(out: Path, per_class: int, seed: int) -> dict[str, Any]:
    need(FORTUNES, "fortunes")
    groups: dict[str, list[str]] = {}
    for label in FORTUNE_FILES:
        raw = (FORTUNES / label).read_text(encoding="utf-8", errors="replace")
        cookies = [re.sub(r"\s+", " ", c).strip() for c in raw.split("\n%\n")]
        groups[label] = sorted({c for c in cookies if 20 <= len(c) <= FORTUNE_MAX_CHARS})
    picked = balanced(groups, per_class, seed)
    rows = [(t, label) for label, texts in picked.items() for t in texts]
    write_csv(out, rows)
    return {
        "modality": "text",
        "source": f"Debian fortunes {package_version('fortunes')} (/usr/share/games/fortunes)",
        "licence": "fortune-mod: BSD-3-Clause; cookie collections: see"
                   " /usr/share/doc/fortunes/copyright (public-domain and quoted material)",
        "labels": "the cookie file a cookie comes from; cookies of 20-"
                  f"{FORTUNE_MAX_CHARS} characters,"
                  " whitespace collapsed, duplicates dropped",
        "counts": {label: len(texts) for label, texts in picked.items()},
        "available": {label: len(texts) for label, texts in groups.items()},
    }


BUILDERS: dict[str, Callable[[Path, int, int], dict[str, Any]]] = {
    "emoji": build_emoji,
    "stamps": build_stamps,
    "debian-sections": build_debian_sections,
    "fortunes": build_fortunes,
}
MODALITY = {"emoji": "image", "stamps": "image", "debian-sections": "text", "fortunes": "text"}
VERSIONS = {"emoji": 1, "stamps": 1, "debian-sections": 1, "fortunes": 2}
"""Each set's definition; raise one when its builder changes what it builds, so
that a set built before is rebuilt, not reused (``dataset.json`` ``version``; a set
without one is version 1). fortunes 2: cookies up to :data:`FORTUNE_MAX_CHARS`."""


def data_path(folder: Path) -> Path:
    """What ``data.path`` of a spec should name for a materialised set."""
    return folder / "data.csv" if (folder / "data.csv").exists() else folder


def build(name: str, out_root: Path, per_class: int = 100, seed: int = 0,
          force: bool = False) -> Path:
    """Materialise set ``name`` under ``out_root/name`` (kept if already built
    with the same parameters and builder version, :data:`VERSIONS`, unless
    ``force``). Returns the folder."""
    folder = out_root / name
    meta_file = folder / "dataset.json"
    if meta_file.exists() and not force:
        meta = json.loads(meta_file.read_text())
        same = (meta.get("per_class"), meta.get("seed"), meta.get("version", 1))
        if same == (per_class, seed, VERSIONS[name]):
            return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = out_root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = BUILDERS[name](tmp, per_class, seed)
    meta.update(name=name, version=VERSIONS[name], per_class=per_class, seed=seed,
                sampling=f"balanced: at most {per_class} per class, seeded shuffle (seed {seed})",
                n_examples=sum(meta["counts"].values()), n_classes=len(meta["counts"]))
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[*BUILDERS, []], metavar="NAME",
                        help=f"sets to build (default: all): {', '.join(BUILDERS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: bench/data/")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--list", action="store_true", help="print the sets' descriptions")
    args = parser.parse_args(argv)
    if args.list:
        print(__doc__.split("The sets (``--list`` prints the same):")[1].strip())
        return 0
    for name in args.names or list(BUILDERS):
        folder = build(name, args.out, args.per_class, args.seed, args.force)
        meta = json.loads((folder / "dataset.json").read_text())
        print(f"{name}: {meta['n_examples']} {meta['modality']} examples, "
              f"{meta['n_classes']} classes -> {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
