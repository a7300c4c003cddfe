"""Text-only scenes: a short list of facts that plays the role of a video's clip captions.

A scene is ``{"id": "scene-00000", "facts": ["Two red apples lie on a wooden table.", ...]}`` (3-5 facts).
:func:`generate_scenes` draws them from the fixed vocabularies below with a seeded generator; scene ``i``
depends only on ``(seed, i)``, so ``--num 200`` is a prefix of ``--num 400``. The vocabularies are also
the judge's lexicon of checkable claims (:mod:`synpo.pairs.textjudge`), together with
:data:`EXTRA_TERMS`: words a description may use that no generated fact contains.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from synpo.pairs.io import JsonlWriter

# Each place lists furniture/landmarks that make sense there, for positions ("on the bench").
PLACES = {
    "park": ("bench", "fountain", "tree", "path"),
    "kitchen": ("table", "counter", "window", "shelf"),
    "beach": ("rock", "umbrella", "towel", "boat"),
    "garden": ("fence", "tree", "bench", "pond"),
    "library": ("table", "shelf", "window", "desk"),
    "street": ("lamp", "bench", "wall", "door"),
    "classroom": ("desk", "window", "board", "shelf"),
    "market": ("stall", "cart", "table", "tent"),
    "forest": ("tree", "rock", "path", "stream"),
    "office": ("desk", "window", "chair", "shelf"),
    "harbour": ("boat", "pier", "rope", "crate"),
    "station": ("platform", "bench", "clock", "sign"),
}
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey", "pink")
OBJECTS = (
    "apple", "book", "cup", "ball", "bag", "bottle", "hat", "kite", "basket", "box", "bicycle", "umbrella",
    "lamp", "flower", "candle", "bowl",
)  # fmt: skip
ANIMALS = {
    "dog": ("sleeps", "runs", "barks", "sits"),
    "cat": ("sleeps", "sits", "watches", "stretches"),
    "bird": ("sings", "sits", "flies", "hops"),
    "duck": ("swims", "sits", "walks", "waddles"),
    "horse": ("stands", "grazes", "walks", "rests"),
}
PEOPLE = ("man", "woman", "boy", "girl", "child")
CLOTHES = ("coat", "shirt", "dress", "jacket", "scarf", "sweater")
ACTIONS = (
    "reading a newspaper", "eating a sandwich", "talking on a phone", "painting a picture",
    "carrying a box", "drinking coffee", "writing a letter", "playing a guitar", "taking a photo",
    "sweeping the floor",
)  # fmt: skip
WEATHER = ("sunny", "rainy", "foggy", "snowy", "windy", "cloudy")
TIMES = ("morning", "afternoon", "evening", "night")
COUNT_WORDS = ("two", "three", "four", "five", "six")

# Concrete words a description may add that no scene fact uses: claims the judge can catch.
EXTRA_TERMS = (
    "car", "bus", "train", "house", "building", "mountain", "river", "lake", "sea", "ocean", "sky",
    "sun", "moon", "star", "cloud", "grass", "field", "road", "bridge", "city", "town", "village",
    "restaurant", "shop", "store", "church", "castle", "school", "museum", "crowd", "family", "friend",
    "couple", "baby", "tourist", "musician", "artist", "computer", "laptop", "camera",
    "piano", "music", "food", "pizza", "bread", "cake", "fish", "sheep", "cow", "mouse",
    "squirrel", "rabbit", "rain", "snow", "wind", "fog", "storm", "sunset", "sunrise", "summer",
    "winter", "spring", "autumn", "gold", "silver", "golden", "gray", "dark", "bright",
)  # fmt: skip

_ID_WIDTH = 5


@dataclass(frozen=True)
class Scene:
    id: str
    facts: tuple[str, ...]

    def to_record(self) -> dict:
        return {"id": self.id, "facts": list(self.facts)}


def _plural(noun: str) -> str:
    irregular = {"man": "men", "woman": "women", "child": "children", "box": "boxes", "bench": "benches"}
    if noun in irregular:
        return irregular[noun]
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _objects_fact(rng: random.Random, spot: str) -> str:
    count = rng.choice(COUNT_WORDS)
    return f"{count.capitalize()} {rng.choice(COLOURS)} {_plural(rng.choice(OBJECTS))} are by the {spot}."


def _object_fact(rng: random.Random, spot: str) -> str:
    colour = rng.choice(COLOURS)
    return f"{_article(colour)} {colour} {rng.choice(OBJECTS)} is next to the {spot}."


def _person_fact(rng: random.Random, spot: str) -> str:
    person, colour = rng.choice(PEOPLE), rng.choice(COLOURS)
    return (
        f"A {person} in {_article(colour).lower()} {colour} {rng.choice(CLOTHES)} is {rng.choice(ACTIONS)} "
        f"near the {spot}."
    )


def _animal_fact(rng: random.Random, spot: str) -> str:
    animal = rng.choice(sorted(ANIMALS))
    action = rng.choice(ANIMALS[animal])
    if rng.random() < 0.5:
        return f"A {rng.choice(COLOURS)} {animal} {action} by the {spot}."
    # Third person -> plural: sleeps -> sleep, stretches -> stretch, flies -> fly.
    if action.endswith("ies"):
        plural_action = action[:-3] + "y"
    else:
        plural_action = action[:-2] if action.endswith("ches") else action[:-1]
    return f"{rng.choice(COUNT_WORDS).capitalize()} {_plural(animal)} {plural_action} by the {spot}."


def _sky_fact(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"It is a {rng.choice(WEATHER)} {rng.choice(TIMES)}."
    return f"The weather is {rng.choice(WEATHER)}."


def make_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of generator ``seed``: a place, then 2-4 facts about things in it (3-5 in all)."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    rng = random.Random(f"synpo-scene:{seed}:{index}")
    place = rng.choice(sorted(PLACES))
    facts = [f"The scene is {_article(place).lower()} {place}."]
    makers = [_objects_fact, _object_fact, _person_fact, _animal_fact]
    for maker in rng.sample(makers, rng.randint(2, 3)):
        facts.append(maker(rng, rng.choice(PLACES[place])))
    if rng.random() < 0.6:
        facts.append(_sky_fact(rng))
    return Scene(f"scene-{index:0{_ID_WIDTH}d}", tuple(facts))


def generate_scenes(num: int, seed: int = 0) -> list[Scene]:
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return [make_scene(seed, index) for index in range(num)]


def write_scenes(scenes: list[Scene], path: str | Path) -> None:
    """Write ``scenes`` to ``path`` (replacing it: the file is a pure function of num and seed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with JsonlWriter(tmp, fsync=False) as writer:
        for scene in scenes:
            writer.write(scene.to_record())
    tmp.replace(path)


def read_scenes(path: str | Path) -> list[Scene]:
    """The scenes of a JSONL file; a malformed line is a ``ValueError`` naming the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenes: file not found: {path}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"scenes {path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        scene_id = record.get("id")
        if not isinstance(scene_id, str) or not scene_id.strip():
            raise ValueError(f"{where}: 'id' must be a non-empty string")
        if scene_id in seen:
            raise ValueError(f"{where}: duplicate 'id' {scene_id!r}")
        facts = record.get("facts")
        if not isinstance(facts, list) or not facts:
            raise ValueError(f"{where}: 'facts' must be a non-empty list of strings")
        for position, fact in enumerate(facts, start=1):
            if not isinstance(fact, str) or not fact.strip():
                raise ValueError(f"{where}: 'facts' item {position} must be a non-empty string")
        seen.add(scene_id)
        scenes.append(Scene(scene_id, tuple(fact.strip() for fact in facts)))
    if not scenes:
        raise ValueError(f"scenes {path}: no scenes in the file")
    return scenes
