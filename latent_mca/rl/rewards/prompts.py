"""Pairwise judge prompts: MMRole-style (8 aspects) and PCogAlign-style (5 aspects).

Both prompts show the judge the context, answer A and answer B, and end with the one output format the parser
accepts: one line per aspect, in the listed order, each ending in ``[Scores]: (score of A, score of B)`` with
scores from 1 to 10. The wording is ours; the aspects, their order and the output format follow the
benchmarks' protocols so that scores stay comparable.

Metadata read (first key found wins; nested ``eval_info`` is searched too):

* MMRole: role name (``role_name``, ``character_role``, ``character``, ``role``), profile (``profile``,
  ``character_profile``), optional image description (``image_desc``, ``ImageDesc``).
* PCogAlign: role set (``role_set``, ``individual_RoleSet``), scenario (``image_desc``, ``ImageDesc``), what the
  user hopes for (``eval_help``, ``EvalHelp``), optional ``location``, optional ``query`` (default: the last user
  turn of the prompt).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

Messages = list[dict[str, Any]]

MMROLE_ASPECTS: tuple[str, ...] = (
    "Instruction Adherence", "Fluency", "Coherency", "Image-Text Relevance", "Response Accuracy",
    "Personality Consistency", "Knowledge Consistency", "Tone Consistency",
)
PCOGALIGN_ASPECTS: tuple[str, ...] = (
    "Role-Set Sensitivity", "Body Behavior Awareness", "Mind Feelings Awareness", "Contextual Awareness",
    "Conversational Flow",
)

_MMROLE_HINTS = (
    "does the response do what the dialogue asks of the character, in the expected form?",
    "is the language natural, grammatical and easy to read?",
    "does the response follow logically from the conversation and stay internally consistent?",
    "does the response engage with what the image actually shows?",
    "is the content factually and visually correct?",
    "does the response reflect the character's personality traits?",
    "does the response agree with the character's background, experience and relationships?",
    "do the wording, register and catchphrases sound like the character?",
)
_PCOG_HINTS = (
    "does it respect who I am across my roles and what each role implies here?",
    "does it take into account my physical situation and what I can actually do right now?",
    "does it notice and respond to how I am likely feeling?",
    "does it fit the specific scene and place I am in?",
    "does it read as a natural, well-paced reply in a conversation?",
)


class MissingMetadataError(ValueError):
    """A judge prompt needs a metadata field the sample does not have."""


def _lookup(metadata: Mapping[str, Any], keys: Sequence[str], required: bool, what: str) -> Any:
    nested = metadata.get("eval_info") if isinstance(metadata.get("eval_info"), Mapping) else {}
    for source in (metadata, nested):
        for key in keys:
            if source.get(key) not in (None, ""):
                return source[key]
    if required:
        raise MissingMetadataError(f"the judge prompt needs the {what}: metadata has none of {list(keys)} "
                                   f"(available keys: {sorted(metadata)})")
    return None


def _render_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                parts.append("<image>")
            else:
                parts.append(str(part))
        return " ".join(p for p in parts if p)
    return str(content)


def render_conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    """Readable transcript of chat messages: one ``[role]: text`` line per message (images as ``<image>``)."""
    return "\n".join(f"[{m.get('role', '?')}]: {_render_content(m.get('content', ''))}" for m in messages)


def _render_facts(value: Any) -> str:
    if isinstance(value, Mapping):
        return "\n".join(f"- {k}: {_render_facts(v) if isinstance(v, Mapping) else v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render_role_set(value: Any) -> str:
    if isinstance(value, Mapping):  # location -> role, as in PCogAlignBench
        return "; ".join(f"{role} at {place}" for place, role in value.items())
    return str(value)


def output_format(aspects: Sequence[str]) -> str:
    """The output instructions shared by all prompts (exactly ``len(aspects)`` score lines)."""
    lines = "\n".join(f"{name}: <one-sentence reason> [Scores]: (<score of A>, <score of B>)" for name in aspects)
    return (
        f"Output exactly {len(aspects)} lines, one per aspect, in this order and in this format, with integer "
        f"scores from 1 (very poor) to 10 (excellent):\n{lines}\n"
        "Write nothing else after these lines. Judge each response on its merits: the order in which the "
        "responses are shown and their length must not influence the scores."
    )


def mmrole_messages(prompt: Messages, answer_a: str, answer_b: str, metadata: Mapping[str, Any]) -> Messages:
    """MMRole-style judge messages: role-play quality of answer A versus answer B on 8 aspects.

    Args:
        prompt: The conversation the answers reply to.
        answer_a: The first answer shown (normally the model's).
        answer_b: The second answer shown (normally the reference).
        metadata: Sample facts: role name and profile are required, an image description is optional.

    Returns:
        Chat messages (system + user) for the judge.
    """
    role = _lookup(metadata, ("role_name", "character_role", "character", "role"), True, "role name")
    profile = _lookup(metadata, ("profile", "character_profile"), True, "character profile")
    image_desc = _lookup(metadata, ("image_desc", "ImageDesc"), False, "image description")
    aspects = "\n".join(f"{i}. {name}: {hint}" for i, (name, hint) in enumerate(zip(MMROLE_ASPECTS, _MMROLE_HINTS), 1))
    scene = f"\nThe image in the conversation shows: {image_desc}\n" if image_desc else ""
    user = (
        f"## Conversation (start)\n{render_conversation(prompt)}\n## Conversation (end)\n\n"
        f"## Response of Model A (start)\n{answer_a}\n## Response of Model A (end)\n\n"
        f"## Response of Model B (start)\n{answer_b}\n## Response of Model B (end)\n\n"
        f"Both models were asked to speak as the character \"{role}\". The character's profile:\n"
        f"{_render_facts(profile)}\n{scene}\n"
        "Compare the two responses as replies to the last turn of the conversation, aspect by aspect:\n"
        f"{aspects}\n\n{output_format(MMROLE_ASPECTS)}"
    )
    system = ("You are a fair and exacting judge of multimodal role-play dialogue. You score each response "
              "independently against the same standard and justify every score briefly.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _last_user_text(prompt: Messages) -> str:
    for message in reversed(prompt):
        if message.get("role") == "user":
            return _render_content(message.get("content", ""))
    raise MissingMetadataError("the PCogAlign judge prompt needs a query: no 'query' metadata and no user turn")


def pcogalign_messages(prompt: Messages, answer_a: str, answer_b: str, metadata: Mapping[str, Any]) -> Messages:
    """PCogAlign-style judge messages: the judge plays the user (an interviewee) and rates two replies.

    Args:
        prompt: The conversation the answers reply to (its last user turn is the query by default).
        answer_a: The first answer shown (normally the model's).
        answer_b: The second answer shown (normally the reference).
        metadata: Sample facts: role set, scenario description and the user's expectations are required.

    Returns:
        Chat messages (system + user) for the judge; the user message ends with ``"Interviewee: "``.
    """
    role_set = _render_role_set(_lookup(metadata, ("role_set", "individual_RoleSet"), True, "role set"))
    scene = _lookup(metadata, ("image_desc", "ImageDesc"), True, "scenario description")
    hopes = _lookup(metadata, ("eval_help", "EvalHelp"), True, "user's expectations")
    location = _lookup(metadata, ("location",), False, "location")
    query = _lookup(metadata, ("query",), False, "query") or _last_user_text(prompt)
    where = f" at {location}" if location else ""
    aspects = "\n".join(f"{i}. {name}: {hint}" for i, (name, hint) in enumerate(zip(PCOGALIGN_ASPECTS, _PCOG_HINTS), 1))
    user = (
        "Interviewer: Could you first describe the roles you hold in life?\n"
        f"Interviewee: {role_set}\n"
        f"Interviewer: Picture this scene{where}: {scene} What would you want an assistant's reply to do for you "
        "there?\n"
        f"Interviewee: {hopes}\n"
        f"Interviewer: In that scene you asked an assistant: \"{query}\"\n"
        f"Here is Response A:\n{answer_a}\n\nHere is Response B:\n{answer_b}\n\n"
        "A longer response is not a better one in itself. Please rate both responses, from your own point of view, "
        f"on these aspects:\n{aspects}\n\n{output_format(PCOGALIGN_ASPECTS)}\n"
        "Interviewee: "
    )
    system = (f"You are taking part in an interview as a person who is \"{role_set}\". Answer as that person "
              "would, honestly and specifically.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


PromptBuilder = Callable[[Messages, str, str, Mapping[str, Any]], Messages]

PROMPT_STYLES: dict[str, tuple[PromptBuilder, tuple[str, ...]]] = {
    "mmrole": (mmrole_messages, MMROLE_ASPECTS),
    "pcogalign": (pcogalign_messages, PCOGALIGN_ASPECTS),
}
"""Prompt style name -> (message builder, aspects in output order)."""
