"""Fixture builders: fake records of each format and tiny images written into a temporary directory."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from latent_mca import cli


def image_bytes(fmt: str = "PNG", seed: int = 0, size: int = 28) -> bytes:
    """Encoded bytes of a small noise image (noise, so truncation cuts into pixel data)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_file(root: Path, relative: str, data: bytes) -> bytes:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def write_records(path: Path, records: list[Any], jsonl: bool = False, extra_lines: tuple[str, ...] = ()) -> Path:
    """Write records as a JSON array, or as JSONL with optional raw (e.g. broken) lines appended."""
    if jsonl:
        lines = [json.dumps(r) for r in records] + list(extra_lines)
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def authors_mm(rid: str, image: str, user: str = "<image>\nWhat is shown?", answer: str = "A red square.",
               system: str | None = "You are a helpful assistant.") -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": rid, "images": [image], "messages": messages, "instance_type": "mm_conversation"}


def authors_text(rid: str, text: str = "Some text.", none_image: bool = False) -> dict[str, Any]:
    record = {"id": rid, "messages": [{"role": "system", "content": ""},
                                      {"role": "user", "content": "The following is a text."},
                                      {"role": "assistant", "content": text}], "instance_type": "General"}
    if none_image:
        record["images"] = ["None"]
    return record


PROFILE = {"introduction": "Alice is a painter.", "personality": "Curious and warm.",
           "experience": "Studied in Paris.", "relationship": "Friend of Bob.", "catchphrase": "Colours sing!"}


def mmrole_record(rid: str, image: str, turns: list[tuple[str, str]], role: str = "Alice",
                  profiles: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": rid, "image_path": image,
        "conversations": [{"role": r, "content": c} for r, c in turns],
        "original_roles": ["human" if r == "user" else role for r, _ in turns],
        "character_role": role,
        "character_profile": {role: PROFILE} if profiles is None else profiles,
    }


ROLE_SET = {"school": "Teacher", "home": "Parent"}


def pcog_record(image: str, query: str = "What should I do now?", golden: str = "Take a break.",
                role_set: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "individual_RoleSet": dict(ROLE_SET) if role_set is None else role_set,
        "query": query, "golden_response": golden, "image": {"file_path": image},
        "eval_info": {"ImageDesc": "A messy desk.", "EvalHelp": "Be kind and practical.", "location": "school"},
        **extra,
    }


def run_shards(*args: str) -> dict[str, Any]:
    """Call the importer through the real command line entry point."""
    return cli.main(["shards", *args])


def read_samples(kind_dir: Path) -> list[dict[str, Any]]:
    """All samples of a kind directory (shards listed in sizes.json, in order), json decoded."""
    import webdataset as wds

    sizes = json.loads((kind_dir / "sizes.json").read_text())
    urls = [str(kind_dir / name) for name in sorted(sizes)]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        sample = dict(sample)
        sample["json"] = json.loads(sample["json"])
        samples.append(sample)
    return samples


def tar_counts(kind_dir: Path) -> dict[str, int]:
    """Shard name -> number of samples (distinct keys), counted from the tar members themselves."""
    counts = {}
    for path in sorted(kind_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            counts[path.name] = len({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return counts
