"""Where a slide's level-0 mpp comes from, in one place, the way labs meet slides.

Order, per slide (`MppRule`):
1. the user's value: `--mpp-csv` (by file name, then stem) or `--slide-mpp` (`user_mpp_table` /
   `mpp_for`), or the mpp a slide manifest recorded;
2. the slide's standard metadata (Aperio `MPP`, OpenSlide's `openslide.mpp-x`, TIFF resolution);
3. `--custom-mpp-keys KEY[,KEY]`: properties where a scanner or a lab's conversion stores the mpp
   under another name (TRIDENT's `--custom_mpp_keys`; looked up only when 1 and 2 give nothing).
   A key matches a property by its full name (`aperio.ScanMPP`) or by its last part (`ScanMPP`),
   case-insensitively; generic TIFFs expose `key=value` pairs of their ImageDescription too.

Magnification comes from the mpp by TRIDENT's standard buckets (`grid.nominal_magnification`:
0.499 um/px -> 20x, 0.25 -> 40x, 1.0 -> 10x), the exact mpp staying in the grid's and the
manifest's metadata; the objective power of the metadata is used only for a slide without an mpp.

A slide with no mpp fails with `MissingResolution` errors that say the fix (`MPP_FIX`); a command
lists such slides once, with the fix once (`missing_mpp_summary`), rather than once per slide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .manifest import mpp_for, user_mpp_table

# Said once per run for the slides without an mpp (and at the end of each such slide's error).
MPP_FIX = ("On the command line: --custom-mpp-keys KEY when the slide stores its mpp under another property "
           "name, --mpp-csv FILE with columns wsi,mpp (or the mpp column of a slide manifest) per slide, "
           "or --slide-mpp 0.25 for every slide")
NO_MPP = "the slide has no mpp"  # how grid.MissingResolutionError starts: tells these failures apart

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PAIR = re.compile(r"([A-Za-z_][\w.\- ]*?)\s*[=:]\s*([^|;\n\r]+)")


def parse_mpp_keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """'KEY[,KEY]' (or a list of such strings, as a repeated option gives) -> the keys, in order."""
    if keys is None:
        return ()
    items = [keys] if isinstance(keys, str) else list(keys)
    out = [k.strip() for item in items for k in str(item).split(",") if k.strip()]
    return tuple(dict.fromkeys(out))


def slide_properties(slide) -> dict[str, str]:
    """The slide's metadata properties, plus, for a generic TIFF (no vendor properties), its
    ImageDescription as `tiff.ImageDescription` and the `key=value` / `key: value` pairs in it."""
    props = dict(getattr(slide.info, "properties", {}) or {})
    pages = getattr(slide, "pages", None)
    if not props and pages:
        desc = getattr(pages[0], "description", "") or ""
        if desc:
            props["tiff.ImageDescription"] = desc
            for k, v in _PAIR.findall(desc):
                props.setdefault(k.strip(), v.strip())
    return props


def _value(text: str) -> float | None:
    from .slide import MPP_RANGE, _in_range

    m = _NUMBER.search(str(text))
    return None if m is None else _in_range(m.group(0), MPP_RANGE)


def mpp_from_keys(properties: Mapping[str, str], keys: Iterable[str]) -> tuple[float | None, str]:
    """(mpp, property name) of the first key that names a property holding a plausible mpp (a
    number, units after it allowed), else (None, a note on what was found)."""
    lower = {k.lower(): k for k in properties}
    notes = []
    for key in keys:
        kl = key.lower()
        names = [lower[kl]] if kl in lower else [k for k in properties if k.lower().rsplit(".", 1)[-1] == kl]
        if not names:
            notes.append(f"no property {key!r}")
            continue
        for name in names:
            v = _value(properties[name])
            if v is not None:
                return v, name
            notes.append(f"property {name!r} = {properties[name]!r} is not an mpp")
    return None, "; ".join(notes)


def apply_mpp_keys(slide, keys: Sequence[str]):
    """Give `slide` the mpp of the first custom key that holds one, when its metadata has none
    (mpp_source becomes 'key:<property>'); otherwise say in its resolution note what the keys
    found. Returns the slide."""
    from .slide import SlideInfo

    info = slide.info
    if not keys or info.mpp is not None:
        return slide
    props = slide_properties(slide)
    mpp, where = mpp_from_keys(props, keys)
    if mpp is not None:
        slide.info = SlideInfo(**{**info.__dict__, "mpp": mpp, "mpp_source": f"key:{where}"})
    else:
        note = "; ".join(n for n in (info.resolution_note, f"--custom-mpp-keys: {where}") if n)
        slide.info = SlideInfo(**{**info.__dict__, "resolution_note": note})
    return slide


def mpp_like_properties(slide, limit: int = 6) -> list[str]:
    """Property names that may hold an mpp (for the error of a slide without one)."""
    pat = re.compile(r"mpp|micron|um.?per|resolution|pixel.?size|spacing", re.I)
    props = slide_properties(slide)
    return [k for k in props if pat.search(k) and k != "tiff.ImageDescription"][:limit]


@dataclass(frozen=True)
class MppRule:
    """Everything that decides a slide's mpp besides its standard metadata: the user's table
    (file name or stem -> mpp, "*" -> the default for all; `user_mpp_table`) and custom keys.
    Picklable: it travels to workers."""

    table: Mapping[str, float] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    def user_mpp(self, path: str | Path) -> float | None:
        return mpp_for(self.table, path)

    def open(self, path: str | Path, *, mpp: float | None = None, threads: int = 4):
        """open_slide with this rule: `mpp` (e.g. recorded in a manifest) first, then the user's
        table, the metadata, the custom keys."""
        from .slide import open_slide

        return open_slide(path, mpp=mpp if mpp is not None else self.user_mpp(path), threads=threads,
                          mpp_keys=self.keys)


def mpp_rule(*, mpp_csv: str | Path | None = None, slide_mpp: float | None = None,
             custom_mpp_keys: str | Sequence[str] | None = None) -> MppRule:
    """The one place the command-line mpp options become a rule: --mpp-csv, --slide-mpp,
    --custom-mpp-keys."""
    from .patching import read_mpp_csv

    table = user_mpp_table(read_mpp_csv(mpp_csv) if mpp_csv else None, slide_mpp or None)
    return MppRule(table, parse_mpp_keys(custom_mpp_keys))


def is_missing_mpp(reason: str) -> bool:
    """Whether a slide's failure reason (an error message, maybe from another process) is a
    missing mpp."""
    return NO_MPP in str(reason)


def without_fix(reason: str) -> str:
    """A missing-mpp reason without the fix sentence (said once by missing_mpp_summary)."""
    r = str(reason).replace(MPP_FIX, "").rstrip()
    return r.rstrip(".").rstrip() if r != str(reason) else str(reason)


def missing_mpp_summary(slide_ids: Sequence[str], *, show: int = 5) -> str:
    """One message for all the slides of a run that have no mpp, with the fix."""
    ids = list(slide_ids)
    listed = ", ".join(ids[:show]) + (f", ... ({len(ids)} in all)" if len(ids) > show else "")
    return (f"{len(ids)} slide(s) have no mpp (microns per pixel) in their metadata: {listed}. {MPP_FIX}. "
            "Magnification is then read from the mpp (0.5 um/px -> 20x, 0.25 -> 40x, 1.0 -> 10x).")


__all__ = ["MPP_FIX", "MppRule", "apply_mpp_keys", "is_missing_mpp", "missing_mpp_summary", "mpp_from_keys",
           "mpp_rule", "parse_mpp_keys", "slide_properties", "without_fix"]
