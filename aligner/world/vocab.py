"""The built-in world's vocabulary: every content and look word with its synonyms.

Two vocabularies per concept:

* ``train`` words appear in corpus captions and training queries;
* ``heldout`` words never appear in any caption; paraphrase queries use them to check that the
  retriever learned language (through its pretrained sentence-encoder text tower) rather than
  a fixed code ("a gloomy picture of three crimson discs").
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
COUNTS = (1, 2, 3)
BACKGROUNDS = ("paper", "sky", "grass", "sand", "wood")
# The aesthetic factors the oracle sees; LOOK_FACTORS are the ones captions can mention.
FACTORS = ("blur", "noise", "exposure", "saturation", "tone", "composition")


@dataclass(frozen=True)
class Words:
    """Train-time synonyms and held-out synonyms of one concept."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


SHAPE_WORDS: dict[str, tuple[Words, Words]] = {
    # (singular, plural)
    "circle": (Words(("circle", "disc", "round dot", "round shape", "dot", "sphere"), ("disk", "orb")),
               Words(("circles", "discs", "round dots", "round shapes", "dots", "spheres"), ("disks", "orbs"))),
    "square": (Words(("square", "box", "block", "tile", "rectangle", "square shape"), ("cube", "quadrilateral")),
               Words(("squares", "boxes", "blocks", "tiles", "rectangles", "square shapes"), ("cubes", "quadrilaterals"))),
    "triangle": (Words(("triangle", "wedge", "triangular shape", "arrowhead", "three-sided shape"), ("pyramid", "trigon")),
                 Words(("triangles", "wedges", "triangular shapes", "arrowheads", "three-sided shapes"), ("pyramids", "trigons"))),
    "star": (Words(("star", "star shape", "five-pointed star", "starfish shape", "spiky star"), ("starburst", "asterisk")),
             Words(("stars", "star shapes", "five-pointed stars", "starfish shapes", "spiky stars"), ("starbursts", "asterisks"))),
    "diamond": (Words(("diamond", "rhombus", "diamond shape", "rhomb", "gem shape"), ("lozenge", "kite")),
                Words(("diamonds", "rhombuses", "diamond shapes", "rhombs", "gem shapes"), ("lozenges", "kites"))),
    "ring": (Words(("ring", "hoop", "donut", "circle outline", "annulus"), ("halo", "loop")),
             Words(("rings", "hoops", "donuts", "circle outlines", "annuli"), ("halos", "loops"))),
}

COLOUR_WORDS: dict[str, Words] = {
    "red": Words(("red", "scarlet", "cherry red", "blood-red", "brick red"), ("crimson", "ruby")),
    "orange": Words(("orange", "tangerine", "amber", "pumpkin orange", "bright orange"), ("apricot", "rust-orange")),
    "yellow": Words(("yellow", "lemon", "golden yellow", "butter yellow", "sunflower yellow"), ("canary", "mustard")),
    "green": Words(("green", "emerald", "lime green", "olive green", "forest green"), ("jade", "verdant")),
    "blue": Words(("blue", "navy", "royal blue", "indigo", "ultramarine"), ("cobalt", "sapphire")),
    "purple": Words(("purple", "violet", "lilac", "mauve", "grape purple"), ("plum", "lavender")),
    "pink": Words(("pink", "rose", "hot pink", "magenta", "bubblegum pink"), ("fuchsia", "salmon")),
    "black": Words(("black", "jet-black", "charcoal", "pitch-black", "inky black"), ("ebony", "onyx")),
}

COUNT_WORDS: dict[int, Words] = {
    1: Words(("a", "one", "a single", "a lone"), ("a solitary", "just one")),
    2: Words(("two", "a pair of", "a couple of"), ("twin", "a duo of")),
    3: Words(("three", "a group of three", "a set of three"), ("a trio of", "a triplet of")),
}

BACKGROUND_WORDS: dict[str, Words] = {
    "paper": Words(("a white background", "plain paper", "a blank white wall"),
                   ("a blank canvas", "an empty page")),
    "sky": Words(("a blue sky", "the sky", "a clear sky"), ("the heavens", "an azure firmament")),
    "grass": Words(("grass", "a lawn", "a green meadow"), ("turf", "a grassy field")),
    "sand": Words(("sand", "a beach", "sandy ground"), ("dunes", "the seashore")),
    "wood": Words(("a wooden table", "wood", "a timber floor"), ("oak planks", "a hardwood desk")),
}

# Look phrases by factor and polarity. "dark"/"bright" are the two bad sides of exposure.
LOOK_WORDS: dict[tuple[str, str], Words] = {
    ("blur", "bad"): Words(("blurry", "out of focus", "fuzzy"), ("hazy", "smeared")),
    ("blur", "good"): Words(("crisp", "sharp", "in sharp focus"), ("pin-sharp", "razor-sharp")),
    ("noise", "bad"): Words(("grainy", "noisy", "speckled"), ("static-filled", "mottled")),
    ("noise", "good"): Words(("clean", "smooth", "noise-free"), ("pristine", "spotless")),
    ("exposure", "dark"): Words(("dark", "underexposed", "dim"), ("gloomy", "murky")),
    ("exposure", "bright"): Words(("overexposed", "washed-out", "blown-out"),
                                  ("glaring", "bleached")),
    ("exposure", "good"): Words(("well-lit", "well-exposed", "nicely lit"),
                                ("evenly lit", "perfectly exposed")),
    ("saturation", "bad"): Words(("dull", "faded", "drab"), ("lifeless", "greyish")),
    ("saturation", "good"): Words(("vivid", "vibrant", "colourful"), ("saturated", "punchy")),
    ("tone", "bad"): Words(("with a sickly green tint", "with an ugly greenish cast",
                            "with off, greenish colours"), ("with a murky olive cast",
                                                            "tinted a nauseous green")),
    ("tone", "good"): Words(("with warm golden tones", "in warm golden light",
                             "with harmonious warm colours"), ("bathed in golden-hour light",
                                                               "with a cosy amber glow")),
    ("composition", "bad"): Words(("off-centre", "badly framed", "awkwardly cropped"),
                                  ("lopsided", "poorly composed")),
    ("composition", "good"): Words(("centred", "well-composed", "nicely framed"),
                                   ("balanced", "well-arranged")),
}

# Overall judgements that alt text attaches to very good or very bad pictures.
OVERALL_WORDS: dict[str, Words] = {
    "good": Words(("beautiful", "stunning", "lovely"), ("gorgeous", "exquisite")),
    "bad": Words(("ugly", "amateurish", "poor-quality"), ("hideous", "botched")),
}

PHOTO_NOUNS = Words(("photo", "picture", "image", "shot", "snapshot"), ("photograph", "capture"))


def all_words(heldout: bool) -> set[str]:
    """Every word/phrase of one vocabulary (for leak checks in tests)."""
    out: set[str] = set()
    groups = [*COLOUR_WORDS.values(), *COUNT_WORDS.values(), *BACKGROUND_WORDS.values(),
              *LOOK_WORDS.values(), *OVERALL_WORDS.values(), PHOTO_NOUNS]
    groups += [w for pair in SHAPE_WORDS.values() for w in pair]
    for g in groups:
        out.update(g.heldout if heldout else g.train)
    return out
