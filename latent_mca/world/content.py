"""What the synthetic world talks about: scenes, characters and every text template.

All language in the world comes from this module, so the vocabulary stays small and regular enough for a
tiny model trained from scratch on a CPU: a scene is one coloured shape at one of five positions; a
character answers with ``"<opener> <core> <catchphrase>"``, where the opener carries one of the character's
style words, the core states the requested scene facts in a handful of shared sentence patterns, and the
catchphrase ends the reply. The rule-based judge reads the same markers back (:mod:`latent_mca.world.judge`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

#: Colour name -> RGB, chosen to be far apart from each other and from the light backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
#: Position name -> centre of the shape as fractions (x, y) of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "describe")
#: Question type -> the scene attributes a correct answer must state.
REQUESTED: dict[str, tuple[str, ...]] = {
    "colour": ("colour",), "shape": ("shape",), "position": ("position",),
    "describe": ("colour", "shape", "position"),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What colour do you see?", "Which colour is it?"),
    "shape": ("What shape is it?", "What shape do you see?", "Which shape is in the picture?"),
    "position": ("Where is the shape?", "Where is it in the picture?", "Where do you see it?"),
    "describe": ("What do you see?", "Tell me about the picture.", "What is in the picture?"),
}
#: The in-character reply's fact-stating core, shared by all characters.
CORES: dict[str, tuple[str, ...]] = {
    "colour": ("It is {colour}.", "The shape is {colour}.", "I see the colour {colour}."),
    "shape": ("It is a {shape}.", "I see a {shape}.", "The shape is a {shape}."),
    "position": ("It is {where}.", "I see it {where}.", "The shape is {where}."),
    "describe": ("It is a {colour} {shape} {where}.", "I see a {colour} {shape} {where}."),
}
CAPTION_PROMPTS: tuple[str, ...] = ("Describe the picture.", "Caption this image.", "What does the image show?")
CAPTIONS: tuple[str, ...] = (
    "A {colour} {shape} {where}.",
    "There is a {colour} {shape} {where}.",
    "The picture shows a {colour} {shape} {where}.",
)
HELPER_SYSTEM = "You are a helpful assistant."
#: How a text-only user turn describes the scene in words in place of the image.
SCENE_TEMPLATE = "[Scene: {scene}.] {question}"
ROLE_NAMES: tuple[str, ...] = ("system", "user", "assistant")


def where(position: str) -> str:
    """The prepositional phrase of a position ("at the top left", "in the center")."""
    return "in the center" if position == "center" else f"at the {position}"


@dataclass(frozen=True, order=True)
class Scene:
    """One image: a shape of one colour at one position."""

    colour: str
    shape: str
    position: str

    def fill(self, template: str) -> str:
        """Fill ``{colour}``, ``{shape}`` and ``{where}`` in a template."""
        return template.format(colour=self.colour, shape=self.shape, where=where(self.position))

    def phrase(self) -> str:
        """The scene in words, e.g. "a red circle at the top left"."""
        return self.fill("a {colour} {shape} {where}")


def all_scenes() -> list[Scene]:
    """Every scene, in a fixed order."""
    return [Scene(c, s, p) for c, s, p in product(COLOURS, SHAPES, POSITIONS)]


@dataclass(frozen=True)
class Character:
    """A role-play character: an MMRole-like profile plus the style markers its replies carry.

    Attributes:
        name: Display name.
        introduction: Who the character is.
        personality: Temperament; it also names the style words, so a profile alone defines the style.
        experience: Background.
        relationship: Relations to others.
        catchphrase: Ends every reply.
        style_words: Words only this character uses; every opener holds one.
        openers: Sentences that start a reply.
    """

    name: str
    introduction: str
    personality: str
    experience: str
    relationship: str
    catchphrase: str
    style_words: tuple[str, ...]
    openers: tuple[str, ...]

    def profile(self) -> dict[str, str]:
        """The MMRole-like profile fields."""
        return {"name": self.name, "introduction": self.introduction, "personality": self.personality,
                "experience": self.experience, "relationship": self.relationship, "catchphrase": self.catchphrase}

    def system_prompt(self) -> str:
        """The system message: the profile as one line of text."""
        return (f"Please play the role of {self.name} and answer in character. Introduction: {self.introduction} "
                f"Personality: {self.personality} Experience: {self.experience} "
                f"Relationship: {self.relationship} Catchphrase: {self.catchphrase}")

    def reply(self, question_type: str, scene: Scene, opener: int, core: int) -> str:
        """An in-character answer stating the facts the question type asks for.

        Args:
            question_type: One of :data:`QUESTION_TYPES`.
            scene: The scene the answer describes.
            opener: Index into :attr:`openers`.
            core: Index into ``CORES[question_type]``.
        """
        return f"{self.openers[opener]} {scene.fill(CORES[question_type][core])} {self.catchphrase}"

    def markers(self) -> tuple[str, ...]:
        """The phrases that identify this character's voice: catchphrase and style words."""
        return (self.catchphrase, *self.style_words)


def _char(name: str, intro: str, temper: str, words: tuple[str, str], experience: str, relationship: str,
          catchphrase: str, openers: tuple[str, str]) -> Character:
    personality = f"{temper}, says {words[0]} and {words[1]}."
    return Character(name, intro, personality, experience, relationship, catchphrase, words, openers)


#: Every character the world can draw from; a world uses ``WorldSpec.num_characters`` of them.
CHARACTER_POOL: tuple[Character, ...] = (
    _char("Captain Rook", "A pirate captain who sails the wide sea.", "Bold and loud", ("ahoy", "matey"),
          "Has sailed for twenty years on a small ship.", "Leads a loyal crew of ten sailors.",
          "Hoist the sails!", ("Ahoy!", "Listen, matey.")),
    _char("Professor Quill", "A professor who studies old books.", "Calm and curious", ("indeed", "fascinating"),
          "Has taught at the city school for many years.", "Mentor to a class of young students.",
          "Knowledge is power!", ("Indeed.", "How fascinating.")),
    _char("Sir Galen", "A knight who guards the castle gate.", "Brave and formal", ("hark", "noble"),
          "Has won many tournaments.", "Sworn to serve the old king.",
          "For honor and glory!", ("Hark!", "Well met, noble friend.")),
    _char("Chef Basil", "A chef who runs a busy kitchen.", "Warm and lively", ("delicious", "sizzling"),
          "Has cooked in many famous kitchens.", "Best friend of the baker next door.",
          "Bon appetit!", ("Delicious question!", "Sizzling news!")),
    _char("Unit Zed", "A helper robot built in a lab.", "Precise and flat", ("beep", "processing"),
          "Has scanned a million objects.", "Assistant to the lab engineers.",
          "Task complete.", ("Beep.", "Processing done.")),
    _char("Granny Fern", "A grandmother who loves her garden.", "Gentle and kind", ("dearie", "sweetheart"),
          "Has grown flowers for fifty years.", "Grandmother of six grandchildren.",
          "Bless your heart!", ("Oh, dearie.", "Well, sweetheart.")),
    _char("Detective Marlow", "A detective who solves city mysteries.", "Sharp and dry", ("elementary", "clue"),
          "Has closed over a hundred cases.", "Partner of the chief of police.",
          "The case is closed.", ("Elementary.", "Here is a clue.")),
    _char("Coach Dash", "A coach who trains young runners.", "Loud and cheerful", ("champ", "hustle"),
          "Has won three national titles.", "Coach of the school team.",
          "Give it your all!", ("Listen up, champ!", "Hustle up!")),
    _char("Wizard Orin", "A wizard who lives in a tall tower.", "Wise and mysterious", ("behold", "mystic"),
          "Has studied magic for three hundred years.", "Teacher of a young apprentice.",
          "Magic never sleeps!", ("Behold!", "The mystic eye sees.")),
    _char("Astronaut Nova", "An astronaut who flies to the moon.", "Calm and brave", ("roger", "orbit"),
          "Has spent a year in space.", "Member of a space crew of four.",
          "To the stars!", ("Roger that.", "Report from orbit.")),
    _char("Poet Elara", "A poet who writes about the sky.", "Dreamy and soft", ("alas", "lovely"),
          "Has written ten books of poems.", "Friend of the town painter.",
          "Life is a poem.", ("Alas.", "How lovely.")),
    _char("Farmer Hank", "A farmer who grows corn and wheat.", "Plain and friendly", ("howdy", "yonder"),
          "Has worked the family farm since he was a boy.", "Neighbor of the whole valley.",
          "Early bird gets the worm!", ("Howdy!", "Look yonder.")),
    _char("Princess Ivy", "A princess who lives in a glass palace.", "Graceful and proud", ("darling", "splendid"),
          "Has hosted a hundred royal balls.", "Daughter of the queen.",
          "How delightful!", ("Oh, darling.", "Splendid!")),
    _char("Surfer Kai", "A surfer who lives by the beach.", "Relaxed and happy", ("dude", "gnarly"),
          "Has surfed the biggest waves.", "Best friend of the lifeguard.",
          "Ride the wave!", ("Dude!", "Gnarly!")),
    _char("Ninja Kage", "A ninja who moves without a sound.", "Quiet and calm", ("hush", "swift"),
          "Has trained in the mountains since childhood.", "Student of an old master.",
          "The shadow sees all.", ("Hush.", "Swift answer.")),
    _char("Doctor Mira", "A doctor who works at the city hospital.", "Caring and clear", ("healthy", "diagnosis"),
          "Has treated thousands of patients.", "Head of a team of nurses.",
          "Stay well!", ("Diagnosis ready.", "A healthy question.")),
)


def select_characters(seed: int, num_characters: int) -> list[Character]:
    """The world's cast: ``num_characters`` characters drawn from the pool by the seed.

    The first half (rounded down) are the ID characters, seen with images; the rest are OOD.

    Raises:
        ValueError: If the pool is too small or fewer than 2 characters are asked for.
    """
    if not 2 <= num_characters <= len(CHARACTER_POOL):
        raise ValueError(f"num_characters must be in [2, {len(CHARACTER_POOL)}], got {num_characters}")
    order = list(CHARACTER_POOL)
    random.Random(f"cast-{seed}").shuffle(order)
    return order[:num_characters]


def user_text_only(scene: Scene, question: str) -> str:
    """A text-only user turn: the scene in words, then the question."""
    return SCENE_TEMPLATE.format(scene=scene.phrase(), question=question)


def make_facts(character: Character, scene: Scene, question_type: str, cast: list[Character],
               max_words: int = 30) -> dict:
    """Everything the rule-based judge needs to score a reply to one question.

    Args:
        character: The character who should answer.
        scene: The scene in the image.
        question_type: One of :data:`QUESTION_TYPES`.
        cast: All characters of the world; the others' markers count against the answer.
        max_words: Longest fluent reply, in words.
    """
    foreign = [m for other in cast if other.name != character.name for m in other.markers()]
    return {
        "character": character.name, "catchphrase": character.catchphrase,
        "style_words": list(character.style_words), "question_type": question_type,
        "requested": list(REQUESTED[question_type]),
        "colour": scene.colour, "shape": scene.shape, "position": scene.position,
        "foreign_markers": foreign,
        "choices": {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)},
        "max_words": max_words,
    }


def world_texts(cast: list[Character]) -> list[str]:
    """Every text a sample of a world with this cast can hold, sorted and without duplicates.

    Raises:
        ValueError: If a text spans several lines (``corpus.txt`` holds one text per line).
    """
    scenes = all_scenes()
    questions = [q for qs in QUESTIONS.values() for q in qs]
    texts = {HELPER_SYSTEM, *ROLE_NAMES, *questions, *CAPTION_PROMPTS}
    texts.update(s.fill(t) for s in scenes for t in CAPTIONS)
    texts.update(user_text_only(s, q) for s in scenes for q in (*questions, *CAPTION_PROMPTS))
    for char in cast:
        texts.add(char.system_prompt())
        for qtype, scene in product(QUESTION_TYPES, scenes):
            texts.update(char.reply(qtype, scene, o, c)
                         for o in range(len(char.openers)) for c in range(len(CORES[qtype])))
    bad = [t for t in texts if "\n" in t]
    if bad:
        raise ValueError(f"corpus texts must be single lines; found {bad[0]!r}")
    return sorted(texts)


_WORD_RE = re.compile(r"[a-z]+")


def words_of(text: str) -> list[str]:
    """Lower-cased words of a text (letters only), the unit the judge counts in."""
    return _WORD_RE.findall(text.lower())


@lru_cache(maxsize=1)
def known_words() -> frozenset[str]:
    """Every word any text of any world can hold (the whole pool), for the judge's fluency check."""
    pieces = [HELPER_SYSTEM, SCENE_TEMPLATE, *ROLE_NAMES, *CAPTION_PROMPTS, *CAPTIONS, *COLOURS, *SHAPES, *POSITIONS]
    pieces += [q for qs in QUESTIONS.values() for q in qs] + [c for cs in CORES.values() for c in cs]
    pieces += [where(p) for p in POSITIONS]
    for char in CHARACTER_POOL:
        pieces += [char.system_prompt(), *char.openers, *char.style_words]
    # Template placeholders are not words.
    return frozenset(w for p in pieces for w in words_of(re.sub(r"\{[a-z]+\}", " ", p)))
