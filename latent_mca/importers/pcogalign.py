"""PCogAlignBench -> dialogue samples.

A record holds ``individual_RoleSet`` (location -> the user's role there), ``query``, ``golden_response``,
``image.file_path`` and ``eval_info.{ImageDesc, EvalHelp, location}`` (reference notes, 1.3). The sample's
context is a system message naming the user's role set and a user message with the image and the query;
its reference is ``golden_response``. The benchmark's records carry no id, so the image path stands in
(as the authors' evaluation does); since images repeat, such collisions are kept with a key suffix and
counted (bug B8).
"""

from __future__ import annotations

from typing import Any

from latent_mca.importers.common import (
    MALFORMED,
    UNKNOWN_ROLE,
    Converted,
    Draft,
    ImportContext,
    RecordError,
    count_placeholders,
    image_content,
    read_image,
    require,
    source_id_of,
)


def role_set_text(role_set: dict[str, str]) -> str:
    """``"<role> at <location>; ..."`` in record order."""
    return "; ".join(f"{role} at {location}" for location, role in role_set.items())


def system_prompt(role_set: dict[str, str]) -> str:
    """The system message: who the user is, across the places of their life."""
    return (f"You are a helpful assistant. The person you are talking to has these roles: {role_set_text(role_set)}. "
            "Shape your reply to who they are and where they are, and to what the image shows.")


def _role_set(record: dict[str, Any]) -> dict[str, str]:
    role_set = require(record, "individual_RoleSet", dict)
    if not role_set:
        raise RecordError(MALFORMED, "record['individual_RoleSet'] is empty")
    for location, role in role_set.items():
        if not isinstance(role, str) or not role.strip():
            raise RecordError(UNKNOWN_ROLE, f"individual_RoleSet[{location!r}] is {role!r}, not a role name")
    return role_set


def _eval_info(record: dict[str, Any]) -> dict[str, Any]:
    info = require(record, "eval_info", dict)
    location = require(info, "location", str, where="eval_info")
    for key in ("ImageDesc", "EvalHelp"):
        if info.get(key) is None:
            raise RecordError(MALFORMED, f"eval_info has no {key!r}")
    return {"ImageDesc": info["ImageDesc"], "EvalHelp": info["EvalHelp"], "location": location}


def convert(label: str, record: Any, ctx: ImportContext) -> Converted:
    """Convert one PCogAlignBench record into one dialogue sample.

    Args:
        label: The record's position (for reports only).
        record: The parsed record.
        ctx: Images root and split.

    Returns:
        One ``dialogue`` draft keyed by the record's ``id`` when it has one, else by its image path.

    Raises:
        RecordError: On a malformed record, a role set entry that is not a role name, or a missing or
            undecodable image.
    """
    role_set = _role_set(record)
    query = require(record, "query", str)
    reference = require(record, "golden_response", str)
    if not query.strip() or not reference.strip():
        raise RecordError(MALFORMED, "record['query'] or record['golden_response'] is empty")
    if count_placeholders(query) > 1:
        raise RecordError(MALFORMED, "record['query'] holds more than one <image> placeholder")
    file_path = require(require(record, "image", dict), "file_path", str, where="image")
    source_id = source_id_of(record) if "id" in record else file_path
    facts = {**_eval_info(record), "role_set": role_set}
    image = read_image(ctx.images_root, file_path)
    meta = {
        "messages": [
            {"role": "system", "content": system_prompt(role_set)},
            {"role": "user", "content": image_content(query)},
        ],
        "reference": reference,
        "role_set": role_set,
        "task": "pcogalign",
        "split": ctx.split,
        "facts": facts,
    }
    return Converted(source_id, [Draft("dialogue", "", meta, image)])
