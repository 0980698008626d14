"""Generate csrc/unicode_tables.h: a two-stage lookup table from code point to the character class
used by the dedup normaliser (csrc/normalize.cpp).

Run with the Python whose `unicodedata` version is pinned below (CPython 3.11 ships Unicode 14.0.0):

    python tools/gen_unicode_tables.py > csrc/unicode_tables.h

Classes (low 2 bits) follow the general category:
  KEEP       letters, numbers, So (emoji and pictographs), Mc, Co, Cn: part of a word
  SEPARATOR  Z*, Cc, P*, Sm, Sc, Sk: whitespace and punctuation, collapsed to one space
  MARK       Mn, Me: kept, or dropped when diacritics are stripped
  FORMAT     Cf (soft hyphen, zero-width joiners, BOM...): dropped
Bit 2 (NO_SPACE) marks scripts written without spaces between words (Han, kana, Thai, Lao,
Khmer, Myanmar, Tibetan...): documents mostly in them are shingled by characters.
Bit 3 (HAS_FOLD) marks code points whose full case folding (`str.casefold`, which is applied code
point by code point without context) is not the code point itself; kCaseFold lists the mappings,
sorted by code point, each of 1 to 3 code points.
Bits 4-6 and the kDecomp/kCcc/kCompose tables implement NFKC/NFKD (Unicode Standard Annex #15):
full compatibility decompositions, canonical combining classes, and the primary composites
(canonical decompositions of two code points that NFC recomposes; Hangul is algorithmic).
"""

from __future__ import annotations

import sys
import unicodedata

PINNED_UNIDATA_VERSION = "14.0.0"

KEEP, SEPARATOR, MARK, FORMAT = 0, 1, 2, 3
CLASS_MASK = 3
NO_SPACE = 4
HAS_FOLD = 8
HAS_DECOMP = 16  # NFKD(cp) != cp (Hangul syllables included; they are decomposed by formula)
NONZERO_CCC = 32  # canonical combining class > 0
COMPOSES_SECOND = 64  # second code point of a primary composite (or a Hangul V/T jamo)
HANGUL_S = range(0xAC00, 0xD7A4)

# Blocks of scripts that do not separate words with spaces (ranges of the Unicode block list).
NO_SPACE_RANGES = [
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0xA9E0, 0xA9FF),  # Myanmar extended-B
    (0xAA60, 0xAA7F),  # Myanmar extended-A
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # ideographic iteration mark, closing mark, number zero
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # kana repeat marks
    (0x3038, 0x303C),
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31BF),  # Bopomofo extended
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth Katakana
    (0x1B000, 0x1B16F),  # kana supplement, kana extended-A
    (0x20000, 0x3FFFF),  # CJK extensions B..H, compatibility supplement
]


def char_class(cp: int) -> int:
    cat = unicodedata.category(chr(cp))
    if cat[0] == "Z" or cat == "Cc" or cat[0] == "P" or cat in ("Sm", "Sc", "Sk"):
        cls = SEPARATOR
    elif cat in ("Mn", "Me"):
        cls = MARK
    elif cat == "Cf":
        cls = FORMAT
    else:
        cls = KEEP
    if any(lo <= cp <= hi for lo, hi in NO_SPACE_RANGES) and cls != SEPARATOR:
        cls |= NO_SPACE
    if case_fold(cp) != chr(cp):
        cls |= HAS_FOLD
    if not 0xD800 <= cp <= 0xDFFF and unicodedata.normalize("NFKD", chr(cp)) != chr(cp):
        cls |= HAS_DECOMP
    if unicodedata.combining(chr(cp)):
        cls |= NONZERO_CCC
    if cp in SECONDS:
        cls |= COMPOSES_SECOND
    return cls


def primary_composites() -> dict:
    """(first, second) -> composite for every canonical pair decomposition that NFC recomposes."""
    pairs = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or cp in HANGUL_S:
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        if len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp):
            pairs[(parts[0], parts[1])] = cp
    return pairs


PAIRS = primary_composites()
SECONDS = {b for _, b in PAIRS} | set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))


def case_fold(cp: int) -> str:
    if 0xD800 <= cp <= 0xDFFF:
        return chr(cp)
    return chr(cp).casefold()


def main() -> None:
    if unicodedata.unidata_version != PINNED_UNIDATA_VERSION:
        sys.exit(f"unicodedata is {unicodedata.unidata_version}, expected {PINNED_UNIDATA_VERSION}")
    block_ids: dict[bytes, int] = {}
    blocks: list[bytes] = []
    stage1: list[int] = []
    for hi in range(0x110000 >> 8):
        block = bytes(char_class((hi << 8) | lo) for lo in range(256))
        if block not in block_ids:
            block_ids[block] = len(blocks)
            blocks.append(block)
        stage1.append(block_ids[block])
    out = sys.stdout
    out.write("// Generated by tools/gen_unicode_tables.py from Python's unicodedata "
              f"{PINNED_UNIDATA_VERSION}; do not edit.\n")
    out.write("// Code point -> dedup character class: kUnicodeStage2[kUnicodeStage1[cp >> 8] * 256 + (cp & 255)].\n")
    out.write("#pragma once\n#include <cstdint>\n\nnamespace mlmix::dedup::tables {\n\n")
    out.write(f'inline constexpr const char* kUnicodeVersion = "{PINNED_UNIDATA_VERSION}";\n')
    out.write(f"inline constexpr uint16_t kUnicodeStage1[{len(stage1)}] = {{\n")
    for i in range(0, len(stage1), 16):
        out.write("  " + ", ".join(str(v) for v in stage1[i:i + 16]) + ",\n")
    out.write("};\n\n")
    out.write(f"inline constexpr uint8_t kUnicodeStage2[{len(blocks) * 256}] = {{\n")
    for block in blocks:
        for i in range(0, 256, 32):
            out.write("  " + ",".join(str(v) for v in block[i:i + 32]) + ",\n")
    out.write("};\n\n")
    folds = [(cp, case_fold(cp)) for cp in range(0x110000) if case_fold(cp) != chr(cp)]
    assert all(1 <= len(f) <= 3 for _, f in folds)
    out.write("struct CaseFold {\n  uint32_t cp;\n  uint32_t to[3];\n  uint32_t length;\n};\n\n")
    out.write(f"inline constexpr CaseFold kCaseFold[{len(folds)}] = {{\n")
    for cp, f in folds:
        to = [ord(c) for c in f] + [0] * (3 - len(f))
        out.write(f"  {{0x{cp:X}, {{0x{to[0]:X}, 0x{to[1]:X}, 0x{to[2]:X}}}, {len(f)}}},\n")
    out.write("};\n\n")
    decomps = [(cp, unicodedata.normalize("NFKD", chr(cp))) for cp in range(0x110000)
               if not 0xD800 <= cp <= 0xDFFF and cp not in HANGUL_S
               and unicodedata.normalize("NFKD", chr(cp)) != chr(cp)]
    pool: list[int] = []
    out.write("struct Decomp {\n  uint32_t cp;\n  uint32_t offset;\n  uint32_t length;\n};\n\n")
    out.write(f"inline constexpr Decomp kDecomp[{len(decomps)}] = {{\n")
    for cp, d in decomps:
        out.write(f"  {{0x{cp:X}, {len(pool)}, {len(d)}}},\n")
        pool.extend(ord(c) for c in d)
    out.write("};\n\n")
    out.write(f"inline constexpr uint32_t kDecompPool[{len(pool)}] = {{\n")
    for i in range(0, len(pool), 12):
        out.write("  " + ", ".join(f"0x{v:X}" for v in pool[i:i + 12]) + ",\n")
    out.write("};\n\n")
    cccs = [(cp, unicodedata.combining(chr(cp))) for cp in range(0x110000) if unicodedata.combining(chr(cp))]
    out.write("struct Ccc {\n  uint32_t cp;\n  uint32_t ccc;\n};\n\n")
    out.write(f"inline constexpr Ccc kCcc[{len(cccs)}] = {{\n")
    for cp, c in cccs:
        out.write(f"  {{0x{cp:X}, {c}}},\n")
    out.write("};\n\n")
    out.write("struct Compose {\n  uint64_t pair;  // first << 32 | second\n  uint32_t composite;\n};\n\n")
    out.write(f"inline constexpr Compose kCompose[{len(PAIRS)}] = {{\n")
    for (a, b), c in sorted(PAIRS.items()):
        out.write(f"  {{0x{(a << 32) | b:X}ull, 0x{c:X}}},\n")
    out.write("};\n\n")
    out.write(f"inline constexpr uint8_t kClassMask = {CLASS_MASK}, kSeparator = {SEPARATOR}, kMark = {MARK}, "
              f"kFormat = {FORMAT};\n")
    out.write(f"inline constexpr uint8_t kNoSpace = {NO_SPACE}, kHasFold = {HAS_FOLD}, kHasDecomp = {HAS_DECOMP}, "
              f"kNonzeroCcc = {NONZERO_CCC}, kComposesSecond = {COMPOSES_SECOND};\n\n")
    out.write("}  // namespace mlmix::dedup::tables\n")


if __name__ == "__main__":
    main()
