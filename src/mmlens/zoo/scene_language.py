"""The language of the synthetic scenes: descriptions, questions and answers from object lists.

Every text is a deterministic function of a scene's `objects` (and a random generator for which
question to ask), so the embedded model's training data and its held-out evaluation come from
the same templates. Locations are the 3 x 3 cell of an object's centre. The grounded set adds
questions whose answers need per-region information: what covers a cell of the mask, which of
two objects lies further left or higher, and how many objects lie in a band of the image.
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
GROUNDED_TYPES = ("what_at", "relation", "count_region")
QUESTION_SETS = {"basic": QUESTION_TYPES, "grounded": QUESTION_TYPES + GROUNDED_TYPES}
# A cell is "covered" by the class owning most of its pixels, if that is at least this share;
# below it the answer is "nothing" (cells that are mostly background or split between objects).
CELL_COVER = 0.3
# Relations are asked only when the centres differ by at least this fraction of the image side.
RELATION_MARGIN = 0.15


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


def _cell_name(row: int, col: int) -> str:
    return location({"y": (row + 0.5) / 3, "x": (col + 0.5) / 3})


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


def cell_contents(mask: np.ndarray, class_names: dict[int, str]) -> dict[str, str]:
    """Per 3 x 3 cell of a class mask (0 = background): the class covering most of it, or
    'nothing' when no class covers `CELL_COVER` of its pixels."""
    height, width = mask.shape
    contents = {}
    for row in range(3):
        for col in range(3):
            cell = mask[row * height // 3 : (row + 1) * height // 3, col * width // 3 : (col + 1) * width // 3]
            counts = np.bincount(cell.ravel(), minlength=len(class_names) + 1)
            counts[0] = 0
            best = int(counts.argmax())
            covered = best > 0 and counts[best] >= CELL_COVER * cell.size
            contents[_cell_name(row, col)] = class_names[best] if covered else "nothing"
    return contents


def grounded_questions(
    objects: list[dict], mask: np.ndarray, rng: np.random.Generator, classes: list[tuple[str, str]]
) -> list[QA]:
    """The grounded kinds for one scene: what is at a cell (read from the pixel mask; a covered
    cell three times in four when there is one, since most cells are background),
    which of two distinguishable objects is further left or higher (when their centres are
    `RELATION_MARGIN` apart), and how many objects have their centre in a band of the image."""
    class_names = {i + 1: f"{colour} {shape}" for i, (colour, shape) in enumerate(classes)}
    contents = cell_contents(mask, class_names)
    covered = [name for name, content in contents.items() if content != "nothing"]
    pool = covered if covered and rng.random() < 0.75 else list(contents)
    cell = pool[int(rng.integers(len(pool)))]
    qas = [QA("what_at", f"what is at the {cell} ?", contents[cell])]
    names = Counter(_name(o) for o in objects)
    unique = [o for o in objects if names[_name(o)] == 1]
    axis, word = (("x", "further left"), ("y", "higher"))[int(rng.integers(2))]
    pairs = [(a, b) for a in unique for b in unique if a is not b and abs(a[axis] - b[axis]) >= RELATION_MARGIN]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        answer = a if a[axis] < b[axis] else b
        qas.append(QA("relation", f"which is {word} , the {_name(a)} or the {_name(b)} ?", _name(answer)))
    band = ("top", "bottom", "left", "right")[int(rng.integers(4))]
    in_band = {
        "top": lambda o: o["y"] < 1 / 3, "bottom": lambda o: o["y"] >= 2 / 3,
        "left": lambda o: o["x"] < 1 / 3, "right": lambda o: o["x"] >= 2 / 3,
    }[band]
    preposition = "at the" if band in ("top", "bottom") else "on the"
    qas.append(QA("count_region", f"how many objects are {preposition} {band} ?",
                  COUNT_WORDS[sum(map(in_band, objects))]))
    return qas


def vocabulary(question_set: str = "basic") -> list[str]:
    """Every word the templates of a question set can produce, in a fixed order (the basic
    set's words first, so its token ids do not move)."""
    words = (
        "USER : ASSISTANT describe the image . , what objects are in how many there where is "
        "colour shape object a at and of yes no"
    ).split()
    words += [*ROWS, *COLS, *COUNT_WORDS, *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), "?"]
    if question_set == "grounded":
        words += "nothing which further higher or on".split()
    elif question_set != "basic":
        raise ValueError(f"question_set must be one of {sorted(QUESTION_SETS)}, got {question_set!r}")
    return list(dict.fromkeys(words))
