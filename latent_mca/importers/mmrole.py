"""MMRole role-play dialogues -> dialogue samples, one per (user, assistant) turn pair.

A record is ``{"id", "image_path", "conversations": [{"role": "user"|"assistant", "content"}],
"original_roles": [speaker names], "character_role", "character_profile": {role: profile}}`` (the
processed form described in the reference notes, 1.2). For the k-th assistant turn the sample's context
is a system message (role-play instruction + the character's profile) and one user message holding the
image, the conversation so far and the question; its reference is the assistant's reply. Sample keys
are ``<id>_t<k>`` so every turn of a dialogue is keyed uniquely (bug B8).
"""

from __future__ import annotations

import json
from typing import Any

from latent_mca.importers.common import (
    MALFORMED,
    MISSING_PROFILE,
    NO_ASSISTANT_TURN,
    UNKNOWN_ROLE,
    Converted,
    Draft,
    ImportContext,
    RecordError,
    read_image,
    require,
    source_id_of,
    strip_placeholders,
)

#: Roles a turn of ``conversations`` may have.
ROLES = ("user", "assistant")
#: Speaker name of user turns when the record gives no ``original_roles``.
HUMAN = "human"


def format_profile(profile: Any) -> str:
    """Render a character profile as text.

    Args:
        profile: A string (used as it is), or an object of fields such as introduction, personality,
            experience, relationship and catchphrase (one ``Field: value`` line each, in record order).

    Returns:
        The profile text.
    """
    if isinstance(profile, str):
        return profile.strip()
    lines = []
    for name, value in profile.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{str(name).replace('_', ' ').strip().capitalize()}: {text.strip()}")
    return "\n".join(lines)


def system_prompt(role: str, profile: Any) -> str:
    """The role-play instruction with the character's profile."""
    return (f"You are {role}. Stay in character for the whole conversation: think, feel and speak as {role} "
            f"would, keeping their personality, knowledge and tone, and base what you say on the image you "
            f"are shown.\n\nWho {role} is:\n{format_profile(profile)}")


def user_prompt(role: str, history: list[tuple[str, str]], speaker: str, question: str) -> str:
    """The user turn's text: the conversation so far (``[speaker]: text`` lines) and the new question."""
    parts = []
    if history:
        parts.append("The conversation so far:\n" + "\n".join(f"[{who}]: {text}" for who, text in history))
    parts.append(f"New message:\n[{speaker}]: {question}")
    parts.append(f"Answer as {role}, in character.")
    return "\n\n".join(parts)


def _speakers(record: dict[str, Any], turns: list[dict[str, str]], role: str) -> list[str]:
    names = record.get("original_roles")
    if names is None:
        return [HUMAN if t["role"] == "user" else role for t in turns]
    if not isinstance(names, list) or len(names) != len(turns) or not all(isinstance(n, str) for n in names):
        raise RecordError(MALFORMED, "record['original_roles'] must list one speaker name per conversation turn")
    return names


def _turns(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = require(record, "conversations", list)
    for i, turn in enumerate(turns):
        who = require(turn, "role", str, where=f"conversations[{i}]")
        require(turn, "content", str, where=f"conversations[{i}]")
        if who not in ROLES:
            raise RecordError(UNKNOWN_ROLE, f"conversations[{i}] has role {who!r}; expected user or assistant")
        if who == "assistant" and (i == 0 or turns[i - 1]["role"] != "user"):
            raise RecordError(MALFORMED, f"conversations[{i}] is an assistant turn that answers no user turn")
        if who == "assistant" and not turn["content"].strip():
            raise RecordError(MALFORMED, f"conversations[{i}] is an empty assistant reply")
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError(NO_ASSISTANT_TURN, "the dialogue has no assistant turn")
    return [{"role": t["role"], "content": strip_placeholders(t["content"])} for t in turns]


def convert(label: str, record: Any, ctx: ImportContext) -> Converted:
    """Convert one MMRole dialogue into one dialogue sample per answered user turn.

    Args:
        label: The record's position (for reports only).
        record: The parsed record.
        ctx: Images root and split.

    Returns:
        ``dialogue`` drafts with suffixes ``t0``, ``t1``, ... (the index of the assistant turn).

    Raises:
        RecordError: On a malformed record, an unknown role, no assistant turn, a character without a
            profile, or a missing or undecodable image.
    """
    source_id = source_id_of(record)
    image_path = require(record, "image_path", str)
    role = require(record, "character_role", str)
    profiles = require(record, "character_profile", dict)
    if role not in profiles:
        raise RecordError(MISSING_PROFILE, f"character_profile has no entry for character_role {role!r}")
    profile = profiles[role]
    if not isinstance(profile, (str, dict)):
        raise RecordError(MALFORMED, f"character_profile[{role!r}] is a {type(profile).__name__}")
    turns = _turns(record)
    speakers = _speakers(record, turns, role)
    image = read_image(ctx.images_root, image_path)
    system = {"role": "system", "content": system_prompt(role, profile)}
    drafts = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        history = [(speakers[j], turns[j]["content"]) for j in range(i - 1)]
        text = user_prompt(role, history, speakers[i - 1], turns[i - 1]["content"])
        meta = {
            "messages": [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            "reference": turn["content"],
            "character": role,
            "profile": profile,
            "task": "mmrole",
            "split": ctx.split,
            "facts": {"character_role": role, "character_profile": profile},
        }
        drafts.append(Draft("dialogue", f"t{len(drafts)}", meta, image))
    return Converted(source_id, drafts)
