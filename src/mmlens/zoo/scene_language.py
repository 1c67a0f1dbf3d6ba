"""The language of the synthetic scenes: descriptions, questions and answers from object lists.

Every text is a deterministic function of a scene's `objects` (and a random generator for which
question to ask), so the embedded model's training data and its held-out evaluation come from
the same templates. Locations are the 3 x 3 cell of an object's centre.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data.scenes import COLOURS, SHAPES

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
QUESTION_TYPES = ("describe", "objects", "count", "where", "colour", "shape", "exists", "count_shape")


def location(obj: dict) -> str:
    """'top left', 'top', ..., 'centre', ..., 'bottom right' from the object's centre."""
    row = ROWS[min(int(obj["y"] * 3), 2)]
    col = COLS[min(int(obj["x"] * 3), 2)]
    if row == "middle":
        return "centre" if col == "centre" else col
    return row if col == "centre" else f"{row} {col}"


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def reading_order(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (min(int(o["y"] * 3), 2), o["x"]))


def describe(objects: list[dict]) -> str:
    """'a red circle at the top left and a blue ring at the bottom .'"""
    parts = [f"a {_name(o)} at the {location(o)}" for o in reading_order(objects)]
    return _join(parts) + " ."


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def questions(objects: list[dict], rng: np.random.Generator, classes: list[tuple[str, str]]) -> list[QA]:
    """Every question the templates can ask about this scene (one per kind; `rng` picks the
    subject where several fit). `classes` lists (colour, shape) of every object class."""
    names = Counter(_name(o) for o in objects)
    shapes = Counter(o["shape"] for o in objects)
    colours = Counter(o["colour"] for o in objects)
    present = [c for c in classes if f"{c[0]} {c[1]}" in names]
    qas = [
        QA("describe", "describe the image .", describe(objects)),
        QA("objects", "what objects are in the image ?",
           _join([f"{c} {s}" for c, s in present])),
        QA("count", "how many objects are there ?", COUNT_WORDS[len(objects)]),
    ]
    unique = [o for o in objects if names[_name(o)] == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        qas.append(QA("where", f"where is the {_name(o)} ?", location(o)))
    lone_shapes = [s for s, n in shapes.items() if n == 1]
    if lone_shapes:
        shape = sorted(lone_shapes)[int(rng.integers(len(lone_shapes)))]
        colour = next(o["colour"] for o in objects if o["shape"] == shape)
        qas.append(QA("colour", f"what colour is the {shape} ?", colour))
    lone_colours = [c for c, n in colours.items() if n == 1]
    if lone_colours:
        colour = sorted(lone_colours)[int(rng.integers(len(lone_colours)))]
        shape = next(o["shape"] for o in objects if o["colour"] == colour)
        qas.append(QA("shape", f"what shape is the {colour} object ?", shape))
    if rng.random() < 0.5 and present:
        colour, shape = present[int(rng.integers(len(present)))]
        qas.append(QA("exists", f"is there a {colour} {shape} ?", "yes"))
    else:
        absent = [c for c in classes if c not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        qas.append(QA("exists", f"is there a {colour} {shape} ?", "no"))
    shape = sorted({s for _, s in classes})[int(rng.integers(len({s for _, s in classes})))]
    qas.append(QA("count_shape", f"how many {shape}s are there ?", COUNT_WORDS[shapes[shape]]))
    return qas


def vocabulary() -> list[str]:
    """Every word the templates can produce, in a fixed order."""
    words = (
        "USER : ASSISTANT describe the image . , what objects are in how many there where is "
        "colour shape object a at and of yes no"
    ).split()
    words += [*ROWS, *COLS, *COUNT_WORDS, *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), "?"]
    return list(dict.fromkeys(words))
