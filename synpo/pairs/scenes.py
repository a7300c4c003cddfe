"""Text-only scenes: a short list of facts that plays the role of a video's clip captions.

A scene is ``{"id": "scene-00000", "facts": ["Two red apples lie on a wooden table.", ...]}`` (3-5 facts).
:func:`generate_scenes` draws them from fixed vocabularies with a seeded generator; scene ``i`` depends
only on ``(seed, i)``, so ``--num 200`` is a prefix of ``--num 400``. The vocabularies are also the
judge's lexicon of checkable claims (:mod:`synpo.pairs.textjudge`), together with :data:`EXTRA_TERMS`.

The vocabularies are data, bundled as ``synpo/assets/scene_vocabulary.json`` and loaded once at import
into the module-level tables below (their order is the draw order: editing the file changes every scene):

- :data:`PLACES`: each place with the furniture/landmarks that make sense there, for positions ("on the
  bench"); :data:`ANIMALS`: each animal with the (third-person) things it does.
- :data:`COLOURS`, :data:`OBJECTS`, :data:`PEOPLE`, :data:`CLOTHES`, :data:`ACTIONS`, :data:`WEATHER`,
  :data:`TIMES`, :data:`COUNT_WORDS`: the words the facts are made of.
- :data:`EXTRA_TERMS`: concrete words a description may add that no scene fact uses: claims the judge
  can catch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from synpo.config import json_error_text
from synpo.pairs.io import JsonlWriter

VOCABULARY_PATH = Path(__file__).resolve().parent.parent / "assets" / "scene_vocabulary.json"

Words = tuple[str, ...]


class SceneVocabulary(NamedTuple):
    """The tables of ``scene_vocabulary.json``: a field per key, the two word-to-words tables first."""

    places: dict[str, Words]
    animals: dict[str, Words]
    colours: Words
    objects: Words
    people: Words
    clothes: Words
    actions: Words
    weather: Words
    times: Words
    count_words: Words
    extra_terms: Words


_MAPPING_TABLES = frozenset({"places", "animals"})


def _words(value: object, where: str) -> Words:
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w for w in value):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings")
    return tuple(value)


def _table(data: dict, key: str, where: str) -> dict[str, Words] | Words:
    if key not in data:
        raise ValueError(f"{where} is missing")
    value = data[key]
    if key not in _MAPPING_TABLES:
        return _words(value, where)
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where} must be a non-empty object of word lists")
    return {word: _words(words, f"{where}[{word!r}]") for word, words in value.items()}


def load_vocabulary(path: str | Path = VOCABULARY_PATH) -> SceneVocabulary:
    """The scene vocabularies of ``path``, in file order (the draw order); a missing, unknown or
    malformed table is a ``ValueError`` naming the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"scene vocabulary {path}: invalid JSON ({json_error_text(exc)})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"scene vocabulary {path}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SceneVocabulary._fields))
    if unknown:
        raise ValueError(f"scene vocabulary {path}: unknown keys {unknown}")
    tables = [_table(data, key, f"scene vocabulary {path}: {key!r}") for key in SceneVocabulary._fields]
    return SceneVocabulary(*tables)


VOCABULARY = load_vocabulary()
PLACES, ANIMALS, COLOURS, OBJECTS, PEOPLE, CLOTHES, ACTIONS, WEATHER, TIMES, COUNT_WORDS, EXTRA_TERMS = (
    VOCABULARY
)

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
            raise ValueError(f"{where}: invalid JSON ({json_error_text(exc)})") from exc
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
