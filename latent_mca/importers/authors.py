"""The authors' pretraining release format -> paired and text-only samples.

A record is ``{"id", "images": [one path relative to the images root], "messages": [{"role", "content"}],
"instance_type"}``. Text-only records have no ``images`` key (or ``["None"]``, as the authors' loader
writes). A user turn may hold a literal ``<image>`` placeholder: it is removed and the image item is put
where it was; without one, the image item opens the first user turn (as ``trl`` does for these records).
"""

from __future__ import annotations

from typing import Any

from latent_mca.importers.common import (
    MALFORMED,
    MULTIPLE_IMAGES,
    NO_ASSISTANT_TURN,
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

#: Roles a message of this format may have.
ROLES = ("system", "user", "assistant")
#: The authors' loader writes this as the image list of text-only records.
_NO_IMAGE = "None"


def image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths; empty for a text-only record.

    Raises:
        RecordError: If ``images`` is not a list of strings.
    """
    images = record.get("images")
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(MALFORMED, "record['images'] must be a list of path strings")
    return [p for p in images if p and p != _NO_IMAGE]


def checked_messages(record: dict[str, Any], roles: tuple[str, ...] = ROLES) -> list[dict[str, str]]:
    """The record's messages after checking roles, content types and that an assistant turn exists.

    Raises:
        RecordError: ``malformed_record``, ``unknown_role`` or ``no_assistant_turn``.
    """
    messages = require(record, "messages", list)
    if not messages:
        raise RecordError(MALFORMED, "record['messages'] is empty")
    for i, message in enumerate(messages):
        role = require(message, "role", str, where=f"messages[{i}]")
        require(message, "content", str, where=f"messages[{i}]")
        if role not in roles:
            raise RecordError(UNKNOWN_ROLE, f"messages[{i}] has role {role!r}; expected one of {', '.join(roles)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(NO_ASSISTANT_TURN, "the record has no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def attach_image(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Messages with structured content on the user turn that carries the (single) image.

    Raises:
        RecordError: If a placeholder sits outside a user turn, there is more than one placeholder, or
            there is no user turn to carry the image.
    """
    counts = [count_placeholders(m["content"]) for m in messages]
    misplaced = [i for i, (m, n) in enumerate(zip(messages, counts)) if n and m["role"] != "user"]
    if misplaced:
        raise RecordError(MALFORMED, f"messages[{misplaced[0]}] ({messages[misplaced[0]]['role']}) holds an "
                                     "<image> placeholder; only user turns may")
    if sum(counts) > 1:
        raise RecordError(MALFORMED, f"{sum(counts)} <image> placeholders for one image")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise RecordError(MALFORMED, "the record has an image but no user turn to show it in")
    target = next((i for i, n in enumerate(counts) if n), users[0])
    out: list[dict[str, Any]] = [dict(m) for m in messages]
    out[target]["content"] = image_content(messages[target]["content"])
    return out


def convert(label: str, record: Any, ctx: ImportContext) -> Converted:
    """Convert one authors'-format record into a paired or a text-only sample.

    Args:
        label: The record's position (for reports only).
        record: The parsed record.
        ctx: Images root and split.

    Returns:
        One ``paired`` draft (image bytes + messages) or one ``text_only`` draft.

    Raises:
        RecordError: On a malformed record, an unknown role, a missing assistant turn, a misplaced
            placeholder, several images, or a missing or undecodable image.
    """
    source_id = source_id_of(record)
    paths = image_paths(record)
    messages = checked_messages(record)
    source = record.get("instance_type")
    source = source if isinstance(source, str) and source else "authors"
    if len(paths) > 1:
        raise RecordError(MULTIPLE_IMAGES, f"{len(paths)} images; samples hold one image each")
    if not paths:
        if any(count_placeholders(m["content"]) for m in messages):
            raise RecordError(MALFORMED, "an <image> placeholder in a record without images")
        return Converted(source_id, [Draft("text_only", "", {"source": source, "messages": messages})])
    structured = attach_image(messages)
    image = read_image(ctx.images_root, paths[0])
    return Converted(source_id, [Draft("paired", "", {"source": source, "messages": structured}, image)])
